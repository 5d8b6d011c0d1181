"""The README.md model card written into every export."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bloomray.export.sparse import SPARSE_METHODS


def write_model_card(
    model_dir: Path, meta: dict[str, Any], info: dict[str, Any], extra: str = "", name: str | None = None
) -> None:
    """Record data, config, steps, final metrics and export facts as a Markdown card.

    ``name``: the dir's final name, when ``model_dir`` is the temp dir it is renamed from.
    """
    name = name or model_dir.name
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
# {name} — BLOOM {meta.get("task", "causal_lm")} model {"pruned" if meta.get("oneshot") else "trained"} with bloomray

Exported {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")} from `{info.get("checkpoint")}`.

## Model
- architecture: BLOOM, {mc.get("n_layer")} layers, hidden {mc.get("hidden_size")}, {mc.get("n_head")} heads, vocab {mc.get("vocab_size")}
- parameters: {info.get("parameters"):,}
- size on disk: {info.get("size_on_disk_bytes", 0) / 2**20:.2f} MiB (safetensors)
- base model: {meta.get("base_model") or "random init from preset " + str(cfg.get("model", {}).get("preset"))}
- LoRA: {"merged, r=" + str(meta["lora"]["r"]) if meta.get("lora") else "no"}
- export check: reloaded logits vs {"the pruned model" if meta.get("oneshot") else "trained engine"}, max |diff| = {"n/a" if diff is None else f"{diff:.3g}"}

{_training_section(meta, cfg)}
## Data
```json
{json.dumps(meta.get("data", {}), indent=2, default=str)}
```

## Final metrics
| metric | value |
|---|---|
{metric_rows}
{extra}
{_load_section(name, meta)}"""
    (model_dir / "README.md").write_text(text)


def _training_section(meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    if meta.get("oneshot"):
        return f"""## Training
- none here: one-shot pruned (no weight training) from `{meta["oneshot"].get("source_model")}`; its own card says how it was trained
"""
    return f"""## Training
- steps: {meta.get("step")} of {meta.get("total_steps")}
- DeepSpeed: ZeRO-{cfg.get("deepspeed", {}).get("zero_stage")}, {cfg.get("deepspeed", {}).get("precision")}, {cfg.get("scaling", {}).get("num_workers")} workers
- lr {cfg.get("train", {}).get("lr")}, schedule {cfg.get("train", {}).get("lr_schedule")}, warmup {cfg.get("train", {}).get("warmup_steps")}, global batch {cfg.get("train", {}).get("global_batch_size")}
"""


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
    elif method in SPARSE_METHODS:
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
    if meta.get("oneshot"):
        return _oneshot_section(meta["oneshot"], info)
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
    }.get(prune["method"])
    if how is None:  # wanda / sparsegpt: one-shot initial masks, then the schedule (prune/initial.py)
        pattern = "2:4 semi-structured" if prune.get("pattern") == "2:4" else "unstructured"
        how = (
            f"{prune['method']} one-shot ({pattern}) on {prune.get('calibration_samples')} calibration "
            f"samples at sparsity {prune.get('initial_sparsity')} before training, then magnitude updates "
            "on the schedule; stored sparse (bitmask + values)"
        )
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


def _oneshot_section(shot: dict[str, Any], info: dict[str, Any]) -> str:
    """The pruning facts of a ``bloomray prune`` export (``export/oneshot.py``)."""
    kinds = "\n".join(f"| {k} | {v:.4f} |" for k, v in shot.get("sparsity_by_kind", {}).items())
    solver = (
        f"; Hessian dampening {shot.get('percdamp')}, column blocks of {shot.get('blocksize')}"
        if shot.get("method") == "sparsegpt"
        else ""
    )
    acc = (
        f"; accuracy {100 * shot['eval_accuracy_before']:.2f}% -> {100 * shot['eval_accuracy_after']:.2f}%"
        if "eval_accuracy_after" in shot
        else ""
    )
    return f"""
## Pruning
- method: one-shot {shot.get("method")}, pattern {shot.get("pattern")}{solver}; stored sparse (bitmask + values of every weight at least 30% zeros)
- target sparsity {shot.get("sparsity_target")} of every pruned weight ({", ".join(shot.get("targets", []))}); measured overall {shot.get("sparsity", float("nan")):.4f}
- calibration: {shot.get("calibration_samples")} samples (the first train {"sentences' tokens, packed into blocks" if acc else "blocks"}) of {shot.get("block_size")} tokens, {shot.get("calibration_tokens")} tokens
- eval loss on {shot.get("eval_blocks")} eval {"sentences" if acc else "blocks"}: {shot.get("eval_loss_before", float("nan")):.4f} dense -> {shot.get("eval_loss_after", float("nan")):.4f} pruned{acc}
- size on disk: {info.get("dense_size_bytes", 0) / 2**20:.2f} MiB dense -> {info.get("size_on_disk_bytes", 0) / 2**20:.2f} MiB exported
- Unstructured and 2:4 zeros make dense kernels no faster: the gain is size on disk (2:4 can use GPU sparse tensor cores).

| weight kind | sparsity |
|---|---|
{kinds}
"""
