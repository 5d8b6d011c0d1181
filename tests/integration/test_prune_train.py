"""Pruning during training on real DeepSpeed with 2 CPU workers: masks hold in every ZeRO stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bloomray.config import load_config
from bloomray.export.consolidate import consolidated_state_dict
from bloomray.export.load import load_model
from bloomray.export.run import run_training
from bloomray.train.checkpoint import DS_TAG, load_deepspeed_file
from bloomray.train.hook_state import HOOKS_META_FILE, HOOKS_TENSORS_FILE, LEGACY_HOOKS_FILE, load_hook_states

pytestmark = pytest.mark.integration

PRUNE = [
    "model.preset=tiny",
    "data.tokenizer.vocab_size=512",
    "data.block_size=32",
    "train.max_steps=12",
    "train.log_every=4",
    "train.eval_every=12",
    "train.eval_max_batches=2",
    "train.checkpoint_every=12",
    "prune.method=magnitude",
    "prune.schedule=one_shot",
    "prune.final_sparsity=0.5",
    "prune.start_fraction=0.25",  # masks at step 3, then 9 more optimizer steps
]


def _fp32_masters_stage0(
    ckpt: Path, model_names: list[str], shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """DeepSpeed's ZeRO-0 bf16 optimizer masters (``fp32_groups``), matched to names by group order."""
    states = load_deepspeed_file(ckpt / DS_TAG / "mp_rank_00_model_states.pt")
    groups = states["optimizer"]["fp32_groups"]
    # bloomray's param groups: weights with decay (>= 2-D, not LayerNorm) first, then the rest.
    decay = [n for n in model_names if len(shapes[n]) >= 2 and "layernorm" not in n.lower()]
    rest = [n for n in model_names if n not in decay]
    out = {}
    for names, tensors in zip((decay, rest), groups, strict=True):
        assert [tuple(t.shape) for t in tensors] == [tuple(shapes[n]) for n in names]
        out.update(zip(names, tensors, strict=True))
    return out


def _saved_masks(ckpt: Path) -> dict[str, torch.Tensor]:
    """The prune hook's masks as the checkpoint holds them: safetensors + JSON, no pickle."""
    assert (ckpt / HOOKS_TENSORS_FILE).is_file() and (ckpt / HOOKS_META_FILE).is_file()
    assert not (ckpt / LEGACY_HOOKS_FILE).exists()
    state = load_hook_states(ckpt, torch.device("cpu"))[0]
    assert set(state) == {"masks", "taylor", "target"}
    return state["masks"]


# ZeRO-0 keeps its fp32 masters per parameter; ZeRO-1 and ZeRO-2 (flat partitions) are the 2:4
# and the structured runs below, which check the same fp32 masters; ZeRO-3's (partitions
# gathered at save) are checked after one-shot masks and distillation in test_distill_recovery.
def test_masks_hold_in_fp32_masters_under_zero0(tmp_path, ray_local):
    out = tmp_path / "zero0"
    ds = ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"]  # bf16: the masters are DeepSpeed's
    summary = run_training(load_config("tiny-cpu", [*PRUNE, *ds]), out)
    ckpt = Path(summary["checkpoint"])
    masks = _saved_masks(ckpt)
    assert masks and all(0.45 < 1 - m.mean().item() < 0.55 for m in masks.values())

    model = load_model(out / "model")  # the exported (sparse-packed) model
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    masters = _fp32_masters_stage0(ckpt, names, shapes)
    exported = dict(model.named_parameters())
    for name, mask in masks.items():
        pruned = mask == 0
        assert torch.count_nonzero(masters[name][pruned]) == 0, f"{name}: optimizer revived pruned weights"
        assert torch.count_nonzero(exported[name][pruned]) == 0, name
        assert torch.count_nonzero(masters[name][~pruned]) > 0.9 * (~pruned).sum(), name  # the rest trained
    m = json.loads((out / "summary.json").read_text())
    assert abs(m["sparsity"] - 0.5) < 0.01
    card = (out / "model" / "README.md").read_text()
    assert "## Pruning" in card and "unstructured magnitude" in card and "| layer | sparsity |" in card


@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        (2, ["prune.method=structured", "prune.structure=mlp+heads", "prune.importance=taylor"]),
        (1, ["prune.method=2:4"]),
    ],
    ids=["structured-taylor-zero2", "2to4-zero1"],
)
def test_structured_taylor_and_2to4_masks_hold(stage, extra, tmp_path, ray_local):
    out = tmp_path / "run"
    summary = run_training(load_config("tiny-cpu", [*PRUNE, f"deepspeed.zero_stage={stage}", *extra]), out)
    ckpt = Path(summary["checkpoint"])
    masks = _saved_masks(ckpt)
    masters = consolidated_state_dict(ckpt)
    for name, mask in masks.items():
        assert torch.count_nonzero(masters[name][mask == 0]) == 0, name
    if "prune.method=2:4" in extra:
        w = masters[next(n for n in masks if n.endswith("dense_h_to_4h.weight"))]
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()  # 2 of every 4
        assert abs(summary["sparsity"] - 0.5) < 0.01
    else:
        # whole neurons went, so the export is compacted into smaller shapes
        config = json.loads((out / "model" / "config.json").read_text())
        assert "bloomray_compact" in config
        assert summary["export"]["parameters"] < summary["export"]["parameters_dense"]
