"""The model card's load snippet, run as written, loads the export it sits in (every kind)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_bloom import TARGETS, VOCAB, make_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from bloomray.export.card import write_model_card
from bloomray.export.consolidate import write_model
from bloomray.prune.masks import structured_masks, target_names, unstructured_masks


def _prune(model: torch.nn.Module, method: str) -> None:
    state, names = model.state_dict(), target_names(model, TARGETS)
    scores = {n: state[n].abs() for n in names}
    if method == "structured":
        masks = structured_masks(scores, 0.5, "mlp+heads", model.config.n_head)
    else:
        masks = unstructured_masks(scores, 0.8, "layer")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize(
    ("task", "method", "kind"),
    [
        ("causal_lm", "none", "BloomForCausalLM"),
        ("classification", "none", "BloomForSequenceClassification"),
        ("causal_lm", "structured", "BloomrayCompactForCausalLM"),
        ("classification", "structured", "BloomForSequenceClassification"),
        ("causal_lm", "magnitude", "BloomForCausalLM"),
        ("classification", "magnitude", "BloomForSequenceClassification"),
    ],
)
def test_card_snippet_loads_the_export(tmp_path: Path, monkeypatch, task: str, method: str, kind: str):
    model = make_model(task, seed=4)
    if method != "none":
        _prune(model, method)
    out = tmp_path / "exported"
    out.mkdir()
    facts = write_model(model, out, method)
    _tokenizer().save_pretrained(str(out))
    meta = {"task": task, "config": {"prune": {"method": method}}, "model_config": {}}
    write_model_card(out, meta, {**facts, "checkpoint": "ckpt"})

    snippet = re.search(r"## Load\n```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the card names the dir relative to where it is run
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the card's own code, as a user would paste it
    loaded = scope["model"]
    assert type(loaded).__name__ == kind
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    assert scope["tokenizer"]("w3 w9").input_ids == [3, 9]
