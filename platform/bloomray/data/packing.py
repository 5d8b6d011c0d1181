"""Tokenize, pack into fixed-length blocks, and split deterministically."""

from __future__ import annotations

import hashlib

import numpy as np
from transformers import PreTrainedTokenizerBase

from bloomray.data.corpus import DataError


def tokenize_documents(
    tokenizer: PreTrainedTokenizerBase, docs: list[str], batch: int = 1000
) -> list[list[int]]:
    """Token ids of each document, with EOS appended so packed documents stay separated."""
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for i in range(0, len(docs), batch):
        enc = tokenizer(docs[i : i + batch], add_special_tokens=False)["input_ids"]
        out.extend(ids + [eos] for ids in enc)
    return out


def pack_blocks(token_lists: list[list[int]], block_size: int) -> np.ndarray:
    """Concatenate token lists and cut them into ``[n, block_size]`` blocks (tail dropped).

    Raises:
        DataError: fewer tokens than one block.
    """
    flat = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int32)
    n = len(flat) // block_size
    if n == 0:
        raise DataError(
            f"the corpus has {len(flat)} tokens, fewer than one block of data.block_size="
            f"{block_size}; add text or lower data.block_size"
        )
    return flat[: n * block_size].reshape(n, block_size)


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split of ``n`` items: same seed, same split, on any machine.

    At least one item goes to each side when ``n >= 2``.
    """
    if n < 2:
        raise DataError(f"need at least 2 examples to split train/eval, got {n}; add data")
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def encode_classification(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``/``attention_mask`` arrays, truncated to ``max_length``.

    Right padding matters: BloomForSequenceClassification reads the last non-pad token.
    """
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        padding="longest",
        padding_side="right",
        return_tensors="np",
        add_special_tokens=False,
    )
    return {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int8),
    }


class ArrayBlocks:
    """Examples held in memory as equal-length arrays (classification, sft): a
    :class:`~bloomray.data.shards.BlockSource` like the token shards' blocks."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __iter__(self):  # noqa: ANN204 - the column names, like a dict
        return iter(self.arrays)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx].astype(np.int64) for k, v in self.arrays.items()}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.arrays):
            a = np.ascontiguousarray(self.arrays[name])
            h.update(f"{name}/{a.dtype.str}/{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()
