"""Per-rank micro-batches: disjoint, covering, resumable by index, reshuffled per epoch, and the
same blocks per step on any number of workers (elastic resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bloomray.data.packing import ArrayBlocks
from bloomray.train.batches import (
    DataTooSmallError,
    ShardedBatches,
    eval_batches,
    steps_per_epoch,
    total_steps,
)


def arrays(n: int, width: int = 3) -> ArrayBlocks:
    # Row i holds i everywhere, so a batch shows which items it took.
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], width, axis=1)
    return ArrayBlocks({"input_ids": ids, "labels": np.arange(n, dtype=np.int64) % 2})


def items(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def epoch_items(n: int, world: int, mbs: int, seed: int, epoch: int, ga: int = 1) -> list[list[int]]:
    shards = [ShardedBatches(arrays(n), r, world, mbs, ga, seed) for r in range(world)]
    per = shards[0].steps_per_epoch * ga
    return [[i for b in range(epoch * per, (epoch + 1) * per) for i in items(s.get(b))] for s in shards]


def step_items(world: int, mbs: int, ga: int, steps: int, n: int = 48, seed: int = 4) -> list[list[int]]:
    """The sorted items of each optimizer step, over all ranks and micro-batches."""
    shards = [ShardedBatches(arrays(n), r, world, mbs, ga, seed) for r in range(world)]
    return [
        sorted(i for s in shards for a in range(ga) for i in items(s.get(step * ga + a)))
        for step in range(steps)
    ]


def test_batch_shapes_and_dtypes():
    sb = ShardedBatches(arrays(20, width=5), rank=0, world=2, micro_batch_size=4, grad_accum=1, seed=0)
    b = sb.get(0)
    assert b["input_ids"].shape == (4, 5)
    assert b["input_ids"].dtype == torch.int64
    assert b["labels"].shape == (4,)
    # Rows keep their labels.
    assert (b["labels"] == b["input_ids"][:, 0] % 2).all()


@pytest.mark.parametrize("n,world,mbs", [(20, 2, 4), (23, 2, 3), (30, 3, 2), (17, 1, 4)])
def test_ranks_disjoint_and_cover_the_used_items(n: int, world: int, mbs: int):
    per_rank = epoch_items(n, world, mbs, seed=5, epoch=0)
    flat = [i for r in per_rank for i in r]
    per_epoch = n // (world * mbs)
    assert all(len(r) == per_epoch * mbs for r in per_rank)  # same number of batches per rank
    assert len(flat) == len(set(flat))  # nothing twice within an epoch, across ranks
    assert set(flat) <= set(range(n))
    assert len(flat) == world * per_epoch * mbs
    if n % (world * mbs) == 0:
        assert sorted(flat) == list(range(n))


def test_epochs_reshuffle_but_each_covers_again():
    e0 = epoch_items(24, 2, 4, seed=1, epoch=0)
    e1 = epoch_items(24, 2, 4, seed=1, epoch=1)
    assert e0 != e1
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(24))


def test_seed_changes_the_order():
    assert epoch_items(24, 2, 4, seed=1, epoch=0) != epoch_items(24, 2, 4, seed=2, epoch=0)


def test_same_index_same_batch_for_resume():
    first = ShardedBatches(arrays(40), 1, 2, 4, 1, seed=3)
    seen = {i: items(first.get(i)) for i in range(12)}  # crosses epoch boundaries (5 per epoch)
    resumed = ShardedBatches(arrays(40), 1, 2, 4, 1, seed=3)
    for i in (7, 3, 11, 0, 7):  # random access, back and forth across epochs
        assert items(resumed.get(i)) == seen[i]


def test_a_step_takes_the_same_items_on_any_world_size():
    # global batch 8 as 2 workers x 4 x 1, 1 worker x 4 x 2, 4 workers x 2 x 1, 1 x 2 x 4:
    # every step trains on the same 8 items, whichever way they are split (elastic resume)
    two = step_items(world=2, mbs=4, ga=1, steps=12)  # 6 steps per epoch: crosses epochs
    assert step_items(world=1, mbs=4, ga=2, steps=12) == two
    assert step_items(world=4, mbs=2, ga=1, steps=12) == two
    assert step_items(world=1, mbs=2, ga=4, steps=12) == two
    assert sorted(sum(two[:6], [])) == list(range(48))  # one epoch: every item once
    assert step_items(world=2, mbs=4, ga=1, steps=1, seed=5) != two[:1]


def test_epoch_of_step():
    sb = ShardedBatches(arrays(40), 0, 2, 4, 1, seed=0)
    assert sb.steps_per_epoch == 5
    assert [sb.epoch_of_step(i) for i in (0, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]


def test_too_few_items_for_a_step():
    with pytest.raises(DataTooSmallError, match="3 training examples"):
        ShardedBatches(arrays(3), 0, 2, 2, 1, seed=0)


def test_steps_per_epoch():
    assert steps_per_epoch(100, 2, 8, 3) == 2
    assert steps_per_epoch(1000, 4, 4, 2) == 31
    assert steps_per_epoch(100, 2, 8, 1) == 6  # full global batches only (100 // 16)


def test_steps_per_epoch_too_small_names_the_batch_size():
    with pytest.raises(DataTooSmallError) as exc:
        steps_per_epoch(15, 2, 4, 2)
    assert "15 training examples" in str(exc.value)
    assert "train.global_batch_size=16" in str(exc.value)


def test_total_steps():
    assert total_steps(7, 3.0, per_epoch=100) == 7  # max_steps wins
    assert total_steps(None, 2.0, per_epoch=10) == 20
    assert total_steps(None, 0.25, per_epoch=10) == 3  # rounded up
    assert total_steps(None, 0.01, per_epoch=10) == 1  # at least one


def test_eval_batches_same_count_on_every_rank_and_disjoint():
    arr = arrays(11)
    per_rank = [eval_batches(arr, r, 3, 2, None) for r in range(3)]
    assert {len(b) for b in per_rank} == {2}  # 3 items per rank -> batches of 2 and 1
    seen = [i for batches in per_rank for b in batches for i in items(b)]
    assert len(seen) == len(set(seen)) == 9
    assert per_rank[0][0]["input_ids"].dtype == torch.int64


def test_eval_batches_max_batches():
    assert len(eval_batches(arrays(40), 0, 2, 2, max_batches=3)) == 3


def test_eval_batches_too_small():
    with pytest.raises(DataTooSmallError, match="data.eval_fraction"):
        eval_batches(arrays(1), 0, 2, 2, None)
