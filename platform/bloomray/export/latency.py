"""CPU forward latency of a model: the figure exports, the tune winner and benchmarks report."""

from __future__ import annotations

import time

import numpy as np
import torch

# Seconds of timed forwards per latency figure of an export (see bounded_latency_ms).
LATENCY_BUDGET_S = 2.0


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


def bounded_latency_ms(model: torch.nn.Module, budget_s: float = LATENCY_BUDGET_S) -> float:
    """``forward_latency_ms`` (batch 4 x 64) with as many timed forwards (1 to 10) as fit in
    ``budget_s``: a small model gets the median of 10, while a large one (a 250,880-row LM head, a
    7B model on CPU) is timed once instead of spending minutes of the export on it."""
    once = forward_latency_ms(model, repeats=1)  # a warm-up forward, then one timed
    repeats = min(10, int(budget_s * 1000 / max(once, 1e-3)))
    return once if repeats <= 1 else forward_latency_ms(model, repeats=repeats)
