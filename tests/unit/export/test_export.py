"""Export helpers: the no-init module a checkpoint loads into, bounded latency timing, local dirs."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from transformers import BloomConfig

from bloomray.export.consolidate import empty_model
from bloomray.export.latency import bounded_latency_ms
from bloomray.model.build import build_from_config

TINY = BloomConfig(vocab_size=96, hidden_size=16, n_layer=2, n_head=2)


def test_empty_model_loads_a_trained_state_exactly_and_reties_the_head():
    trained = build_from_config("causal_lm", TINY, seed=3).eval()
    model = empty_model("causal_lm", TINY, None)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
    assert (missing, unexpected) == ([], [])
    model.tie_weights()
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    ids = torch.randint(0, TINY.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_empty_model_with_lora_has_the_adapter_weights_to_load():
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query_key_value"]}
    model = empty_model("causal_lm", TINY, lora)
    names = [n for n, _ in model.named_parameters()]
    assert sum("lora_A" in n for n in names) == TINY.n_layer
    assert {p.device.type for p in model.parameters()} == {"cpu"}


class _Timed(torch.nn.Module):
    """A stand-in model whose forward takes ``seconds`` and counts its calls."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=8)
        self.seconds, self.calls = seconds, 0

    def forward(self, input_ids: torch.Tensor) -> None:
        self.calls += 1
        time.sleep(self.seconds)


def test_latency_of_a_slow_model_is_timed_once():
    model = _Timed(0.3)
    ms = bounded_latency_ms(model, budget_s=0.5)  # 0.5 s fits one 0.3 s forward
    assert model.calls == 2  # one warm-up, one timed
    assert 300 <= ms < 600


def test_latency_of_a_fast_model_is_the_median_of_ten():
    model = _Timed(0.0)
    bounded_latency_ms(model, budget_s=1.0)
    assert model.calls == 2 + 1 + 10  # the first estimate, then a warm-up and 10 timed
