"""AdamW parameter groups: weight decay on matrices only."""

from __future__ import annotations

import pytest
import torch

from bloomray.config import load_config
from bloomray.model.build import build_from_config, preset_config
from bloomray.train.engine import build_optimizer


@pytest.fixture(scope="module")
def model():
    return build_from_config("causal_lm", preset_config("tiny", 300), seed=0)


def test_adamw_groups_decay_only_matrices(model):
    cfg = load_config(
        None, ["train.max_steps=1", "train.lr=0.004", "train.weight_decay=0.1", "train.betas=[0.8, 0.9]"]
    )
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 0.004
    assert decay["betas"] == (0.8, 0.9)
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
        opt = build_optimizer(load_config(None, ["train.max_steps=1"]), model)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not any(id(p) in in_opt for p in model.transformer.h[0].parameters())
        assert in_opt
    finally:
        for p in model.transformer.h[0].parameters():
            p.requires_grad_(True)
