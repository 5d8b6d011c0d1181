"""``scaling.num_workers=[min, max]``: Ray Train's elastic group, with the gradient accumulation
taken from the size the group actually starts with (the global batch stays)."""

from __future__ import annotations

import pytest

from bloomray.config import ConfigError, dump_config, load_config
from bloomray.train.engine import deepspeed_config
from bloomray.train.run import scaling_config

BASE = ["train.max_steps=5", "train.global_batch_size=48", "train.micro_batch_size=4"]


def test_a_range_is_a_tuple_that_round_trips_through_the_saved_config(tmp_path):
    cfg = load_config(None, [*BASE, "scaling.num_workers=[1, 4]"])
    assert cfg.scaling.num_workers == (1, 4) and cfg.scaling.elastic
    assert list(cfg.scaling.worker_counts) == [1, 2, 3, 4]
    dump_config(cfg, tmp_path / "config.yaml")  # what --resume reloads
    assert load_config(tmp_path / "config.yaml") == cfg
    fixed = load_config(None, [*BASE, "scaling.num_workers=3"])
    assert not fixed.scaling.elastic and list(fixed.scaling.worker_counts) == [3]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[3, 2]", "[3, 2]: the minimum is above the maximum"),
        ("[0, 2]", "must be at least 1"),
        ("0", "must be at least 1"),
        ("[1, 2, 3]", "a range is [min, max], two worker counts"),
    ],
)
def test_a_bad_count_or_range_is_refused(value: str, message: str):
    with pytest.raises(ConfigError, match="scaling.num_workers") as err:
        load_config(None, [*BASE, f"scaling.num_workers={value}"])
    assert message in str(err.value)


def test_every_size_of_the_range_must_split_the_global_batch():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, "scaling.num_workers=[2, 6]"])  # 48 = 4 x n x accumulation
    msg = str(err.value)
    assert "n = [5]" in msg and "scaling.num_workers=[2, 6]" in msg and "multiple of 240" in msg


def test_the_accumulation_follows_the_actual_worker_count():
    cfg = load_config(None, [*BASE, "scaling.num_workers=[1, 4]"])
    assert [cfg.grad_accum_for(n) for n in cfg.scaling.worker_counts] == [12, 6, 4, 3]
    with pytest.raises(ValueError, match="range"):
        cfg.grad_accum_steps  # noqa: B018 - no single answer for a range
    for n in cfg.scaling.worker_counts:
        d = deepspeed_config(cfg, world_size=n)
        assert (
            d["train_batch_size"]
            == 48
            == d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * n
        )


def test_ray_train_gets_the_range_as_its_elastic_tuple():
    elastic = scaling_config(load_config(None, [*BASE, "scaling.num_workers=[1, 4]"]))
    assert elastic.num_workers == (1, 4) and elastic.elasticity_enabled
    assert (elastic.min_workers, elastic.max_workers) == (1, 4)
    fixed = scaling_config(load_config(None, [*BASE, "scaling.num_workers=2", "scaling.cpus_per_worker=2"]))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled
    assert fixed.resources_per_worker == {"CPU": 2.0}
