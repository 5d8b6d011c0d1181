"""start_local_ray's one retry of a local node that timed out during start-up (Ray's raylet
aborts when its dashboard agent is slow to report its ports, ray-project/ray#65983).

That failure depends on the box's load and cannot be caused on purpose, so ``ray.init`` is
replaced here: the failing attempt leaves a real child process behind, as a half-started
node does, and the retry must kill it."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

import bloomray.raycluster as rc

TIMEOUT = Exception(
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)


def _fake_init(monkeypatch, errors: list[BaseException | None]) -> tuple[list[dict], list[subprocess.Popen]]:
    calls, leftovers = [], []

    def init(**kwargs):
        calls.append(kwargs)
        error = errors.pop(0)
        if error is not None:
            leftovers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
            raise error

    monkeypatch.setattr(rc.ray, "init", init)
    return calls, leftovers


def test_a_node_start_timeout_is_killed_and_started_once_more(monkeypatch, caplog):
    calls, leftovers = _fake_init(monkeypatch, [TIMEOUT, None])
    rc.start_local_ray(num_cpus=4)
    assert len(calls) == 2
    assert all(c["address"] == "local" and c["num_cpus"] == 4 for c in calls)
    assert calls[0]["dashboard_port"] != calls[1]["dashboard_port"]  # a fresh free port each time
    # killed and reaped before the retry: the half-started node's processes are gone
    assert not psutil.pid_exists(leftovers[0].pid)
    assert "started once more" in caplog.text


def test_a_fixed_dashboard_port_is_kept_on_the_retry(monkeypatch):
    calls, _ = _fake_init(monkeypatch, [TIMEOUT, None])
    rc.start_local_ray(dashboard_port=8266)
    assert [c["dashboard_port"] for c in calls] == [8266, 8266]


def test_other_errors_and_a_second_timeout_are_raised(monkeypatch):
    calls, _ = _fake_init(monkeypatch, [ValueError("num_cpus must be positive")])
    with pytest.raises(ValueError, match="num_cpus"):
        rc.start_local_ray(num_cpus=-1)
    assert len(calls) == 1  # no retry for anything but the start-up timeout

    calls, leftovers = _fake_init(monkeypatch, [TIMEOUT, TIMEOUT])
    with pytest.raises(Exception, match="timed out during startup"):
        rc.start_local_ray()
    assert len(calls) == rc.LOCAL_RAY_ATTEMPTS == 2
    assert not psutil.pid_exists(leftovers[0].pid)
    leftovers[1].kill()
    leftovers[1].wait()
