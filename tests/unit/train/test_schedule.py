"""LR schedule: linear warmup, then cosine/linear decay or constant (build_scheduler)."""

from __future__ import annotations

import math

import pytest
import torch

from bloomray.config import load_config
from bloomray.train.engine import build_scheduler

LR = 0.01
WARMUP = 4
TOTAL = 20


def lrs(schedule: str, warmup: int = WARMUP, total: int = TOTAL) -> list[float]:
    cfg = load_config(
        None,
        [
            "train.max_steps=1",
            f"train.lr={LR}",
            f"train.warmup_steps={warmup}",
            f"train.lr_schedule={schedule}",
        ],
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = build_scheduler(cfg, opt, total)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_zero(schedule: str):
    got = lrs(schedule)
    for step in range(WARMUP + 1):
        assert got[step] == pytest.approx(LR * step / WARMUP)


def test_cosine_decay():
    got = lrs("cosine")
    for step in range(WARMUP, TOTAL + 1):
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        assert got[step] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert got[WARMUP] == pytest.approx(LR)  # peak right after warmup
    assert got[(WARMUP + TOTAL) // 2] == pytest.approx(LR / 2)  # half-way
    assert got[TOTAL] == pytest.approx(0.0, abs=1e-12)


def test_linear_decay():
    got = lrs("linear")
    for step in range(WARMUP, TOTAL + 1):
        assert got[step] == pytest.approx(LR * (TOTAL - step) / (TOTAL - WARMUP), abs=1e-12)


def test_constant_after_warmup():
    got = lrs("constant")
    assert got[WARMUP:] == pytest.approx([LR] * (TOTAL - WARMUP + 1))


def test_no_warmup_starts_at_peak():
    for schedule in ("cosine", "linear", "constant"):
        assert lrs(schedule, warmup=0)[0] == pytest.approx(LR)


def test_decay_is_monotone_after_warmup():
    for schedule in ("cosine", "linear"):
        after = lrs(schedule)[WARMUP:]
        assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_first_segment_equals_transformers_schedules():
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    for schedule, hf_name in names.items():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        hf = get_scheduler(hf_name, opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL)
        want = []
        for _ in range(TOTAL + 1):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            hf.step()
        assert lrs(schedule) == pytest.approx(want, abs=1e-12), schedule


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("resume_at", [2, 10])  # during warmup and after it
def test_extending_total_on_resume_keeps_lr_continuous(schedule: str, resume_at: int):
    from bloomray.train.engine import lr_multiplier

    segments = [[0, TOTAL], [resume_at, 2 * TOTAL]]
    old = [lr_multiplier(s, schedule, WARMUP, segments[:1]) for s in range(TOTAL + 1)]
    new = [lr_multiplier(s, schedule, WARMUP, segments) for s in range(2 * TOTAL + 1)]
    assert new[: resume_at + 1] == pytest.approx(old[: resume_at + 1])  # the past is unchanged
    steps = [abs(a - b) for a, b in zip(new[WARMUP:], new[WARMUP + 1 :], strict=False)]
    old_steps = [abs(a - b) for a, b in zip(old[WARMUP:], old[WARMUP + 1 :], strict=False)]
    assert max(steps) <= max(old_steps) + 1e-12  # no jump larger than the schedule's own slope
    assert new[2 * TOTAL] == pytest.approx(0.0, abs=1e-12)  # still decays to zero at the new end
    assert new[TOTAL] > 0.05  # where the old schedule ended, the extended one is still going
    after = new[max(WARMUP, resume_at) :]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_second_extension_continues_from_the_first():
    from bloomray.train.engine import lr_multiplier

    segs = [[0, 20], [10, 40], [30, 60]]
    at_30 = lr_multiplier(30, "linear", 0, segs[:2])
    assert lr_multiplier(30, "linear", 0, segs) == pytest.approx(at_30)
    assert lr_multiplier(45, "linear", 0, segs) == pytest.approx(at_30 * 0.5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_extending_a_finished_run_warms_up_again(schedule: str, warmup: int):
    """A finished run's LR factor is 0: continuing from it would train every added step at LR 0."""
    from bloomray.train.engine import lr_multiplier

    segments = [[0, TOTAL], [TOTAL, 2 * TOTAL]]
    new = [lr_multiplier(s, schedule, warmup, segments) for s in range(2 * TOTAL + 1)]
    old_end = lr_multiplier(TOTAL, schedule, warmup, segments[:1])
    assert old_end == pytest.approx(0.0, abs=1e-12)
    assert new[TOTAL] == pytest.approx(old_end, abs=1e-12)  # the resumed step itself is unchanged
    rewarm = max(1, warmup)
    ramp = new[TOTAL : TOTAL + rewarm + 1]
    assert ramp == pytest.approx([i / rewarm for i in range(rewarm + 1)])  # linear, from 0 to the peak
    assert new[TOTAL + 1] > 0.0  # the first added step trains
    after = new[TOTAL + rewarm :]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # then decays
    assert new[2 * TOTAL] == pytest.approx(0.0, abs=1e-12)  # to zero at the new end
