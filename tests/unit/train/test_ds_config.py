"""The DeepSpeed JSON config derived from a Config."""

from __future__ import annotations

import pytest

from bloomray.config import load_config, preset_names
from bloomray.train.engine import MIN_BUCKET, ZERO3_SUB_GROUP, compute_dtype, deepspeed_config

BASE = ["train.max_steps=5"]


def ds(*overrides: str) -> dict:
    return deepspeed_config(load_config(None, [*BASE, *overrides]))


def test_batch_sizes_are_consistent():
    d = ds("train.global_batch_size=48", "train.micro_batch_size=4", "scaling.num_workers=3")
    assert d["train_batch_size"] == 48
    assert d["train_micro_batch_size_per_gpu"] == 4
    assert d["gradient_accumulation_steps"] == 4
    assert d["train_batch_size"] == d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * 3


@pytest.mark.parametrize("precision,bf16,fp16", [("bf16", True, False), ("fp32", False, False)])
def test_precision_cpu(precision: str, bf16: bool, fp16: bool):
    d = ds(f"deepspeed.precision={precision}")
    assert d["bf16"]["enabled"] is bf16
    assert d["fp16"]["enabled"] is fp16


def test_fp16_on_gpu_uses_dynamic_loss_scale():
    d = ds("deepspeed.precision=fp16", "scaling.use_gpu=true")
    assert d["fp16"]["enabled"] is True
    assert d["bf16"]["enabled"] is False
    assert d["fp16"]["loss_scale"] == 0  # 0 = dynamic


def test_compute_dtype():
    import torch

    assert compute_dtype(load_config(None, BASE)) == torch.bfloat16
    assert compute_dtype(load_config(None, [*BASE, "deepspeed.precision=fp32"])) == torch.float32


def test_grad_clip():
    assert ds("train.grad_clip=0.5")["gradient_clipping"] == 0.5
    assert ds("train.grad_clip=0")["gradient_clipping"] == 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(stage: int):
    z = ds(f"deepspeed.zero_stage={stage}")["zero_optimization"]
    assert z["stage"] == stage
    assert ("overlap_comm" in z) == (stage >= 1)
    assert ("stage3_gather_16bit_weights_on_model_save" in z) == (stage == 3)
    assert "offload_optimizer" not in z and "offload_param" not in z


def test_overlap_comm_only_on_gpu():
    assert ds("deepspeed.zero_stage=2")["zero_optimization"]["overlap_comm"] is False
    assert ds("deepspeed.zero_stage=2", "scaling.use_gpu=true")["zero_optimization"]["overlap_comm"] is True


def test_offload_sections():
    z = ds(
        "deepspeed.zero_stage=3",
        "deepspeed.optimizer=cpu_adam",
        "deepspeed.offload_optimizer=true",
        "deepspeed.offload_params=true",
    )["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": False}
    z = ds(
        "deepspeed.zero_stage=2",
        "deepspeed.optimizer=cpu_adam",
        "deepspeed.offload_optimizer=true",
        "scaling.use_gpu=true",
    )["zero_optimization"]
    assert z["offload_optimizer"]["pin_memory"] is True
    assert "offload_param" not in z


def test_client_optimizer_is_allowed_and_quiet():
    d = ds()
    assert d["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in d and "scheduler" not in d  # the client's AdamW and LR scheduler are used
    assert d["steps_per_print"] >= 10**6


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_gives_a_valid_deepspeed_config(preset):
    import json

    cfg = load_config(preset)
    d = deepspeed_config(cfg)
    json.dumps(d)  # serialisable as DeepSpeed's JSON config
    assert d["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    t = d["train_batch_size"]
    assert (
        t == d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * cfg.scaling.num_workers
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_buckets_are_sized_from_the_model_width(stage: int):
    cfg = load_config(None, [*BASE, f"deepspeed.zero_stage={stage}"])
    wide = deepspeed_config(cfg, hidden_size=4096)["zero_optimization"]
    assert wide["reduce_bucket_size"] == 4096**2 == wide["allgather_bucket_size"]
    narrow = deepspeed_config(cfg, hidden_size=64)["zero_optimization"]
    assert narrow["reduce_bucket_size"] == MIN_BUCKET  # tiny models keep few, larger buckets
    if stage == 3:
        assert wide["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
        assert wide["stage3_param_persistence_threshold"] == 40960
        assert wide["sub_group_size"] == ZERO3_SUB_GROUP
    else:
        assert "sub_group_size" not in wide and "stage3_prefetch_bucket_size" not in wide
    # without a width DeepSpeed's own defaults apply
    assert "reduce_bucket_size" not in deepspeed_config(cfg)["zero_optimization"]
