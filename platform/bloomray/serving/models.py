"""Loading served models: the default loader, and the injected one tests and users can give."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bloomray.serving.engine import GenerationEngine

Loader = Callable[[str], tuple[Any, Any]]


@dataclass
class Served:
    """One loaded model: what the handlers need."""

    name: str
    model: Any
    tokenizer: Any
    task: str
    engine: GenerationEngine | None
    id2label: dict[int, str]


def default_loader(path: str, quantize: str = "none", dtype: str = "auto") -> tuple[Any, Any]:
    """Any bloomray export (plain, compacted or sparse) + its tokenizer; int8 or bf16 on request."""
    from transformers import AutoTokenizer

    from bloomray.model.load import load_model
    from bloomray.serving.quant import quantize_int8

    model = load_model(path)
    if quantize == "int8":
        model = quantize_int8(model)
    elif torch.cuda.is_available() and dtype in ("auto", "bf16"):
        model = model.to("cuda", torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def resolve_loader(spec: str | None) -> Loader | None:
    """``module:function`` -> the function (a custom loader), or None for the default."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def task_of_dir(path: str) -> str:
    """causal_lm or classification from a model dir's config.json (cheap: no weights)."""
    from bloomray.model.load import task_of

    cfg = Path(path) / "config.json"
    return task_of(json.loads(cfg.read_text())) if cfg.exists() else "causal_lm"


def make_served(name: str, model: Any, tokenizer: Any) -> Served:
    task = "classification" if "SequenceClassification" in type(model).__name__ else "causal_lm"
    labels = {int(k): v for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    engine = GenerationEngine(model, tokenizer) if task == "causal_lm" else None
    return Served(name, model, tokenizer, task, engine, labels)
