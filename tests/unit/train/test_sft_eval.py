"""sft in the training loop: the loss covers labelled response tokens only, eval averages per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_bloom import VOCAB, make_model

from bloomray.train.evaluation import evaluate, forward_outputs


def sft_batch(lengths: list[tuple[int, int]], width: int, seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of (prompt, response) lengths, labels on the response only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(lengths):
        mask[i, : p + r] = 1
        labels[i, p : p + r] = ids[i, p : p + r]
        ids[i, p + r :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every labelled token (logits at t predict token t+1)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    keep = target != -100
    return F.cross_entropy(logits[:, :-1][keep], target[keep], reduction="none")


def test_sft_forward_scores_only_response_tokens():
    model = make_model("causal_lm")
    batch = sft_batch([(5, 3), (2, 6)], width=10, seed=0)
    with torch.no_grad():
        loss = forward_outputs(model, "sft", batch).loss
    torch.testing.assert_close(loss, token_losses(model, batch).mean())
    # What the padding holds changes nothing (right padding, masked, unlabelled).
    batch["input_ids"][0, 8:] = 7
    with torch.no_grad():
        torch.testing.assert_close(forward_outputs(model, "sft", batch).loss, loss)


def test_sft_eval_loss_is_a_per_token_mean_over_batches():
    model = make_model("causal_lm")
    batches = [sft_batch([(3, 1)], width=12, seed=1), sft_batch([(2, 9), (4, 7), (1, 10)], width=12, seed=2)]
    per_token = torch.cat([token_losses(model, b) for b in batches]).mean().item()
    per_batch = sum(token_losses(model, b).mean().item() for b in batches) / 2
    out = evaluate(model, "sft", batches, torch.device("cpu"), None)
    assert abs(out["eval_loss"] - per_token) < 1e-5
    assert abs(per_token - per_batch) > 1e-3  # the two averages do differ on these batches
    assert set(out) == {"eval_loss", "eval_perplexity"}
