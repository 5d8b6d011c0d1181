"""bloomray's sparse format for unstructured-pruned exports: a bitmask plus the non-zero values.

A dir holding it has ``bloomray_sparse`` in its config.json and its weights in
``sparse.safetensors``; ``export/load.py`` expands it to dense tensors on load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SPARSE_KEY = "bloomray_sparse"
SPARSE_FILE = "sparse.safetensors"
#: ``prune.method``s whose exports are stored in this format (unstructured or 2:4 zeros).
SPARSE_METHODS = ("magnitude", "2:4", "wanda", "sparsegpt")


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
