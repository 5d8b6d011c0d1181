"""One function loads every model bloomray writes: plain HF, compacted, or sparse-packed.

- plain HF dirs (and hub names): ``from_pretrained``;
- compacted structured-pruned dirs (``bloomray_compact`` in config.json): stock BLOOM with
  per-layer smaller attention/MLP shapes (see ``model/compact.py``); causal LMs come back as
  :class:`~bloomray.model.compact_hf.BloomrayCompactForCausalLM` (``model_type``
  ``bloomray_compact``; older dirs with ``model_type`` ``bloom`` plus the spec load the same way);
- sparse-packed dirs (``bloomray_sparse`` in config.json): unstructured-pruned weights stored
  as a bitmask plus the non-zero values (``sparse.safetensors``, see ``export/sparse.py``),
  expanded to dense on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BloomConfig, PreTrainedModel

from bloomray.export.sparse import SPARSE_FILE, SPARSE_KEY, load_sparse
from bloomray.files import atomic_dir
from bloomray.model.build import ModelLoadError, load_pretrained, model_class
from bloomray.model.compact import SPEC_KEY, reshape_model
from bloomray.model.compact_hf import BloomrayCompactForCausalLM, compact_config


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
        raise ModelLoadError(
            f"{local}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


DENSE_DIR = "vllm-dense"  # where a sparse export's dense copy is cached (inside the export)


def dense_copy(path: str | Path) -> str:
    """A dense HF dir of a sparse-packed export (what vLLM loads), written once, atomically, inside it."""
    src = Path(path)
    out = src / DENSE_DIR
    if (out / "config.json").is_file():
        return str(out)
    model = load_model(src)
    if hasattr(model.config, SPARSE_KEY):
        delattr(model.config, SPARSE_KEY)  # the copy is a plain dense dir
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tmp))
    return str(out)
