"""Sparsity schedules: the target sparsity at a training step.

Cubic is gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune"):
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3`` for ``t0 <= t <= t1``, held at
``s_f`` afterwards, with masks recomputed every ``update_every`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Step-based schedule. ``kind`` is cubic, linear, exponential or one_shot."""

    kind: str
    initial: float
    final: float
    start_step: int
    end_step: int
    update_every: int

    @classmethod
    def from_config(cls, prune_cfg, total_steps: int) -> Schedule:
        """Steps from the config's fractions of ``total_steps``; end >= start >= 1.

        Masks are computed after an optimizer step (``PruneHook.after_step`` sees steps 1, 2,
        ...), so a schedule starting at 0 (``start_fraction=0``) starts after step 1: else a
        ``one_shot`` schedule at 0 would never prune.
        """
        start = max(1, int(round(prune_cfg.start_fraction * total_steps)))
        end = max(start, int(round(prune_cfg.end_fraction * total_steps)))
        return cls(
            prune_cfg.schedule,
            prune_cfg.initial_sparsity,
            prune_cfg.final_sparsity,
            start,
            end,
            prune_cfg.update_every,
        )

    def sparsity_at(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps (0 before the start step)."""
        if step < self.start_step:
            return 0.0
        if self.kind == "one_shot" or step >= self.end_step or self.end_step == self.start_step:
            return self.final
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        if self.kind == "cubic":
            return self.final + (self.initial - self.final) * (1.0 - progress) ** 3
        if self.kind == "linear":
            return self.initial + (self.final - self.initial) * progress
        if self.kind == "exponential":
            # Geometric in the kept fraction: (1-s) decays from (1-s_i) to (1-s_f).
            kept = (1 - self.initial) * ((1 - self.final) / (1 - self.initial)) ** progress
            return 1.0 - kept
        raise ValueError(f"unknown schedule {self.kind!r}")

    def is_update_step(self, step: int) -> bool:
        """Masks are recomputed at the start step, every ``update_every`` steps, and at the end."""
        if step < self.start_step or step > self.end_step:
            return False
        if self.kind == "one_shot":
            return step == self.start_step
        return (step - self.start_step) % self.update_every == 0 or step == self.end_step

    def steps_with_updates(self) -> list[int]:
        """Every step at which masks change (for plots and tests)."""
        return [s for s in range(self.start_step, self.end_step + 1) if self.is_update_step(s)]


def is_monotone(values: list[float]) -> bool:
    """True when the sequence never decreases (tolerating float noise)."""
    return all(b >= a - 1e-12 for a, b in zip(values, values[1:], strict=False)) and all(
        math.isfinite(v) for v in values
    )
