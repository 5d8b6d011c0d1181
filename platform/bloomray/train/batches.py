"""Deterministic per-rank batches over a block source (memory-mapped token shards, or
labelled arrays from Ray's object store).

A micro-batch is addressed by its global index, so a resumed run continues exactly where
the checkpoint left off, with no data seen twice or skipped (:class:`ShardedBatches`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bloomray.data.shards import BlockSource
from bloomray.errors import EXIT_USAGE, BloomrayError


class DataTooSmallError(BloomrayError, ValueError):
    """Fewer examples than one step needs.

    Exit code 2: the data (or its split over workers and micro-batches) is too small.
    """

    exit_code = EXIT_USAGE


def steps_per_epoch(n_examples: int, num_workers: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch (full global batches); raises DataTooSmallError when it is zero."""
    need = num_workers * micro_batch_size * grad_accum
    steps = n_examples // need
    if steps == 0:
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
    """Shuffled micro-batches for one rank, addressed by global micro-batch index.

    Every epoch is a seeded permutation of the block indices, cut into steps of
    ``global_batch = world * micro_batch_size * grad_accum`` blocks (the tail is dropped).
    Step ``s`` takes blocks ``[s*G, (s+1)*G)`` of its epoch's permutation; its micro-batch ``a``
    the ``world * micro_batch_size`` blocks after ``a`` of them, of which rank ``r`` takes
    slice ``r``. A step's blocks depend only on the seed and ``G``, not on the number of
    workers, so a run can resume on another world size with the same global batch and still
    see every block of the schedule once.
    """

    def __init__(
        self, source: BlockSource, rank: int, world: int, micro_batch_size: int, grad_accum: int, seed: int
    ) -> None:
        self.source = source
        self.rank, self.world, self.mbs, self.ga, self.seed = rank, world, micro_batch_size, grad_accum, seed
        self.n = len(source)
        self.global_batch = world * micro_batch_size * grad_accum
        self.steps_per_epoch = steps_per_epoch(self.n, world, micro_batch_size, grad_accum)
        self._epoch = -1
        self._perm: np.ndarray = np.empty(0, dtype=np.int64)

    def ids(self, index: int) -> np.ndarray:
        """The example indices of this rank's ``index``-th micro-batch (``step * grad_accum + a``)."""
        step, a = divmod(index, self.ga)
        epoch, s = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            self._epoch = epoch
        start = s * self.global_batch + (a * self.world + self.rank) * self.mbs
        return np.sort(self._perm[start : start + self.mbs])

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """The ``index``-th micro-batch of this rank (epochs continue seamlessly)."""
        return self.take(self.ids(index))

    def take(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """The examples ``ids`` (a micro-batch's, from :meth:`ids`) as tensors."""
        return {k: torch.from_numpy(v) for k, v in self.source.take(ids).items()}

    def epoch_of_step(self, step: int) -> int:
        """The epoch optimizer step ``step`` (0-based) falls in."""
        return step // self.steps_per_epoch


def eval_batches(
    source: BlockSource, rank: int, world: int, micro_batch_size: int, max_batches: int | None
) -> list[dict[str, torch.Tensor]]:
    """This rank's eval micro-batches, the same count on every rank (ZeRO-3 needs that)."""
    n = len(source)
    per_rank = n // world
    if per_rank == 0:
        raise DataTooSmallError(
            f"{n} eval examples cannot be split over {world} workers; raise data.eval_fraction"
        )
    mine = np.arange(n)[rank::world][:per_rank]
    out = []
    for i in range(0, per_rank, micro_batch_size):
        idx = mine[i : i + micro_batch_size]
        out.append({k: torch.from_numpy(v) for k, v in source.take(idx).items()})
        if max_batches is not None and len(out) >= max_batches:
            break
    return out
