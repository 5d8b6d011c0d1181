"""Apply masks where the optimizer cannot undo them, for every DeepSpeed ZeRO stage.

DeepSpeed's optimizer updates fp32 *master* copies and then overwrites the module's
low-precision weights from them, so zeroing only ``module.weight`` is undone at the next
step. After every optimizer step we zero, at the pruned positions: the fp32 master, the
optimizer's moments (so Adam has no momentum to revive them) and the module weight. Where
each lives depends on the stage:

- ZeRO-1/2 (and DeepSpeed's BF16 optimizer): ``param._hp_mapping`` maps this rank's slice of
  the flattened param to its slice of the flat fp32 partition and of each optimizer state;
  the module keeps a full low-precision copy on every rank.
- ZeRO-3: ``param._z3_optimizer`` owns the flat fp32 partition; the module weight is itself
  partitioned (``param.ds_tensor``), so both are masked with this rank's slice of the mask.
- ZeRO-0 with bf16/fp16: DeepSpeed's FP16_Optimizer keeps one flat fp32 tensor per param
  group (in the order of ``fp16_groups``), FP16_UnfusedOptimizer (what a torch client
  optimizer gets without apex) one fp32 tensor per param in ``fp32_groups``.
- ZeRO-0 in fp32: the client optimizer updates the module params directly.

Everything here touches only this rank's memory: no collectives, so it runs every step.
"""

from __future__ import annotations

from typing import Any

import torch


class MaskApplier:
    """Reads full weights and writes masks for one DeepSpeed engine."""

    def __init__(self, engine: Any, model: torch.nn.Module) -> None:
        self.engine = engine
        self.params = dict(model.named_parameters())
        self.stage = engine.zero_optimization_stage()
        self._flat_index = self._index_fp16_optimizer()

    # ------------------------------------------------------------------ reading

    def full_weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """fp32 copies of the full (gathered) module weights; a collective under ZeRO-3."""
        params = [self.params[n] for n in names]
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                return {n: p.data.detach().float().clone() for n, p in zip(names, params, strict=True)}
        return {n: p.data.detach().float().clone() for n, p in zip(names, params, strict=True)}

    def full_grads(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full averaged gradients before the optimizer step (a collective under ZeRO 1-3)."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for n in names:
            g = safe_get_full_grad(self.params[n])
            out[n] = (
                torch.zeros_like(self.params[n], dtype=torch.float32) if g is None else g.detach().float()
            )
        return out

    # ------------------------------------------------------------------ writing

    @torch.no_grad()
    def apply(self, masks: dict[str, torch.Tensor]) -> None:
        """Zero masters, optimizer moments and module weights wherever ``masks`` is 0."""
        for name, mask in masks.items():
            param = self.params[name]
            if self.stage == 3:
                self._apply_zero3(param, mask)
            elif getattr(param, "_hp_mapping", None) is not None or self.stage in (1, 2):
                self._apply_hp_mapping(param, mask)
            elif self._flat_index is not None:
                self._apply_flat(param, mask)
            else:
                self._apply_plain(param, mask)

    def _apply_hp_mapping(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        param.data.mul_(mask.to(param.device, param.dtype))
        frag = getattr(param, "_hp_mapping", None)
        if frag is None:  # this rank holds no slice of this param's master
            return
        addr = frag.lp_fragment_address
        piece = mask.reshape(-1)[addr.start : addr.start + addr.numel].to(frag.hp_fragment.device)
        frag.hp_fragment.data.mul_(piece.to(frag.hp_fragment.dtype))
        for key in frag.get_optim_state_keys() if frag.optim_fragment else []:
            state = frag.get_optim_state_fragment(key)
            state.data.mul_(piece.to(state.dtype))

    def _apply_zero3(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        opt = param._z3_optimizer
        master, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        n, rank = master.numel(), opt._get_param_partition_rank(param)
        flat_mask = mask.reshape(-1).float()
        start = rank * n
        valid = max(0, min(n, flat_mask.numel() - start))  # the last partition is padded
        piece = torch.zeros(n, dtype=torch.float32, device=master.device)
        piece[:valid] = flat_mask[start : start + valid].to(master.device)
        master.data.mul_(piece)
        group_idx = opt.grad_position[opt.get_param_id(param)][0]
        state = opt.optimizer.state.get(opt.fp32_partitioned_groups_flat[group_idx], {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                s, _ = opt._get_fp32_opt_state_partition(
                    param, release_swap_buffers=False, optim_state_key=key
                )
                s.data.mul_(piece.to(s.dtype))
        local = param.ds_tensor
        local.data.mul_(piece[: local.numel()].to(local.dtype).view_as(local))
        if param.data.numel() == param.ds_numel:
            # Small params stay gathered between steps (stage3_param_persistence_threshold):
            # the full copy the next forward reads must be masked too.
            param.data.mul_(mask.to(param.device, param.dtype).view_as(param.data))

    def _index_fp16_optimizer(self) -> dict[int, Any] | None:
        """param id -> its fp32 master under DeepSpeed's ZeRO-0 fp16/bf16 optimizers, if used.

        FP16_Optimizer (fused) keeps one flat fp32 tensor per group: the value is
        ``(group, offset)``. FP16_UnfusedOptimizer keeps one fp32 tensor per param: the value
        is that tensor.
        """
        opt = self.engine.optimizer
        if self.stage != 0 or not hasattr(opt, "fp16_groups"):
            return None
        index: dict[int, Any] = {}
        if hasattr(opt, "fp32_groups_flat"):
            for g, group in enumerate(opt.fp16_groups):
                offset = 0
                for p in group:
                    index[id(p)] = (g, offset)
                    offset += p.numel()
        elif hasattr(opt, "fp32_groups"):
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
                for lp, hp in zip(lp_group, hp_group, strict=True):
                    index[id(lp)] = hp
        return index or None

    def _apply_flat(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        opt = self.engine.optimizer
        assert self._flat_index is not None
        entry = self._flat_index[id(param)]
        param.data.mul_(mask.to(param.device, param.dtype))
        if isinstance(entry, torch.Tensor):  # unfused: a per-param fp32 master
            m = mask.to(entry.device, entry.dtype)
            entry.data.mul_(m)
            state = opt.optimizer.state.get(entry, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].mul_(m)
            return
        g, offset = entry
        flat_mask = mask.reshape(-1).float()
        master = opt.fp32_groups_flat[g]
        master.data[offset : offset + param.numel()].mul_(flat_mask.to(master.device))
        state = opt.optimizer.state.get(master, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][offset : offset + param.numel()].mul_(flat_mask.to(state[key].device))

    def _apply_plain(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        m = mask.to(param.device, param.dtype)
        param.data.mul_(m)
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        for key in ("exp_avg", "exp_avg_sq"):
            state = inner.state.get(param, {})
            if key in state:
                state[key].mul_(m.to(state[key].dtype))
