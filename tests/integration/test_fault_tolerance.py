"""Recovery: a SIGKILLed worker, and a lost node of a two-node cluster with shared storage."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bloomray.config import load_config
from bloomray.export.run import run_training
from bloomray.raycluster import train_worker_processes
from bloomray.train.progress import latest_registered_step

pytestmark = pytest.mark.integration

STEPS = 40  # the fault comes once the step-10 checkpoint is registered: 30 steps left to recover in
FAST_CKPT = [
    "model.preset=tiny",
    "data.tokenizer.vocab_size=1024",
    "data.block_size=64",
    f"train.max_steps={STEPS}",
    "train.log_every=5",
    f"train.eval_every={STEPS}",
    "train.eval_max_batches=2",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=3",
    "train.max_failures=2",
    "output.export=false",
]


def _start(cfg: Any, out: Path) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["summary"] = run_training(cfg, out)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for_checkpoint(out: Path, box: dict[str, Any], min_step: int, timeout: float = 240) -> int:
    """The newest checkpoint step Ray Train has registered (so a restart resumes from it), once
    it reaches ``min_step``; a checkpoint dir on storage alone is not one yet."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "error" in box or "summary" in box:
            pytest.fail(f"run ended before the fault was injected: {box}")
        step = latest_registered_step(out)
        if step >= min_step:
            return step
        time.sleep(0.2)
    pytest.fail("no checkpoint appeared in time")


def _finish(thread: threading.Thread, box: dict[str, Any], timeout: float = 400) -> dict[str, Any]:
    thread.join(timeout)
    assert not thread.is_alive(), "training did not finish after the fault"
    if "error" in box:
        raise box["error"]
    return box["summary"]


def test_sigkill_worker_resumes_from_last_checkpoint(tmp_path, ray_local):
    cfg = load_config("tiny-cpu", FAST_CKPT)
    out = tmp_path / "run"
    thread, box = _start(cfg, out)
    _wait_for_checkpoint(out, box, min_step=10)
    pids = [p.pid for p in train_worker_processes()]
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    saved_at_kill = latest_registered_step(out)

    summary = _finish(thread, box)
    assert summary["steps"] == STEPS
    assert len(summary["restarts"]) == 1
    # Resumed from the newest checkpoint there was: at most one interval of steps lost.
    assert summary["restarts"][0] >= saved_at_kill
    # the untrained baseline of step 0 survives the restart (the new attempt never evaluated it)
    assert summary["initial_eval_loss"] > summary["eval_loss"]


def test_two_node_cluster_recovers_from_node_loss(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from bloomray.raycluster import free_port, own_api_server

    ray.shutdown()  # leave the shared local Ray; ray_local restarts it for later modules
    port = free_port()  # not Ray's default 8265, which another Ray on the box may hold
    with own_api_server(port):  # its nodes' workers find this cluster's State API, not another's
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": port})
        worker_node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    shared = tmp_path / "shared-storage"  # what NFS/S3 is on a real cluster
    try:
        cfg = load_config(
            "tiny-cpu", [*FAST_CKPT, "scaling.placement_strategy=SPREAD", f"output.storage_path={shared}"]
        )
        out = tmp_path / "run"
        thread, box = _start(cfg, out)
        _wait_for_checkpoint(out, box, min_step=10)
        nodes_used = {
            node
            for pg in ray.util.placement_group_table().values()
            if pg["state"] == "CREATED"
            for node in pg["bundles_to_node_id"].values()
        }
        assert len(nodes_used) == 2, "workers should span both nodes (each reads its data shard remotely)"
        cluster.remove_node(worker_node)  # the node dies with its worker
        saved_at_loss = latest_registered_step(out)

        summary = _finish(thread, box)
        assert summary["steps"] == STEPS
        assert summary["restarts"] and summary["restarts"][0] >= saved_at_loss
        assert Path(summary["checkpoint"]).is_relative_to(shared)
    finally:
        ray.shutdown()
        cluster.shutdown()
