"""Driver side of a training run: data, Ray Train trainer, summary and export.

Output contract (``OUTPUT/``): ``summary.json``, ``model/`` (HF export), ``checkpoints/``
(Ray Train run dir with DeepSpeed shards), ``logs/`` (TensorBoard, MLflow), ``tokenizer/``
and ``config.yaml`` (the resolved config, which ``--resume`` reloads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from bloomray.config import Config, ConfigError, dump_config, load_config
from bloomray.data.prepare import PreparedData, prepare_data
from bloomray.data.tokenizer import load_tokenizer
from bloomray.model.build import resolve_model_config
from bloomray.raycluster import init_ray, worker_env
from bloomray.train.batches import steps_per_epoch, total_steps
from bloomray.train.checkpoint import META_FILE, local_checkpoint_dir, read_meta, read_tokenizer_files
from bloomray.train.loop import train_loop_per_worker
from bloomray.train.progress import CheckpointIndex, index_path
from bloomray.train.resume import (
    ResumeContract,
    check_resume,
    check_tokenizer_settings,
    extend_lr_segments,
    fingerprint_arrays,
    hash_dir,
    latest_checkpoint_meta,
)

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training failed after all retries; the message points at the logs."""


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse to mix two runs in one dir, and refuse to resume a run that is not there."""
    has_run = (out / "config.yaml").exists()
    if resume and not has_run:
        raise ConfigError(
            f"--resume {out}: no run there (no config.yaml); start a new run with --output {out}"
        )
    if not resume and has_run:
        raise ConfigError(
            f"{out} already holds a run; continue it with --resume {out}, or pick a new --output"
        )


def resume_config(out: Path, overrides: list[str] | None) -> Config:
    """The saved config of the run in ``out``, with extra overrides (e.g. a larger max_steps)."""
    return load_config(out / "config.yaml", overrides)


@dataclass(frozen=True)
class RunPlan:
    """What the driver decides before Ray starts: the model shape, the step budget, and what a
    resume must keep (recorded in every checkpoint)."""

    model_config: dict[str, Any]
    total_steps: int
    contract: ResumeContract
    lr_segments: list[list[int]]


def checkpoint_location(cfg: Config, out: Path) -> tuple[str, str]:
    """(storage, name) of the Ray Train run that holds this run's checkpoints.

    Without ``output.storage_path`` they live in ``OUTPUT/checkpoints``. With it (shared or
    cloud storage) the name carries a hash of the output dir's full path, so two runs whose
    output dirs share a basename never share checkpoints.
    """
    if not cfg.output.storage_path:
        return str(out), "checkpoints"
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:8]
    return cfg.output.storage_path, f"{out.name}-{digest}"


def local_checkpoint_root(cfg: Config, out: Path) -> str | None:
    """The run's checkpoint directory when storage is a local path (local disk, or NFS mounted
    on every node), where workers write checkpoints in place; None on cloud storage."""
    storage, name = checkpoint_location(cfg, out)
    if storage.startswith("file://"):
        storage = storage.removeprefix("file://")
    elif "://" in storage:
        return None
    return str(Path(storage).expanduser().resolve() / name)


def plan_run(cfg: Config, out: Path, data: PreparedData, tokenizer_dir: Path) -> RunPlan:
    """Check the model against the tokenizer and a resume against its checkpoint (no Ray needed).

    Raises:
        ModelLoadError: the tokenizer's ids do not fit the model's vocabulary.
        ConfigError: too little eval data, or settings a resume cannot change.
    """
    n_train = len(data.train["input_ids"])
    per_epoch = steps_per_epoch(
        n_train, cfg.scaling.num_workers, cfg.train.micro_batch_size, cfg.grad_accum_steps
    )
    total = total_steps(cfg.train.max_steps, cfg.train.epochs, per_epoch)
    model_config = resolve_model_config(
        cfg.task, cfg.model.preset, cfg.model.path, data.tokenizer, data.id2label, cfg.model.vocab_size
    )
    if len(data.eval["input_ids"]) < cfg.scaling.num_workers:
        raise ConfigError(
            f"{len(data.eval['input_ids'])} eval examples for {cfg.scaling.num_workers} workers; "
            "raise data.eval_fraction or give data.eval_path"
        )
    contract = ResumeContract(
        world_size=cfg.scaling.num_workers,
        block_size=cfg.data.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        train_seed=cfg.train.seed,
        data_seed=cfg.data.seed,
        data_fingerprint=fingerprint_arrays({"train": data.train, "eval": data.eval}),
        tokenizer_hash=hash_dir(tokenizer_dir),
        total_steps=total,
    )
    saved = latest_checkpoint_meta(*checkpoint_location(cfg, out))
    step = int(saved["step"]) if saved else 0
    if saved and "resume_contract" in saved:
        check_resume(saved["resume_contract"], contract, step)
    return RunPlan(model_config, total, contract, extend_lr_segments(saved, step, total))


def build_loop_config(
    cfg: Config, out: Path, data: PreparedData, tokenizer_dir: Path, plan: RunPlan
) -> dict[str, Any]:
    """Everything a worker needs, with bulky parts as object refs (shared across nodes)."""
    meta = {
        "task": cfg.task,
        "model_config": plan.model_config,
        "lora": cfg.model.lora.model_dump() if cfg.model.lora.enabled else None,
        "base_model": cfg.model.path,
        "config": cfg.model_dump(mode="json"),
        "data": data.stats,
        "total_steps": plan.total_steps,
        "resume_contract": plan.contract.to_dict(),
        "lr_segments": plan.lr_segments,
    }
    return {
        "config": cfg.model_dump(mode="json"),
        "data": ray.put({"train": data.train, "eval": data.eval}),
        "tokenizer": ray.put(read_tokenizer_files(tokenizer_dir)),
        "model_config": plan.model_config,
        "num_labels": len(data.id2label) if data.id2label else None,
        "total_steps": plan.total_steps,
        "lr_segments": plan.lr_segments,
        "meta": meta,
        "log_dir": str(out / "logs"),
        "checkpoint_root": local_checkpoint_root(cfg, out),
        "run_name": out.name,
        "params": _flat_params(cfg),
    }


def build_trainer(
    cfg: Config, out: Path, loop_config: dict[str, Any], callbacks: list[Any] | None = None
) -> TorchTrainer:
    """A TorchTrainer whose checkpoints live in ``OUTPUT/checkpoints`` (resumable by name).

    With ``output.storage_path`` (shared or cloud storage on a cluster) they live in
    ``storage_path/<output dir name>`` instead. Each one Ray registers is listed in
    ``OUTPUT/logs/checkpoints.json`` (``progress.py``).
    """
    storage, name = checkpoint_location(cfg, out)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": worker_env(s.use_gpu)},
            callbacks=[CheckpointIndex(index_path(out)), *(callbacks or [])],
        ),
    )


def run_training(cfg: Config, output_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into ``output_dir``; return the summary (also in summary.json).

    Raises:
        ConfigError / DataError: bad settings or data, before any worker starts.
        TrainingError: the run failed after ``train.max_failures`` retries.
    """
    out = Path(output_dir).expanduser().resolve()
    check_output_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    if resume:  # the run's own tokenizer: never re-trained or overwritten
        check_tokenizer_settings(load_config(out / "config.yaml"), cfg)
        data = prepare_data(cfg, tokenizer=load_tokenizer(str(tokenizer_dir)))
    else:
        data = prepare_data(cfg, tokenizer_dir)
    plan = plan_run(cfg, out, data, tokenizer_dir)
    dump_config(cfg, out / "config.yaml")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    return train_prepared(cfg, out, data, tokenizer_dir, plan=plan)


def train_prepared(
    cfg: Config,
    out: Path,
    data: PreparedData,
    tokenizer_dir: Path,
    callbacks: list[Any] | None = None,
    plan: RunPlan | None = None,
) -> dict[str, Any]:
    """Run the Ray Train job on prepared data, then summarise and export (Ray already up).

    Re-running it on the same ``out`` resumes from the latest checkpoint there (after the
    same checks as :func:`plan_run`).
    """
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.scaling.worker_start_timeout_s)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each progress line prints twice
    plan = plan or plan_run(cfg, out, data, tokenizer_dir)
    loop_config = build_loop_config(cfg, out, data, tokenizer_dir, plan)
    trainer = build_trainer(cfg, out, loop_config, callbacks)
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in several types
        raise TrainingError(f"training failed: {exc}\nlogs: {out / 'logs'} and the Ray worker logs") from exc
    if result.checkpoint is None:
        raise TrainingError(f"training finished without a checkpoint in {out / 'checkpoints'}")
    source = checkpoint_uri(result.checkpoint, checkpoint_location(cfg, out)[0])
    # Without an export the summary needs only the checkpoint's metadata file.
    with local_checkpoint_dir(result.checkpoint, None if cfg.output.export else [META_FILE]) as local_dir:
        return finish_run(out, local_dir, cfg.output.export, source=source)


def checkpoint_uri(checkpoint: ray.train.Checkpoint, storage: str) -> str:
    """Where ``checkpoint`` lives, as a path or URI that ``bloomray export --checkpoint`` reads.

    A checkpoint on local disk is its path. One on cloud storage is ``scheme://bucket/key`` with
    the storage URI's query (endpoint, region) kept and its user info (credentials) left out.
    """
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    parts = urllib.parse.urlsplit(storage)
    return f"{parts.scheme}://{checkpoint.path}" + (f"?{parts.query}" if parts.query else "")


def finish_run(
    out: Path, checkpoint_path: str | Path, export: bool, source: str | None = None
) -> dict[str, Any]:
    """Write summary.json from the final checkpoint and export the model.

    Args:
        checkpoint_path: the final checkpoint as a local dir (a download of a remote one).
        source: where that checkpoint lives when it is not ``checkpoint_path`` (a URI); the
            summary and the model card name it.
    """
    from bloomray.model.export import export_checkpoint

    source = source or str(checkpoint_path)
    meta = read_meta(checkpoint_path)
    m = meta["metrics"]
    summary = {
        "task": meta["task"],
        "steps": meta["step"],
        "initial_eval_loss": (meta.get("initial_eval") or {}).get("eval_loss"),
        "train_loss": m.get("train_loss"),
        "eval_loss": m.get("eval_loss"),
        **{k: m[k] for k in ("eval_perplexity", "eval_accuracy", "eval_macro_f1") if k in m},
        "sparsity": m.get("sparsity"),
        "tokens_per_s": m.get("tokens_per_s"),
        "mfu": m.get("mfu"),
        "peak_mem_mb": m.get("peak_mem_mb"),
        "checkpoint": source,
        "restarts": meta.get("restarts", []),  # the step each recovery resumed from
        "data": meta["data"],
    }
    if export:
        info = export_checkpoint(checkpoint_path, out / "model", overwrite=True, source=source)
        summary["model_dir"] = str(out / "model")
        summary["export_max_abs_logit_diff"] = info.get("max_abs_logit_diff")
        summary["export"] = {k: v for k, v in info.items() if k != "checkpoint"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _flat_params(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in cfg.model_dump(mode="json").items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[section] = values
    return flat
