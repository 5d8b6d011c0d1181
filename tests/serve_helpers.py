"""Models and HTTP helpers for the serving tests (importable: pytest puts tests/ on sys.path).

Shapes are vLLM-CPU-friendly (head size 32) and weights are scaled up so different prompts
give different greedy text (a random-init BLOOM tends to repeat one token).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from transformers import BloomConfig, BloomForSequenceClassification

KEY = "test-key-0123456789"
HDR = {"Authorization": f"Bearer {KEY}"}
HIDDEN, HEADS, LAYERS = 128, 4, 2


def _scaled(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.ndim == 2 else 0.05))
    return model


def _prune_some(model: torch.nn.Module) -> None:
    """Zero a different number of heads and MLP neurons per layer (what structured pruning leaves)."""
    head_dim = HIDDEN // HEADS
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            qkv = block.self_attention.query_key_value
            for head in range(i + 1):  # layer 0 loses 1 head, layer 1 loses 2
                rows = slice(head * 3 * head_dim, (head + 1) * 3 * head_dim)
                qkv.weight[rows] = 0
                qkv.bias[rows] = 0
            up = block.mlp.dense_h_to_4h
            cut = 4 * HIDDEN // (3 + i)  # different widths per layer
            up.weight[:cut] = 0
            up.bias[:cut] = 0


def make_model_dirs(root: Path) -> dict[str, Path]:
    """A dense LM, its compacted structured-pruned export, and a classifier, saved under ``root``."""
    from bloomray.data.corpus import embedded_documents
    from bloomray.data.tokenizer import train_tokenizer
    from bloomray.export.consolidate import compact_model
    from bloomray.model.build import build_from_config

    tok = train_tokenizer(embedded_documents()[:30], 512)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    cfg = BloomConfig(vocab_size=len(tok), hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **ids)
    lm = _scaled(build_from_config("causal_lm", cfg, seed=0), seed=1).eval()
    dirs = {"lm": root / "lm", "compact": root / "compact", "clf": root / "clf"}
    lm.save_pretrained(dirs["lm"])
    tok.save_pretrained(dirs["lm"])
    _prune_some(lm)
    compact, _ = compact_model(lm)
    compact.save_pretrained(dirs["compact"])
    tok.save_pretrained(dirs["compact"])
    torch.manual_seed(0)
    clf = BloomForSequenceClassification(
        BloomConfig(
            vocab_size=len(tok),
            hidden_size=64,
            n_layer=2,
            n_head=4,
            num_labels=2,
            id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1},
            **ids,
        )
    )
    clf.save_pretrained(dirs["clf"])
    tok.save_pretrained(dirs["clf"])
    return dirs


def make_tiny_dir(path: Path, task: str = "causal_lm") -> Path:
    """A smallest servable dir (hidden 64, 2 heads: head size 32, 1 layer, a 300-token BPE), for
    tests that start or build the app and need a real model dir, not model quality."""
    from bloomray.data.corpus import embedded_documents
    from bloomray.data.tokenizer import train_tokenizer
    from bloomray.model.build import build_from_config

    tok = train_tokenizer(embedded_documents()[:5], 300)
    cfg = BloomConfig(
        vocab_size=len(tok),
        hidden_size=64,
        n_layer=1,
        n_head=2,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    build_from_config(task, cfg, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def post(
    url: str, path: str, body: Any, headers: dict[str, str] = HDR, timeout: float = 120
) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{url}{path}", content=data, headers={**headers, "content-type": "application/json"}, timeout=timeout
    )


_REFERENCE: dict[str, Any] = {}


def greedy_reference(model_dir: Path, prompt: str, max_tokens: int, stop: list[str]) -> str:
    """transformers' greedy continuation (bloomray's loader, fp32), cut at the first stop string."""
    from transformers import AutoTokenizer

    from bloomray.export.load import load_model

    key = str(model_dir)
    if key not in _REFERENCE:
        _REFERENCE[key] = (load_model(model_dir).float(), AutoTokenizer.from_pretrained(model_dir))
    model, tok = _REFERENCE[key]
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    # A trailing partial UTF-8 character decodes to U+FFFD here; vLLM's incremental
    # detokenizer holds those bytes back, as any streaming server must.
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).rstrip("\ufffd")
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def count_tokens(model_dir: Path, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"])


def engine_metric(name: str, default: float | None = None, **labels: str) -> float:
    """Sum of a metric's samples on Ray's Prometheus endpoint, by labels.

    Ray prefixes ``ray_`` and turns vLLM's ``vllm:x`` into ``vllm_x``: pass ``vllm_x``.
    """
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total, found = 0.0, False
    pattern = re.compile(r"^ray_" + re.escape(name) + r"(\{[^}]*\})?\s+([0-9.eE+-]+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
            found = True
    if not found and default is None:  # a renamed metric must fail the test, not read as 0
        raise KeyError(f"no sample of ray_{name} with {labels} on Ray's metrics endpoint")
    return total


def replicas(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[app].deployments[deployment].replica_states)


def replica_pids(app: str, deployment: str) -> list[int]:
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"ray::ServeReplica:{app}:{deployment}"):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids
