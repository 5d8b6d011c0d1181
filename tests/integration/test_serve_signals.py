"""``bloomray serve`` stops cleanly on SIGTERM and Ctrl-C: exit 0, Serve and Ray shut down.

The CLI runs as a subprocess with its own local Ray (RAY_ADDRESS unset: never the test Ray;
``ray.init`` picks free ports, so it starts beside a running test Ray), serving a tiny
classifier export (no vLLM engine to wait for) over real HTTP. A signal is sent once the CLI
printed its "listening" line (``serve_forever`` owns SIGINT/SIGTERM from then on), and once
during the start-up: Ray's core worker installs a C++ SIGTERM handler that printed
"*** SIGTERM received ***" and aborted (exit -6), so the CLI turns SIGTERM into Ctrl-C until then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from serve_helpers import KEY, make_tiny_dir

from bloomray.raycluster import free_port

pytestmark = pytest.mark.integration
CLI = Path(sys.executable).with_name("bloomray")
# What a crash, an unhandled signal or Ray's C++ signal handler leaves on stderr.
DIRTY = ("Traceback (most recent call last)", "*** SIG", "received at time=", "Fatal Python error")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return make_tiny_dir(tmp_path_factory.mktemp("models") / "clf", task="classification")


class Serving:
    """``bloomray serve --model DIR`` in its own session (its process group is what a terminal's
    Ctrl-C reaches), stdout and stderr read by threads."""

    def __init__(self, model: Path, tmp: Path) -> None:
        keys = tmp / "api_keys"
        keys.write_text(KEY + "\n")
        keys.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BLOOMRAY_API_KEYS")}
        env.update(BLOOMRAY_API_KEYS_FILE=str(keys), HF_HUB_OFFLINE="1")
        self.port = free_port()
        cmd = [str(CLI), "serve", "--model", str(model), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=lambda f=f, buf=buf: buf.extend(f), daemon=True)
            for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._readers:
            t.start()

    def wait_listening(self, timeout: float = 300) -> None:
        """Until /healthz answers 200 and the CLI said it is listening (fails with stderr's tail)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                healthy = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and any("[serve] listening on" in line for line in self.out):
                return
            time.sleep(0.5)
        self.proc.kill()
        pytest.fail(f"bloomray serve did not come up (rc {self.proc.poll()}):\n{''.join(self.err)[-3000:]}")

    def wait_stderr(self, text: str, timeout: float = 300) -> None:
        """Until TEXT is on stderr (fails with stderr's tail if the CLI exits or times out)."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.err):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                for t in self._readers:
                    t.join(timeout=10)
                pytest.fail(f"no {text!r} on stderr (rc {self.proc.poll()}):\n{''.join(self.err)[-3000:]}")
            time.sleep(0.05)

    def stop(self, sig: int, group: bool, timeout: float = 60) -> tuple[int, str, str]:
        """Send SIG (to the process group, as Ctrl-C does, if GROUP); (exit code, stdout, stderr)."""
        os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        for t in self._readers:
            t.join(timeout=10)
        return code, "".join(self.out), "".join(self.err)


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return out


def assert_clean(err: str, ray_procs: list[psutil.Process]) -> None:
    """No crash or signal dump on stderr, and every Ray process of the CLI gone."""
    dirty = [line for line in err.splitlines() if any(mark in line for mark in DIRTY)]
    assert not dirty, "\n".join(dirty)
    deadline = time.monotonic() + 10  # children reparented at exit finish their own teardown
    while _alive(ray_procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(ray_procs), f"left running after exit: {_alive(ray_procs)}"


def test_serve_exits_0_on_ctrl_c_to_its_group_and_shuts_ray_down(classifier, tmp_path):
    """Ctrl-C reaches the CLI and every Ray process of its group at once. SIGTERM to the CLI
    alone takes the same handler (``serve_forever`` sets one for both); SIGTERM is tested
    during the start-up below, where the CLI handles it apart (each case starts its own Ray,
    ~100 s on 2 busy cores, so the fourth combination is left out)."""
    server = Serving(classifier, tmp_path)
    server.wait_listening()
    ray_procs = psutil.Process(server.proc.pid).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in ray_procs)
    assert "raylet" in names and "ServeController" in names, names  # its own Ray, with Serve
    code, out, err = server.stop(signal.SIGINT, group=True)
    assert code == 0, f"exit code {code}:\n{err[-3000:]}"
    assert "[serve] shutting down" in out
    assert_clean(err, ray_procs)


def test_sigterm_during_start_up_interrupts_it_cleanly(classifier, tmp_path):
    server = Serving(classifier, tmp_path)
    server.wait_stderr('Started Serve in namespace "serve"')  # Ray up, the app still deploying
    ray_procs = psutil.Process(server.proc.pid).children(recursive=True)
    code, out, err = server.stop(signal.SIGTERM, group=False)
    assert code == 130, f"exit code {code}:\n{err[-3000:]}"
    assert "bloomray: interrupted" in err and "[serve] listening" not in out
    assert_clean(err, ray_procs)
