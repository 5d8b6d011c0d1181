"""Connecting to Ray: a local instance on one box, or an existing cluster by address."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import ray


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Env vars every training worker needs (DeepSpeed picks its accelerator from it)."""
    return {
        "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        "TOKENIZERS_PARALLELISM": "false",
    }


# Set (to 1) by `bloomray demo` without -v: Ray's own log lines (workers, actors, Tune's
# tables) stay in Ray's log files instead of the console; bloomray prints its own progress.
QUIET_ENV = "BLOOMRAY_QUIET"


# Ray Serve's throughput settings (read by the Serve controller, proxy and replicas when they
# start, so they must be in the environment of every Ray node): gRPC between the proxy and the
# replicas and between deployments, user code and routing on the replica's event loop, Serve
# logs to files only. Measured on 2 cores (benchmarks/serve_throughput.py): +22% tokens/s at
# concurrency 16 for the streamed path. Direct ingress (replicas serving HTTP on their own
# ports behind HAProxy) stays off: bloomray serves through Serve's proxy on one port.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def apply_serve_env() -> None:
    """Put :data:`SERVE_ENV` in this process's environment (a user's own values win), before a
    local Ray starts: its nodes, and so every Serve process, inherit it."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


def quiet() -> bool:
    """Whether Ray's own output is kept off the console (see ``QUIET_ENV``)."""
    return os.environ.get(QUIET_ENV, "0") == "1"


# Ray reads this to find the dashboard for its State API (Train V2's controller polls it). With
# no address Ray searches the box for a GCS and fails if two local Rays run (two bloomray jobs
# on one box, or a test run beside another), so a local Ray started here names its own.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def own_api_server(port: int) -> Iterator[None]:
    """While a local Ray starts: its nodes (and so every worker and actor) inherit
    ``RAY_API_SERVER_ADDRESS`` of the dashboard on PORT; this process's own environment is
    restored afterwards, so its subprocesses that start their own Ray do not inherit it."""
    old = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = old


# What ``ray.init`` raises when the local node it started never registered. On a saturated
# box the usual cause is Ray's raylet aborting after a fixed 15 s wait for its dashboard agent's
# port files (raylet.err: "WaitForDashboardAgentPorts", ray-project/ray#65983); the agent is
# just slow to import, and a second start finds it warm.
NODE_START_TIMEOUT = "timed out during startup"
LOCAL_RAY_ATTEMPTS = 2
log = logging.getLogger(__name__)


def start_local_ray(**kwargs: Any) -> None:
    """``ray.init`` of a new local Ray with the Serve settings and its own State API address.

    Always a new one (``address="local"``): without an address ``ray.init`` would join any
    Ray another process on this machine started (``ray start``, a test cluster) and then
    refuse ``num_cpus``. A node that timed out during start-up (see ``NODE_START_TIMEOUT``)
    is killed and started once more; any other error is raised at once."""
    kwargs.setdefault("address", "local")
    apply_serve_env()  # a cluster's nodes get SERVE_ENV from its config (cluster.yaml, deploy/)
    fixed_port = "dashboard_port" in kwargs
    for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
        port = kwargs["dashboard_port"] if fixed_port else free_port()
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            with own_api_server(port):
                ray.init(**{**kwargs, "dashboard_port": port})
            return
        except Exception as e:
            if attempt == LOCAL_RAY_ATTEMPTS or NODE_START_TIMEOUT not in str(e):
                raise
            _kill_new_children(before)
            log.warning(
                "the local Ray node did not come up (%s); its processes are stopped and it is "
                "started once more (see /tmp/ray/session_latest/logs/raylet.err)",
                e,
            )


def _kill_new_children(before: set[int]) -> None:
    """SIGKILL this process's descendants not in BEFORE (a half-started node) and reap them."""
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for proc in new:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(new, timeout=10)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join the configured cluster, or start a local Ray; no-op if already connected.

    ``address`` (or ``RAY_ADDRESS``) joins a cluster; token auth stays on, so the client
    needs the cluster's token (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).
    ``num_cpus`` oversubscribes a small box so trainer, trials and workers all fit.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    if quiet():  # worker and actor output stays in /tmp/ray/session_latest/logs
        kwargs = {"log_to_driver": False, "logging_level": logging.WARNING, **kwargs}
    if address:
        ray.init(address=address, **kwargs)
    else:
        start_local_ray(num_cpus=num_cpus or max(4, os.cpu_count() or 1), **kwargs)


def train_worker_processes() -> list[psutil.Process]:
    """The Ray Train worker processes of the local Ray this process started (its descendants),
    in psutil's order; for tests and benchmarks that watch or kill them."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.Error:  # a process that just exited, or one we may not inspect
            pass
    return found


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def outside_placement_group() -> Any:
    """A scheduling strategy that takes a task out of its caller's placement group.

    Ray schedules a task started inside a placement group (a Tune trial's holds only the
    trial's own 0.5 CPU) into that group, where a task asking for more never fits; with this
    it gets what it asks for from the cluster.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)
