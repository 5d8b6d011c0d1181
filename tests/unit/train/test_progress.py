"""The checkpoint index that Ray Train's controller writes through a UserCallback."""

from __future__ import annotations

import json
from pathlib import Path

from ray.train import Checkpoint

from bloomray.train.progress import CheckpointIndex, index_path, latest_registered_step


def test_index_lists_every_registered_checkpoint_and_the_newest_step(tmp_path: Path):
    out = tmp_path / "run"
    assert latest_registered_step(out) == 0  # nothing registered yet
    index = CheckpointIndex(index_path(out))
    index.after_report(None, [{"step": 5, "loss": 1.0}, {"step": 5}], Checkpoint(str(tmp_path / "c0")))
    index.after_report(None, [{"step": 7}], None)  # a report without a checkpoint
    index.after_report(None, [{"step": 10}], Checkpoint(str(tmp_path / "c1")))
    entries = json.loads(index_path(out).read_text())["registered"]
    assert [(e["step"], e["path"]) for e in entries] == [
        (5, str(tmp_path / "c0")),
        (10, str(tmp_path / "c1")),
    ]
    assert latest_registered_step(out) == 10
    assert sorted(p.name for p in index_path(out).parent.iterdir()) == ["checkpoints.json"]  # no temp left


def test_a_damaged_index_reads_as_nothing_registered(tmp_path: Path):
    index_path(tmp_path).parent.mkdir(parents=True)
    index_path(tmp_path).write_text('{"registered": [')
    assert latest_registered_step(tmp_path) == 0
