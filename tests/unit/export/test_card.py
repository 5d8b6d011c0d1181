"""The model card's load and serve snippets match the export's kind."""

import pytest

from bloomray.export.card import _load_section


@pytest.mark.parametrize(
    ("task", "method", "loader", "serving"),
    [
        ("causal_lm", "none", "AutoModelForCausalLM.from_pretrained", "on vLLM (continuous"),
        ("classification", "none", "AutoModelForSequenceClassification.from_pretrained", "/v1/classify"),
        ("causal_lm", "structured", "load_model(", "BloomrayCompactForCausalLM"),
        ("causal_lm", "magnitude", "load_model(", "densely on vLLM"),
        ("causal_lm", "2:4", "load_model(", "vllm-dense/"),
        ("classification", "structured", "load_model(", "/v1/classify"),
    ],
)
def test_load_snippet_fits_the_export(task, method, loader, serving):
    text = _load_section("m", {"task": task, "config": {"prune": {"method": method}}})
    assert loader in text and serving in text
