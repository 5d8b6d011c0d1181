"""The distillation loss: the LM loss at alpha=0, zero KL for a student equal to its teacher, the
forward KL computed by hand, masking of sft positions, and the config's teacher check."""

from __future__ import annotations

import math

import pytest
import torch

from bloomray.config import ConfigError, load_config
from bloomray.train.distill import distill_loss, positions


def logits(seed: int, shape: tuple[int, ...] = (2, 5, 7)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_is_exactly_the_lm_loss():
    lm = torch.tensor(3.25, requires_grad=True)
    loss, kl = distill_loss(logits(0), logits(1), lm, alpha=0.0, temperature=2.0)
    assert loss is lm and kl.item() > 0


def test_a_student_equal_to_its_teacher_has_zero_kl():
    x = logits(2)
    loss, kl = distill_loss(x, x.clone(), torch.tensor(1.0), alpha=1.0, temperature=3.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_the_kl_is_the_forward_kl_at_temperature_scaled_by_t_squared():
    s, t = logits(3, (1, 1, 4)), logits(4, (1, 1, 4))
    temp = 2.5
    ps, pt = torch.softmax(s / temp, -1)[0, 0], torch.softmax(t / temp, -1)[0, 0]
    by_hand = sum(pt[i] * math.log(pt[i] / ps[i]) for i in range(4)) * temp**2
    loss, kl = distill_loss(s, t, torch.tensor(2.0), alpha=0.25, temperature=temp)
    assert kl.item() == pytest.approx(float(by_hand), rel=1e-5)
    assert loss.item() == pytest.approx(0.25 * float(by_hand) + 0.75 * 2.0, rel=1e-5)


def test_only_masked_positions_count_and_gradients_reach_the_student():
    s = logits(5).requires_grad_(True)
    t = logits(6)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    _, only = distill_loss(s[:, 1:2][:1], t[:, 1:2][:1], torch.tensor(0.0), 1.0, 1.0)
    loss, kl = distill_loss(s, t, torch.tensor(0.0), 1.0, 1.0, mask)
    assert kl.item() == pytest.approx(only.item(), rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad[0, 1].abs().sum() > 0 and s.grad[1].abs().sum() == 0


def test_positions_per_task():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    span, mask = positions("sft", {"labels": labels})
    assert span == slice(None, -1) and mask.tolist() == [[False, True, True, False]]
    assert positions("causal_lm", {}) == (slice(None, -1), None)
    assert positions("classification", {}) == (None, None)


def test_distillation_needs_a_teacher():
    with pytest.raises(ConfigError, match="prune.distill.enabled=true needs a teacher: set model.path"):
        load_config(None, ["train.max_steps=1", "prune.distill.enabled=true"])
    cfg = load_config(
        None, ["train.max_steps=1", "prune.distill.enabled=true", "prune.distill.teacher=some/dir"]
    )
    assert cfg.prune.distill.alpha == 0.5 and cfg.prune.distill.temperature == 2.0
