"""Training progress as Prometheus gauges through Ray's metrics API, for alerts and dashboards.

Rank 0 calls :func:`export_step` at every log interval; Ray's metrics endpoint serves the
gauges with a ``ray_`` prefix (``ray_bloomray_train_loss{run="..."}``), next to Ray Serve's
and vLLM's. ``deploy/monitoring/`` alerts on them (training stalled, loss not finite) and
its test reads the names below from this file, so keep them literal.

A NaN or infinite loss is still set on ``bloomray_train_loss``, and
``bloomray_train_loss_nonfinite`` turns 1, so the alert does not depend on how an exporter
writes NaN.
"""

from __future__ import annotations

import math
import time
from functools import cache
from typing import Any

from ray.util import metrics

_TAGS = ("run",)


@cache
def _gauges() -> dict[str, metrics.Gauge]:
    """Made on first use, once per worker process."""
    return {
        "step": metrics.Gauge("bloomray_train_step", "optimizer steps done", tag_keys=_TAGS),
        "total": metrics.Gauge(
            "bloomray_train_total_steps", "optimizer steps the run is planned for", tag_keys=_TAGS
        ),
        "loss": metrics.Gauge(
            "bloomray_train_loss", "training loss averaged over ranks since the last log step", tag_keys=_TAGS
        ),
        "nonfinite": metrics.Gauge(
            "bloomray_train_loss_nonfinite", "1 when the last logged loss was NaN or infinite", tag_keys=_TAGS
        ),
        "tokens": metrics.Gauge(
            "bloomray_train_tokens_per_second",
            "training tokens/s, all workers, last interval",
            tag_keys=_TAGS,
        ),
        "mfu": metrics.Gauge("bloomray_train_mfu", "model FLOPs utilization (0-1)", tag_keys=_TAGS),
        "time": metrics.Gauge(
            "bloomray_train_last_step_timestamp_seconds",
            "Unix time of the last logged step (a stalled run stops moving it)",
            tag_keys=_TAGS,
        ),
    }


def export_step(run: str, step_metrics: dict[str, Any], total_steps: int) -> None:
    """Set the run's gauges from one log interval's metrics (``loop._step_metrics``'s dict)."""
    loss = float(step_metrics["train_loss"])
    values = {
        "step": float(step_metrics["step"]),
        "total": float(total_steps),
        "loss": loss,
        "nonfinite": 0.0 if math.isfinite(loss) else 1.0,
        "tokens": float(step_metrics["tokens_per_s"]),
        "mfu": float(step_metrics["mfu"]),
        "time": time.time(),
    }
    gauges = _gauges()
    for key, value in values.items():
        gauges[key].set(value, tags={"run": run})
