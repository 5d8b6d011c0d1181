"""Turn a DataConfig into train/eval examples plus the tokenizer: the driver-side data step.

Causal-LM text becomes a token dataset dir (``shards.py``; raw input is prepared into
``OUTPUT/data`` by the same code ``bloomray prepare-data`` runs, a prepared ``data.path`` is
read in place), whose blocks every worker reads by memory map. Classification and SFT
examples are small labelled arrays (:class:`~bloomray.data.shards.ArrayBlocks`) that go into
Ray's object store. Each worker reads its own deterministic share (``train/batches.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from bloomray.config import Config
from bloomray.data.corpus import DataError, Rows, read_rows
from bloomray.data.packing import ArrayBlocks, encode_classification, split_indices
from bloomray.data.redact import Redactor, placeholders, redacted, redaction_stats
from bloomray.data.remote import display_uri, is_remote
from bloomray.data.shards import BlockSource, is_token_dataset
from bloomray.data.sources import EMBEDDED
from bloomray.data.tokenizer import configured_tokenizer, load_tokenizer, train_tokenizer
from bloomray.data.tokens import build_dataset, open_prepared, scratch_dir

__all__ = ["PreparedData", "configured_tokenizer", "prepare_data"]

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything the workers need to iterate batches, and what the model card records."""

    tokenizer: PreTrainedTokenizerBase
    train: BlockSource
    eval: BlockSource
    id2label: dict[int, str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(
    cfg: Config,
    tokenizer_dir: Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    data_dir: Path | None = None,
) -> PreparedData:
    """Load the corpus, get a tokenizer, and build train/eval arrays for ``cfg.task``.

    Args:
        cfg: the run config.
        tokenizer_dir: where to save the tokenizer (the workers and export reload it).
        tokenizer: use this one (a resumed run's own) instead of :func:`configured_tokenizer`.
        data_dir: where causal-LM raw input is prepared into token shards (``OUTPUT/data``;
            a temp dir when None). A prepared ``data.path`` is read in place (a URI from this
            node's copy of it, ``data/remote.py``).

    Raises:
        DataError: unreadable data, bad rows with ``data.bad_rows=fail``, too little data.
        TokenizerError: the configured tokenizer cannot be loaded or is not the model's own.
    """
    tokenizer = tokenizer or configured_tokenizer(cfg)
    if cfg.task == "classification":
        data = _prepare_classification(cfg, tokenizer)
    elif cfg.task == "sft":
        from bloomray.data.sft import prepare_sft  # imports PreparedData from here

        data = prepare_sft(cfg, tokenizer)
    else:
        data = _prepare_causal(cfg, tokenizer, data_dir)
    if tokenizer_dir is not None:
        data.tokenizer.save_pretrained(str(tokenizer_dir))
    log.info("data: %s", data.stats)
    return data


def _prepare_causal(cfg: Config, tok: PreTrainedTokenizerBase | None, data_dir: Path | None) -> PreparedData:
    d = cfg.data
    if is_token_dataset(d.path):
        ds = open_prepared(cfg, tok)
    else:
        ds = build_dataset(cfg, tok, data_dir or scratch_dir())
    train, evald = ds.blocks("train", d.block_size), ds.blocks("eval", d.block_size)
    if len(train) == 0:
        raise DataError(
            f"the corpus has {ds.tokens('train')} training tokens, fewer than one block of "
            f"data.block_size={d.block_size}; add text or lower data.block_size"
        )
    if len(evald) == 0:
        raise DataError(
            f"the eval split has {ds.documents('eval')} documents ({ds.tokens('eval')} tokens), fewer "
            f"than one block of data.block_size={d.block_size}; raise data.eval_fraction, give "
            "data.eval_path, or lower data.block_size"
        )
    index = ds.index
    stats = {
        "source": display_uri(d.path) if is_remote(d.path) else (d.path or EMBEDDED),
        "dataset": str(ds.path),  # a URI's copy on this node
        "documents": ds.documents("train") + ds.documents("eval"),
        "bad_rows": index["bad_rows"],
        "train_blocks": len(train),
        "eval_blocks": len(evald),
        "block_size": d.block_size,
        "train_tokens": len(train) * d.block_size,
        "vocab_size": index["vocab_size"],
        **({"redacted": index["redacted"]} if "redacted" in index else {}),
    }
    tokenizer = tok or load_tokenizer(str(ds.tokenizer_dir))
    return PreparedData(tokenizer, train, evald, None, stats)


def _prepare_classification(cfg: Config, tok: PreTrainedTokenizerBase | None) -> PreparedData:
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
    redact = Redactor.from_config(d.redact)
    texts, etexts = redacted(redact, texts), redacted(redact, etexts)
    tok = tok or train_tokenizer(
        texts, d.tokenizer.vocab_size, d.tokenizer.min_frequency, placeholders(redact)
    )
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
        **redaction_stats(redact),
    }
    if rows.bad:
        log.warning("skipped %d bad rows, e.g. %s", rows.bad, rows.bad_examples[:3])
    return PreparedData(tok, ArrayBlocks(train), ArrayBlocks(evald), dict(enumerate(names)), stats)


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
