"""Evaluation on every rank: eval loss and perplexity (causal LM, sft) or accuracy and
macro-F1 (classification), summed over ranks, and the probe logits export checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bloomray.train.collectives import all_reduce_sum
from bloomray.train.metrics import perplexity


def forward_outputs(engine: Any, task: str, batch: dict[str, torch.Tensor]) -> Any:
    """The model outputs (loss, logits) of ``batch``, with the labels of ``task``."""
    if task in ("classification", "sft"):
        return engine(**batch)
    return engine(input_ids=batch["input_ids"], labels=batch["input_ids"])


def evaluate(
    engine: Any,
    task: str,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    num_labels: int | None,
) -> dict[str, float]:
    """Eval loss/perplexity (LM, sft) or loss/accuracy/macro-F1 (classification) over all ranks.

    sft averages per response token (a batch's mean loss weighted by its labelled tokens), so
    the result does not depend on how examples fall into batches; the others per example.
    Sums stay on the device until the one all-reduce at the end: no host sync per batch.
    """
    engine.eval()
    k = num_labels or 1
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    confusion = torch.zeros(k * k, dtype=torch.float64, device=device)
    with _no_autograd(engine):
        for b in batches:
            b = {name: v.to(device) for name, v in b.items()}
            out = forward_outputs(engine, task, b)
            # The loss predicts token t+1 at t: sft's labelled positions are labels[:, 1:].
            n = (b["labels"][:, 1:] != -100).sum() if task == "sft" else b["input_ids"].shape[0]
            loss_sum[0] += out.loss.double() * n
            loss_sum[1] += n
            if task == "classification":
                cells = b["labels"] * k + out.logits.argmax(-1)
                confusion += torch.bincount(cells, minlength=k * k).double()
    engine.train()
    totals = all_reduce_sum(torch.cat([loss_sum, confusion]), device)
    eval_loss = (totals[0] / totals[1]).item()
    if task != "classification":
        return {"eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss)}
    confusion = totals[2:].reshape(k, k)
    return {"eval_loss": eval_loss, **classification_scores(confusion.numpy())}


def classification_scores(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction)."""
    confusion = np.asarray(confusion, dtype=np.float64)  # integer counts: the divisions below write floats
    tp = np.diag(confusion)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros_like(tp), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros_like(tp), where=confusion.sum(1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0
    )
    present = confusion.sum(1) > 0
    return {
        "eval_accuracy": float(tp.sum() / max(confusion.sum(), 1)),
        "eval_macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def _no_autograd(engine: Any) -> Any:
    """``inference_mode`` for eval forwards, but ``no_grad`` under ZeRO-3: parameters it gathers
    in an inference-mode forward can reach the next training step as inference tensors, which
    autograd refuses to save ("Inference tensors cannot be saved for backward": seen in
    test_prune_train's ZeRO-3 run)."""
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()  # plain modules in unit tests
    return torch.no_grad() if stage == 3 else torch.inference_mode()


@torch.no_grad()
def probe_logits(
    engine: Any, evals: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, torch.Tensor]:
    """Logits of the trained engine on a fixed eval batch: export checks it reproduces them."""
    engine.eval()
    batch = {k: v[:2] for k, v in evals[0].items() if k != "labels"}
    logits = engine(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    engine.train()
    return {**batch, "logits": logits}
