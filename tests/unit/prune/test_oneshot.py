"""One-shot pruning with calibration data: Wanda, SparseGPT and the magnitude baseline.

Exact sparsity and 2:4 patterns, masks matching the zeroed weights, SparseGPT's reconstruction
error against magnitude and Wanda on the same data, Wanda's use of activation norms, the
argument checks, and determinism. Tiny fp32 BLOOMs, no Ray.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_bloom import TARGETS, VOCAB, make_model
from transformers import BloomConfig

from bloomray.errors import EXIT_USAGE, BloomrayError
from bloomray.model.build import build_from_config
from bloomray.prune.calibrate import InputStats
from bloomray.prune.masks import target_names, two_four_masks, unstructured_masks
from bloomray.prune.oneshot import (
    OneShotError,
    magnitude_mask,
    oneshot_prune,
    reconstruction_error,
    reconstruction_errors,
    sparsegpt_prune,
    wanda_mask,
)

METHODS = ["magnitude", "wanda", "sparsegpt"]


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(3, VOCAB, (32, 32), generator=torch.Generator().manual_seed(0))


def pruned(dense: torch.nn.Module, calib: torch.Tensor, method: str, pattern: str = "unstructured", **kw):
    """(pruned copy of ``dense``, masks)."""
    model = copy.deepcopy(dense)
    masks = oneshot_prune(model, calib, method, 0.5, pattern, TARGETS, batch_size=8, **kw)
    return model, masks


def per_row_magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Independent reference: prune the int(sparsity * cols) smallest |w| of each row (by sorting)."""
    k = int(sparsity * weight.shape[1])
    order = weight.abs().argsort(dim=1)
    mask = torch.ones_like(weight)
    for r in range(weight.shape[0]):
        mask[r, order[r, :k]] = 0.0
    return mask


# --------------------------------------------------------------------------- exact sparsity


@pytest.mark.parametrize("method", METHODS)
def test_unstructured_half_is_exact_per_weight(dense, calib, method):
    model, masks = pruned(dense, calib, method)
    params = dict(model.named_parameters())
    assert list(masks) == target_names(model, TARGETS)
    for name, mask in masks.items():
        w = params[name]
        assert int((w == 0).sum()) == w.numel() // 2, name
        if method == "wanda":  # compared within each output row: int(0.5 * in_features) per row
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
        assert torch.equal(w == 0, mask == 0), f"{name}: mask and zeros differ"


@pytest.mark.parametrize("method", METHODS)
def test_two_four_pattern_is_exact(dense, calib, method):
    model, masks = pruned(dense, calib, method, "2:4")
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        w = params[name]
        zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (zeros == 2).all(), name
        assert torch.equal(w == 0, mask == 0), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_outputs_stay_finite_and_untargeted_weights_untouched(dense, calib, method, pattern):
    model, masks = pruned(dense, calib, method, pattern)
    with torch.no_grad():
        logits = model(calib[:4]).logits
    assert torch.isfinite(logits).all()
    before = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if name not in masks:
            assert torch.equal(p, before[name]), f"{name} changed"
    assert model.training == dense.training


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(dense, calib, pattern):
    errors = {}
    for method in METHODS:
        model, _ = pruned(dense, calib, method, pattern)
        errors[method] = reconstruction_errors(dense, model, calib, TARGETS, batch_size=8)
    total = {m: sum(e.values()) for m, e in errors.items()}
    assert total["sparsegpt"] < 0.8 * total["magnitude"], total
    assert total["sparsegpt"] < 0.8 * total["wanda"], total
    for name in errors["sparsegpt"]:  # and in every layer, not only on the sum
        assert errors["sparsegpt"][name] < min(errors["magnitude"][name], errors["wanda"][name]), name


def test_reconstruction_error_is_the_output_difference():
    g = torch.Generator().manual_seed(3)
    w, w2, x = (torch.randn(s, generator=g) for s in ((5, 8), (5, 8), (2, 7, 8)))
    expected = float(((x @ w.T) - (x @ w2.T)).pow(2).sum())
    assert reconstruction_error(w, w2, x) == pytest.approx(expected, rel=1e-5)
    assert reconstruction_error(w, w, x) == 0.0


def test_sparsegpt_with_an_isotropic_hessian_is_magnitude_pruning():
    # H = c*I: no input correlations, so OBS has nothing to compensate with (zero updates) and
    # the cost w^2 / [H^-1]_jj ranks like |w|.
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    x = torch.eye(16).repeat(3, 1)
    stats = InputStats(16, w.device, hessian=True)
    stats.add(x)
    new, mask = sparsegpt_prune(w, stats.hessian(), 0.5, blocksize=128)
    assert torch.equal(mask, unstructured_masks({"w": w.abs()}, 0.5, "layer")["w"])
    assert torch.equal(new, w * mask)
    new, mask = sparsegpt_prune(w, stats.hessian(), 0.5, "2:4", blocksize=8)
    assert torch.equal(mask, two_four_masks({"w": w.abs()})["w"])
    assert torch.equal(new, w * mask)


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(4, 12, generator=g), torch.randn(50, 12, generator=g)
    stats = InputStats(12, w.device, hessian=True)
    stats.add(x)
    new, mask = sparsegpt_prune(w, stats.hessian(), 0.0, blocksize=5)
    assert torch.equal(new, w) and bool((mask == 1).all())


# --------------------------------------------------------------------------- wanda vs magnitude


def test_wanda_keeps_small_weights_on_a_large_input_column():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 8, generator=g).abs() + 0.5
    w[:, 3] = 0.05  # the smallest of every row: magnitude prunes the whole column
    x = torch.randn(64, 8, generator=g)
    x[:, 3] *= 100.0  # ... but its input is 100x larger than the others
    stats = InputStats(8, w.device, hessian=False)
    stats.add(x)
    wanda, magnitude = wanda_mask(w, stats.col_norm(), 0.5), magnitude_mask(w, 0.5)
    assert bool((magnitude[:, 3] == 0).all())
    assert bool((wanda[:, 3] == 1).all())
    assert bool((per_row_magnitude(w, 0.5)[:, 3] == 0).all())


def test_wanda_follows_the_activations_of_the_calibration_data(dense):
    # Calibration tokens chosen so one input column of block 0's query_key_value is large:
    # Wanda keeps more of that column than per-row magnitude does.
    h0 = dense.transformer.h[0]
    with torch.no_grad():
        feats = h0.input_layernorm(
            dense.transformer.word_embeddings_layernorm(dense.transformer.word_embeddings.weight)
        )
    col = 5
    tokens = feats[:, col].abs().topk(8).indices
    ids = tokens[torch.randint(0, 8, (16, 16), generator=torch.Generator().manual_seed(2))]
    model, masks = pruned(dense, ids, "wanda")
    name = "transformer.h.0.self_attention.query_key_value.weight"
    w = dense.get_parameter(name)
    by_magnitude = per_row_magnitude(w.detach(), 0.5)
    kept_wanda, kept_mag = int(masks[name][:, col].sum()), int(by_magnitude[:, col].sum())
    assert kept_wanda > kept_mag + 0.25 * w.shape[0], (kept_wanda, kept_mag)
    assert bool(((masks[name][:, col] == 1) & (by_magnitude[:, col] == 0)).any())


def test_wanda_equals_per_row_magnitude_when_input_norms_are_equal():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(8, 32, generator=g)
    x = torch.randint(0, 2, (40, 32), generator=g).float() * 2 - 1  # +-1: every column norm is sqrt(40)
    stats = InputStats(32, w.device, hessian=False)
    stats.add(x)
    assert torch.equal(stats.col_norm(), torch.full((32,), 40.0).sqrt())
    assert torch.equal(wanda_mask(w, stats.col_norm(), 0.5), per_row_magnitude(w, 0.5))
    assert torch.equal(wanda_mask(w, stats.col_norm(), 0.25), per_row_magnitude(w, 0.25))
    assert torch.equal(wanda_mask(w, stats.col_norm(), 0.5, "2:4"), two_four_masks({"w": w.abs()})["w"])


# --------------------------------------------------------------------------- errors


def test_bad_arguments_are_clear_errors(dense, calib):
    model = copy.deepcopy(dense)
    cases = [
        (
            dict(sparsity=0.6, pattern="2:4"),
            "2:4 keeps 2 of every 4 weights, so sparsity must be 0.5, got 0.6",
        ),
        (dict(calib_ids=torch.empty(0, 16, dtype=torch.long)), "calibration data is empty"),
        (dict(calib_ids=torch.empty(4, 0, dtype=torch.long)), "calibration data is empty"),
        (dict(calib_ids=torch.ones(4, 8)), "must be integer token ids"),
        (dict(targets=["qkv", "dense"]), "unknown prune targets ['qkv']; choose from query_key_value"),
        (dict(targets=[]), "unknown prune targets []"),
        (dict(method="obs"), "unknown one-shot method 'obs'"),
        (dict(pattern="4:8"), "unknown pattern '4:8'"),
        (dict(sparsity=1.0), "sparsity must be in [0, 1), got 1.0"),
    ]
    for kwargs, message in cases:
        args = {"calib_ids": calib, "method": "wanda", "sparsity": 0.5, "pattern": "unstructured"} | kwargs
        with pytest.raises(OneShotError) as info:
            oneshot_prune(model, **args)
        assert message in str(info.value), (kwargs, str(info.value))
        assert isinstance(info.value, ValueError) and isinstance(info.value, BloomrayError)
        assert info.value.exit_code == EXIT_USAGE
    for name, p in model.named_parameters():  # nothing was pruned by a failed call
        assert torch.equal(p, dense.get_parameter(name))


def test_two_four_needs_in_features_divisible_by_four():
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=66, n_layer=1, n_head=2, pad_token_id=0)
    model = build_from_config("causal_lm", cfg, seed=0).eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        with pytest.raises(OneShotError, match=r"query_key_value.weight: 2:4 sparsity needs in_features "):
            oneshot_prune(model, ids, method, 0.5, "2:4", ["query_key_value"])
    with pytest.raises(OneShotError, match="divisible by 4, got 6"):
        wanda_mask(torch.ones(4, 6), torch.ones(6), 0.5, "2:4")
    # The 4*hidden input of dense_4h_to_h (264) is fine.
    masks = oneshot_prune(model, ids, "sparsegpt", 0.5, "2:4", ["dense_4h_to_h"])
    assert list(masks) == ["transformer.h.0.mlp.dense_4h_to_h.weight"]


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_inputs_give_identical_masks(dense, calib, method):
    a, masks_a = pruned(dense, calib, method)
    b, masks_b = pruned(dense, calib, method)
    assert masks_a.keys() == masks_b.keys()
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), name
        assert torch.equal(a.get_parameter(name), b.get_parameter(name)), name
