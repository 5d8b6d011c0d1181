"""The results of a finished search: trials.csv, the measured exports, the front, the winner.

``driver.run_tune`` calls :func:`summarize` once Tune is done (and again on ``--resume``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from bloomray.config import Config
from bloomray.files import atomic_dir, atomic_write_text
from bloomray.tune.objectives import pareto_rows, size_mb
from bloomray.tune.select import Candidate, choose_winner, pareto_front

FINAL_KEY = "bloomray_final"


def collect_rows(cfg: Config, out: Path) -> list[dict[str, Any]]:
    """One row per trial from Tune's saved state: config, status, attempts, metrics."""
    analysis = tune.ExperimentAnalysis(str(out / "tune"))
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        finished = last.get(FINAL_KEY) == 1
        attempts_file = out / "trials" / trial.trial_id / "attempts"
        row: dict[str, Any] = {
            "trial_id": trial.trial_id,
            "status": "COMPLETED" if finished else ("ERROR" if trial.status == "ERROR" else "STOPPED_EARLY"),
            "attempts": int(attempts_file.read_text()) if attempts_file.exists() else trial.num_failures + 1,
            "error": _first_error_line(trial) if trial.status == "ERROR" else "",
        }
        row.update({k: trial.config.get(k) for k in cfg.tune.space})
        for key in (
            "steps",
            "train_loss",
            "eval_loss",
            "eval_perplexity",
            "eval_accuracy",
            "eval_macro_f1",
            "sparsity",
            "tokens_per_s",
        ):
            row[key] = last.get(key)
        if cfg.tune.objectives:  # what the trial measured for the sampler (summarize re-measures)
            row["trial_latency_ms"] = last.get("latency_ms")
            for key in ("size_mb", "decode_ms", "decode_rel"):
                row[key] = last.get(key)
        row["model_dir"] = last.get("model_dir", "") if finished else ""
        rows.append(row)
    return rows


_WRAPPERS = ("WorkerGroupError", "TrainingFailedError", "TrainingError", "RayTaskError", "TuneError")


def _first_error_line(trial: Any) -> str:
    """The root cause of a trial's failure: the innermost exception line of its error file."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        return "error (no error file)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception): ", ln)]
    causes = [ln for ln in raised if not any(w in ln.split(":")[0] for w in _WRAPPERS)]
    pick = causes or raised or lines[-1:] or ["error"]
    return pick[-1][:300]


def measure(cfg: Config, rows: list[dict[str, Any]], rounds: int = 3) -> list[Candidate]:
    """Latency, parameters and size of every finished trial's export, measured here.

    All exports are loaded first, then timed in interleaved rounds (best median per model),
    so a background hiccup cannot single out one trial.
    """
    from bloomray.export.latency import forward_latency_ms
    from bloomray.export.load import load_model
    from bloomray.model.build import count_parameters

    done = [r for r in rows if r["status"] == "COMPLETED" and r["model_dir"]]
    models = {r["trial_id"]: load_model(r["model_dir"]) for r in done}
    best: dict[str, float] = {}
    for _ in range(rounds):
        for tid, model in models.items():
            ms = forward_latency_ms(model, cfg.select.latency_batch, cfg.select.latency_seq)
            best[tid] = min(best.get(tid, ms), ms)
    cands = []
    for row in done:
        row["parameters"] = count_parameters(models[row["trial_id"]])
        row["size_mb"] = size_mb(row["model_dir"])
        row["latency_ms"] = best[row["trial_id"]]
        quality = row[cfg.tune.metric] if cfg.tune.metric == "eval_loss" else 1.0 - row[cfg.tune.metric]
        cands.append(
            Candidate(row["trial_id"], float(quality), row["latency_ms"], float(row["sparsity"] or 0.0), row)
        )
    return cands


def summarize(cfg: Config, out: Path) -> dict[str, Any]:
    """trials.csv, plots, winner/ and summary.json from the finished search."""
    from bloomray.tune.plots import plot_lr_vs_quality, plot_pareto

    rows = collect_rows(cfg, out)
    cands = measure(cfg, rows)
    failed = [r for r in rows if r["status"] == "ERROR"]
    if not cands:  # every trial failed: keep their errors in trials.csv, then say so
        from bloomray.train.run import TrainingError

        write_csv(rows, out / "trials.csv")
        raise TrainingError(
            f"no trial of the search finished ({len(failed)} of {len(rows)} failed); "
            f"their errors are in {out / 'trials.csv'}"
        )
    if cfg.tune.objectives:  # the front over every objective; the winner comes from it
        ids = {r["trial_id"] for r in pareto_rows([c.row for c in cands], list(cfg.tune.objectives))}
        front = sorted((c for c in cands if c.trial_id in ids), key=lambda c: (c.latency_ms, c.quality))
        winner, why = choose_winner(front, cfg.select.max_latency_ms, cfg.select.min_sparsity)
        why += f" among the {len(front)} trials on the Pareto front of {', '.join(cfg.tune.objectives)}"
    else:
        front = pareto_front(cands)
        winner, why = choose_winner(cands, cfg.select.max_latency_ms, cfg.select.min_sparsity)
    for r in rows:
        r["pareto"] = any(c.trial_id == r["trial_id"] for c in front)
        r["winner"] = r["trial_id"] == winner.trial_id
    write_csv(rows, out / "trials.csv")
    quality_name = cfg.tune.metric if cfg.tune.metric == "eval_loss" else f"1 - {cfg.tune.metric}"
    plot_pareto(cands, front, winner, quality_name, out / "pareto.png")
    plot_lr_vs_quality(rows, cfg.tune.metric, out / "lr_vs_quality.png")
    copy_winner(Path(winner.row["model_dir"]), out / "winner", why)
    summary = {
        "winner": {
            k: winner.row.get(k)
            for k in (
                "trial_id",
                *cfg.tune.space,
                cfg.tune.metric,
                "sparsity",
                "parameters",
                "size_mb",
                "latency_ms",
                *(o for o in cfg.tune.objectives if o not in ("size_mb", "latency_ms", "sparsity")),
            )
        },
        "selection": why,
        "winner_dir": str(out / "winner"),
        "trials": len(rows),
        "completed": len(cands),
        "stopped_early": sum(r["status"] == "STOPPED_EARLY" for r in rows),
        "failed": [
            {"trial_id": r["trial_id"], "attempts": r["attempts"], "error": r["error"]} for r in failed
        ],
        "pareto_front": [c.trial_id for c in front],
        "objectives": list(cfg.tune.objectives) or [cfg.tune.metric, "latency_ms"],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def copy_winner(src: Path, dst: Path, why: str) -> None:
    """Copy the winning export to ``dst`` atomically and note why it won in its card."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        card = tmp / "README.md"
        card.write_text(card.read_text() + f"\n## Selected by bloomray tune\n{why}; from `{src}`.\n")
