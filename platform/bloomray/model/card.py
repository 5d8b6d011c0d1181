"""The README.md model card written into every export."""

from __future__ import annotations

import json
from datetime import datetime, timezone
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
    text = f"""---
library_name: transformers
tags: [bloom, bloomray]
---
# {model_dir.name} — BLOOM {meta.get("task", "causal_lm")} model trained with bloomray

Exported {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} from `{info.get("checkpoint")}`.

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
## Load
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{model_dir.name}")
tokenizer = AutoTokenizer.from_pretrained("{model_dir.name}")
```
"""
    (model_dir / "README.md").write_text(text)
