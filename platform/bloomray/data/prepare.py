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
from bloomray.data.redact import Redactor, placeholders, redacted, redaction_stats
from bloomray.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything the workers need to iterate batches, and what the model card records."""

    tokenizer: PreTrainedTokenizerBase
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    id2label: dict[int, str] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(
    cfg: Config, tokenizer_dir: Path | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreparedData:
    """Load the corpus, get a tokenizer, and build train/eval arrays for ``cfg.task``.

    Args:
        cfg: the run config.
        tokenizer_dir: where to save the tokenizer (the workers and export reload it).
        tokenizer: use this one (a resumed run's own) instead of :func:`configured_tokenizer`.

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
        data = _prepare_causal(cfg, tokenizer)
    if tokenizer_dir is not None:
        data.tokenizer.save_pretrained(str(tokenizer_dir))
    log.info("data: %s", data.stats)
    return data


def configured_tokenizer(cfg: Config) -> PreTrainedTokenizerBase | None:
    """The run's tokenizer when it is loaded, not trained; None when one must be trained.

    A pretrained model (``model.path``, a dir or hub name) keeps its own tokenizer, loaded from
    the same place unless ``data.tokenizer.path`` names another copy of it. A byte-level BPE is
    trained on the corpus only for models built from a preset without ``data.tokenizer.path``.
    Called before the corpus is read, so a wrong tokenizer stops the run at once.

    Raises:
        TokenizerError: no tokenizer at ``model.path``, or ``data.tokenizer.path`` holds a
            tokenizer that is not the model's own.
    """
    tcfg, model_path = cfg.data.tokenizer, cfg.model.path
    if model_path is None:
        return load_tokenizer(tcfg.path) if tcfg.path else None
    if tcfg.path is None:
        local = Path(model_path).expanduser()
        if local.is_dir() and not _has_tokenizer(local):
            raise TokenizerError(
                f"model.path={model_path} has no tokenizer files (tokenizer.json or tokenizer_config.json); "
                "a pretrained model needs its own tokenizer: set data.tokenizer.path to it"
            )
        return load_tokenizer(model_path)
    tok = load_tokenizer(tcfg.path)
    local = Path(model_path).expanduser()
    if not local.is_dir() or _has_tokenizer(local):  # the model's own copy is there to compare with
        own = load_tokenizer(model_path)
        if own.get_vocab() != tok.get_vocab():
            raise TokenizerError(
                f"data.tokenizer.path={tcfg.path} ({len(tok)} tokens) is not the tokenizer of "
                f"model.path={model_path} ({len(own)} tokens): their vocabularies differ, so every id "
                "would mean another token. Leave data.tokenizer.path unset to use the model's own"
            )
    return tok


def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def _prepare_causal(cfg: Config, tok: PreTrainedTokenizerBase | None) -> PreparedData:
    d = cfg.data
    docs, rows = read_documents(d.path, d.text_column, d.bad_rows)
    docs = docs[: d.max_documents] if d.max_documents else docs
    redact = Redactor.from_config(d.redact)
    docs = redacted(redact, docs)
    tok = tok or train_tokenizer(
        docs, d.tokenizer.vocab_size, d.tokenizer.min_frequency, placeholders(redact)
    )
    blocks = pack_blocks(tokenize_documents(tok, docs), d.block_size)
    if d.eval_path:
        eval_docs, _ = read_documents(d.eval_path, d.text_column, d.bad_rows)
        eval_docs = redacted(redact, eval_docs)
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
        **redaction_stats(redact),
    }
    return PreparedData(tok, {"input_ids": train_blocks}, {"input_ids": eval_blocks}, None, stats)


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
