"""A tiny fp32 BLOOM with non-flat weights, shared by the pruning/compaction/loading unit tests.

Importable as ``tiny_bloom``: pytest puts ``tests/`` on sys.path for its conftest.py.
"""

from __future__ import annotations

import torch

from bloomray.model.build import build_from_config, preset_config

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
VOCAB, PAD = 128, 0


def make_model(task: str = "causal_lm", seed: int = 0) -> torch.nn.Module:
    """Tiny fp32 BLOOM in eval mode, weights scaled up so outputs depend on every head."""
    cfg = preset_config(
        "tiny", vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, num_labels=3
    )
    model = build_from_config(task, cfg, seed=seed).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.1))
    return model
