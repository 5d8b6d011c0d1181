"""What the driver hands every training worker: the run's plan, frozen and typed.

The driver decides a :class:`RunPlan` before Ray starts (``run.plan_run``), then builds one
:class:`WorkerPlan` from it (:func:`build_worker_plan`); Ray Train pickles it to every rank,
where ``loop.train_loop_per_worker`` reads its attributes. Ray Train's ``train_loop_config``
must be a dict, so the plan travels as ``{"plan": plan}`` (:func:`as_loop_config`) and the
worker unwraps it first thing (:func:`from_loop_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from bloomray.config import Config
from bloomray.data.prepare import PreparedData
from bloomray.data.shards import BlockSource, TokenBlocks
from bloomray.train.checkpoint import read_tokenizer_files
from bloomray.train.resume import ResumeContract

_LOOP_CONFIG_KEY = "plan"


@dataclass(frozen=True)
class RunPlan:
    """What the driver decides before Ray starts: the model shape, the step budget, and what a
    resume must keep (recorded in every checkpoint)."""

    model_config: dict[str, Any]
    total_steps: int
    contract: ResumeContract
    lr_segments: list[list[int]]


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a training worker needs; bulky parts are object refs (shared across nodes)."""

    config: Config
    """The validated run config (the same object the driver resolved)."""
    train_data: TokenBlocks | ray.ObjectRef
    """The train examples: memory-mapped token blocks (causal LM, sent as a path), or a ref to
    labelled arrays in the object store (classification, sft)."""
    eval_data: TokenBlocks | ray.ObjectRef
    """The eval examples, like ``train_data``."""
    tokenizer_files: ray.ObjectRef
    """Ref to the tokenizer's files (name -> bytes); rank 0 copies them into each checkpoint."""
    model_config: dict[str, Any]
    """The BLOOM config (``BloomConfig.to_dict()`` form) every rank builds the model from."""
    num_labels: int | None
    """Classification's number of labels; None for the other tasks."""
    total_steps: int
    """Optimizer steps the whole run makes (a resume continues up to it)."""
    lr_segments: list[list[int]]
    """The LR schedule's segments as ``[start_step, end_step]`` (a resume that raises the
    step budget adds one; see ``resume.extend_lr_segments``)."""
    checkpoint_meta: dict[str, Any] = field(repr=False)
    """The run's part of every checkpoint's ``bloomray.json`` (task, model config, resume
    contract, data stats, ...); it is written as JSON, so it stays a dict."""
    log_dir: Path
    """Where rank 0 writes TensorBoard and MLflow logs (``OUTPUT/logs``)."""
    checkpoint_root: str | None
    """The run's checkpoint dir when storage is a local path every rank mounts (written in
    place); None on cloud storage (written to a temp dir that Ray uploads)."""
    run_name: str
    """The run's name in the metric sinks (the output dir's name)."""
    params: dict[str, Any] = field(repr=False)
    """The config flattened to ``section.key`` -> value, logged as MLflow params."""

    def train_source(self) -> BlockSource:
        """The train examples on this worker (shards mapped, or arrays fetched once)."""
        return _received(self.train_data)

    def eval_source(self) -> BlockSource:
        """The eval examples on this worker."""
        return _received(self.eval_data)


def _shipped(source: BlockSource) -> TokenBlocks | ray.ObjectRef:
    # token blocks travel as their path (each worker maps the shards); arrays go to the object store
    return source if isinstance(source, TokenBlocks) else ray.put(source)


def _received(data: TokenBlocks | ray.ObjectRef) -> BlockSource:
    return data if isinstance(data, TokenBlocks) else ray.get(data)


def build_worker_plan(
    cfg: Config,
    out: Path,
    data: PreparedData,
    tokenizer_dir: Path,
    plan: RunPlan,
    checkpoint_root: str | None,
    initial_model: str | None = None,
) -> WorkerPlan:
    """The :class:`WorkerPlan` of a run into ``out`` (puts data and tokenizer in the object store).

    ``initial_model``: a dir the workers start from instead of ``model.path`` (its one-shot
    pruned copy, ``prune/initial.py``); ``model.path`` stays the distillation teacher and the
    checkpoints' ``base_model``.
    """
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
    worker_cfg = cfg
    if initial_model:
        worker_cfg = cfg.model_copy(deep=True)
        worker_cfg.prune.distill.teacher = cfg.prune.distill.teacher or cfg.model.path
        worker_cfg.model.path = initial_model
    return WorkerPlan(
        config=worker_cfg,
        train_data=_shipped(data.train),
        eval_data=_shipped(data.eval),
        tokenizer_files=ray.put(read_tokenizer_files(tokenizer_dir)),
        model_config=plan.model_config,
        num_labels=len(data.id2label) if data.id2label else None,
        total_steps=plan.total_steps,
        lr_segments=plan.lr_segments,
        checkpoint_meta=meta,
        log_dir=out / "logs",
        checkpoint_root=checkpoint_root,
        run_name=out.name,
        params=flat_params(cfg),
    )


def as_loop_config(plan: WorkerPlan) -> dict[str, WorkerPlan]:
    """``plan`` as Ray Train's ``train_loop_config`` (which must be a dict)."""
    return {_LOOP_CONFIG_KEY: plan}


def from_loop_config(loop_config: dict[str, Any]) -> WorkerPlan:
    """The :class:`WorkerPlan` inside a ``train_loop_config`` made by :func:`as_loop_config`."""
    return loop_config[_LOOP_CONFIG_KEY]


def flat_params(cfg: Config) -> dict[str, Any]:
    """``cfg`` flattened to ``section.key`` -> value (one level deep), for MLflow params."""
    flat: dict[str, Any] = {}
    for section, values in cfg.model_dump(mode="json").items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[section] = values
    return flat
