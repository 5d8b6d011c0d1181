"""load_model: plain, compacted and sparse-packed model dirs; the sparse format; CPU latency."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_bloom import PAD, TARGETS, VOCAB, make_model
from transformers import BloomForCausalLM, BloomForSequenceClassification

from bloomray.export.consolidate import compact_model, write_model
from bloomray.export.latency import forward_latency_ms
from bloomray.export.load import load_model, task_of
from bloomray.export.sparse import SPARSE_FILE, SPARSE_KEY, load_sparse, save_sparse
from bloomray.model.build import ModelLoadError, count_parameters
from bloomray.model.compact import SPEC_KEY, CompactBloomAttention
from bloomray.prune.masks import structured_masks, target_names, unstructured_masks


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])


def structured_prune(model: torch.nn.Module) -> None:
    """Heads and neurons pruned at a different rate in each of the two layers."""
    state, names = model.state_dict(), target_names(model, TARGETS)
    masks: dict[str, torch.Tensor] = {}
    for layer, sparsity in {0: 0.5, 1: 0.75}.items():
        scores = {n: state[n].abs() for n in names if f".h.{layer}." in n}
        masks.update(structured_masks(scores, sparsity, "mlp+heads", model.config.n_head))
    apply_masks(model, masks)


def magnitude_prune(model: torch.nn.Module, sparsity: float = 0.8) -> None:
    state, names = model.state_dict(), target_names(model, TARGETS)
    apply_masks(model, unstructured_masks({n: state[n].abs() for n in names}, sparsity, "layer"))


def ids_and_mask(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = PAD, 0  # left padding
    return ids, mask


@torch.no_grad()
def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids, mask = ids_and_mask(seed)
    return model(input_ids=ids, attention_mask=mask).logits


def sparse_state(shape=(64, 256), sparsity=0.8, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    n_zero = int(round(sparsity * t.numel()))
    t.view(-1)[torch.randperm(t.numel(), generator=g)[:n_zero]] = 0
    return t.to(dtype)


# --------------------------------------------------------------------------- compacted dirs


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_compacted_model_round_trips(tmp_path: Path, task: str):
    model = make_model(task)
    structured_prune(model)
    compact, _ = compact_model(model)
    compact.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw[SPEC_KEY]["heads"] == getattr(compact.config, SPEC_KEY)["heads"]
    loaded = load_model(tmp_path)
    assert type(loaded) is type(compact)
    assert not loaded.training
    assert count_parameters(loaded) == count_parameters(compact) < count_parameters(model)
    assert [type(b.self_attention) for b in loaded.transformer.h] == [CompactBloomAttention] * 2
    assert [b.self_attention.kept_heads.tolist() for b in loaded.transformer.h] == raw[SPEC_KEY]["heads"]
    assert torch.allclose(logits(loaded), logits(compact), atol=1e-5, rtol=0)
    assert torch.allclose(logits(loaded, seed=1), logits(model, seed=1), atol=1e-4, rtol=0)
    if task == "causal_lm":
        assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight


def test_compacted_model_loads_in_bf16(tmp_path: Path):
    model = make_model()
    structured_prune(model)
    compact, _ = compact_model(model)
    compact.save_pretrained(str(tmp_path))
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.transformer.h[0].self_attention.kept_heads.dtype == torch.long
    assert torch.allclose(logits(loaded).float(), logits(compact), atol=0.1)


def test_compacted_dir_with_wrong_weights_is_refused(tmp_path: Path):
    model = make_model()
    structured_prune(model)
    compact, _ = compact_model(model)
    compact.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.h.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="do not match the config"):  # a bad model dir: exit 2
        load_model(tmp_path)


# --------------------------------------------------------------------------- plain dirs


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_plain_save_pretrained_dir_loads(tmp_path: Path, task: str):
    model = make_model(task, seed=1)
    model.save_pretrained(str(tmp_path))
    loaded = load_model(tmp_path)
    assert type(loaded) is (BloomForSequenceClassification if task == "classification" else BloomForCausalLM)
    assert not loaded.training
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_missing_dir_offline_explains(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model(tmp_path / "no-such-model")


def test_task_of_reads_architectures():
    assert task_of({"architectures": ["BloomForSequenceClassification"]}) == "classification"
    assert task_of({"architectures": ["BloomForCausalLM"]}) == "causal_lm"
    assert task_of({}) == "causal_lm"


# --------------------------------------------------------------------------- sparse format


def test_sparse_round_trip_is_exact_and_smaller(tmp_path: Path):
    state = {
        "a.weight": sparse_state(seed=0),
        "b.weight": sparse_state((128, 64), seed=1),
        "c.weight": sparse_state((32, 32), seed=2, dtype=torch.bfloat16),
        "a.bias": torch.randn(64),  # 1-D: always dense
    }
    packed = save_sparse(state, tmp_path / "sparse.safetensors")
    assert packed == ["a.weight", "b.weight", "c.weight"]
    back = load_sparse(tmp_path / "sparse.safetensors")
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    save_file(state, str(tmp_path / "dense.safetensors"))
    sparse_size = (tmp_path / "sparse.safetensors").stat().st_size
    dense_size = (tmp_path / "dense.safetensors").stat().st_size
    # 20% fp32 values + 1 bit per element: about a quarter of the dense bytes.
    assert sparse_size < 0.4 * dense_size


def test_tensors_below_min_sparsity_stay_dense(tmp_path: Path):
    state = {"sparse": sparse_state(sparsity=0.8), "light": sparse_state(sparsity=0.2, seed=1)}
    path = tmp_path / "s.safetensors"
    assert save_sparse(state, path, min_sparsity=0.3) == ["sparse"]
    raw = load_file(str(path))
    assert set(raw) == {"sparse::bits", "sparse::values", "sparse::shape", "light"}
    assert torch.equal(raw["light"], state["light"])
    assert raw["sparse::values"].numel() == int((state["sparse"] != 0).sum())
    assert raw["sparse::shape"].tolist() == [64, 256]
    # A lower threshold packs the lightly pruned tensor too; the round trip is still exact.
    assert save_sparse(state, path, min_sparsity=0.1) == ["sparse", "light"]
    back = load_sparse(path)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sparse_edge_cases_round_trip(tmp_path: Path):
    state = {
        "all_zero": torch.zeros(4, 8),
        "odd_size": torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0]]),  # 9 bits: padded byte
    }
    path = tmp_path / "e.safetensors"
    assert save_sparse(state, path) == ["all_zero", "odd_size"]
    back = load_sparse(path)
    assert all(torch.equal(back[k], state[k]) for k in state)


# --------------------------------------------------------------------------- exported dirs


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_magnitude_export_is_sparse_packed_and_loads(tmp_path: Path, task: str):
    model = make_model(task, seed=2)
    magnitude_prune(model)
    facts = write_model(model, tmp_path, "magnitude")
    assert facts["sparse_tensors"] == len(target_names(model, TARGETS))
    assert (tmp_path / SPARSE_FILE).exists() and not (tmp_path / "model.safetensors").exists()
    raw = json.loads((tmp_path / "config.json").read_text())
    assert SPARSE_KEY in raw
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model)  # a classification model must not come back as a causal LM
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=0)
    dense = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(dense))
    assert (tmp_path / SPARSE_FILE).stat().st_size < dense.stat().st_size


def test_structured_export_is_compact_and_loads(tmp_path: Path):
    model = make_model(seed=3)
    structured_prune(model)
    facts = write_model(model, tmp_path, "structured")
    assert facts["parameters"] < facts["parameters_dense"] == count_parameters(model)
    loaded = load_model(tmp_path)
    assert count_parameters(loaded) == facts["parameters"]
    assert torch.allclose(logits(loaded), logits(model), atol=1e-4, rtol=0)


class _Clocked(torch.nn.Module):
    """A stand-in model: each forward records its ids and moves a fake clock on by the next duration."""

    def __init__(self, clock: list[float], seconds: list[float], vocab: int = 7) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.clock, self.seconds, self.seen = clock, list(seconds), []

    def forward(self, input_ids: torch.Tensor) -> None:
        self.seen.append(input_ids.clone())
        self.clock[0] += self.seconds.pop(0)


def test_forward_latency_ms_is_the_median_of_the_timed_forwards(monkeypatch):
    import bloomray.export.latency as latency

    clock = [0.0]
    monkeypatch.setattr(latency, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    # The 5 s warm-up is not timed; the median of 10, 50 and 20 ms is 20 ms.
    model = _Clocked(clock, [5.0, 0.010, 0.050, 0.020])
    assert forward_latency_ms(model, batch=2, seq=8, repeats=3) == pytest.approx(20.0)
    assert model.seconds == []  # one warm-up forward, then exactly `repeats` timed ones
    first = model.seen[0]
    assert first.shape == (2, 8) and int(first.max()) < 7  # ids below the model's vocab_size
    assert all(torch.equal(ids, first) for ids in model.seen)  # one fixed batch for every forward
    # An even count: the mean of the middle two; `vocab` bounds the ids instead of the config.
    model = _Clocked(clock, [1.0, 0.001, 0.004, 0.002, 0.003], vocab=10_000)
    assert forward_latency_ms(model, batch=1, seq=64, repeats=4, vocab=3) == pytest.approx(2.5)
    assert int(model.seen[0].max()) < 3
    again = _Clocked(clock, [0.0, 0.0])
    forward_latency_ms(again, batch=2, seq=8, repeats=1)
    assert torch.equal(again.seen[0], first)  # seeded: the same batch on every call
