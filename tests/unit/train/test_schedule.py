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
