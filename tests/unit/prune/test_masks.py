"""Masks: which weights are targets, unstructured (layer/global), 2:4, structured neurons/heads."""

from __future__ import annotations

import pytest
import torch

from bloomray.model.build import build_from_config, preset_config
from bloomray.prune.masks import (
    layer_of,
    sparsity_of,
    structured_masks,
    target_names,
    two_four_masks,
    unstructured_masks,
)

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
HIDDEN, N_LAYER, N_HEAD = 64, 2, 4
HEAD_DIM = HIDDEN // N_HEAD
FFN = 4 * HIDDEN


@pytest.fixture(scope="module")
def model():
    return build_from_config("causal_lm", preset_config("tiny", vocab_size=128, pad_token_id=0), seed=0)


@pytest.fixture(scope="module")
def block_scores(model):
    """|w| of every targeted block weight, with the magnitudes spread out (random per tensor)."""
    g = torch.Generator().manual_seed(0)
    names = target_names(model, TARGETS)
    params = dict(model.named_parameters())
    return {n: torch.randn(params[n].shape, generator=g).abs() for n in names}


def rand_scores(*shapes: tuple[int, int], seed: int = 0, scales: tuple[float, ...] | None = None):
    g = torch.Generator().manual_seed(seed)
    scales = scales or (1.0,) * len(shapes)
    return {
        f"t{i}": torch.rand(s, generator=g) * k + 1e-3
        for i, (s, k) in enumerate(zip(shapes, scales, strict=True))
    }


def zeros_of(mask: torch.Tensor) -> int:
    return int((mask == 0).sum())


# --------------------------------------------------------------------------- targets


def test_target_names_are_only_block_linear_weights(model):
    names = target_names(model, TARGETS)
    assert len(names) == 4 * N_LAYER
    suffixes = {".".join(n.split(".")[-2:]) for n in names}
    assert suffixes == {f"{t}.weight" for t in TARGETS}
    params = dict(model.named_parameters())
    for n in names:
        assert ".h." in n and params[n].ndim == 2
        assert not any(bad in n for bad in ("word_embeddings", "layernorm", "lm_head", "bias"))
    assert {layer_of(n) for n in names} == set(range(N_LAYER))
    # Everything that is not a block Linear weight is left out.
    left_out = set(params) - set(names)
    assert "transformer.word_embeddings.weight" in left_out
    assert "transformer.h.0.mlp.dense_h_to_4h.bias" in left_out
    assert "transformer.h.0.input_layernorm.weight" in left_out


def test_target_names_match_module_names_exactly(model):
    # "dense" is the attention output projection only, not dense_h_to_4h / dense_4h_to_h.
    assert target_names(model, ["dense"]) == [
        f"transformer.h.{i}.self_attention.dense.weight" for i in range(N_LAYER)
    ]
    assert target_names(model, ["query_key_value"]) == [
        f"transformer.h.{i}.self_attention.query_key_value.weight" for i in range(N_LAYER)
    ]
    assert target_names(model, ["word_embeddings", "lm_head"]) == []


def test_target_names_leave_the_classification_head_out():
    cls = build_from_config("classification", preset_config("tiny", vocab_size=128, pad_token_id=0), seed=0)
    names = target_names(cls, TARGETS)
    assert len(names) == 4 * N_LAYER
    assert not any("score" in n for n in names)


# --------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layer_scope_exact_fraction_per_tensor_keeps_largest(sparsity: float):
    scores = rand_scores((8, 16), (32, 4), (5, 7))
    masks = unstructured_masks(scores, sparsity, "layer")
    assert masks.keys() == scores.keys()
    for n, s in scores.items():
        m = masks[n]
        assert m.shape == s.shape
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert zeros_of(m) == int(round(sparsity * s.numel()))
        if 0 < sparsity:
            assert s[m == 1].min() > s[m == 0].max()  # the kept are exactly the largest


def test_layer_scope_on_model_weights(block_scores):
    masks = unstructured_masks(block_scores, 0.6, "layer")
    _, per = sparsity_of({n: block_scores[n] * masks[n] for n in block_scores})
    for n, frac in per.items():
        assert frac == pytest.approx(round(0.6 * block_scores[n].numel()) / block_scores[n].numel())


def test_global_scope_exact_overall_fraction_with_differing_tensors():
    # t1 has magnitudes 10x t0's: one global threshold prunes t0 much harder.
    scores = rand_scores((16, 16), (16, 16), (8, 8), scales=(1.0, 10.0, 3.0))
    masks = unstructured_masks(scores, 0.5, "global")
    total = sum(s.numel() for s in scores.values())
    assert sum(zeros_of(m) for m in masks.values()) == int(round(0.5 * total))
    overall, per = sparsity_of({n: scores[n] * masks[n] for n in scores})
    assert overall == pytest.approx(int(round(0.5 * total)) / total)
    assert per["t0"] > 0.9 and per["t1"] < 0.1  # per-tensor fractions differ
    kept = torch.cat([scores[n][masks[n] == 1] for n in scores])
    pruned = torch.cat([scores[n][masks[n] == 0] for n in scores])
    assert kept.min() > pruned.max()


def test_global_and_layer_scope_differ():
    scores = rand_scores((16, 16), (16, 16), scales=(1.0, 10.0))
    layer = unstructured_masks(scores, 0.5, "layer")
    glob = unstructured_masks(scores, 0.5, "global")
    assert zeros_of(layer["t0"]) == zeros_of(layer["t1"]) == 128
    assert zeros_of(glob["t0"]) != zeros_of(glob["t1"])


# --------------------------------------------------------------------------- 2:4


def test_two_four_exactly_two_of_every_four_keeping_the_largest():
    scores = rand_scores((6, 16), (4, 8))
    masks = two_four_masks(scores)
    for n, s in scores.items():
        m = masks[n]
        assert m.shape == s.shape
        rows, cols = s.shape
        groups_m = m.reshape(rows, cols // 4, 4)
        groups_s = s.reshape(rows, cols // 4, 4)
        assert torch.equal(groups_m.sum(-1), torch.full((rows, cols // 4), 2.0))
        kept_min = torch.where(groups_m == 1, groups_s, torch.inf).amin(-1)
        pruned_max = torch.where(groups_m == 0, groups_s, -torch.inf).amax(-1)
        assert (kept_min > pruned_max).all()
        assert zeros_of(m) == s.numel() // 2


def test_two_four_groups_run_along_the_input_dim():
    # Largest two in each group of 4 *columns*: a pattern that differs from grouping rows.
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0, 9.0, 8.0, 0.5, 0.1]]).repeat(4, 1)
    m = two_four_masks({"w": s})["w"]
    assert m[0].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(m, m[0].expand_as(m))


def test_two_four_needs_input_dim_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        two_four_masks({"w": torch.rand(4, 6)})


def test_two_four_on_model_weights(block_scores):
    masks = two_four_masks(block_scores)
    overall, per = sparsity_of(masks)
    assert overall == 0.5 and set(per.values()) == {0.5}


# --------------------------------------------------------------------------- structured


def _mlp_names(layer: int) -> tuple[str, str]:
    pre = f"transformer.h.{layer}.mlp."
    return pre + "dense_h_to_4h.weight", pre + "dense_4h_to_h.weight"


def _attn_names(layer: int) -> tuple[str, str]:
    pre = f"transformer.h.{layer}.self_attention."
    return pre + "query_key_value.weight", pre + "dense.weight"


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_structured_mlp_removes_whole_neurons(block_scores, sparsity: float):
    masks = structured_masks(block_scores, sparsity, "mlp", N_HEAD)
    assert not any("self_attention" in n for n in masks)  # mlp only
    for layer in range(N_LAYER):
        up, down = _mlp_names(layer)
        m_up, m_b, m_down = masks[up], masks[up.replace(".weight", ".bias")], masks[down]
        assert m_up.shape == (FFN, HIDDEN) and m_b.shape == (FFN,) and m_down.shape == (HIDDEN, FFN)
        neuron = m_up[:, 0]
        assert torch.equal(m_up, neuron[:, None].expand_as(m_up))  # whole rows
        assert torch.equal(m_b, neuron)  # and their biases
        assert torch.equal(m_down, neuron[None, :].expand_as(m_down))  # whole columns of 4h_to_h
        assert zeros_of(neuron) == int(round(sparsity * FFN))
        # Kept neurons are the most important (row of h_to_4h + column of 4h_to_h).
        unit = block_scores[up].sum(1) + block_scores[down].sum(0)
        assert unit[neuron == 1].min() > unit[neuron == 0].max()


def test_structured_mlp_keeps_at_least_one_neuron(block_scores):
    masks = structured_masks(block_scores, 0.9999, "mlp", N_HEAD)
    for layer in range(N_LAYER):
        up, _ = _mlp_names(layer)
        assert int(masks[up][:, 0].sum()) == 1


def test_structured_mlp_without_down_projection_scores():
    up, down = _mlp_names(0)
    s = torch.rand(FFN, HIDDEN, generator=torch.Generator().manual_seed(3))
    masks = structured_masks({up: s}, 0.5, "mlp", N_HEAD)
    assert down not in masks
    neuron = masks[up][:, 0]
    assert zeros_of(neuron) == FFN // 2
    assert s.sum(1)[neuron == 1].min() > s.sum(1)[neuron == 0].max()


def test_structured_heads_remove_whole_heads(block_scores):
    scores = {n: s.clone() for n, s in block_scores.items()}
    qkv, dense = _attn_names(0)
    # Make heads 1 and 3 of layer 0 the important ones.
    for h in (1, 3):
        scores[qkv][h * 3 * HEAD_DIM : (h + 1) * 3 * HEAD_DIM] += 5.0
    masks = structured_masks(scores, 0.5, "heads", N_HEAD)
    assert not any(".mlp." in n for n in masks)  # heads only
    for layer in range(N_LAYER):
        qkv, dense = _attn_names(layer)
        m_qkv, m_b, m_dense = masks[qkv], masks[qkv.replace(".weight", ".bias")], masks[dense]
        assert (
            m_qkv.shape == (3 * HIDDEN, HIDDEN)
            and m_b.shape == (3 * HIDDEN,)
            and m_dense.shape == (HIDDEN, HIDDEN)
        )
        head = m_qkv[:, 0].reshape(N_HEAD, 3 * HEAD_DIM)[:, 0]
        assert zeros_of(head) == N_HEAD // 2
        # q, k and v rows of a head go together: 3*head_dim consecutive rows, plus biases.
        assert torch.equal(m_qkv, head.repeat_interleave(3 * HEAD_DIM)[:, None].expand_as(m_qkv))
        assert torch.equal(m_b, head.repeat_interleave(3 * HEAD_DIM))
        # ... and the head's head_dim input columns of the output projection.
        assert torch.equal(m_dense, head.repeat_interleave(HEAD_DIM)[None, :].expand_as(m_dense))
        if layer == 0:
            assert head.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_structured_heads_importance_includes_the_output_projection(block_scores):
    scores = {n: s.clone() for n, s in block_scores.items()}
    _, dense = _attn_names(1)
    scores[dense][:, 2 * HEAD_DIM : 3 * HEAD_DIM] += 50.0  # head 2 matters through dense only
    masks = structured_masks(scores, 0.75, "heads", N_HEAD)
    qkv, _ = _attn_names(1)
    assert masks[qkv][:, 0].reshape(N_HEAD, 3 * HEAD_DIM)[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_structured_heads_keep_at_least_one(block_scores):
    masks = structured_masks(block_scores, 0.95, "heads", N_HEAD)
    for layer in range(N_LAYER):
        qkv, _ = _attn_names(layer)
        assert int(masks[qkv][:, 0].sum()) == 3 * HEAD_DIM  # exactly one head


def test_structured_mlp_and_heads_together(block_scores):
    masks = structured_masks(block_scores, 0.5, "mlp+heads", N_HEAD)
    assert set(masks) == set(block_scores) | {
        n.replace(".weight", ".bias") for n in block_scores if "h_to_4h" in n or "query_key_value" in n
    }
    overall, per = sparsity_of(masks)
    assert set(per.values()) == {0.5}
    assert overall == 0.5


# --------------------------------------------------------------------------- helpers


def test_sparsity_of_math():
    tensors = {"a": torch.tensor([0.0, 1.0, 0.0, 2.0]), "b": torch.zeros(2, 2), "c": torch.ones(2, 4)}
    overall, per = sparsity_of(tensors)
    assert per == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert overall == pytest.approx(6 / 16)  # element-weighted, not the mean of the fractions
    assert sparsity_of({}) == (0.0, {})


def test_layer_of():
    assert layer_of("transformer.h.12.mlp.dense_h_to_4h.weight") == 12
    assert layer_of("base_model.model.transformer.h.3.self_attention.dense.weight") == 3
    with pytest.raises(ValueError, match="not inside a transformer block"):
        layer_of("transformer.word_embeddings.weight")
