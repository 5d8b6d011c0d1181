"""``bloomray tune``: a Ray Tune search whose trials each drive a Ray Train + DeepSpeed run.

Ray 2.60 runs Train V2, so each trial is a *function* trainable that builds and fits its
own TorchTrainer, forwarding Train's reports to Tune with ``TuneReportCallback`` (what ASHA
stops on). Data is tokenized once, in the driver, and shared by every trial. With
``tune.objectives`` the search is multi-objective (``objectives.py``: Optuna's NSGA-II or
TPE sampler on every objective, one report per trial at its end). ``results.py`` writes the
outputs once the search is done.

Outputs in DIR: ``trials.csv``, ``pareto.png``, ``lr_vs_quality.png``, ``winner/``,
``summary.json``; trial runs in ``DIR/trials/<trial_id>/``; Tune's state in ``DIR/tune/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray import tune

from bloomray.config import Config, ConfigError, dump_config, load_config
from bloomray.data.prepare import PreparedData, prepare_data
from bloomray.files import atomic_write_text
from bloomray.raycluster import init_ray, quiet
from bloomray.train.checkpoint import read_tokenizer_files
from bloomray.tune.objectives import modes, sampler, trial_measures
from bloomray.tune.results import FINAL_KEY, summarize
from bloomray.tune.space import check_space, param_space, trial_config

log = logging.getLogger(__name__)


def _trial(
    params: dict[str, Any],
    data: PreparedData,
    tokenizer_files: dict[str, bytes],
    base: dict[str, Any],
    root: str,
    reference: str | None = None,
) -> None:
    """One trial: train + export with the sampled config, then report the final metrics.

    ``reference``: the dense shape the ``decode_rel`` objective is measured against.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from bloomray.export.run import train_prepared

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params)
    cfg.train.eval_every = cfg.train.log_every  # ASHA needs the metric in every report
    multi = bool(cfg.tune.objectives)  # one report at the end, with every objective in it
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
        summary = train_prepared(cfg, out, data, tok_dir, callbacks=[] if multi else [TuneReportCallback()])
    if multi and summary.get("model_dir") and not set(cfg.tune.objectives) <= set(summary):
        summary.update(trial_measures(cfg, summary["model_dir"], reference))
        atomic_write_text(done, json.dumps(summary, indent=2, default=str))
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
    metric, mode = t.metric, ("min" if t.metric == "eval_loss" else "max")
    search_alg = None
    if t.objectives:  # the sampler takes every objective; Tune itself ranks on none
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=list(t.objectives), mode=modes(cfg), sampler=sampler(cfg))
        metric, mode = None, None
    elif t.search == "optuna":
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
            metric=metric,
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
    reference = None
    if "decode_rel" in cfg.tune.objectives:
        from bloomray.model.build import resolve_model_config
        from bloomray.tune.engine_latency import write_reference

        m = cfg.model
        shape = resolve_model_config(cfg.task, m.preset, m.path, data.tokenizer, data.id2label, m.vocab_size)
        reference = write_reference(cfg, out, shape, out / "tokenizer")
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            data=data,
            tokenizer_files=read_tokenizer_files(out / "tokenizer"),
            base=cfg.model_dump(mode="json"),
            root=str(out),
            reference=reference,
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
