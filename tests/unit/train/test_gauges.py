"""Training gauges (bloomray.train.gauges): what rank 0 exports at each log step, NaN included."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest

from bloomray.train import gauges


class FakeGauge:
    made: dict[str, FakeGauge] = {}

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
        assert tag_keys == ("run",) and description
        self.values: dict[tuple, float] = {}
        FakeGauge.made[name] = self

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert isinstance(value, float)
        self.values[tuple(sorted(tags.items()))] = value


@pytest.fixture
def fake(monkeypatch):
    FakeGauge.made = {}
    monkeypatch.setattr(gauges, "metrics", SimpleNamespace(Gauge=FakeGauge))
    gauges._gauges.cache_clear()
    yield FakeGauge.made
    gauges._gauges.cache_clear()


def _value(made: dict[str, FakeGauge], name: str, run: str = "r1") -> float:
    return made[name].values[(("run", run),)]


STEP = {"step": 20, "train_loss": 2.5, "tokens_per_s": 1234.0, "mfu": 0.41, "lr": 1e-3, "grad_norm": None}


def test_export_step_sets_every_gauge_for_the_run(fake):
    before = time.time()
    gauges.export_step("r1", STEP, total_steps=100)
    assert _value(fake, "bloomray_train_step") == 20.0
    assert _value(fake, "bloomray_train_total_steps") == 100.0
    assert _value(fake, "bloomray_train_loss") == 2.5
    assert _value(fake, "bloomray_train_loss_nonfinite") == 0.0
    assert _value(fake, "bloomray_train_tokens_per_second") == 1234.0
    assert _value(fake, "bloomray_train_mfu") == pytest.approx(0.41)
    assert before <= _value(fake, "bloomray_train_last_step_timestamp_seconds") <= time.time()


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_nonfinite_loss_is_exported_and_flagged(fake, loss):
    gauges.export_step("r1", {**STEP, "train_loss": loss}, total_steps=100)
    exported = _value(fake, "bloomray_train_loss")
    assert math.isnan(exported) if math.isnan(loss) else exported == loss
    assert _value(fake, "bloomray_train_loss_nonfinite") == 1.0


def test_gauges_are_made_once_per_process(fake):
    gauges.export_step("r1", STEP, total_steps=100)
    first = dict(fake)
    gauges.export_step("r2", {**STEP, "step": 30}, total_steps=100)
    assert fake == first  # no new Gauge objects
    assert _value(fake, "bloomray_train_step", "r2") == 30.0 and _value(fake, "bloomray_train_step") == 20.0


def test_real_ray_gauges_accept_nan_without_a_ray_cluster():
    """ray.util.metrics.Gauge.set takes NaN (recorded; Ray only exports once a worker runs)."""
    gauges._gauges.cache_clear()
    gauges.export_step("unit-test", {**STEP, "train_loss": math.nan}, total_steps=100)
    gauges._gauges.cache_clear()
