"""The per-worker training loop that Ray Train runs on every rank.

Read top to bottom: set up (engine, data, resume), then steps, each followed by hooks,
logging, eval and checkpointing at the configured intervals.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import torch

from bloomray.model.build import count_parameters
from bloomray.train.batches import ShardedBatches, eval_batches
from bloomray.train.checkpoint import checkpoint_dir_name, save_and_report
from bloomray.train.collectives import all_reduce_sum, barrier
from bloomray.train.contract import WorkerPlan, from_loop_config
from bloomray.train.distill import Distiller
from bloomray.train.engine import build_engine, compute_dtype
from bloomray.train.evaluation import evaluate, forward_outputs, probe_logits
from bloomray.train.gauges import export_step
from bloomray.train.metrics import (
    MetricSinks,
    flops_per_token,
    format_progress,
    matmul_params,
    peak_flops,
    peak_memory_mb,
)
from bloomray.train.progress import append_progress
from bloomray.train.restore import restore_latest


class StepHook(Protocol):
    """Runs around every optimizer step (pruning masks, for one). Methods run on all ranks."""

    def before_step(self, engine: Any, next_step: int) -> None: ...

    def after_step(self, engine: Any, step: int) -> dict[str, float]: ...

    def log_metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_hooks(cfg: Any, engine: Any, model: torch.nn.Module, total_steps: int) -> list[StepHook]:
    """Hooks for this run: pruning when ``prune.method`` is set."""
    if cfg.prune.method == "none":
        return []
    from bloomray.prune.hook import PruneHook

    return [PruneHook(cfg, engine, model, total_steps)]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop_config`` wraps the driver's :class:`~bloomray.train.contract.WorkerPlan`."""
    plan = from_loop_config(loop_config)
    cfg = plan.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    total = plan.total_steps

    ga = cfg.grad_accum_for(world)  # the global batch stays, whatever size the group started with
    engine, model = build_engine(cfg, plan.model_config, total, plan.lr_segments, world)
    hooks = build_hooks(cfg, engine, model, total)
    distiller = Distiller(cfg, device, world) if cfg.prune.distill.enabled else None
    t_restore = time.perf_counter()
    restored = restore_latest(engine, device=device)
    step = restored.step
    restore_s = time.perf_counter() - t_restore
    for hook, state in zip(hooks, restored.hook_states, strict=False):
        hook.load_state_dict(state)
    mb = cfg.train.micro_batch_size
    batches = ShardedBatches(plan.train_source(), rank, world, mb, ga, cfg.train.seed)
    evals = eval_batches(plan.eval_source(), rank, world, mb, cfg.train.eval_max_batches)
    flops_tok, peak = _flop_budget(cfg, engine, model, plan.model_config, device)
    sinks = _sinks(plan, rank, step)
    is_rank0 = rank == 0
    tag = _attempt_tag(is_rank0, device)
    audit = _sample_log(plan.log_dir, rank, tag) if cfg.train.log_sample_ids else None
    # This attempt's restore time and its earlier saves' times (a save's own time is only
    # known after it is written, so each checkpoint records the ones before it).
    timings: dict[str, Any] = {"restore_s": restore_s if step else None, "save_s": []}
    meta = _checkpoint_meta(plan, restored.restarts, timings, world) if is_rank0 else None
    tok_files = ray.get(plan.tokenizer_files) if is_rank0 else None
    # The loss sum stays on the device: one host sync per log step, not one per micro-batch.
    loss_sum, n_loss, tokens, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    metrics: dict[str, Any] = {}
    if is_rank0 and step:
        print(f"[bloomray] resumed from step {step}", flush=True)
    if meta is not None and step:  # a restarted attempt keeps the run's step-0 baseline
        meta["initial_eval"] = restored.meta.get("initial_eval")
    if step == 0:  # the untrained baseline, so every run shows how far training moved it
        initial = evaluate(engine, cfg.task, evals, device, plan.num_labels)
        if meta is not None:
            meta["initial_eval"] = initial
            print(f"[bloomray] step 0/{total} | eval {initial['eval_loss']:.4f} (untrained)", flush=True)

    while step < total:
        engine.train()
        used: list[int] = []  # the example ids of this step, for the audit
        for a in range(ga):
            ids = batches.ids(step * ga + a)
            if audit is not None:
                used += ids.tolist()
            batch = {k: v.to(device) for k, v in batches.take(ids).items()}
            # classification and sft batches carry their own labels and attention_mask (sft:
            # -100 on prompt and padding); packed causal-LM blocks predict every token.
            outputs = forward_outputs(engine, cfg.task, batch)
            loss = distiller.loss(outputs, batch) if distiller else outputs.loss
            engine.backward(loss)
            if a == ga - 1:
                for hook in hooks:
                    hook.before_step(engine, step + 1)
            engine.step()
            loss_sum += loss.detach().float()
            n_loss += 1
            tokens += batch["input_ids"].numel()
        step += 1
        if audit is not None:
            audit.write(json.dumps({"step": step, "ids": used}) + "\n")
            audit.flush()
        extra: dict[str, float] = {}
        for hook in hooks:
            extra.update(hook.after_step(engine, step))

        epoch_end = batches.epoch_of_step(step) != batches.epoch_of_step(step - 1)
        do_eval = step % cfg.train.eval_every == 0 or step == total or (epoch_end and cfg.train.epochs)
        do_ckpt = step % cfg.train.checkpoint_every == 0 or step == total
        if not (do_eval or do_ckpt or step % cfg.train.log_every == 0):
            continue
        elapsed = time.perf_counter() - t0
        metrics = _step_metrics(engine, step, loss_sum, n_loss, tokens, elapsed, flops_tok, peak, device)
        metrics.update(extra)
        for hook in hooks:
            metrics.update(hook.log_metrics())
        if distiller:
            metrics.update(distiller.log_metrics())
        metrics["epoch"] = step / batches.steps_per_epoch
        if do_eval:
            metrics.update(evaluate(engine, cfg.task, evals, device, plan.num_labels))
        if is_rank0:
            line = "[bloomray] " + format_progress(step, total, metrics)
            print(line, flush=True)
            append_progress(plan.log_dir, line)  # `tail -f OUTPUT/logs/progress.txt`; the quiet demo reads it
            export_step(plan.run_name, metrics, total)  # Prometheus gauges (deploy/monitoring)
            if sinks:
                sinks.log(step, metrics)
        if do_ckpt:
            probe = probe_logits(engine, evals, device) if step == total else None
            states = [h.state_dict() for h in hooks] if is_rank0 else None
            t_save = time.perf_counter()
            save_and_report(
                engine,
                step,
                metrics,
                meta,
                tok_files,
                probe if is_rank0 else None,
                states,
                name=checkpoint_dir_name(step, tag),
                local_root=plan.checkpoint_root,
            )
            timings["save_s"].append(round(time.perf_counter() - t_save, 3))
        else:
            ray.train.report(metrics)
        loss_sum, n_loss, tokens, t0 = torch.zeros((), device=device), 0, 0, time.perf_counter()
    if sinks:
        sinks.close()
    if audit is not None:
        audit.close()


def _checkpoint_meta(
    plan: WorkerPlan, restarts: list[int], timings: dict[str, Any], world: int
) -> dict[str, Any]:
    """Rank 0's part of this attempt's checkpoints: the run's, with the worker count it trains
    on now in the resume contract (with ``scaling.num_workers=[min, max]`` the driver cannot know it)."""
    contract = {**plan.checkpoint_meta["resume_contract"], "world_size": world}
    return {**plan.checkpoint_meta, "resume_contract": contract, "restarts": restarts, "timings": timings}


def _sample_log(log_dir: Path, rank: int, tag: str) -> Any:
    path = log_dir / "samples" / f"rank{rank}-{tag}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a")


def _step_metrics(
    engine: Any,
    step: int,
    loss_sum: torch.Tensor,
    n_loss: int,
    tokens: int,
    elapsed: float,
    flops_tok: float,
    peak: float,
    device: torch.device,
) -> dict[str, Any]:
    """Loss averaged over ranks, global tokens/s and MFU since the last report."""
    counts = torch.tensor([n_loss, tokens], dtype=torch.float64, device=device)
    t = all_reduce_sum(torch.cat([loss_sum.double().reshape(1), counts]), device)
    tok_s = t[2].item() / max(elapsed, 1e-9)
    gnorm = engine.get_global_grad_norm()
    return {
        "step": step,
        "train_loss": t[0].item() / max(t[1].item(), 1),
        "tokens_per_s": tok_s,
        "flops_per_s": tok_s * flops_tok,
        "mfu": tok_s * flops_tok / peak,
        "lr": float(engine.get_lr()[0]),
        "grad_norm": float(gnorm) if gnorm is not None else None,
        "peak_mem_mb": peak_memory_mb(device),
    }


def _attempt_tag(is_rank0: bool, device: torch.device) -> str:
    """Six hex digits drawn by rank 0 and shared with every rank (one all-reduce): this
    attempt's mark in its checkpoint names."""
    draw = float(secrets.randbelow(16**6)) if is_rank0 else 0.0
    return f"{int(all_reduce_sum(torch.tensor([draw], dtype=torch.float64), device).item()):06x}"


def _flop_budget(
    cfg: Any, engine: Any, model: torch.nn.Module, mc: dict[str, Any], device: torch.device
) -> tuple[float, float]:
    """(training FLOPs per token, summed peak FLOP/s of all workers); ``mc``: the BLOOM config."""
    trainable = count_parameters(model, trainable_only=True)
    total = count_parameters(model)
    n = matmul_params(model, mc["vocab_size"], mc["hidden_size"], lm_head=cfg.task != "classification")
    seq = cfg.data.block_size
    fpt = flops_per_token(n, mc["n_layer"], mc["hidden_size"], seq, trainable / max(total, 1))
    barrier(device)  # measure while every worker competes for the same cores, as in training
    peak = torch.tensor(
        [peak_flops(cfg.scaling.peak_tflops, compute_dtype(cfg), device)], dtype=torch.float64
    )
    return fpt, all_reduce_sum(peak, device).item()


def _sinks(plan: WorkerPlan, rank: int, step: int) -> MetricSinks | None:
    if rank != 0:
        return None
    return MetricSinks(
        plan.log_dir,
        plan.config.output.mlflow_tracking_uri,
        plan.config.output.tensorboard,
        run_name=f"{plan.run_name}-from-step-{step}",
        params=plan.params,
    )
