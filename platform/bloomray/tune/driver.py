"""``bloomray tune``: a Ray Tune search whose trials each drive a Ray Train + DeepSpeed run.

Ray 2.60 runs Train V2, so each trial is a *function* trainable that builds and fits its
own TorchTrainer, forwarding Train's reports to Tune with ``TuneReportCallback`` (what ASHA
stops on). Data is tokenized once, in the driver, and shared by every trial.

Outputs in DIR: ``trials.csv``, ``pareto.png``, ``lr_vs_quality.png``, ``winner/``,
``summary.json``; trial runs in ``DIR/trials/<trial_id>/``; Tune's state in ``DIR/tune/``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from bloomray.config import Config, ConfigError, dump_config, load_config
from bloomray.data.prepare import PreparedData, prepare_data
from bloomray.files import atomic_dir, atomic_write_text
from bloomray.raycluster import init_ray, quiet
from bloomray.train.checkpoint import read_tokenizer_files
from bloomray.tune.select import Candidate, choose_winner, pareto_front
from bloomray.tune.space import check_space, param_space, trial_config

log = logging.getLogger(__name__)
FINAL_KEY = "bloomray_final"


def _trial(
    params: dict[str, Any],
    data: PreparedData,
    tokenizer_files: dict[str, bytes],
    base: dict[str, Any],
    root: str,
) -> None:
    """One trial: train + export with the sampled config, then report the final metrics."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from bloomray.export.run import train_prepared

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params)
    cfg.train.eval_every = cfg.train.log_every  # ASHA needs the metric in every report
    out = Path(root) / "trials" / trial_id
    done = out / "summary.json"  # the trial's last write, after its export
    if done.exists():
        # It finished under a driver that died before Tune saved that (Tune's state saves
        # are 10 s or more apart): on --resume, report that result again, never re-run it.
        summary = json.loads(done.read_text())
    else:
        tok_dir = out / "tokenizer"
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name, blob in tokenizer_files.items():
            (tok_dir / name).write_bytes(blob)
        attempts = out / "attempts"
        attempts.write_text(str(int(attempts.read_text()) + 1 if attempts.exists() else 1))
        dump_config(cfg, out / "config.yaml")
        summary = train_prepared(cfg, out, data, tok_dir, callbacks=[TuneReportCallback()])
    final = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    tune.report({**final, FINAL_KEY: 1, "model_dir": summary.get("model_dir", "")})


class TrialLines(tune.Callback):
    """Quiet mode's console output of a search: one line per trial that ends (Tune's own
    status tables are off)."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        loss = r.get("eval_loss")
        print(
            f"[tune] trial {trial.trial_id} finished: eval loss {'-' if loss is None else f'{loss:.3f}'}, "
            f"sparsity {r.get('sparsity') or 0:.2f}, {r.get('tokens_per_s') or 0:,.0f} tok/s",
            flush=True,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[tune] trial {trial.trial_id} failed (retried up to tune.max_failures)", flush=True)


def build_tuner(cfg: Config, out: Path, trainable: Any) -> tune.Tuner:
    """The Tuner: search algorithm, ASHA on the quality metric, retries, concurrency."""
    t = cfg.tune
    mode = "min" if t.metric == "eval_loss" else "max"
    search_alg = None
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=t.seed)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", grace_period=t.grace_period, reduction_factor=t.reduction_factor
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(out),
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            verbose=0 if quiet() else 1,  # quiet: one line per finished trial instead
            callbacks=[TrialLines()] if quiet() else None,
        ),
    )


def run_tune(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Search, measure every finished trial's export, pick the winner, write the outputs.

    Raises:
        ConfigError: bad search space or output dir, before Ray starts.
    """
    out = Path(output_dir).expanduser().resolve()
    if resume and not (out / "tune").exists():
        raise ConfigError(f"--resume {out}: no search there (no tune/); start one with --output {out}")
    if not resume and (out / "config.yaml").exists():
        raise ConfigError(
            f"{out} already holds a search; continue it with --resume {out}, or pick a new --output"
        )
    check_space(cfg)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out / "tokenizer", data_dir=out / "data")
    dump_config(cfg, out / "config.yaml")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            data=data,
            tokenizer_files=read_tokenizer_files(out / "tokenizer"),
            base=cfg.model_dump(mode="json"),
            root=str(out),
        ),
        {"CPU": 0.5},
    )
    if resume:
        tuner = tune.Tuner.restore(str(out / "tune"), trainable=trainable, resume_errored=True)
    else:
        tuner = build_tuner(cfg, out, trainable)
    tuner.fit()
    return summarize(cfg, out)


def resume_tune(output_dir: str | Path) -> dict[str, Any]:
    """Continue an interrupted search in ``output_dir`` with its saved config."""
    out = Path(output_dir).expanduser().resolve()
    return run_tune(load_config(out / "config.yaml"), out, resume=True)


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
        row["size_mb"] = sum(p.stat().st_size for p in Path(row["model_dir"]).glob("*.safetensors")) / 2**20
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
