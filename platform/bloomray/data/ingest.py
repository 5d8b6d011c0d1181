"""Raw text -> a token dataset dir (``shards.py``): ``bloomray prepare-data`` and a run's own.

The input is cut into *units* (one file each, a row range of a saved HF dataset, or the
embedded corpus). :func:`encode_unit` streams one unit in chunks of documents (memory stays
at one chunk), redacts, tokenizes with the fast tokenizer, appends EOS and assigns each
document to ``train`` or ``eval`` by a hash of its text (so adding files never moves a
document across the split). Units run either in this process (``workers=0``: small inputs a
run prepares on the fly) or in parallel as Ray Data ``map_batches`` tasks (at most
``workers`` at once; each Ray worker process loads the tokenizer once); Ray Data keeps the
order, and the driver writes the shards in unit order, so the bytes are the same for any
number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from bloomray.data.corpus import DataError, Rows
from bloomray.data.redact import Redactor, redaction_stats
from bloomray.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, TokenDataset, token_dtype
from bloomray.data.sources import EncodeSettings, Unit, texts_of
from bloomray.files import atomic_dir, hash_dir

log = logging.getLogger(__name__)
CHUNK_DOCS = 4096  # documents tokenized (and sent to the writer) at a time


def is_eval(text: str, eval_fraction: float, seed: int) -> bool:
    """The split rule: a document is eval when its salted sha256 falls under ``eval_fraction``.

    It depends on the document's text only, so the split of a document never changes when
    other documents are added or removed (duplicates always land on the same side).
    """
    return _under(_digest(_salt(seed), text), eval_fraction)


def _salt(seed: int) -> Any:
    return hashlib.sha256(f"{seed}\0".encode())


def _digest(salt: Any, text: str) -> bytes:
    h = salt.copy()
    h.update(text.encode("utf-8", errors="replace"))
    return h.digest()


def _under(digest: bytes, fraction: float) -> bool:
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def token_ids(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """The ids of each text, without special tokens: what ``tok(texts, add_special_tokens=False)``
    gives. A fast tokenizer is called through its Rust tokenizer's ``encode_batch_fast`` (no
    offsets, no per-document Python dicts of ids and masks: 2.3x faster on short documents);
    a slow one, or one whose Rust tokenizer truncates or pads, through ``tok`` itself."""
    backend = tok.backend_tokenizer if getattr(tok, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tok(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def encode_unit(unit: Unit, tok: PreTrainedTokenizerBase, s: EncodeSettings) -> Iterator[dict[str, Any]]:
    """A unit's documents as chunks: ``{"tokens", "lengths", "eval", "meta"}`` (EOS appended).

    ``meta`` of the last chunk carries the unit's bad-row count and examples and the
    redaction counts; ``sha256`` is the unit's content fingerprint (over the documents' salted
    hashes, the same ones that choose their split).
    """
    rows = Rows()
    redact = Redactor(**s.redact) if s.redact is not None else None
    eos = tok.eos_token_id
    texts = texts_of(unit, s.text_column, rows, s.bad_rows)
    fingerprint = hashlib.sha256(f"{unit.kind}:{Path(unit.source).name}:{unit.start}:{unit.stop}".encode())
    salt = _salt(s.split_seed)
    while True:
        chunk = [t for _, t in zip(range(CHUNK_DOCS), texts, strict=False)]
        last = len(chunk) < CHUNK_DOCS
        if chunk:
            digests = [_digest(salt, t) for t in chunk]  # one hash per document: split and fingerprint
            fingerprint.update(b"".join(digests))
            if unit.split is None:
                flags = np.fromiter(
                    (_under(d, s.eval_fraction) for d in digests), dtype=bool, count=len(chunk)
                )
            else:
                flags = np.full(len(chunk), unit.split == "eval")
            clean = [redact(t) for t in chunk] if redact else chunk
            ids = token_ids(tok, clean)
            lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
            flat = np.empty(int(lengths.sum()), dtype=np.int64)
            ends = np.cumsum(lengths) - 1
            body = np.ones(len(flat), dtype=bool)
            body[ends] = False
            flat[body] = np.fromiter(
                itertools.chain.from_iterable(ids), dtype=np.int64, count=len(flat) - len(ids)
            )
            flat[ends] = eos
        else:
            flat, lengths, flags = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, bool)
        meta: dict[str, Any] = {}
        if last:
            meta = {
                "source": unit.source if unit.kind != "hf" else f"{unit.source}[{unit.start}:{unit.stop}]",
                "bad_rows": rows.bad,
                "bad_row_examples": rows.bad_examples,
                "sha256": fingerprint.hexdigest(),
                **redaction_stats(redact),
            }
        yield {"tokens": flat, "lengths": lengths, "eval": flags, "meta": meta}
        if last:
            return


_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}


def _tokenizer_files(tokenizer_dir: str) -> dict[str, bytes]:
    """A saved tokenizer's files: what every task loads it from, on whichever node it runs."""
    return {p.name: p.read_bytes() for p in sorted(Path(tokenizer_dir).iterdir()) if p.is_file()}


def _worker_tokenizer(files: dict[str, bytes]) -> PreTrainedTokenizerBase:
    """The tokenizer saved as ``files``, loaded once per Ray worker process (Ray reuses the
    process for later tasks) from a private temp dir: no node needs the driver's disk."""
    key = hashlib.sha256(
        b"".join(
            name.encode() + b"\0" + hashlib.sha256(data).digest() for name, data in sorted(files.items())
        )
    ).hexdigest()
    if key not in _TOKENIZERS:
        from bloomray.data.tokenizer import load_tokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task per CPU already
        with tempfile.TemporaryDirectory(prefix="bloomray-tokenizer-") as d:
            for name, data in files.items():
                (Path(d) / name).write_bytes(data)
            _TOKENIZERS.clear()  # one dataset's tokenizer at a time
            _TOKENIZERS[key] = load_tokenizer(d)
    return _TOKENIZERS[key]


def _encode_units(
    batch: dict[str, np.ndarray], settings: EncodeSettings, tokenizer_files: dict[str, bytes]
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data task: encodes its units, one output row per chunk, tokens in the shards' dtype."""
    tok = _worker_tokenizer(tokenizer_files)
    dtype = token_dtype(len(tok))
    for i, unit_json in enumerate(batch["unit"]):
        for c in encode_unit(Unit(**json.loads(unit_json)), tok, settings):
            yield {
                "order": np.array([int(batch["order"][i])]),
                "tokens": np.array([c["tokens"].astype(dtype).tobytes()], dtype=object),
                "lengths": np.array([c["lengths"].astype("<i8").tobytes()], dtype=object),
                "eval": np.array([c["eval"].tobytes()], dtype=object),
                "meta": np.array([json.dumps(c["meta"])], dtype=object),
            }


def _ray_chunks(
    units: list[Unit], settings: EncodeSettings, workers: int, dtype: np.dtype
) -> Iterator[dict[str, Any]]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size)
    ctx.execution_options.preserve_order = True  # the shards' order must not depend on timing
    ctx.enable_progress_bars = False
    # A block per chunk or two (~0.1-1 MB), not per unit: the driver writes while tasks encode.
    ctx.target_max_block_size = 1 << 20
    try:  # the caller's own Ray Data settings come back once the chunks are read (or abandoned)
        items = [{"order": i, "unit": json.dumps(u.__dict__)} for i, u in enumerate(units)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _encode_units,
            fn_kwargs={"settings": settings, "tokenizer_files": _tokenizer_files(settings.tokenizer_dir)},
            batch_size=1,  # one unit per call, at most ``workers`` at a time
            compute=ray.data.TaskPoolStrategy(size=min(workers, len(units))),
            num_cpus=1,
        )
        for row in ds.iter_rows():
            yield {
                "tokens": np.frombuffer(row["tokens"], dtype=dtype),
                "lengths": np.frombuffer(row["lengths"], dtype="<i8"),
                "eval": np.frombuffer(row["eval"], dtype=bool),
                "meta": json.loads(row["meta"]),
            }
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size = saved


def _local_chunks(
    units: list[Unit], settings: EncodeSettings, tok: PreTrainedTokenizerBase
) -> Iterator[dict[str, Any]]:
    for unit in units:
        yield from encode_unit(unit, tok, settings)


def write_dataset(
    units: list[Unit],
    tok: PreTrainedTokenizerBase,
    out: Path,
    settings: EncodeSettings,
    workers: int = 0,
    max_documents: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = False,
) -> TokenDataset:
    """Encode ``units`` and write the dataset dir ``out`` atomically (replacing an old one).

    Args:
        workers: Ray Data actors (Ray must be up); 0 encodes in this process.
        max_documents: keep only the first N documents (in unit order).
        progress: print a line to stderr every few seconds (documents, tokens, tokens/s).

    Raises:
        DataError: bad rows with ``data.bad_rows=fail``, no document at all.
    """
    dtype = token_dtype(len(tok))
    chunks = _ray_chunks(units, settings, workers, dtype) if workers else _local_chunks(units, settings, tok)
    t0 = last = time.perf_counter()
    with atomic_dir(out) as tmp:
        tok.save_pretrained(str(tmp / "tokenizer"))
        writer = ShardWriter(tmp, len(tok), shard_tokens)
        sources: list[dict[str, Any]] = []
        redacted: dict[str, int] = {}
        docs, done = 0, False
        for c in chunks:
            tokens, lengths, flags = c["tokens"], c["lengths"], c["eval"]
            if max_documents is not None and docs + len(lengths) >= max_documents:
                keep = max_documents - docs
                tokens, lengths, flags = tokens[: int(lengths[:keep].sum())], lengths[:keep], flags[:keep]
                done = True
            in_eval = np.repeat(flags, lengths)
            writer.add_many("train", tokens[~in_eval], lengths[~flags])
            writer.add_many("eval", tokens[in_eval], lengths[flags])
            docs += len(lengths)
            if c["meta"]:
                m = c["meta"]
                for k, v in m.pop("redacted", {}).items():
                    redacted[k] = redacted.get(k, 0) + v
                sources.append(m)
            if progress and time.perf_counter() - last > 5:
                last = time.perf_counter()
                n = sum(w.tokens for w in writer.splits.values())
                print(
                    f"[bloomray] prepare-data: {docs:,} documents, {n:,} tokens, "
                    f"{n / (last - t0):,.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
            if done:
                break
        if docs == 0:
            raise DataError(f"{units[0].source if units else 'the input'} yielded no documents with text")
        h = hashlib.sha256()
        for m in sources:
            h.update(m["sha256"].encode())
        writer.close(
            {
                "vocab_size": len(tok),
                "eos_token_id": tok.eos_token_id,
                "tokenizer_hash": hash_dir(tmp / "tokenizer"),
                "source_fingerprint": h.hexdigest(),
                "split": {
                    "rule": "sha256(seed, text) < eval_fraction",
                    "eval_fraction": settings.eval_fraction,
                    "seed": settings.split_seed,
                },
                "max_documents": max_documents,
                "sources": sources,
                "bad_rows": sum(m["bad_rows"] for m in sources),
                **({"redacted": redacted} if settings.redact is not None else {}),
            }
        )
    ds = TokenDataset.open(out)
    if progress:
        n = ds.tokens("train") + ds.tokens("eval")
        print(
            f"[bloomray] prepare-data: {docs:,} documents, {n:,} tokens in "
            f"{time.perf_counter() - t0:.1f}s -> {out}",
            file=sys.stderr,
            flush=True,
        )
    return ds
