"""One-shot pruning of a trained BLOOM with calibration data: Wanda, SparseGPT (and magnitude).

All three prune the 2-D weights of the blocks' Linears named in ``targets`` (BLOOM layout:
``self_attention.query_key_value`` ``[3*hidden, hidden]``, ``self_attention.dense``
``[hidden, hidden]``, ``mlp.dense_h_to_4h`` ``[4*hidden, hidden]``, ``mlp.dense_4h_to_h``
``[hidden, 4*hidden]``; a weight is ``[out_features, in_features]`` and its input ``X`` is
``[tokens, in_features]``), and return masks keyed by parameter name as ``prune.masks`` does
(float, 1 keep / 0 prune), with the model's pruned weights zeroed in place.

- **magnitude** (baseline, no data): ``|W|`` with ``masks.unstructured_masks`` (per tensor) or
  ``masks.two_four_masks``.
- **Wanda** (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, compared within each output row;
  unstructured prunes ``int(sparsity * in_features)`` lowest of every row (so a weight has
  exactly ``round(sparsity * numel)`` zeros whenever ``sparsity * in_features`` is an
  integer), 2:4 keeps the 2 highest of every 4 consecutive input columns. No weight update.
- **SparseGPT** (Frantar & Alistarh 2023): minimises ``||W X^T - W' X^T||^2`` with the
  layer Hessian ``H = 2 X^T X / n`` (+ ``percdamp * mean(diag H)`` on the diagonal). With
  ``U`` the upper Cholesky factor of ``H^-1``, columns are visited left to right: a pruned
  weight ``w_rj`` costs ``w_rj^2 / U_jj^2`` and its removal is compensated by subtracting
  ``(w_rj / U_jj) * U[j, j:]`` from the rest of row r (the OBS update restricted to the
  not-yet-visited columns). Updates are applied lazily per block of ``blocksize`` columns.
  The mask is chosen adaptively on the *updated* weights: unstructured at the start of each
  column block (the lowest-cost weights of the whole block, the block's share of
  ``round(sparsity * numel)``, so the layer total is exact; rows may differ), 2:4 at the
  start of each group of 4 columns (the 2 lowest-cost of every row). Runs in float32; the
  weights are written back in the model's dtype.

Wanda and SparseGPT calibrate block by block (``prune.calibrate``): each block sees the
outputs of the already pruned blocks before it, as in both papers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from bloomray.errors import EXIT_USAGE, BloomrayError
from bloomray.prune.calibrate import block_inputs, blocks, collect_stats, run_block
from bloomray.prune.masks import layer_of, target_names, two_four_masks, unstructured_masks

Method = Literal["wanda", "sparsegpt", "magnitude"]
Pattern = Literal["unstructured", "2:4"]
TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
METHODS = ("wanda", "sparsegpt", "magnitude")
PATTERNS = ("unstructured", "2:4")


class OneShotError(BloomrayError, ValueError):
    """One-shot pruning was asked for something it cannot do (exit code 2: fix the arguments)."""

    exit_code = EXIT_USAGE


def _check_pattern(sparsity: float, pattern: str) -> None:
    if pattern not in PATTERNS:
        raise OneShotError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if not 0.0 <= sparsity < 1.0:
        raise OneShotError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern == "2:4" and sparsity != 0.5:
        raise OneShotError(f"2:4 keeps 2 of every 4 weights, so sparsity must be 0.5, got {sparsity}")


def _check_two_four(name: str, weight: torch.Tensor) -> None:
    if weight.shape[1] % 4:
        raise OneShotError(f"{name}: 2:4 sparsity needs in_features divisible by 4, got {weight.shape[1]}")


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask pruning the ``int(sparsity * cols)`` lowest scores of every row."""
    mask = torch.ones_like(scores, dtype=torch.float32)
    k = int(sparsity * scores.shape[1])
    if k > 0:
        mask.scatter_(1, scores.float().topk(k, dim=1, largest=False).indices, 0.0)
    return mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern = "unstructured") -> torch.Tensor:
    """The magnitude baseline via ``prune.masks``: per tensor (unstructured) or 2:4."""
    _check_pattern(sparsity, pattern)
    scores = {"w": weight.detach().float().abs()}
    if pattern == "2:4":
        _check_two_four("weight", weight)
        return two_four_masks(scores)["w"]
    return unstructured_masks(scores, sparsity, scope="layer")["w"]


def wanda_mask(
    weight: torch.Tensor, col_norm: torch.Tensor, sparsity: float, pattern: Pattern = "unstructured"
) -> torch.Tensor:
    """Wanda's mask from ``|W_ij| * ||X_j||_2`` (``col_norm``: the input columns' L2 norms)."""
    _check_pattern(sparsity, pattern)
    scores = weight.detach().float().abs() * col_norm.float().to(weight.device)[None, :]
    if pattern == "2:4":
        _check_two_four("weight", weight)
        return two_four_masks({"w": scores})["w"]
    return per_row_mask(scores, sparsity)


def _inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; ``damp`` grows tenfold while H is not PD."""
    h = hessian.float()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(h.diagonal().mean()) or 1.0  # all-zero inputs: any damp makes it PD
    damp = percdamp * mean_diag
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return upper
        damp = max(10.0 * damp, 1e-6 * mean_diag)
    raise OneShotError("the calibration Hessian is not positive definite", hint="raise percdamp")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern = "unstructured",
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight ``[out, in]`` with its Hessian ``[in, in]``: (new weight fp32, mask)."""
    _check_pattern(sparsity, pattern)
    if pattern == "2:4":
        _check_two_four("weight", weight)
        if blocksize % 4:
            raise OneShotError(f"2:4 needs blocksize divisible by 4, got {blocksize}")
    if blocksize < 1:
        raise OneShotError(f"blocksize must be >= 1, got {blocksize}")
    w = weight.detach().float().clone()
    rows, cols = w.shape
    u = _inverse_hessian_factor(hessian.to(w.device), percdamp)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        d = u1.diagonal()
        err = torch.zeros_like(w1)
        if pattern == "unstructured":
            n_prune = int(round(sparsity * rows * i2)) - int(round(sparsity * rows * i1))
            if n_prune > 0:
                cost = (w1.pow(2) / d.pow(2)[None, :]).reshape(-1)
                keep1.view(-1)[cost.topk(n_prune, largest=False).indices] = False
        for j in range(i2 - i1):
            if pattern == "2:4" and j % 4 == 0:
                cost = w1[:, j : j + 4].pow(2) / d[j : j + 4].pow(2)[None, :]
                keep1[:, j : j + 4].scatter_(1, cost.topk(2, dim=1, largest=False).indices, False)
            e = w1[:, j] * (~keep1[:, j]) / d[j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, i1:i2], keep[:, i1:i2] = w1, keep1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    w[~keep] = 0.0
    return w, keep.float()


def _validate(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    method: str,
    sparsity: float,
    pattern: str,
    targets: list[str],
    batch_size: int,
) -> list[str]:
    if method not in METHODS:
        raise OneShotError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")
    _check_pattern(sparsity, pattern)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise OneShotError(f"unknown prune targets {unknown or targets}; choose from {', '.join(TARGETS)}")
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.ndim != 2 or calib_ids.numel() == 0:
        shape = tuple(calib_ids.shape) if isinstance(calib_ids, torch.Tensor) else type(calib_ids).__name__
        raise OneShotError(f"calibration data is empty or not [n, seq] input_ids (got {shape})")
    if calib_ids.is_floating_point() or calib_ids.is_complex():
        raise OneShotError(f"calibration input_ids must be integer token ids, got {calib_ids.dtype}")
    if batch_size < 1:
        raise OneShotError(f"batch_size must be >= 1, got {batch_size}")
    names = target_names(model, targets)
    if not names:
        raise OneShotError(f"the model has no block weights named {targets}")
    if pattern == "2:4":
        params = dict(model.named_parameters())
        for n in names:
            _check_two_four(n, params[n])
    return names


@torch.no_grad()
def oneshot_prune(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    method: Method = "wanda",
    sparsity: float = 0.5,
    pattern: Pattern = "unstructured",
    targets: list[str] | None = None,
    batch_size: int = 8,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` (a full, unpartitioned BLOOM) in place; return its masks by parameter name.

    Args:
        calib_ids: calibration ``input_ids`` ``[n, seq]`` without padding; run ``batch_size``
            rows at a time (magnitude ignores the data but it is still checked).
        targets: module names (default all four of ``TARGETS``); the masks' keys are
            ``target_names(model, targets)``, in that order.
        blocksize, percdamp: SparseGPT's lazy-update block width and Hessian dampening.

    Raises:
        OneShotError: unknown method/pattern/targets, 2:4 with sparsity != 0.5 or
            in_features not divisible by 4, empty or non-integer calibration data.
    """
    targets = list(TARGETS) if targets is None else list(targets)
    names = _validate(model, calib_ids, method, sparsity, pattern, targets, batch_size)
    modules = dict(model.named_modules())
    linears = {n: modules[n.rsplit(".", 1)[0]] for n in names}
    masks: dict[str, torch.Tensor] = {}
    if method == "magnitude":
        for n, lin in linears.items():
            masks[n] = magnitude_mask(lin.weight, sparsity, pattern)
            lin.weight.mul_(masks[n].to(lin.weight.dtype))
        return masks
    was_training = model.training
    model.eval()
    try:
        inputs = block_inputs(model, calib_ids, batch_size)
        for i, block in enumerate(blocks(model)):
            layer = {n: lin for n, lin in linears.items() if layer_of(n) == i}
            if layer:
                stats = collect_stats(block, inputs, layer, hessian=method == "sparsegpt")
                for n, lin in layer.items():
                    if stats[n].tokens == 0:
                        raise OneShotError(f"{n} saw no calibration input (is it called as a module?)")
                    if method == "wanda":
                        masks[n] = wanda_mask(lin.weight, stats[n].col_norm(), sparsity, pattern)
                        lin.weight.mul_(masks[n].to(lin.weight.dtype))
                    else:
                        new, masks[n] = sparsegpt_prune(
                            lin.weight, stats[n].hessian(), sparsity, pattern, blocksize, percdamp
                        )
                        lin.weight.copy_(new.to(lin.weight.dtype))
                    del stats[n]
            if i + 1 < len(blocks(model)):
                inputs = run_block(block, inputs)
    finally:
        model.train(was_training)
    return {n: masks[n] for n in names}


def reconstruction_error(weight_before: torch.Tensor, weight_after: torch.Tensor, x: torch.Tensor) -> float:
    """``||X W^T - X W'^T||_F^2`` for inputs ``x`` ``[..., in_features]`` (float32)."""
    delta = (weight_before.detach().float() - weight_after.detach().float()).to(x.device)
    return float((x.detach().reshape(-1, x.shape[-1]).float() @ delta.T).pow(2).sum())


@torch.no_grad()
def reconstruction_errors(
    dense: torch.nn.Module,
    pruned: torch.nn.Module | Mapping[str, torch.Tensor],
    calib_ids: torch.Tensor,
    targets: list[str] | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Per target weight, ``||W X - W' X||^2`` summed over the calibration tokens.

    ``X`` is each layer's input in the *dense* model's own forward pass, ``W`` its dense
    weight and ``W'`` the same-named weight of ``pruned`` (a model or a name -> weight dict).
    """
    names = target_names(dense, list(TARGETS) if targets is None else list(targets))
    after = dict(pruned.named_parameters()) if isinstance(pruned, torch.nn.Module) else dict(pruned)
    modules = dict(dense.named_modules())
    errors = dict.fromkeys(names, 0.0)
    handles = []
    for n in names:
        lin = modules[n.rsplit(".", 1)[0]]

        def hook(
            _m: torch.nn.Module, args: tuple, _out: object, n: str = n, w: torch.Tensor = lin.weight
        ) -> None:
            errors[n] += reconstruction_error(w, after[n], args[0])

        handles.append(lin.register_forward_hook(hook))
    was_training = dense.training
    dense.eval()
    device = next(dense.parameters()).device
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            dense(input_ids=calib_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        dense.train(was_training)
    return errors
