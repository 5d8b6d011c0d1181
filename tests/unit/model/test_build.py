"""Model shapes, seeded init, pretrained loading and its errors, and the resolved config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, BloomForSequenceClassification

from bloomray.data.tokenizer import train_tokenizer
from bloomray.model.build import (
    PRESETS,
    ModelLoadError,
    build_from_config,
    count_parameters,
    load_pretrained,
    model_class,
    preset_config,
    resolve_model_config,
)

BLOOM_VOCAB = 250_880


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["some tiny text for a tiny tokenizer, with tiny words"] * 10, vocab_size=280)


def meta_parameters(preset: str) -> int:
    """Parameters of a real-size preset, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = model_class("causal_lm").from_config(preset_config(preset, BLOOM_VOCAB))
    assert next(model.parameters()).device.type == "meta"
    return count_parameters(model)


def test_preset_config_shapes_and_ids():
    cfg = preset_config("tiny", 300, pad_token_id=3, eos_token_id=2)
    assert isinstance(cfg, BloomConfig)
    assert (cfg.hidden_size, cfg.n_layer, cfg.n_head, cfg.vocab_size) == (64, 2, 4, 300)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (3, 2)
    for name, shape in PRESETS.items():
        c = preset_config(name, 1000)
        assert (
            c.hidden_size == shape["hidden_size"]
            and c.n_layer == shape["n_layer"]
            and c.n_head == shape["n_head"]
        )
        assert c.hidden_size % c.n_head == 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="bloom-560m"):
        preset_config("huge", 100)


@pytest.mark.parametrize(
    "preset,expected",
    [("bloom-560m", 559_214_592), ("bloom-1b7", 1_722_408_960), ("bloom-7b1", 7_069_016_064)],
)
def test_real_bloom_sizes_on_meta(preset: str, expected: int):
    # The bigscience checkpoints' published parameter counts.
    assert meta_parameters(preset) == expected


def test_tiny_model_builds_and_runs():
    model = build_from_config("causal_lm", preset_config("tiny", 300, pad_token_id=3), seed=0)
    assert isinstance(model, BloomForCausalLM)
    ids = torch.randint(4, 300, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 10, 300)
    assert torch.isfinite(out.loss)
    # Output embedding is tied to the input embedding (counted once).
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
    per_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert count_parameters(model) == per_name - model.lm_head.weight.numel()


def test_classification_model():
    cfg = preset_config("tiny", 300, pad_token_id=3, num_labels=3)
    model = build_from_config("classification", cfg, seed=0)
    assert isinstance(model, BloomForSequenceClassification)
    ids = torch.randint(4, 300, (2, 7))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)


def test_same_seed_same_weights_other_seed_differs():
    cfg = preset_config("tiny", 300)
    a = build_from_config("causal_lm", cfg, seed=1).state_dict()
    torch.manual_seed(12345)  # global RNG state in between must not matter
    b = build_from_config("causal_lm", cfg, seed=1).state_dict()
    c = build_from_config("causal_lm", cfg, seed=2).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_missing_hub_model_fails_fast_and_names_model_path():
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as exc:
        load_pretrained("causal_lm", "no-such-org/no-such-bloom-model")
    assert time.monotonic() - start < 10  # HF_HUB_OFFLINE=1: no retries
    msg = str(exc.value)
    assert "no-such-org/no-such-bloom-model" in msg
    assert "model.path" in msg
    assert "HF_HUB_OFFLINE=1" in msg
    assert isinstance(exc.value, OSError)  # still an OSError for callers that catch one
    assert exc.value.exit_code == 2  # `bloomray` reports a bad model.path as bad input


def test_directory_without_model(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not a loadable model directory"):
        load_pretrained("causal_lm", str(tmp_path))


def test_save_then_load_pretrained(tmp_path: Path):
    model = build_from_config("causal_lm", preset_config("tiny", 300, pad_token_id=3), seed=0).eval()
    model.save_pretrained(str(tmp_path))
    loaded = load_pretrained("causal_lm", str(tmp_path)).eval()
    assert isinstance(loaded, BloomForCausalLM)
    ids = torch.randint(4, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_load_pretrained_lm_as_classifier(tmp_path: Path):
    build_from_config("causal_lm", preset_config("tiny", 300, pad_token_id=3), seed=0).save_pretrained(
        str(tmp_path)
    )
    cls = load_pretrained("classification", str(tmp_path), num_labels=4)
    assert isinstance(cls, BloomForSequenceClassification)
    assert cls.config.num_labels == 4


def test_resolve_from_preset_uses_the_tokenizer(tok):
    d = resolve_model_config("classification", "tiny", None, tok, {0: "neg", 1: "pos"})
    assert d["vocab_size"] == len(tok)
    assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (1, 2, 3)
    assert d["hidden_size"] == 64 and d["n_layer"] == 2
    cfg = BloomConfig.from_dict(d)  # what the workers do
    assert cfg.num_labels == 2
    assert cfg.id2label == {0: "neg", 1: "pos"} and cfg.label2id == {"neg": 0, "pos": 1}


def test_resolve_from_path_keeps_the_stored_shape(tmp_path: Path, tok):
    BloomConfig(vocab_size=512, hidden_size=32, n_layer=1, n_head=2, pad_token_id=None).save_pretrained(
        str(tmp_path)
    )
    d = resolve_model_config("causal_lm", "bloom-560m", str(tmp_path), tok)
    assert (d["vocab_size"], d["hidden_size"], d["n_layer"]) == (512, 32, 1)  # the path wins over the preset
    assert d["pad_token_id"] == tok.pad_token_id  # filled in from the tokenizer


def test_resolve_rejects_tokenizer_bigger_than_model_vocab(tmp_path: Path, tok):
    BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=2).save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError) as exc:
        resolve_model_config("causal_lm", "tiny", str(tmp_path), tok)
    msg = str(exc.value)
    assert "vocab_size=100" in msg
    assert f"{len(tok)} tokens" in msg
    assert "data.tokenizer.path" in msg


def test_resolve_missing_path_gives_the_explained_error(tok):
    with pytest.raises(ModelLoadError, match="model.path"):
        resolve_model_config("causal_lm", "tiny", "no-such-org/no-such-bloom-model", tok)
