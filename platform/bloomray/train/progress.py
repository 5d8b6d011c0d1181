"""The run's checkpoint index, ``OUTPUT/logs/checkpoints.json``: what Ray Train has registered.

A checkpoint directory on storage is not yet a checkpoint a restart resumes from: Ray Train
registers it when its controller processes the report. :class:`CheckpointIndex`, a Ray Train
``UserCallback``, runs on the controller right after that registration (Ray calls its
checkpoint manager first) and rewrites the index atomically, so a watcher (a dashboard, a fault
test, the scale check) learns the newest resumable step through a public API instead of Ray's
private files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from bloomray.files import atomic_write_text

INDEX_FILE = "checkpoints.json"
PROGRESS_FILE = "progress.txt"


def append_progress(log_dir: str | Path, line: str) -> None:
    """Append one progress line (rank 0, each log step) to ``log_dir/progress.txt``."""
    path = Path(log_dir) / PROGRESS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(line + "\n")


def index_path(out: Path) -> Path:
    return out / "logs" / INDEX_FILE


class CheckpointIndex(UserCallback):
    """Appends ``{"step", "path", "time"}`` to the index for every registered checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        step = int((metrics[0] if metrics else {}).get("step", 0))
        entries = registered_checkpoints_at(Path(self.path))
        entries.append({"step": step, "path": checkpoint.path, "time": time.time()})
        # readers never see a half-written index
        atomic_write_text(self.path, json.dumps({"registered": entries}, indent=2))


def registered_checkpoints_at(path: Path) -> list[dict[str, Any]]:
    """The index's entries, oldest first; [] when there is none yet."""
    try:
        return list(json.loads(path.read_text())["registered"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def latest_registered_step(out: str | Path) -> int:
    """The step of the newest checkpoint Ray Train registered for the run in ``out`` (0: none)."""
    entries = registered_checkpoints_at(index_path(Path(out)))
    return max((int(e["step"]) for e in entries), default=0)
