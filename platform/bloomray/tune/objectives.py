"""Multi-objective search (``tune.objectives``): what a trial reports, the front, its hypervolume.

With two or more objectives the search runs Optuna's NSGA-II (or TPE) sampler through Ray
Tune's ``OptunaSearch`` on all of them at once. A trial then reports once, at its end: its
eval metrics, and what :func:`trial_measures` measures on its export in the trial itself (the
forward latency, best of a few rounds, and the size on disk), so the sampler sees every
objective. After the search ``results.summarize`` re-measures every export's latency in
interleaved rounds (one machine, one request shape, rounds alternating between trials), and
the Pareto front over the objectives uses those values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bloomray.config import OBJECTIVES, Config


def modes(cfg: Config) -> list[str]:
    """``min``/``max`` of each of ``tune.objectives``, in order."""
    return [OBJECTIVES[o] for o in cfg.tune.objectives]


def population_size(cfg: Config) -> int:
    """NSGA-II's generation size (TPE's random startup trials): ``tune.population_size``, or a
    third of ``tune.num_samples`` within [2, 50] so the search has at least three generations."""
    t = cfg.tune
    return t.population_size if t.population_size is not None else max(2, min(50, t.num_samples // 3))


def sampler(cfg: Config) -> Any:
    """The Optuna sampler of a multi-objective search, seeded with ``tune.seed``.

    The random baseline and a search's first generation draw the same points for the same
    seed, so a comparison of the two differs only in what the search chose after it.
    """
    import optuna

    t = cfg.tune
    if t.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size(cfg), seed=t.seed)
    if t.sampler == "random":  # the same objectives measured, none used to choose points
        return optuna.samplers.RandomSampler(seed=t.seed)
    return optuna.samplers.TPESampler(n_startup_trials=population_size(cfg), seed=t.seed)


def size_mb(model_dir: str | Path) -> float:
    """The export's weights on disk (its safetensors files), in MiB."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / 2**20


def trial_measures(
    cfg: Config, model_dir: str | Path, reference: str | None = None, rounds: int = 3
) -> dict[str, Any]:
    """What a trial measures on its own export for the sampler: size; the forward latency (best
    of ``rounds``) for ``latency_ms``; ``decode_ms`` and ``decode_rel`` in the serving engine
    against ``reference`` (``engine_latency.py``) for ``decode_rel``."""
    from bloomray.export.latency import forward_latency_ms
    from bloomray.export.load import load_model

    out: dict[str, Any] = {"size_mb": size_mb(model_dir)}
    if "latency_ms" in cfg.tune.objectives:
        model = load_model(model_dir)
        out["latency_ms"] = min(
            forward_latency_ms(model, cfg.select.latency_batch, cfg.select.latency_seq) for _ in range(rounds)
        )
    if "decode_rel" in cfg.tune.objectives:
        from bloomray.tune.engine_latency import engine_measures

        if reference is None:
            raise ValueError(
                "decode_rel needs the dense reference the driver writes (engine_latency.write_reference)"
            )
        out.update(engine_measures(cfg, str(model_dir), reference))
    return out


def _signed(row: dict[str, Any], objectives: list[str]) -> tuple[float, ...] | None:
    """The row's objective values, negated where larger is better (so all are minimised)."""
    vals = []
    for o in objectives:
        v = row.get(o)
        if v is None or v == "" or not math.isfinite(float(v)):
            return None
        vals.append(float(v) if OBJECTIVES[o] == "min" else -float(v))
    return tuple(vals)


def pareto_rows(rows: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """The rows no other row beats on every objective (at least as good on all, better on one)."""
    pts = [(r, p) for r in rows if (p := _signed(r, objectives)) is not None]

    def dominated(p: tuple[float, ...]) -> bool:
        return any(all(a <= b for a, b in zip(q, p, strict=True)) and q != p for _, q in pts)

    return [r for r, p in pts if not dominated(p)]


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both coordinates minimised) and bounded by ``ref``.

    Points not strictly better than ``ref`` on both coordinates add nothing.
    """
    inside = sorted({p for p in points if p[0] < ref[0] and p[1] < ref[1]})
    area, best_y = 0.0, ref[1]
    for x, y in inside:  # ascending x: each point adds the strip below the best y so far
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def front_hypervolume(rows: list[dict[str, Any]], objectives: list[str], ref: tuple[float, float]) -> float:
    """:func:`hypervolume_2d` of two objectives' values of ``rows`` (signed so both are minimised).

    ``ref`` is in the same signed units (a maximised objective's bound is its negative).
    """
    if len(objectives) != 2:
        raise ValueError(f"hypervolume_2d takes two objectives, got {objectives}")
    pts = [p for r in rows if (p := _signed(r, objectives)) is not None]
    return hypervolume_2d([(p[0], p[1]) for p in pts], ref)
