"""Model + optimizer + scheduler + DeepSpeed engine for one worker."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import BloomConfig, get_scheduler

from bloomray.config import Config
from bloomray.model.build import add_lora, build_from_config, load_pretrained

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` (batch sizes, precision, ZeRO, clipping)."""
    ds, t = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True}
    if ds.zero_stage >= 1:
        zero["overlap_comm"] = cfg.scaling.use_gpu  # overlap needs async streams (GPU only)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype the engine computes in."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.deepspeed.precision]


def build_model(cfg: Config, model_config: dict[str, Any]) -> torch.nn.Module:
    """The worker's model: pretrained weights or seeded random init, then LoRA/checkpointing."""
    if cfg.model.path:
        model = load_pretrained(cfg.task, cfg.model.path, config=BloomConfig.from_dict(model_config))
    else:
        model = build_from_config(cfg.task, BloomConfig.from_dict(model_config), cfg.train.seed)
    if cfg.model.activation_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        model = add_lora(model, cfg.task, cfg.model.lora.model_dump())
    return model


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over trainable params; no weight decay on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "layernorm" in name.lower() else decay).append(p)
    # Empty groups are left out: ZeRO drops them, and the LR scheduler would then hold one
    # more group than the optimizer (LoRA has no trainable biases or LayerNorms).
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": cfg.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    kw = {"lr": cfg.train.lr, "betas": tuple(cfg.train.betas)}
    if cfg.deepspeed.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if cfg.deepspeed.optimizer == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """Warmup then cosine/linear decay (or constant), from transformers' schedulers."""
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.lr_schedule]
    return get_scheduler(
        name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total_steps
    )


def build_engine(cfg: Config, model_config: dict[str, Any], total_steps: int) -> tuple[Any, torch.nn.Module]:
    """``deepspeed.initialize`` on the configured model, optimizer and scheduler.

    Returns:
        (engine, model): the engine, and the underlying module (for hooks and probes).
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    model = build_model(cfg, model_config)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    return engine, model
