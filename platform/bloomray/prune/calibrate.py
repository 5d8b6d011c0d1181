"""Layer-by-layer calibration of a BLOOM model: block inputs and per-Linear input statistics.

One-shot pruning (``prune.oneshot``) needs, for every target Linear, statistics of its input
over the calibration tokens. Running the whole model with hooks everywhere would hold every
layer's statistics and activations at once; instead the model is walked one block at a time:

1. :func:`block_inputs` runs ``word_embeddings`` + ``word_embeddings_layernorm`` once per
   calibration batch and stops at the first block (a forward pre-hook on ``transformer.h[0]``
   records the block's arguments and raises), so the hidden states *and* the exact keyword
   arguments the model passes its blocks (``alibi``, the 4-D causal ``attention_mask``, ...)
   are captured as the installed transformers builds them, rather than rebuilt here.
2. :func:`collect_stats` runs one block on those hidden states with forward hooks on its
   target Linears, accumulating per input column the squared norm (Wanda) and optionally the
   Gram matrix ``X^T X`` (SparseGPT's Hessian).
3. :func:`run_block` re-runs the (now pruned) block to produce the next block's inputs, so
   each block is calibrated on the outputs of the already pruned blocks before it.

Memory stays at one block's activations for all calibration samples plus one block's stats.
"""

from __future__ import annotations

from typing import Any

import torch

#: One calibration batch at a block boundary: hidden states and the block's keyword arguments.
BlockInput = tuple[torch.Tensor, dict[str, Any]]


class _Stop(Exception):
    """Raised by the pre-hook on block 0 once its inputs are recorded."""


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (``transformer.h``) of a BLOOM model or of a bare ``BloomModel``."""
    base = getattr(model, "transformer", model)
    return base.h


@torch.no_grad()
def block_inputs(model: torch.nn.Module, calib_ids: torch.Tensor, batch_size: int) -> list[BlockInput]:
    """Hidden states entering block 0 and its keyword arguments, per calibration batch.

    ``calib_ids`` is ``[n, seq]`` without padding (no attention mask is passed, so every
    token is attended to and counted).
    """
    base = getattr(model, "transformer", model)
    device = next(model.parameters()).device
    captured: list[BlockInput] = []

    def grab(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.update(zip(("alibi", "attention_mask"), args[1:], strict=False))
        captured.append((hidden, kwargs))
        raise _Stop

    handle = blocks(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            try:
                base(input_ids=calib_ids[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


class InputStats:
    """Running statistics of one Linear's input over the calibration tokens (float32)."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.xtx = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        )
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., in_features]``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq_norm += x.pow(2).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def col_norm(self) -> torch.Tensor:
        """``||X_j||_2`` of every input column j."""
        return self.sq_norm.sqrt()

    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / n`` (n: calibration tokens), the layer-wise reconstruction Hessian."""
        if self.xtx is None:
            raise RuntimeError("these stats were collected without the Hessian")
        return self.xtx * (2.0 / max(self.tokens, 1))


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def collect_stats(
    block: torch.nn.Module,
    inputs: list[BlockInput],
    linears: dict[str, torch.nn.Linear],
    hessian: bool,
) -> dict[str, InputStats]:
    """Run ``block`` on every batch of ``inputs`` and accumulate the inputs of ``linears``."""
    stats = {name: InputStats(lin.in_features, lin.weight.device, hessian) for name, lin in linears.items()}
    handles = []
    for name, lin in linears.items():

        def hook(_m: torch.nn.Module, args: tuple, _out: Any, s: InputStats = stats[name]) -> None:
            s.add(args[0])

        handles.append(lin.register_forward_hook(hook))
    try:
        for hidden, kwargs in inputs:
            block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def run_block(block: torch.nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """The block's outputs for every batch, paired with the same keyword arguments."""
    return [(_output(block(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
