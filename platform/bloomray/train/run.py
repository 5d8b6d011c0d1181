"""Driver side of a training run: data, the plan, the Ray Train trainer, the summary.

``export/run.py`` puts it together with the export into the job ``bloomray train`` runs.

Output contract (``OUTPUT/``): ``summary.json``, ``model/`` (HF export), ``checkpoints/``
(Ray Train run dir with DeepSpeed shards), ``logs/`` (TensorBoard, MLflow), ``tokenizer/``
and ``config.yaml`` (the resolved config, which ``--resume`` reloads).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from bloomray.config import Config, ConfigError, dump_config, load_config
from bloomray.data.prepare import PreparedData, prepare_data
from bloomray.data.tokenizer import load_tokenizer
from bloomray.errors import EXIT_FAILED, BloomrayError
from bloomray.files import hash_dir
from bloomray.model.build import resolve_model_config
from bloomray.prune.initial import initial_model
from bloomray.raycluster import init_ray, worker_env
from bloomray.train.batches import steps_per_epoch, total_steps
from bloomray.train.checkpoint import read_meta
from bloomray.train.contract import RunPlan, WorkerPlan, as_loop_config, build_worker_plan
from bloomray.train.loop import train_loop_per_worker
from bloomray.train.progress import CheckpointIndex, index_path
from bloomray.train.resume import (
    ResumeContract,
    check_resume,
    check_tokenizer_settings,
    extend_lr_segments,
    fingerprint_sources,
    latest_checkpoint_meta,
)

log = logging.getLogger(__name__)


class TrainingError(BloomrayError, RuntimeError):
    """Training failed after all retries; the message points at the logs.

    Exit code 1: the work failed (also: no trial of a Tune search finished).
    """

    exit_code = EXIT_FAILED


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


def checkpoint_location(cfg: Config, out: Path) -> tuple[str, str]:
    """(storage, name) of the Ray Train run that holds this run's checkpoints.

    Without ``output.storage_path`` they live in ``OUTPUT/checkpoints``. With it (shared or
    cloud storage) the name carries a hash of the output dir's full path, so two runs whose
    output dirs share a basename never share checkpoints. A plain path is made absolute
    (``~`` expanded, a relative one against the cwd), as pyarrow and Ray need.
    """
    if not cfg.output.storage_path:
        return str(out), "checkpoints"
    storage = cfg.output.storage_path
    if not urllib.parse.urlsplit(storage).scheme:
        storage = str(Path(storage).expanduser().resolve())
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:8]
    return storage, f"{out.name}-{digest}"


def local_checkpoint_root(cfg: Config, out: Path) -> str | None:
    """The run's checkpoint directory when storage is a local path (local disk, or NFS mounted
    on every node), where workers write checkpoints in place; None on cloud storage."""
    storage, name = checkpoint_location(cfg, out)
    fs, path = pafs.FileSystem.from_uri(storage)
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    return str(Path(path) / name)


def data_location(cfg: Config, out: Path) -> Path:
    """Where a run prepares raw causal-LM input into token shards: next to its checkpoints when
    those are on a local or mounted path (``output.storage_path`` on NFS, which every node
    reads), else ``OUTPUT/data``."""
    root = local_checkpoint_root(cfg, out)
    return Path(root).parent / f"{Path(root).name}-data" if root and cfg.output.storage_path else out / "data"


def plan_run(cfg: Config, out: Path, data: PreparedData, tokenizer_dir: Path) -> RunPlan:
    """Check the model against the tokenizer and a resume against its checkpoint (no Ray needed).

    Raises:
        ModelLoadError: the tokenizer's ids do not fit the model's vocabulary.
        ConfigError: too little eval data, or settings a resume cannot change.
    """
    n_train = len(data.train)
    most = cfg.scaling.worker_counts[-1]  # a step's samples are the same on any count
    per_epoch = steps_per_epoch(n_train, most, cfg.train.micro_batch_size, cfg.grad_accum_for(most))
    total = total_steps(cfg.train.max_steps, cfg.train.epochs, per_epoch)
    model_config = resolve_model_config(
        cfg.task, cfg.model.preset, cfg.model.path, data.tokenizer, data.id2label, cfg.model.vocab_size
    )
    if len(data.eval) < most:
        raise ConfigError(
            f"{len(data.eval)} eval examples for {most} workers; "
            "raise data.eval_fraction or give data.eval_path"
        )
    contract = ResumeContract(
        world_size=most,  # the workers record the count they train on (loop._checkpoint_meta)
        block_size=cfg.data.block_size,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        train_seed=cfg.train.seed,
        data_seed=cfg.data.seed,
        data_fingerprint=fingerprint_sources(data.train, data.eval),
        tokenizer_hash=hash_dir(tokenizer_dir),
        total_steps=total,
        zero_stage=cfg.deepspeed.zero_stage,
        precision=cfg.deepspeed.precision,
    )
    saved = latest_checkpoint_meta(*checkpoint_location(cfg, out))
    step = int(saved["step"]) if saved else 0
    if saved and "resume_contract" in saved:
        check_resume(saved["resume_contract"], contract, step)
    return RunPlan(model_config, total, contract, extend_lr_segments(saved, step, total))


def build_trainer(
    cfg: Config, out: Path, worker_plan: WorkerPlan, callbacks: list[Any] | None = None
) -> TorchTrainer:
    """A TorchTrainer whose checkpoints live in ``OUTPUT/checkpoints`` (resumable by name).

    With ``output.storage_path`` (shared or cloud storage on a cluster) they live in
    ``storage_path/<output dir name>`` instead. Each one Ray registers is listed in
    ``OUTPUT/logs/checkpoints.json`` (``progress.py``). With ``scaling.num_workers=[min, max]``
    the group is elastic: it starts, and restarts after a failure, on as many workers as fit
    (at least min), each start resuming the latest checkpoint on that count.
    """
    storage, name = checkpoint_location(cfg, out)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=as_loop_config(worker_plan),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env={"env_vars": worker_env(cfg.scaling.use_gpu)},
            callbacks=[CheckpointIndex(index_path(out)), *(callbacks or [])],
        ),
    )


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    """Ray Train's workers for ``cfg``: a fixed count, or with ``scaling.num_workers=[min, max]``
    a ``(min, max)`` tuple, Ray Train's elastic group (it sizes each start by the cluster)."""
    s = cfg.scaling
    return ray.train.ScalingConfig(
        num_workers=s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        placement_strategy=s.placement_strategy,
    )


def start_run(
    cfg: Config, output_dir: str | Path, resume: bool = False
) -> tuple[Path, PreparedData, Path, RunPlan]:
    """Everything before the first worker starts: the output dir, data, tokenizer, the plan
    (with the resume checks), the saved config, and Ray.

    Returns:
        (output dir, prepared data, tokenizer dir, plan) for :func:`fit`.

    Raises:
        ConfigError / DataError: bad settings or data, before any worker starts.
    """
    out = Path(output_dir).expanduser().resolve()
    check_output_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    if resume:  # the run's own tokenizer: never re-trained or overwritten
        check_tokenizer_settings(load_config(out / "config.yaml"), cfg)
        data = prepare_data(
            cfg, tokenizer=load_tokenizer(str(tokenizer_dir)), data_dir=data_location(cfg, out)
        )
    else:
        data = prepare_data(cfg, tokenizer_dir, data_dir=data_location(cfg, out))
    plan = plan_run(cfg, out, data, tokenizer_dir)
    dump_config(cfg, out / "config.yaml")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    return out, data, tokenizer_dir, plan


def fit(
    cfg: Config,
    out: Path,
    data: PreparedData,
    tokenizer_dir: Path,
    callbacks: list[Any] | None = None,
    plan: RunPlan | None = None,
) -> tuple[ray.train.Checkpoint, str]:
    """Run the Ray Train job on prepared data (Ray already up).

    Re-running it on the same ``out`` resumes from the latest checkpoint there (after the
    same checks as :func:`plan_run`). With ``prune.method`` wanda or sparsegpt the workers
    start from ``OUTPUT/oneshot``, the starting model pruned one-shot (``prune/initial.py``).

    Returns:
        The final checkpoint, and where it lives (:func:`checkpoint_uri`).

    Raises:
        OneShotError / ModelLoadError: the one-shot initial masks could not be made.
        TrainingError: the run failed after ``train.max_failures`` retries.
    """
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.scaling.worker_start_timeout_s)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each progress line prints twice
    plan = plan or plan_run(cfg, out, data, tokenizer_dir)
    start = initial_model(cfg, out, data)  # wanda/sparsegpt: the starting model pruned one-shot
    worker_plan = build_worker_plan(
        cfg, out, data, tokenizer_dir, plan, local_checkpoint_root(cfg, out), start[0] if start else None
    )
    trainer = build_trainer(cfg, out, worker_plan, callbacks)
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in several types
        raise TrainingError(f"training failed: {exc}\nlogs: {out / 'logs'} and the Ray worker logs") from exc
    if result.checkpoint is None:
        raise TrainingError(f"training finished without a checkpoint in {out / 'checkpoints'}")
    return result.checkpoint, checkpoint_uri(result.checkpoint, checkpoint_location(cfg, out)[0])


def checkpoint_uri(checkpoint: ray.train.Checkpoint, storage: str) -> str:
    """Where ``checkpoint`` lives, as a path or URI that ``bloomray export --checkpoint`` reads.

    A checkpoint on local disk is its path. One on cloud storage is ``scheme://bucket/key`` with
    the storage URI's query (endpoint, region) kept and its user info (credentials) left out.
    """
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    parts = urllib.parse.urlsplit(storage)
    return f"{parts.scheme}://{checkpoint.path}" + (f"?{parts.query}" if parts.query else "")


def summarize(checkpoint_path: str | Path, source: str | None = None) -> dict[str, Any]:
    """The run's summary (what summary.json holds before an export) from its final checkpoint.

    Args:
        checkpoint_path: the final checkpoint as a local dir (a download of a remote one).
        source: where that checkpoint lives when it is not ``checkpoint_path`` (a URI).
    """
    meta = read_meta(checkpoint_path)
    m = meta["metrics"]
    return {
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
        "checkpoint": source or str(checkpoint_path),
        "restarts": meta.get("restarts", []),  # the step each recovery resumed from
        "data": meta["data"],
    }
