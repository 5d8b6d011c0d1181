"""The README.md model card written into every export."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def write_model_card(model_dir: Path, meta: dict[str, Any], info: dict[str, Any], extra: str = "") -> None:
    """Record data, config, steps, final metrics and export facts as a Markdown card."""
    m = meta.get("metrics", {})
    cfg = meta.get("config", {})
    mc = meta.get("model_config", {})
    metric_rows = "\n".join(
        f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in m.items()
        if v is not None
    )
    diff = info.get("max_abs_logit_diff")
    extra = _pruning_section(meta, info) + extra
    text = f"""---
library_name: transformers
tags: [bloom, bloomray]
---
# {model_dir.name} — BLOOM {meta.get("task", "causal_lm")} model trained with bloomray

Exported {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")} from `{info.get("checkpoint")}`.

## Model
- architecture: BLOOM, {mc.get("n_layer")} layers, hidden {mc.get("hidden_size")}, {mc.get("n_head")} heads, vocab {mc.get("vocab_size")}
- parameters: {info.get("parameters"):,}
- size on disk: {info.get("size_on_disk_bytes", 0) / 2**20:.2f} MiB (safetensors)
- base model: {meta.get("base_model") or "random init from preset " + str(cfg.get("model", {}).get("preset"))}
- LoRA: {"merged, r=" + str(meta["lora"]["r"]) if meta.get("lora") else "no"}
- export check: reloaded logits vs trained engine, max |diff| = {"n/a" if diff is None else f"{diff:.3g}"}

## Training
- steps: {meta.get("step")} of {meta.get("total_steps")}
- DeepSpeed: ZeRO-{cfg.get("deepspeed", {}).get("zero_stage")}, {cfg.get("deepspeed", {}).get("precision")}, {cfg.get("scaling", {}).get("num_workers")} workers
- lr {cfg.get("train", {}).get("lr")}, schedule {cfg.get("train", {}).get("lr_schedule")}, warmup {cfg.get("train", {}).get("warmup_steps")}, global batch {cfg.get("train", {}).get("global_batch_size")}

## Data
```json
{json.dumps(meta.get("data", {}), indent=2, default=str)}
```

## Final metrics
| metric | value |
|---|---|
{metric_rows}
{extra}
{_load_section(model_dir.name, meta)}"""
    (model_dir / "README.md").write_text(text)


def _load_section(name: str, meta: dict[str, Any]) -> str:
    """How to load and serve this export; right for its kind (plain, classifier, compacted, sparse)."""
    method = meta.get("config", {}).get("prune", {}).get("method", "none")
    classifier = meta.get("task") == "classification"
    if method == "none":
        auto = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
        load = f'from transformers import {auto}\nmodel = {auto}.from_pretrained("{name}")'
    else:
        load = f'from bloomray.export.load import load_model  # reads compacted and sparse exports\nmodel = load_model("{name}")'
    if classifier:
        serving = "`bloomray serve --model DIR` serves it on transformers at `POST /v1/classify`."
    elif method == "structured":
        serving = (
            "`bloomray serve --model DIR` serves it on vLLM through bloomray's vLLM plugin "
            "(architecture `BloomrayCompactForCausalLM`, per-layer head and neuron counts)."
        )
    elif method in ("magnitude", "2:4"):
        serving = (
            "`bloomray serve --model DIR` serves it densely on vLLM: the sparse file is expanded once "
            "into `vllm-dense/` inside this dir (dense kernels cannot use unstructured zeros)."
        )
    else:
        serving = "`bloomray serve --model DIR` serves it on vLLM (continuous batching, OpenAI API)."
    if meta.get("task") == "sft":
        serving += (
            "\nInstruction-tuned: use `POST /v1/chat/completions`; it applies the chat template saved "
            "with the tokenizer (`tokenizer.chat_template`), the very one the training examples were "
            "rendered with."
        )
    return f"""## Load
```python
{load}
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

## Serve
{serving}
"""


def _pruning_section(meta: dict[str, Any], info: dict[str, Any]) -> str:
    prune = meta.get("config", {}).get("prune", {})
    if prune.get("method", "none") == "none":
        return ""
    m = meta.get("metrics", {})
    layers = "\n".join(
        f"| {k.split('_')[-1]} | {v:.3f} |"
        for k, v in sorted(m.items(), key=lambda kv: kv[0])
        if k.startswith("sparsity/layer_")
    )
    how = {
        "structured": f"structured ({prune.get('structure')}), compacted into smaller shapes",
        "magnitude": f"unstructured magnitude ({prune.get('scope')}), stored sparse (bitmask + values)",
        "2:4": "2:4 semi-structured (GPU sparse tensor cores; masks only on CPU), stored sparse",
    }[prune["method"]]
    dense_mb = info.get("dense_size_bytes", 0) / 2**20
    disk_mb = info.get("size_on_disk_bytes", 0) / 2**20
    speed_note = (
        "Unstructured zeros make dense kernels no faster: the latency gain is none by design; "
        "the gain is size on disk."
        if prune["method"] != "structured"
        else "Structured pruning shrinks the matmuls, so the latency gain is real."
    )
    return f"""
## Pruning
- method: {how}; importance: {prune.get("importance")}
- schedule: {prune.get("schedule")} from sparsity {prune.get("initial_sparsity")} to {prune.get("final_sparsity")}, steps {prune.get("start_fraction")}-{prune.get("end_fraction")} of training, masks updated every {prune.get("update_every")} steps
- overall sparsity of pruned weights: {m.get("sparsity", float("nan")):.3f}
- parameters: {info.get("parameters_dense", 0):,} dense -> {info.get("parameters", 0):,} exported
- size on disk: {dense_mb:.2f} MiB dense -> {disk_mb:.2f} MiB exported
- CPU forward latency (batch 4 x 64 tokens, median): {info.get("latency_ms_dense", float("nan")):.2f} ms dense (masked) -> {info.get("latency_ms", float("nan")):.2f} ms exported
- {speed_note}

| layer | sparsity |
|---|---|
{layers}
"""
