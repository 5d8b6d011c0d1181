"""Batched generation with per-request sampling, stop strings and token limits.

Prompts are left-padded into one batch; one forward per step with the KV cache serves every
row. Each row keeps its own temperature, top_p, seed (a private generator), stop strings
and max_tokens, and leaves the batch's bookkeeping when it finishes, so a batched request
gets exactly what it would get alone (greedy: identical tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GenParams:
    """One completion request's generation settings."""

    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class _Row:
    """Decoding state of one request inside a batch."""

    def __init__(self, params: GenParams, prompt_len: int) -> None:
        self.p = params
        self.prompt_len = prompt_len
        self.tokens: list[int] = []
        self.text = ""
        self.done = False
        self.reason = "length"
        self.gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def push(self, token: int, tokenizer: Any, eos: int | None) -> str:
        """Add a token; return the new visible text (stop strings cut it short)."""
        if token == eos:
            self.done, self.reason = True, "stop"
            return ""
        self.tokens.append(token)
        full = tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((full.find(s) for s in self.p.stop if s and s in full), default=-1)
        if cut >= 0:
            full, self.done, self.reason = full[:cut], True, "stop"
        elif len(self.tokens) >= self.p.max_tokens:
            self.done, self.reason = True, "length"
        delta, self.text = full[len(self.text) :], full
        return delta


def _pick(logits: torch.Tensor, row: _Row) -> int:
    """Greedy at temperature 0, else nucleus sampling with the row's own generator."""
    if row.p.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / row.p.temperature, dim=-1)
    if row.p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < row.p.top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=row.gen))


class GenerationEngine:
    """A loaded causal LM + tokenizer that serves batches and streams."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def generate(self, batch: list[GenParams]) -> list[GenResult]:
        """Complete every request of ``batch`` together; results in the same order."""
        *_, (rows, _) = self._decode(batch)
        return [GenResult(r.text, r.reason, r.prompt_len, len(r.tokens)) for r in rows]

    def stream(self, params: GenParams) -> Iterator[str]:
        """Text deltas of one request as they are generated."""
        with torch.no_grad():
            for _, deltas in self._decode([params]):
                if deltas[0]:
                    yield deltas[0]

    def _decode(self, batch: list[GenParams]) -> Iterator[tuple[list[_Row], list[str]]]:
        enc = [self.tok(p.prompt, add_special_tokens=False)["input_ids"] for p in batch]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[self.pad] * (width - len(e)) + e for e in enc], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=self.device)
        rows = [_Row(p, len(e)) for p, e in zip(batch, enc, strict=True)]
        past = None
        step_ids = ids
        for _ in range(max(p.max_tokens for p in batch)):
            out = self.model(input_ids=step_ids, attention_mask=mask, cache=past, use_cache=True)
            past = out.cache
            logits = out.logits[:, -1, :]
            nxt, deltas = [], []
            for i, row in enumerate(rows):
                if row.done:
                    nxt.append(self.pad)
                    deltas.append("")
                    continue
                token = _pick(logits[i], row)
                deltas.append(row.push(token, self.tok, self.eos))
                nxt.append(token)
            yield rows, deltas
            if all(r.done for r in rows):
                return
            step_ids = torch.tensor(nxt, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
