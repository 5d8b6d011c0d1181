"""Eval scores, FLOPs/MFU math, perplexity and the console line."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bloomray.model.build import build_from_config, preset_config
from bloomray.train.evaluation import classification_scores
from bloomray.train.metrics import flops_per_token, format_progress, matmul_params, perplexity

# rows: truth, columns: prediction
CONFUSION = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])


def test_classification_scores_hand_computed():
    s = classification_scores(CONFUSION.astype(np.float64))
    assert s["eval_accuracy"] == pytest.approx(12 / 16)
    # class 0: P=5/7 R=5/6 -> F1=10/13; class 1: P=3/4 R=3/6 -> 0.6; class 2: P=4/5 R=1 -> 8/9
    assert s["eval_macro_f1"] == pytest.approx((10 / 13 + 0.6 + 8 / 9) / 3)


def test_classification_scores_accepts_integer_counts():
    assert classification_scores(CONFUSION) == classification_scores(CONFUSION.astype(np.float64))


def test_classification_scores_perfect_and_all_wrong():
    assert classification_scores(np.diag([3.0, 4.0])) == {"eval_accuracy": 1.0, "eval_macro_f1": 1.0}
    wrong = classification_scores(np.array([[0.0, 3.0], [4.0, 0.0]]))
    assert wrong == {"eval_accuracy": 0.0, "eval_macro_f1": 0.0}


def test_macro_f1_ignores_classes_absent_from_truth():
    # Class 2 never occurs and is never predicted: it must not drag macro-F1 down.
    c = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 0]])
    assert classification_scores(c)["eval_macro_f1"] == pytest.approx(1.0)


def test_macro_f1_punishes_majority_guessing():
    # Always predicting class 0: accuracy 0.8, but macro-F1 only (F1_0 + 0) / 2.
    c = np.array([[8.0, 0], [2.0, 0]])
    s = classification_scores(c)
    assert s["eval_accuracy"] == pytest.approx(0.8)
    assert s["eval_macro_f1"] == pytest.approx((2 * 0.8 * 1.0 / 1.8) / 2)


def test_classification_scores_empty():
    assert classification_scores(np.zeros((2, 2))) == {"eval_accuracy": 0.0, "eval_macro_f1": 0.0}


def test_flops_per_token_formula():
    n, layers, hidden, seq = 1_000_000, 4, 256, 128
    attn = 12 * layers * hidden * seq
    assert flops_per_token(n, layers, hidden, seq) == 6 * n + attn
    # Frozen weights skip the weight-gradient half of the backward.
    assert flops_per_token(n, layers, hidden, seq, trainable_ratio=0.0) == 4 * n + attn
    assert flops_per_token(n, layers, hidden, seq, trainable_ratio=0.5) == 5 * n + attn


def test_flops_per_token_bloom_560m_magnitude():
    # ~6N for N ~ 0.56e9 (the whole BLOOM-560m including its tied head): ~3.4 GFLOP/token.
    f = flops_per_token(559_214_592, 24, 1024, 2048)
    assert 3.3e9 < f < 4.0e9


def test_matmul_params_counts_tied_head_once_as_matmul():
    vocab = 300
    cfg = preset_config("tiny", vocab)
    model = build_from_config("causal_lm", cfg, seed=0)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    emb = vocab * cfg.hidden_size
    assert matmul_params(model, vocab, cfg.hidden_size, lm_head=True) == total
    assert matmul_params(model, vocab, cfg.hidden_size, lm_head=False) == total - emb


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(1.0) == pytest.approx(math.e)
    assert perplexity(49.0) == pytest.approx(math.exp(49.0))
    assert perplexity(50.0) == float("inf")
    assert perplexity(1e6) == float("inf")  # capped, no OverflowError


def test_format_progress_minimal():
    line = format_progress(
        3, 60, {"train_loss": 2.345678, "tokens_per_s": 12345.6, "mfu": 0.0123, "lr": 1e-3}
    )
    assert "step 3/60" in line
    assert "loss 2.3457" in line
    assert "12,346 tok/s" in line
    assert "MFU 1.23%" in line
    assert "lr 1.00e-03" in line
    assert "eval" not in line and "gnorm" not in line


def test_format_progress_all_fields():
    m = {
        "train_loss": 1.0,
        "tokens_per_s": 10.0,
        "mfu": 0.5,
        "lr": 2e-4,
        "grad_norm": 0.75,
        "eval_loss": 1.5,
        "eval_perplexity": 4.48,
        "eval_accuracy": 0.9,
        "eval_macro_f1": 0.85,
        "sparsity": 0.5,
    }
    line = format_progress(10, 10, m)
    for part in ("eval 1.5000", "ppl 4.5", "acc 0.900 f1 0.850", "gnorm 0.750", "sparsity 0.500", "10 tok/s"):
        assert part in line
    assert line.split(" | ")[0] == "step 10/10"


def test_format_progress_skips_missing_grad_norm():
    m = {"train_loss": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "lr": 1.0, "grad_norm": None}
    assert "gnorm" not in format_progress(1, 1, m)


def test_cpu_peak_is_the_faster_of_the_run_dtype_and_fp32(monkeypatch):
    """On a CPU without bf16 units the bf16 matmul is no ceiling (MFU came out above 1): the
    MFU denominator is the faster of the run's dtype and fp32, and a configured peak wins."""
    import torch

    from bloomray.train import metrics

    rates = {torch.bfloat16: 1.2e9, torch.float32: 86e9}
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda dtype, device: rates[dtype])
    cpu = torch.device("cpu")
    assert metrics.peak_flops(None, torch.bfloat16, cpu) == 86e9
    rates[torch.bfloat16] = 300e9  # AMX / avx512_bf16: bf16 beats fp32
    assert metrics.peak_flops(None, torch.bfloat16, cpu) == 300e9
    assert metrics.peak_flops(None, torch.float32, cpu) == 86e9
    assert metrics.peak_flops(2.0, torch.bfloat16, cpu) == 2.0e12
