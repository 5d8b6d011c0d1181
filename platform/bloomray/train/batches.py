"""Deterministic per-rank batches over arrays held in Ray's object store.

Each epoch is a seeded permutation; rank ``r`` of ``w`` takes every ``w``-th item of it.
A micro-batch is addressed by its global index, so a resumed run continues exactly where
the checkpoint left off, with no data seen twice or skipped.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bloomray.errors import EXIT_USAGE, BloomrayError


class DataTooSmallError(BloomrayError, ValueError):
    """Fewer examples than one step needs.

    Exit code 2: the data (or its split over workers and micro-batches) is too small.
    """

    exit_code = EXIT_USAGE


def micro_batches_per_epoch(n_examples: int, num_workers: int, micro_batch_size: int) -> int:
    """Micro-batches each rank gets from one pass over ``n_examples``."""
    return (n_examples // num_workers) // micro_batch_size


def steps_per_epoch(n_examples: int, num_workers: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch; raises DataTooSmallError when it is zero."""
    steps = micro_batches_per_epoch(n_examples, num_workers, micro_batch_size) // grad_accum
    if steps == 0:
        need = num_workers * micro_batch_size * grad_accum
        raise DataTooSmallError(
            f"{n_examples} training examples are fewer than one step needs "
            f"(train.global_batch_size={need}); add data or lower train.global_batch_size"
        )
    return steps


def total_steps(max_steps: int | None, epochs: float | None, per_epoch: int) -> int:
    """``max_steps`` if set, else ``epochs`` worth of steps (at least one)."""
    if max_steps is not None:
        return max_steps
    assert epochs is not None
    return max(1, math.ceil(epochs * per_epoch))


class ShardedBatches:
    """Shuffled micro-batches for one rank, addressed by global micro-batch index."""

    def __init__(
        self, arrays: dict[str, np.ndarray], rank: int, world: int, micro_batch_size: int, seed: int
    ) -> None:
        self.arrays = arrays
        self.rank, self.world, self.mbs, self.seed = rank, world, micro_batch_size, seed
        self.n = len(next(iter(arrays.values())))
        self.per_epoch = micro_batches_per_epoch(self.n, world, micro_batch_size)
        if self.per_epoch == 0:
            raise DataTooSmallError(f"{self.n} examples cannot fill a micro-batch on {world} workers")
        self._epoch = -1
        self._mine: np.ndarray = np.empty(0, dtype=np.int64)

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """The ``index``-th micro-batch of this rank (epochs continue seamlessly)."""
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            self._mine = perm[self.rank :: self.world][: self.per_epoch * self.mbs]
            self._epoch = epoch
        idx = np.sort(self._mine[i * self.mbs : (i + 1) * self.mbs])
        return {k: torch.from_numpy(v[idx].astype(np.int64)) for k, v in self.arrays.items()}

    def epoch_of(self, index: int) -> int:
        """The epoch a micro-batch index falls in."""
        return index // self.per_epoch


def eval_batches(
    arrays: dict[str, np.ndarray], rank: int, world: int, micro_batch_size: int, max_batches: int | None
) -> list[dict[str, torch.Tensor]]:
    """This rank's eval micro-batches, the same count on every rank (ZeRO-3 needs that)."""
    n = len(next(iter(arrays.values())))
    per_rank = n // world
    if per_rank == 0:
        raise DataTooSmallError(
            f"{n} eval examples cannot be split over {world} workers; raise data.eval_fraction"
        )
    mine = np.arange(n)[rank::world][:per_rank]
    out = []
    for i in range(0, per_rank, micro_batch_size):
        idx = mine[i : i + micro_batch_size]
        out.append({k: torch.from_numpy(v[idx].astype(np.int64)) for k, v in arrays.items()})
        if max_batches is not None and len(out) >= max_batches:
            break
    return out
