"""Shrink structurally pruned BLOOM layers into smaller shapes, and load them back.

A removed MLP neuron has a zero row (and bias) in ``dense_h_to_4h``: GELU(0) = 0, so it adds
nothing and can be cut, with its column of ``dense_4h_to_h``. A removed head has zero value
rows (and biases) in ``query_key_value``: its context is zero, so its rows and its columns of
``dense`` can be cut. The kept heads keep their own ALiBi slopes (a head's slope depends on
its index among the *original* heads), so the compact attention selects those slopes.

Per-layer shapes then differ from stock ``BloomConfig``; the spec is stored in config.json
under ``bloomray_compact`` and :func:`bloomray.export.load.load_model` rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.bloom.modeling_bloom import BloomAttention

SPEC_KEY = "bloomray_compact"


class CompactBloomAttention(BloomAttention):
    """BloomAttention over a subset of the original heads (with their ALiBi slopes)."""

    def __init__(self, config: Any, layer_idx: int, kept_heads: list[int]) -> None:
        super().__init__(config, layer_idx)
        head_dim = config.hidden_size // config.n_head
        self.full_heads = config.n_head
        self.num_heads = len(kept_heads)
        self.register_buffer("kept_heads", torch.tensor(kept_heads, dtype=torch.long), persistent=False)
        self.query_key_value = nn.Linear(self.hidden_size, 3 * head_dim * self.num_heads, bias=True)
        self.dense = nn.Linear(head_dim * self.num_heads, self.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ):
        batch = hidden_states.shape[0]
        # alibi arrives as (batch * all heads, 1, kv_len); keep the rows of our heads.
        alibi = alibi.view(batch, self.full_heads, *alibi.shape[1:])[:, self.kept_heads]
        alibi = alibi.reshape(batch * self.num_heads, *alibi.shape[2:])
        return super().forward(hidden_states, residual, alibi, *args, **kwargs)


def find_removable(state: dict[str, torch.Tensor], n_layer: int, n_head: int) -> dict[str, Any]:
    """Kept heads and neurons per layer, read from the zeros of a (masked) state dict."""
    heads, neurons = [], []
    for i in range(n_layer):
        pre = _prefix(state, i)
        qkv_w, qkv_b = (
            state[f"{pre}self_attention.query_key_value.weight"],
            state[f"{pre}self_attention.query_key_value.bias"],
        )
        head_dim = qkv_w.shape[1] // n_head
        v_rows = qkv_w.view(n_head, 3, head_dim, -1)[:, 2]
        v_bias = qkv_b.view(n_head, 3, head_dim)[:, 2]
        alive = (v_rows.abs().sum((1, 2)) + v_bias.abs().sum(1)) > 0
        kept_h = alive.nonzero().flatten().tolist() or [0]  # a layer keeps at least one head
        up_w, up_b = state[f"{pre}mlp.dense_h_to_4h.weight"], state[f"{pre}mlp.dense_h_to_4h.bias"]
        alive_n = (up_w.abs().sum(1) + up_b.abs()) > 0
        kept_n = alive_n.nonzero().flatten().tolist() or [0]
        heads.append(kept_h)
        neurons.append(kept_n)
    return {"heads": heads, "neurons": neurons}


def _prefix(state: dict[str, torch.Tensor], layer: int) -> str:
    for key in state:
        if f"h.{layer}.self_attention.query_key_value.weight" in key:
            return key[: key.index(f"h.{layer}.")] + f"h.{layer}."
    raise KeyError(f"no attention weights for layer {layer} in the state dict")


def compact_state_dict(
    state: dict[str, torch.Tensor], spec: dict[str, Any], n_head: int
) -> dict[str, torch.Tensor]:
    """Slice the kept heads' rows/columns and kept neurons out of a full-shape state dict."""
    out = dict(state)
    for i, (kept_h, kept_n) in enumerate(zip(spec["heads"], spec["neurons"], strict=True)):
        pre = _prefix(state, i)
        qkv_w = state[f"{pre}self_attention.query_key_value.weight"]
        head_dim = qkv_w.shape[1] // n_head
        idx_h = torch.tensor(kept_h)
        rows = (idx_h[:, None] * 3 * head_dim + torch.arange(3 * head_dim)).flatten()
        cols = (idx_h[:, None] * head_dim + torch.arange(head_dim)).flatten()
        out[f"{pre}self_attention.query_key_value.weight"] = qkv_w[rows].contiguous()
        out[f"{pre}self_attention.query_key_value.bias"] = state[f"{pre}self_attention.query_key_value.bias"][
            rows
        ].contiguous()
        out[f"{pre}self_attention.dense.weight"] = state[f"{pre}self_attention.dense.weight"][
            :, cols
        ].contiguous()
        idx_n = torch.tensor(kept_n)
        out[f"{pre}mlp.dense_h_to_4h.weight"] = state[f"{pre}mlp.dense_h_to_4h.weight"][idx_n].contiguous()
        out[f"{pre}mlp.dense_h_to_4h.bias"] = state[f"{pre}mlp.dense_h_to_4h.bias"][idx_n].contiguous()
        out[f"{pre}mlp.dense_4h_to_h.weight"] = state[f"{pre}mlp.dense_4h_to_h.weight"][:, idx_n].contiguous()
    return out


def reshape_model(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Replace each block's attention and MLP Linears with the compact shapes of ``spec``."""
    base = getattr(model, "transformer", model)
    config = model.config
    for i, block in enumerate(base.h):
        kept_h, kept_n = spec["heads"][i], spec["neurons"][i]
        if len(kept_h) != config.n_head:
            block.self_attention = CompactBloomAttention(config, i, kept_h)
        if len(kept_n) != 4 * config.hidden_size:
            block.mlp.dense_h_to_4h = nn.Linear(config.hidden_size, len(kept_n))
            block.mlp.dense_4h_to_h = nn.Linear(len(kept_n), config.hidden_size)
    return model


def is_compactable(spec: dict[str, Any], n_head: int, hidden: int) -> bool:
    """True when any layer lost a head or a neuron."""
    return any(len(h) < n_head for h in spec["heads"]) or any(len(n) < 4 * hidden for n in spec["neurons"])
