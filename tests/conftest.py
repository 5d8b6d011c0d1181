"""Shared fixtures: one local Ray per test session, tiny data made on the fly.

Tests never need the network or ../shared: HF_HUB_OFFLINE makes a hub name fail at once.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray Train's controller polls its workers every 2 s by default, so each run ends up to ~5 s
# after its last step; the tests' runs are seconds long. Measured on this box: 30 -> 26 s for a
# tiny 8-step run. Set before the test Ray starts: its raylet hands it to every controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import pytest  # noqa: E402

# Logical CPUs for the shared test Ray: oversubscribed so a Tune driver, trials and two
# train workers fit on a 2-core box.
TEST_RAY_CPUS = 8


def ensure_local_ray() -> None:
    """Start the shared local Ray if it is not running (a multi-node test may stop it)."""
    import ray

    if not ray.is_initialized():
        from bloomray.raycluster import start_local_ray

        # As every local Ray bloomray starts: the Serve settings, and its own State API address
        # (pytest-xdist runs one test Ray per worker on the same box). Metrics reach Ray's
        # Prometheus endpoint every second, so tests can scrape them.
        start_local_ray(
            num_cpus=TEST_RAY_CPUS,
            log_to_driver=True,
            _system_config={"metrics_report_interval_ms": 1000},
        )


# The slowest files (seconds in a full `make test`, AVX2-only 2-core box, 2026-12-07), run
# first: `make test` hands whole files to two pytest-xdist workers in collection order
# (--no-loadscope-reorder), so the long ones start early and the many short ones fill in at
# the end; the rest keep their order.
SLOWEST_FIRST = (
    "test_serve.py",  # 585
    "test_tune.py",  # 458
    "test_elastic_resume.py",  # 298
    "test_big_vocab.py",  # 286
    "test_distill_recovery.py",  # 267
    "test_sft.py",  # 263
    "test_fault_tolerance.py",  # 251
    "test_serve_signals.py",  # 185
    "test_prune_train.py",  # 166
    "test_resume_contract.py",  # 139
    "test_s3_storage.py",  # 128
    "test_finetune.py",  # ~100 (132 before its LoRA base became a saved dir)
    "test_quantize_vllm.py",  # 101
    "test_vllm_models.py",  # 78
    "test_pretrain.py",  # 64
    "test_checkpoint_state.py",  # 33
    "test_rayservice_serve_build.py",  # 29
    "test_engine_latency.py",  # 26
)


def pytest_collection_modifyitems(config, items):
    """The slowest files first (see SLOWEST_FIRST); tests marked ``gpu`` skip cleanly (with the
    reason) where no CUDA device is present."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))  # stable
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A running local Ray, shared by every test of the session (restarted if a test stopped it)."""
    ensure_local_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
