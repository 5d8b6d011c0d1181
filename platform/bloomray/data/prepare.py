"""Turn a DataConfig into train/eval arrays plus the tokenizer: the driver-side data step.

The arrays go into Ray's object store and each worker reads its own deterministic shard
(see ``train/batches.py``); the object store spans every node, so the same code path works
on one box and on a multi-node cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from bloomray.config import Config
from bloomray.data.corpus import DataError, Rows, read_documents, read_rows
from bloomray.data.packing import encode_classification, pack_blocks, split_indices, tokenize_documents
from bloomray.data.tokenizer import load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything the workers need to iterate batches, and what the model card records."""

    tokenizer: PreTrainedTokenizerBase
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    id2label: dict[int, str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: Config, tokenizer_dir: Path | None = None) -> PreparedData:
    """Load the corpus, get a tokenizer, and build train/eval arrays for ``cfg.task``.

    Args:
        cfg: the run config.
        tokenizer_dir: where to save the tokenizer (the workers and export reload it).

    Raises:
        DataError: unreadable data, bad rows with ``data.bad_rows=fail``, too little data.
    """
    if cfg.task == "classification":
        data = _prepare_classification(cfg)
    else:
        data = _prepare_causal(cfg)
    if tokenizer_dir is not None:
        data.tokenizer.save_pretrained(str(tokenizer_dir))
    log.info("data: %s", data.stats)
    return data


def get_tokenizer(cfg: Config, texts: list[str]) -> PreTrainedTokenizerBase:
    """The configured tokenizer, the model dir's, or a BPE trained on ``texts``."""
    tcfg = cfg.data.tokenizer
    if tcfg.path:
        return load_tokenizer(tcfg.path)
    if cfg.model.path and (Path(cfg.model.path) / "tokenizer.json").exists():
        return load_tokenizer(cfg.model.path)
    return train_tokenizer(texts, tcfg.vocab_size, tcfg.min_frequency)


def _prepare_causal(cfg: Config) -> PreparedData:
    d = cfg.data
    docs, rows = read_documents(d.path, d.text_column, d.bad_rows)
    docs = docs[: d.max_documents] if d.max_documents else docs
    tok = get_tokenizer(cfg, docs)
    blocks = pack_blocks(tokenize_documents(tok, docs), d.block_size)
    if d.eval_path:
        eval_docs, _ = read_documents(d.eval_path, d.text_column, d.bad_rows)
        train_blocks = blocks
        eval_blocks = pack_blocks(tokenize_documents(tok, eval_docs), d.block_size)
    else:
        if len(blocks) < 2:
            raise DataError(
                f"only {len(blocks)} block of {d.block_size} tokens: add text or lower data.block_size"
            )
        tr, ev = split_indices(len(blocks), d.eval_fraction, d.seed)
        train_blocks, eval_blocks = blocks[tr], blocks[ev]
    stats = {
        "source": d.path or "embedded:pydoc_data.topics",
        "documents": len(docs),
        "bad_rows": rows.bad,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "block_size": d.block_size,
        "train_tokens": int(train_blocks.size),
        "vocab_size": len(tok),
    }
    return PreparedData(tok, {"input_ids": train_blocks}, {"input_ids": eval_blocks}, None, stats)


def _prepare_classification(cfg: Config) -> PreparedData:
    d = cfg.data
    if d.path is None:
        raise DataError(
            "task=classification needs data.path: a CSV/TSV/JSONL file with text and label columns"
        )
    rows = read_rows(d.path, d.text_column, d.bad_rows)
    names = list(d.labels) if d.labels else _infer_labels(rows, d.label_column)
    texts, labels = _labelled(rows, d.path, d.text_column, d.label_column, names, d.bad_rows)
    if d.max_documents:
        texts, labels = texts[: d.max_documents], labels[: d.max_documents]
    if d.eval_path:
        erows = read_rows(d.eval_path, d.text_column, d.bad_rows)
        etexts, elabels = _labelled(erows, d.eval_path, d.text_column, d.label_column, names, d.bad_rows)
        rows.bad += erows.bad
    else:
        tr, ev = split_indices(len(texts), d.eval_fraction, d.seed)
        etexts, elabels = [texts[i] for i in ev], labels[ev]
        texts, labels = [texts[i] for i in tr], labels[tr]
    tok = get_tokenizer(cfg, texts)
    train = {**encode_classification(tok, texts, d.block_size), "labels": labels}
    evald = {**encode_classification(tok, etexts, d.block_size), "labels": elabels}
    stats = {
        "source": d.path,
        "train_examples": len(texts),
        "eval_examples": len(etexts),
        "labels": names,
        "bad_rows": rows.bad,
        "bad_row_examples": rows.bad_examples,
        "vocab_size": len(tok),
    }
    if rows.bad:
        log.warning("skipped %d bad rows, e.g. %s", rows.bad, rows.bad_examples[:3])
    return PreparedData(tok, train, evald, dict(enumerate(names)), stats)


def _infer_labels(rows: Rows, label_column: str) -> list[str]:
    values = {str(r[label_column]).strip() for r in rows.rows if r.get(label_column) not in (None, "")}
    if len(values) < 2:
        raise DataError(
            f"column {label_column!r} has {len(values)} distinct labels; classification needs "
            "at least 2 (check data.label_column)"
        )
    return sorted(
        values, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v)
    )


def _labelled(
    rows: Rows, where: str, text_col: str, label_col: str, names: list[str], policy: str
) -> tuple[list[str], np.ndarray]:
    index = {n: i for i, n in enumerate(names)}
    texts: list[str] = []
    labels: list[int] = []
    for i, row in enumerate(rows.rows):
        text, label = row.get(text_col), row.get(label_col)
        if not isinstance(text, str) or not text.strip():
            rows.reject(f"{where} row {i}", f"missing or empty {text_col!r}", policy)
            continue
        key = str(label).strip() if label is not None else ""
        if key not in index and key.isdigit() and int(key) < len(names) and key not in names:
            key = names[int(key)]  # numeric ids in the data, names in data.labels
        if key not in index:
            rows.reject(f"{where} row {i}", f"unknown label {label!r} (known: {names})", policy)
            continue
        texts.append(text)
        labels.append(index[key])
    if len(texts) < 2:
        raise DataError(f"{where}: fewer than 2 usable labelled rows ({rows.bad} bad)")
    return texts, np.asarray(labels, dtype=np.int64)
