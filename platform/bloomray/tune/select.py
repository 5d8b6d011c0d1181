"""Quality vs cost: the Pareto front over (quality, latency) and the winner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Candidate:
    """One finished trial's measured export."""

    trial_id: str
    quality: float  # lower is better (eval loss, or 1 - accuracy/F1)
    latency_ms: float
    sparsity: float
    row: dict[str, Any]


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both quality and latency, sorted by latency."""
    front = [
        c
        for c in cands
        if not any(
            (o.quality <= c.quality and o.latency_ms <= c.latency_ms)
            and (o.quality < c.quality or o.latency_ms < c.latency_ms)
            for o in cands
        )
    ]
    return sorted(front, key=lambda c: (c.latency_ms, c.quality))


def knee(front: list[Candidate]) -> Candidate:
    """The front point farthest from the chord joining its two ends (normalised axes).

    With one or two points there is no bend: the better-quality point wins.
    """
    if len(front) <= 2:
        return min(front, key=lambda c: c.quality)
    q = [c.quality for c in front]
    t = [c.latency_ms for c in front]
    qn = [(v - min(q)) / ((max(q) - min(q)) or 1) for v in q]
    tn = [(v - min(t)) / ((max(t) - min(t)) or 1) for v in t]
    (x0, y0), (x1, y1) = (tn[0], qn[0]), (tn[-1], qn[-1])
    length = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 or 1.0
    dist = [
        abs((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / length for x, y in zip(tn, qn, strict=True)
    ]
    return front[max(range(len(front)), key=dist.__getitem__)]


def choose_winner(
    cands: list[Candidate], max_latency_ms: float | None, min_sparsity: float | None
) -> tuple[Candidate, str]:
    """Best quality within the budget; else the knee of the front. Returns (winner, why).

    Raises:
        ValueError: no finished trial to choose from.
    """
    if not cands:
        raise ValueError("no trial finished: nothing to choose (see trials.csv for the errors)")
    budget = []
    if max_latency_ms is not None:
        budget.append(f"select.max_latency_ms={max_latency_ms}")
    if min_sparsity is not None:
        budget.append(f"select.min_sparsity={min_sparsity}")
    front = pareto_front(cands)
    if not budget:
        return knee(front), "no budget set: the knee of the quality/latency Pareto front"
    ok = [
        c
        for c in cands
        if (max_latency_ms is None or c.latency_ms <= max_latency_ms)
        and (min_sparsity is None or c.sparsity >= min_sparsity - 1e-9)
    ]
    if ok:
        return min(ok, key=lambda c: c.quality), f"best quality within {' and '.join(budget)}"
    best_lat = min(c.latency_ms for c in cands)
    best_sp = max(c.sparsity for c in cands)
    return knee(front), (
        f"no trial met {' and '.join(budget)} (fastest {best_lat:.2f} ms, sparsest {best_sp:.2f}); "
        "fell back to the knee of the Pareto front"
    )
