"""The training-loop hook that prunes on a schedule and keeps masks applied every step."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from bloomray.config import ONESHOT_METHODS, PRUNABLE_MODULES, ConfigError, check_trainable
from bloomray.prune.apply import MaskApplier
from bloomray.prune.masks import (
    layer_of,
    sparsity_of,
    structured_masks,
    target_names,
    two_four_masks,
    unstructured_masks,
)
from bloomray.prune.schedules import Schedule


class PruneHook:
    """Recompute masks at scheduled steps; re-apply them after every optimizer step.

    Every rank computes the same masks from the same (data-parallel identical) weights, so
    no mask is ever broadcast. Methods marked *collective* must run on all ranks together.

    With a one-shot ``prune.method`` (wanda, sparsegpt) the starting model was pruned before
    the run (``prune/initial.py``): its zeros are the initial masks, applied from step 1, and
    the schedule's later updates rank the kept weights by magnitude (or Taylor importance),
    per ``prune.scope``, or 2 of every 4 with ``prune.pattern=2:4``.
    """

    def __init__(self, cfg: Any, engine: Any, model: torch.nn.Module, total_steps: int) -> None:
        check_trainable(cfg)  # checked on the driver; a config built by hand fails here, not later
        self.p = cfg.prune
        self.schedule = Schedule.from_config(self.p, total_steps)
        self.applier = MaskApplier(engine, model)
        self.names = target_names(model, self.p.targets)
        if not self.names:
            raise ConfigError(
                f"prune.targets={self.p.targets} matches no weight in the model's blocks; "
                f"choose from {list(PRUNABLE_MODULES)}"
            )
        self.n_head = model.config.n_head
        self.masks: dict[str, torch.Tensor] = {}
        self.taylor: dict[str, torch.Tensor] = {}
        self.target = 0.0
        self.oneshot = self.p.method in ONESHOT_METHODS
        if self.oneshot:  # collective under ZeRO-3: every rank builds its hook at the same point
            weights = self.applier.full_weights(self.names)
            self.masks = {n: (w != 0).float() for n, w in weights.items()}
            self.target = self.p.initial_sparsity

    # Taylor importance needs gradients, which exist only between backward and step.
    def before_step(self, engine: Any, next_step: int) -> None:
        """Accumulate |w x grad| ahead of a mask update (collective under ZeRO 1-3)."""
        if self.p.importance != "taylor":
            return
        window_start = self.schedule.start_step - self.p.update_every
        if not (window_start < next_step <= self.schedule.end_step):
            return
        grads = self.applier.full_grads(self.names)
        weights = self.applier.full_weights(self.names)
        for n in self.names:
            score = (weights[n] * grads[n]).abs()
            # A resumed accumulator sits on this rank's device; follow the score's device.
            self.taylor[n] = self.taylor[n].to(score.device) + score if n in self.taylor else score

    def after_step(self, engine: Any, step: int) -> dict[str, float]:
        """Update masks if scheduled (collective under ZeRO-3), then re-apply them (local)."""
        if self.schedule.is_update_step(step):
            self.target = self.schedule.sparsity_at(step)
            self.masks = self._compute_masks(self.target)
            self.taylor = {}
        if self.masks:
            self.applier.apply(self.masks)
        return {"sparsity_target": self.target}

    def _compute_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        weights = self.applier.full_weights(self.names)
        if self.p.importance == "taylor" and self.taylor:
            scores = self.taylor
        else:
            scores = {n: w.abs() for n, w in weights.items()}
        if self.p.method == "2:4" or (self.oneshot and self.p.pattern == "2:4"):
            masks = two_four_masks(scores)
        elif self.p.method == "magnitude" or self.oneshot:
            masks = unstructured_masks(scores, sparsity, self.p.scope)
        else:
            masks = structured_masks(scores, sparsity, self.p.structure, self.n_head)
        # Once pruned, always pruned: a zeroed weight has zero importance anyway, but keep
        # earlier masks so ties at zero can never resurrect a weight.
        for n, old in self.masks.items():
            if n in masks:
                masks[n] = masks[n] * old
        return masks

    def log_metrics(self) -> dict[str, float]:
        """Actual sparsity of the weights, overall and per layer (collective under ZeRO-3)."""
        weights = self.applier.full_weights(self.names)
        overall, per_tensor = sparsity_of(weights)
        by_layer: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for n, s in per_tensor.items():
            by_layer[layer_of(n)].append((s, weights[n].numel()))
        out = {"sparsity": overall}
        for layer, items in sorted(by_layer.items()):
            out[f"sparsity/layer_{layer}"] = sum(s * k for s, k in items) / sum(k for _, k in items)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Masks, the Taylor scores accumulated so far in this window, and the target sparsity.

        The scores are saved so a run killed mid-window resumes with the same importance and
        so computes the same masks as one that never stopped.
        """
        return {"masks": self.masks, "taylor": self.taylor, "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (states saved before Taylor scores were kept have none)."""
        self.masks = dict(state.get("masks", {}))
        self.taylor = dict(state.get("taylor", {}))
        self.target = float(state.get("target", 0.0))
