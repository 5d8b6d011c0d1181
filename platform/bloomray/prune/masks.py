"""Which weights to prune: unstructured magnitude, 2:4, and structured MLP neurons / heads.

Every function takes full (unpartitioned) tensors keyed by parameter name and returns masks
(1 keep, 0 prune) of the same shapes. Importance is |weight| (magnitude) or an accumulated
|weight x grad| (taylor), passed in as ``scores`` with the weights' names and shapes.

BLOOM layout facts used here: ``query_key_value`` rows are ``[head][q,k,v][head_dim]``, so
head ``h`` owns rows ``h*3*d : (h+1)*3*d`` and ``dense`` columns ``h*d : (h+1)*d``; MLP neuron
``j`` is row ``j`` of ``dense_h_to_4h`` (and its bias) and column ``j`` of ``dense_4h_to_h``.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"\.h\.(\d+)\.")


def target_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Names of the 2-D weights of transformer blocks whose module is in ``targets``.

    Embeddings, LayerNorms and the (tied) LM head are never included.
    """
    names = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions params: the full shape is ds_shape
        if len(shape) == 2 and name.endswith(".weight") and _LAYER.search(name) and parts[-2] in targets:
            names.append(name)
    return names


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.float32)
    if keep > 0:
        mask.view(-1)[torch.topk(scores.reshape(-1), keep, sorted=False).indices] = 1.0
    return mask


def unstructured_masks(
    scores: dict[str, torch.Tensor], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Prune the lowest-scoring ``sparsity`` fraction, per tensor (``layer``) or over all (``global``)."""
    if scope == "global":
        flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
        keep = flat.numel() - int(round(sparsity * flat.numel()))
        global_mask = _keep_top(flat, keep)
        out, offset = {}, 0
        for name, s in scores.items():
            out[name] = global_mask[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
        return out
    return {n: _keep_top(s.float(), s.numel() - int(round(sparsity * s.numel()))) for n, s in scores.items()}


def two_four_masks(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the 2 highest of every 4 consecutive weights along the input dim (2:4 sparsity)."""
    out = {}
    for name, s in scores.items():
        rows, cols = s.shape
        if cols % 4:
            raise ValueError(f"{name}: 2:4 sparsity needs the input dim divisible by 4, got {cols}")
        groups = s.float().reshape(rows, cols // 4, 4)
        idx = groups.topk(2, dim=-1).indices
        mask = torch.zeros_like(groups).scatter_(-1, idx, 1.0)
        out[name] = mask.reshape(rows, cols)
    return out


def layer_of(name: str) -> int:
    """Block index of a parameter name."""
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"{name} is not inside a transformer block")
    return int(m.group(1))


def structured_masks(
    scores: dict[str, torch.Tensor], sparsity: float, structure: str, n_head: int
) -> dict[str, torch.Tensor]:
    """Masks removing whole MLP neurons and/or attention heads, ``sparsity`` of each per layer.

    Returns masks for the weights *and* the biases that belong to the removed units (keys
    ending ``.bias``), so a removed unit contributes exactly nothing. At least one neuron
    and one head stay in every layer.
    """
    out: dict[str, torch.Tensor] = {}
    for name, s in scores.items():
        if "mlp" in structure and name.endswith("dense_h_to_4h.weight"):
            down = name.replace("dense_h_to_4h", "dense_4h_to_h")
            unit = s.float().sum(1) + (scores[down].float().sum(0) if down in scores else 0)
            keep = _keep_top(unit, max(1, unit.numel() - int(round(sparsity * unit.numel()))))
            out[name] = keep[:, None].expand_as(s).clone()
            out[name.replace(".weight", ".bias")] = keep.clone()
            if down in scores:
                out[down] = keep[None, :].expand_as(scores[down]).clone()
        if "heads" in structure and name.endswith("query_key_value.weight"):
            dense = name.replace("query_key_value", "dense")
            head_dim = s.shape[1] // n_head
            unit = s.float().reshape(n_head, 3 * head_dim, -1).sum((1, 2))
            if dense in scores:
                unit = unit + scores[dense].float().reshape(-1, n_head, head_dim).sum((0, 2))
            keep = _keep_top(unit, max(1, n_head - int(round(sparsity * n_head))))
            rows = keep.repeat_interleave(3 * head_dim)
            out[name] = rows[:, None].expand_as(s).clone()
            out[name.replace(".weight", ".bias")] = rows.clone()
            if dense in scores:
                out[dense] = keep.repeat_interleave(head_dim)[None, :].expand_as(scores[dense]).clone()
    return out


def sparsity_of(tensors: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """(overall, per-tensor) fraction of exact zeros."""
    per = {n: float((t == 0).sum()) / t.numel() for n, t in tensors.items()}
    total = sum(t.numel() for t in tensors.values())
    zeros = sum(float((t == 0).sum()) for t in tensors.values())
    return (zeros / total if total else 0.0), per
