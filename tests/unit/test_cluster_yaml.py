"""cluster.yaml is a usable Ray cluster launcher config."""

from pathlib import Path

import yaml

from bloomray.config import resolve_preset
from bloomray.raycluster import SERVE_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_parses_and_has_gpu_workers_and_setup():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    # At least one GPU worker can be launched, within the cluster-wide cap.
    assert gpu and gpu[0]["min_workers"] <= gpu[0]["max_workers"] and 1 <= gpu[0]["max_workers"]
    assert gpu[0]["max_workers"] <= cfg["max_workers"]
    assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0  # no training scheduled on the head
    setup = "\n".join(cfg["setup_commands"])
    # torch is installed explicitly before bloomray, then bloomray itself.
    assert setup.index("torch==") < setup.index("-e ~/bloomray")
    assert "/mnt/shared" in setup
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    # Token auth is set explicitly on every node (Ray 2.60 defaults it on only for local clusters).
    starts = [
        c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c
    ]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token " in c for c in starts), starts
    # Ray Serve's throughput settings reach every Serve process, on any node.
    for key, value in SERVE_ENV.items():
        assert all(f"{key}={value} " in c for c in starts), (key, starts)


def test_gpu_presets_point_checkpoints_at_shared_storage():
    for name in ("bloom-560m-zero2", "bloom-1b7-zero2", "bloom-7b1-zero3"):
        cfg = yaml.safe_load(resolve_preset(name).read_text())
        assert cfg["output"]["storage_path"].startswith("/mnt/shared"), name
        assert cfg["scaling"]["use_gpu"] is True
