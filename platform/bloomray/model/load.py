"""One function loads every model bloomray writes: plain HF, compacted, or sparse-packed.

- plain HF dirs (and hub names): ``from_pretrained``;
- compacted structured-pruned dirs (``bloomray_compact`` in config.json): stock BLOOM with
  per-layer smaller attention/MLP shapes (see ``prune/compact.py``); causal LMs come back as
  :class:`~bloomray.model.compact_hf.BloomrayCompactForCausalLM` (``model_type``
  ``bloomray_compact``; older dirs with ``model_type`` ``bloom`` plus the spec load the same way);
- sparse-packed dirs (``bloomray_sparse`` in config.json): unstructured-pruned weights stored
  as a bitmask plus the non-zero values (``sparse.safetensors``), expanded to dense on load.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import BloomConfig, PreTrainedModel

from bloomray.model.build import load_pretrained, model_class
from bloomray.model.compact_hf import BloomrayCompactForCausalLM, compact_config
from bloomray.prune.compact import SPEC_KEY, reshape_model

SPARSE_KEY = "bloomray_sparse"
SPARSE_FILE = "sparse.safetensors"


def task_of(config: dict[str, Any]) -> str:
    """causal_lm or classification, from a config.json's architectures.

    Compacted causal LMs name ``BloomrayCompactForCausalLM`` (see ``model/compact_hf.py``).
    """
    arch = (config.get("architectures") or ["BloomForCausalLM"])[0]
    return "classification" if "SequenceClassification" in arch else "causal_lm"


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load any bloomray export (or HF BLOOM dir) for inference, in eval mode.

    Raises:
        ModelLoadError: not a model dir / unreachable hub name (with the fix in the message).
    """
    local = Path(path).expanduser()
    cfg_path = local / "config.json"
    if not cfg_path.exists():
        return load_pretrained("causal_lm", str(path), dtype=dtype).eval()
    raw = json.loads(cfg_path.read_text())
    task = task_of(raw)
    if SPEC_KEY not in raw and SPARSE_KEY not in raw:
        return load_pretrained(task, str(local), dtype=dtype).eval()
    if SPEC_KEY in raw and task == "causal_lm":
        # model_type bloomray_compact (or an older dir: model_type bloom + the spec).
        model = BloomrayCompactForCausalLM(compact_config(raw, raw[SPEC_KEY]))
    else:
        model = model_class(task).from_config(BloomConfig.from_dict(raw))
        if SPEC_KEY in raw:
            reshape_model(model, raw[SPEC_KEY])
    state = (
        load_sparse(local / SPARSE_FILE) if SPARSE_KEY in raw else load_file(str(local / "model.safetensors"))
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("lm_head.weight")] or unexpected:
        raise ValueError(
            f"{local}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_sparse(state: dict[str, torch.Tensor], path: Path, min_sparsity: float = 0.3) -> list[str]:
    """Write ``state`` with every 2-D tensor at least ``min_sparsity`` zeros packed.

    A packed tensor is ``name::bits`` (1 bit per element, numpy packbits) plus ``name::values``
    (its non-zeros in order) and ``name::shape``. Returns the packed tensor names.
    """
    out: dict[str, torch.Tensor] = {}
    packed = []
    for name, t in state.items():
        t = t.contiguous()
        if t.ndim == 2 and float((t == 0).sum()) / t.numel() >= min_sparsity:
            nz = (t != 0).flatten().numpy()
            out[f"{name}::bits"] = torch.from_numpy(np.packbits(nz))
            out[f"{name}::values"] = t.flatten()[torch.from_numpy(nz)].clone()
            out[f"{name}::shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            packed.append(name)
        else:
            out[name] = t
    save_file(out, str(path))
    return packed


def load_sparse(path: Path) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_sparse`: dense tensors."""
    raw = load_file(str(path))
    state: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        if key.endswith("::bits"):
            name = key[: -len("::bits")]
            shape = raw[f"{name}::shape"].tolist()
            n = int(np.prod(shape))
            nz = torch.from_numpy(np.unpackbits(t.numpy())[:n].astype(bool))
            values = raw[f"{name}::values"]
            dense = torch.zeros(n, dtype=values.dtype)
            dense[nz] = values
            state[name] = dense.view(shape)
        elif "::" not in key:
            state[key] = t
    return state


@torch.no_grad()
def forward_latency_ms(
    model: torch.nn.Module, batch: int = 4, seq: int = 64, repeats: int = 10, vocab: int | None = None
) -> float:
    """Median CPU latency (ms) of one forward pass on a fixed random batch."""
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))
