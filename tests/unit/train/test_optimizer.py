"""AdamW parameter groups (weight decay on matrices only) and the choice of implementation.

The DeepSpeedCPUAdam tests load DeepSpeed's cpu_adam C++ op: JIT-built on first use (minutes,
once per machine, cached in ~/.cache/torch_extensions), as training on CPU does by default.
"""

from __future__ import annotations

import logging

import deepspeed.ops.adam
import pytest
import torch

from bloomray.config import load_config
from bloomray.model.build import build_from_config, preset_config
from bloomray.train.engine import build_optimizer

BASE = ["train.max_steps=1"]


@pytest.fixture(scope="module")
def model():
    return build_from_config("causal_lm", preset_config("tiny", 300), seed=0)


@pytest.mark.parametrize(
    ("choice", "cls"),
    [("adamw", torch.optim.AdamW), ("cpu_adam", deepspeed.ops.adam.DeepSpeedCPUAdam)],
)
def test_adamw_groups_decay_only_matrices(model, choice, cls):
    cfg = load_config(
        None,
        [
            *BASE,
            "train.lr=0.004",
            "train.weight_decay=0.1",
            "train.betas=[0.8, 0.9]",
            f"deepspeed.optimizer={choice}",
        ],
    )
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 0.004
    assert tuple(decay["betas"]) == (0.8, 0.9)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any("layernorm" in names[id(p)].lower() for p in decay["params"])
    assert any("bias" in names[id(p)] for p in no_decay["params"])
    # Every trainable parameter is optimised exactly once.
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})


def test_frozen_parameters_are_left_out(model):
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    try:
        opt = build_optimizer(load_config(None, BASE), model)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not any(id(p) in in_opt for p in model.transformer.h[0].parameters())
        assert in_opt
    finally:
        for p in model.transformer.h[0].parameters():
            p.requires_grad_(True)


def test_auto_is_the_default():
    assert load_config(None, BASE).deepspeed.optimizer == "auto"


def test_auto_is_cpu_adam_on_cpu(model):
    opt = build_optimizer(load_config(None, BASE), model)
    assert type(opt) is deepspeed.ops.adam.DeepSpeedCPUAdam
    assert opt.adam_w_mode  # decoupled weight decay, like torch AdamW


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_auto_is_torch_adamw_on_gpu(model, stage):
    cfg = load_config(None, [*BASE, "scaling.use_gpu=true", f"deepspeed.zero_stage={stage}"])
    assert type(build_optimizer(cfg, model)) is torch.optim.AdamW


def test_auto_is_cpu_adam_under_offload_even_on_gpu(model):
    """ZeRO-Offload steps the optimizer on the CPU; DeepSpeed refuses other client optimizers."""
    cfg = load_config(
        None, [*BASE, "scaling.use_gpu=true", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]
    )
    assert type(build_optimizer(cfg, model)) is deepspeed.ops.adam.DeepSpeedCPUAdam


class _Unbuildable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedCPUAdam requires the cpu_adam op, which failed to build/load.")


def test_auto_falls_back_to_torch_adamw_when_cpu_adam_cannot_build(model, monkeypatch, caplog):
    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", _Unbuildable)
    with caplog.at_level(logging.WARNING, logger="bloomray.train.engine"):
        opt = build_optimizer(load_config(None, BASE), model)
    assert type(opt) is torch.optim.AdamW
    assert "DeepSpeedCPUAdam is unavailable" in caplog.text and "failed to build" in caplog.text


@pytest.mark.parametrize(
    "overrides",
    [
        ["deepspeed.optimizer=cpu_adam"],  # asked for by name: no silent substitute
        ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"],  # offload needs it
    ],
)
def test_no_fallback_when_cpu_adam_is_required(model, monkeypatch, overrides):
    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", _Unbuildable)
    with pytest.raises(RuntimeError, match="cpu_adam op"):
        build_optimizer(load_config(None, [*BASE, *overrides]), model)
