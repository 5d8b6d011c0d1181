"""Knowledge distillation from the dense model while a pruned student trains (``prune.distill``).

The teacher is the run's starting model (``model.path``, or ``prune.distill.teacher``), frozen,
in bf16 (fp32 for fp32 runs), inference only. Under ZeRO-3 it is itself a ZeRO-3 inference
engine, so its weights are partitioned over the ranks like the student's and a run that fits
still fits; otherwise each rank holds a copy (2 bytes per parameter in bf16).

Loss (per predicted position; for sft only the response tokens, for classification the label
logits)::

    loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * lm_loss

with ``p^T = softmax(logits / T)``: the forward KL of Hinton et al. (the student covers the
teacher's distribution), scaled by ``T^2`` so its gradients keep their size across
temperatures. At ``alpha = 0`` it is exactly the LM loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bloomray.config import Config
from bloomray.train.collectives import all_reduce_sum

IGNORE = -100


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    lm_loss: torch.Tensor,
    alpha: float,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the combined loss, the KL term) for logits of shape ``[..., vocab]``.

    Args:
        mask: bool ``[...]``, the positions that count (None: all); the KL is their mean.
    """
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    kl = kl.mean() * t * t if kl.numel() else kl.sum()
    if alpha == 0.0:
        return lm_loss, kl.detach()
    return alpha * kl + (1.0 - alpha) * lm_loss, kl.detach()


def positions(task: str, batch: dict[str, torch.Tensor]) -> tuple[slice | None, torch.Tensor | None]:
    """Which logits the KL compares: (slice over the sequence, mask) per task.

    Causal LM: every position that predicts a next token (all but the last); sft: those whose
    next token is a labelled response token; classification: the one label distribution.
    """
    if task == "classification":
        return None, None
    if task == "sft":
        return slice(None, -1), batch["labels"][:, 1:] != IGNORE
    return slice(None, -1), None


class Distiller:
    """The frozen teacher and the running KL average (the ``distill_kl`` metric, all ranks)."""

    def __init__(self, cfg: Config, device: torch.device, world_size: int | None = None) -> None:
        """``world_size``: the workers training now (None: the fixed ``scaling.num_workers``)."""
        from bloomray.model.build import load_pretrained

        d = cfg.prune.distill
        self.task, self.alpha, self.temperature = cfg.task, d.alpha, d.temperature
        dtype = torch.float32 if cfg.deepspeed.precision == "fp32" else torch.bfloat16
        teacher = load_pretrained(cfg.task, d.teacher or cfg.model.path, dtype=dtype)
        teacher.requires_grad_(False).eval()
        if cfg.deepspeed.zero_stage == 3:
            self.teacher = _zero3_inference(teacher, cfg, world_size)
        else:
            self.teacher = teacher.to(device)
        self.device = device
        self._sum = torch.zeros(2, dtype=torch.float64, device=device)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of ``outputs`` (the student's, with ``.loss`` and ``.logits``)."""
        with torch.no_grad():  # not inference_mode: the KL saves these logits for backward
            if self.task == "causal_lm":
                teacher_logits = self.teacher(input_ids=batch["input_ids"]).logits
            else:
                kwargs = {k: v for k, v in batch.items() if k != "labels"}
                teacher_logits = self.teacher(**kwargs).logits
        span, mask = positions(self.task, batch)
        s, t = outputs.logits, teacher_logits
        if span is not None:
            s, t = s[:, span], t[:, span]
        loss, kl = distill_loss(s, t, outputs.loss, self.alpha, self.temperature, mask)
        self._sum += torch.stack([kl.double(), torch.ones((), dtype=torch.float64, device=kl.device)])
        return loss

    def log_metrics(self) -> dict[str, float]:
        """Mean KL since the last call over all ranks (collective: every rank calls it)."""
        total = all_reduce_sum(self._sum.clone(), self.device)  # a copy: the sum is zeroed below
        self._sum.zero_()
        return {"distill_kl": float(total[0] / total[1])} if total[1] else {}


def _zero3_inference(teacher: torch.nn.Module, cfg: Config, world_size: int | None) -> Any:
    """The teacher as a ZeRO-3 inference engine: its parameters partitioned over the ranks."""
    import deepspeed

    t = cfg.train
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_for(world_size),
        "train_batch_size": t.global_batch_size,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine
