"""Compaction: cut structurally pruned heads/neurons out of a tiny BLOOM; outputs must not change."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_bloom import PAD, TARGETS, VOCAB, make_model
from transformers import BloomForCausalLM, BloomForSequenceClassification
from transformers.models.bloom.modeling_bloom import BloomAttention

from bloomray.export.consolidate import ExportError, compact_model
from bloomray.model.build import count_parameters
from bloomray.model.compact import (
    SPEC_KEY,
    CompactBloomAttention,
    compact_state_dict,
    find_removable,
    is_compactable,
)
from bloomray.prune.masks import structured_masks, target_names

HIDDEN, N_LAYER, N_HEAD = 64, 2, 4  # the tiny preset (tiny_bloom.make_model)
HEAD_DIM, FFN = HIDDEN // N_HEAD, 4 * HIDDEN
# Different sparsity per layer, so layers keep different numbers of heads and neurons.
LAYER_SPARSITY = {0: 0.75, 1: 0.25}


def prune_(
    model: torch.nn.Module, structure: str, layer_sparsity: dict[int, float]
) -> dict[str, torch.Tensor]:
    """Zero structured masks from |w| (per layer at its own sparsity) into weights and biases."""
    state = model.state_dict()
    names = target_names(model, TARGETS)
    masks: dict[str, torch.Tensor] = {}
    for layer, sparsity in layer_sparsity.items():
        scores = {n: state[n].abs() for n in names if f".h.{layer}." in n}
        masks.update(structured_masks(scores, sparsity, structure, N_HEAD))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return masks


def kept_from_masks(masks: dict[str, torch.Tensor], layer: int) -> tuple[list[int], list[int]]:
    qkv = masks.get(f"transformer.h.{layer}.self_attention.query_key_value.bias")
    up = masks.get(f"transformer.h.{layer}.mlp.dense_h_to_4h.bias")
    heads = list(range(N_HEAD)) if qkv is None else qkv.view(N_HEAD, -1)[:, 0].nonzero().flatten().tolist()
    neurons = list(range(FFN)) if up is None else up.nonzero().flatten().tolist()
    return heads, neurons


def expected_parameters(dense: int, heads: list[list[int]], neurons: list[list[int]]) -> int:
    # A removed head: 3*head_dim rows (+ biases) of query_key_value and head_dim columns of dense.
    per_head = 3 * HEAD_DIM * HIDDEN + 3 * HEAD_DIM + HEAD_DIM * HIDDEN
    # A removed neuron: a row (+ bias) of dense_h_to_4h and a column of dense_4h_to_h.
    per_neuron = HIDDEN + 1 + HIDDEN
    removed_heads = sum(N_HEAD - len(h) for h in heads)
    removed_neurons = sum(FFN - len(n) for n in neurons)
    return dense - removed_heads * per_head - removed_neurons * per_neuron


def random_ids(batch: int = 3, seq: int = 14, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n] = PAD
        mask[row, :n] = 0
    return ids, mask


@pytest.fixture(scope="module")
def pruned():
    """(masked model, its masks, compact model, compact info) for mlp+heads, per-layer sparsity."""
    model = make_model()
    dense_params = count_parameters(model)
    masks = prune_(model, "mlp+heads", LAYER_SPARSITY)
    compact, info = compact_model(model)
    return model, masks, compact, info, dense_params


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


# --------------------------------------------------------------------------- find_removable


def test_find_removable_reads_kept_units_from_zeros(pruned):
    model, masks, *_ = pruned
    spec = find_removable(model.state_dict(), N_LAYER, N_HEAD)
    for layer in range(N_LAYER):
        heads, neurons = kept_from_masks(masks, layer)
        assert spec["heads"][layer] == heads
        assert spec["neurons"][layer] == neurons
    assert [len(h) for h in spec["heads"]] == [1, 3]  # layers differ
    assert [len(n) for n in spec["neurons"]] == [64, 192]
    assert is_compactable(spec, N_HEAD, HIDDEN)


def test_find_removable_on_an_unpruned_model_keeps_everything():
    spec = find_removable(make_model().state_dict(), N_LAYER, N_HEAD)
    assert spec["heads"] == [list(range(N_HEAD))] * N_LAYER
    assert spec["neurons"] == [list(range(FFN))] * N_LAYER
    assert not is_compactable(spec, N_HEAD, HIDDEN)


def test_find_removable_needs_value_rows_and_bias_zero():
    state = {k: v.clone() for k, v in make_model().state_dict().items()}
    qkv_w = state["transformer.h.0.self_attention.query_key_value.weight"].view(N_HEAD, 3, HEAD_DIM, HIDDEN)
    qkv_b = state["transformer.h.0.self_attention.query_key_value.bias"].view(N_HEAD, 3, HEAD_DIM)
    qkv_w[1, 2] = 0  # head 1's value rows zero but its value bias is not: the head still contributes
    qkv_w[3, 2], qkv_b[3, 2] = 0, 0  # head 3: value rows and bias zero -> removable
    up_b = state["transformer.h.1.mlp.dense_h_to_4h.bias"]
    state["transformer.h.1.mlp.dense_h_to_4h.weight"][[5, 7]] = 0
    up_b[7] = 0  # neuron 5 keeps its bias (GELU(b) != 0), neuron 7 is removable
    spec = find_removable(state, N_LAYER, N_HEAD)
    assert spec["heads"][0] == [0, 1, 2]
    assert spec["neurons"][1] == [n for n in range(FFN) if n != 7]


def test_find_removable_keeps_one_head_and_neuron_of_an_empty_layer():
    state = {k: v.clone() for k, v in make_model().state_dict().items()}
    for k in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        state[f"transformer.h.1.{k}"].zero_()
    for k in ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"):
        state[f"transformer.h.1.{k}"].zero_()
    spec = find_removable(state, N_LAYER, N_HEAD)
    assert spec["heads"][1] == [0] and spec["neurons"][1] == [0]


def test_compact_state_dict_slices_kept_rows_and_columns(pruned):
    model, *_ = pruned
    state = model.state_dict()
    spec = find_removable(state, N_LAYER, N_HEAD)
    out = compact_state_dict(state, spec, N_HEAD)
    h = spec["heads"][0][0]
    qkv = out["transformer.h.0.self_attention.query_key_value.weight"]
    assert qkv.shape == (3 * HEAD_DIM, HIDDEN)
    assert torch.equal(
        qkv, state["transformer.h.0.self_attention.query_key_value.weight"][h * 48 : (h + 1) * 48]
    )
    dense = out["transformer.h.0.self_attention.dense.weight"]
    assert torch.equal(dense, state["transformer.h.0.self_attention.dense.weight"][:, h * 16 : (h + 1) * 16])
    n = spec["neurons"][1]
    assert torch.equal(
        out["transformer.h.1.mlp.dense_4h_to_h.weight"],
        state["transformer.h.1.mlp.dense_4h_to_h.weight"][:, n],
    )
    assert torch.equal(
        out["transformer.h.1.mlp.dense_h_to_4h.bias"], state["transformer.h.1.mlp.dense_h_to_4h.bias"][n]
    )
    # Untouched tensors pass through.
    assert out["transformer.word_embeddings.weight"] is state["transformer.word_embeddings.weight"]


# --------------------------------------------------------------------------- compact model


def test_compact_shapes_and_spec(pruned):
    model, masks, compact, info, _ = pruned
    assert isinstance(compact, BloomForCausalLM)
    spec = getattr(compact.config, SPEC_KEY)
    assert info["kept_heads"] == [1, 3] and info["kept_neurons"] == [64, 192]
    assert info["compact_logit_diff"] <= 1e-4
    for layer, block in enumerate(compact.transformer.h):
        heads, neurons = kept_from_masks(masks, layer)
        attn = block.self_attention
        assert isinstance(attn, CompactBloomAttention)
        assert attn.num_heads == len(heads) and attn.kept_heads.tolist() == heads == spec["heads"][layer]
        assert attn.query_key_value.weight.shape == (3 * HEAD_DIM * len(heads), HIDDEN)
        assert attn.query_key_value.bias.shape == (3 * HEAD_DIM * len(heads),)
        assert attn.dense.weight.shape == (HIDDEN, HEAD_DIM * len(heads))
        assert block.mlp.dense_h_to_4h.weight.shape == (len(neurons), HIDDEN)
        assert block.mlp.dense_4h_to_h.weight.shape == (HIDDEN, len(neurons))
    # The masked model itself is untouched.
    assert model.transformer.h[0].self_attention.query_key_value.weight.shape == (3 * HIDDEN, HIDDEN)


def test_compact_parameter_count_by_hand(pruned):
    model, masks, compact, _, dense_params = pruned
    assert count_parameters(model) == dense_params
    heads, neurons = zip(*(kept_from_masks(masks, layer) for layer in range(N_LAYER)), strict=True)
    expected = expected_parameters(dense_params, list(heads), list(neurons))
    # layer 0 drops 3 heads and 192 neurons, layer 1 drops 1 head and 64 neurons
    assert expected == dense_params - 4 * 4144 - 256 * 129
    assert count_parameters(compact) == expected
    assert compact.lm_head.weight is compact.transformer.word_embeddings.weight  # still tied


def test_compact_logits_match_masked(pruned):
    model, _, compact, *_ = pruned
    ids = random_ids()
    ref = logits(model, ids)
    assert torch.allclose(logits(compact, ids), ref, atol=1e-4, rtol=0)
    assert ref.std() > 0.1  # a model whose outputs would show a wrong head


def test_compact_logits_match_with_left_padding(pruned):
    model, _, compact, *_ = pruned
    ids, mask = left_padded(random_ids(seed=1), [0, 3, 7])
    ref, out = logits(model, ids, mask), logits(compact, ids, mask)
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-4, rtol=0)


def test_compact_uses_the_kept_heads_alibi_slopes(pruned):
    # Negative control: the same compact weights with slopes of heads 0..k-1 give other logits.
    model, _, compact, *_ = pruned
    wrong = copy.deepcopy(compact)
    for block in wrong.transformer.h:
        attn = block.self_attention
        attn.kept_heads.copy_(torch.arange(attn.num_heads))
    ids, mask = left_padded(random_ids(seed=2), [0, 4, 0])
    diff = (logits(wrong, ids, mask) - logits(model, ids, mask))[mask.bool()].abs().max()
    assert diff > 1e-3


def test_compact_generate_with_kv_cache_same_greedy_tokens(pruned):
    model, _, compact, *_ = pruned
    ids, mask = left_padded(random_ids(batch=2, seq=8, seed=3), [0, 3])
    kwargs = {
        "attention_mask": mask,
        "max_new_tokens": 10,
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": PAD,
    }
    ref = model.generate(ids, **kwargs)
    out = compact.generate(ids, **kwargs)
    assert out.shape == (2, 18)
    assert torch.equal(out, ref)
    # With and without the cache the compact model agrees too (the cache holds per-layer head counts).
    assert torch.equal(compact.generate(ids, **{**kwargs, "use_cache": False}), out)


@pytest.mark.parametrize("structure", ["mlp", "heads"])
def test_compact_one_kind_of_unit(structure: str):
    model = make_model(seed=4)
    masks = prune_(model, structure, {0: 0.5, 1: 0.5})
    compact, info = compact_model(model)
    ids = random_ids(seed=4)
    assert torch.allclose(logits(compact, ids), logits(model, ids), atol=1e-4, rtol=0)
    heads, neurons = zip(*(kept_from_masks(masks, layer) for layer in range(N_LAYER)), strict=True)
    assert count_parameters(compact) == expected_parameters(
        count_parameters(model), list(heads), list(neurons)
    )
    attn_cls = BloomAttention if structure == "mlp" else CompactBloomAttention
    assert all(type(b.self_attention) is attn_cls for b in compact.transformer.h)
    assert info["kept_heads"] == ([N_HEAD] * N_LAYER if structure == "mlp" else [2, 2])
    assert info["kept_neurons"] == ([FFN // 2] * N_LAYER if structure == "mlp" else [FFN] * N_LAYER)


def test_compact_model_raises_when_logits_differ(pruned):
    model, *_ = pruned
    with pytest.raises(ExportError, match="logits differ"):
        compact_model(model, tolerance=-1.0)


def test_compact_classification_model():
    model = make_model("classification", seed=5)
    assert isinstance(model, BloomForSequenceClassification) and model.config.pad_token_id == PAD
    masks = prune_(model, "mlp+heads", {0: 0.25, 1: 0.5})
    compact, info = compact_model(model)
    assert isinstance(compact, BloomForSequenceClassification)
    assert info["kept_heads"] == [3, 2]
    # Right padding: the score is read at each row's last non-pad token.
    ids = random_ids(seed=5)
    ids[1, 10:] = PAD
    ids[2, 5:] = PAD
    ref, out = logits(model, ids), logits(compact, ids)
    assert out.shape == (3, 3)
    assert torch.allclose(out, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ref[0], ref[1], atol=1e-3)  # different rows, different logits
    heads, neurons = zip(*(kept_from_masks(masks, layer) for layer in range(N_LAYER)), strict=True)
    assert count_parameters(compact) == expected_parameters(
        count_parameters(model), list(heads), list(neurons)
    )
