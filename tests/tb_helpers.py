"""Reading a run's TensorBoard scalars back (every event file of ``OUTPUT/logs/tensorboard``)."""

from __future__ import annotations

from pathlib import Path


def scalars(out: Path, tag: str) -> dict[int, float]:
    """{step: value} of every ``tag`` scalar the run logged (later segments win a repeated step)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    points = {}
    for path in sorted((out / "logs" / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():  # scalars come back as 0-d tensors
            for v in event.summary.value:
                if v.tag == tag:
                    points[event.step] = float(make_ndarray(v.tensor))
    return points
