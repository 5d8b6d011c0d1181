"""A training job as ``bloomray train`` runs it: train, write the summary, export the model.

The stages it joins live below it: ``train/run.py`` (data, plan, Ray Train) and
``export/consolidate.py`` (the checkpoint to a model dir). Tune trials run the same job on
data the search prepared once (:func:`train_prepared`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bloomray.config import Config, check_trainable
from bloomray.data.prepare import PreparedData
from bloomray.export.consolidate import export_checkpoint
from bloomray.files import atomic_write_text
from bloomray.prune.initial import FACTS_FILE
from bloomray.train.checkpoint import META_FILE, local_checkpoint_dir
from bloomray.train.run import RunPlan, fit, start_run, summarize

ONESHOT_SUMMARY = (
    "method",
    "pattern",
    "sparsity",
    "calibration_samples",
    "eval_loss_before",
    "eval_loss_after",
)


def run_training(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into ``output_dir``; return the summary (also in summary.json).

    Raises:
        ConfigError / DataError: bad settings or data, before any worker starts.
        TrainingError: the run failed after ``train.max_failures`` retries.
        ExportError: the final checkpoint could not be exported.
    """
    check_trainable(cfg)
    out, data, tokenizer_dir, plan = start_run(cfg, output_dir, resume)
    return train_prepared(cfg, out, data, tokenizer_dir, plan=plan)


def train_prepared(
    cfg: Config,
    out: Path,
    data: PreparedData,
    tokenizer_dir: Path,
    callbacks: list[Any] | None = None,
    plan: RunPlan | None = None,
) -> dict[str, Any]:
    """:func:`bloomray.train.run.fit`, then the summary and the export (Ray already up)."""
    checkpoint, source = fit(cfg, out, data, tokenizer_dir, callbacks, plan)
    # Without an export the summary needs only the checkpoint's metadata file.
    with local_checkpoint_dir(checkpoint, None if cfg.output.export else [META_FILE]) as local_dir:
        return finish_run(out, local_dir, cfg.output.export, source=source)


def finish_run(
    out: Path, checkpoint_path: str | Path, export: bool, source: str | None = None
) -> dict[str, Any]:
    """Write summary.json from the final checkpoint, and export the model to ``OUTPUT/model``.

    Args:
        checkpoint_path: the final checkpoint as a local dir (a download of a remote one).
        source: where that checkpoint lives when it is not ``checkpoint_path`` (a URI); the
            summary and the model card name it.
    """
    source = source or str(checkpoint_path)
    summary = summarize(checkpoint_path, source)
    shot = out / "oneshot" / FACTS_FILE  # wanda/sparsegpt: the run's one-shot initial masks
    if shot.is_file():
        facts = json.loads(shot.read_text())
        summary["initial_oneshot"] = {k: facts[k] for k in ONESHOT_SUMMARY if k in facts}
    if export:
        info = export_checkpoint(checkpoint_path, out / "model", overwrite=True, source=source)
        summary["model_dir"] = str(out / "model")
        summary["export_max_abs_logit_diff"] = info.get("max_abs_logit_diff")
        summary["export"] = {k: v for k, v in info.items() if k != "checkpoint"}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
