"""The units a corpus is read in: one file, a row range of a saved HF dataset, or the
embedded corpus; each streamed as document texts, malformed rows counted per unit."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bloomray.data.corpus import SUFFIXES, DataError, Rows, embedded_documents, iter_file_rows
from bloomray.data.jsonl import jsonl_texts
from bloomray.data.redact import Redactor

HF_UNIT_ROWS = 100_000
EMBEDDED = "embedded:pydoc_data.topics"


@dataclass(frozen=True)
class Unit:
    """One piece of input that one task reads: a file, rows of a HF dataset, or the embedded corpus."""

    kind: str  # "file" | "hf" | "embedded"
    source: str
    start: int = 0
    stop: int = 0
    split: str | None = None  # "train"/"eval" for every document; None: the hash rule


@dataclass(frozen=True)
class EncodeSettings:
    """What every unit's encoding needs (sent to each Ray Data actor)."""

    tokenizer_dir: str
    text_column: str
    bad_rows: str
    eval_fraction: float
    split_seed: int
    redact: dict[str, Any] | None  # Redactor arguments, or None when off


def list_units(source: str | None) -> list[Unit]:
    """The units of ``data.path`` (None: the embedded corpus), in a fixed order.

    Raises:
        DataError: a missing path, or a folder without data files.
    """
    if source is None:
        return [Unit("embedded", EMBEDDED)]
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return _hf_units(str(path.resolve()), _hf_rows(str(path.resolve())))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path} holds no data files ({', '.join(SUFFIXES)})")
        return [Unit("file", str(f.resolve())) for f in files]
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"unsupported data file {path}; use one of {', '.join(SUFFIXES)}")
        return [Unit("file", str(path.resolve()))]
    raise DataError(
        f"data path not found: {source}. Give a file ({', '.join(SUFFIXES)}), a folder of them, "
        "or a saved HF dataset dir (hub datasets: save_to_disk them first)"
    )


def _hf_units(path: str, n: int) -> list[Unit]:
    return [Unit("hf", path, a, min(n, a + HF_UNIT_ROWS)) for a in range(0, n, HF_UNIT_ROWS)]


def _load_hf(path: str) -> Any:
    import datasets

    ds = datasets.load_from_disk(path)
    return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds


def _hf_rows(path: str) -> int:
    return len(_load_hf(path))


def texts_of(unit: Unit, text_column: str, rows: Rows, bad_rows: str) -> Iterator[str]:
    """Every document text of a unit, streamed; malformed rows counted in ``rows``."""
    if unit.kind == "embedded":  # each topic's paragraphs, as a .txt file's
        for topic in embedded_documents():
            yield from (p.strip() for p in re.split(r"\n\s*\n", topic) if p.strip())
        return
    if unit.kind == "hf":
        ds = _load_hf(unit.source)
        if text_column not in ds.column_names:
            raise DataError(
                f"{unit.source} has no column {text_column!r} (columns: {ds.column_names}); set data.text_column"
            )
        for i, row in enumerate(ds.select(range(unit.start, unit.stop))):
            yield from _checked(
                row.get(text_column), f"{unit.source} row {unit.start + i}", text_column, rows, bad_rows
            )
        return
    path = Path(unit.source)

    def python_path() -> Iterator[str]:
        for where, row in iter_file_rows(path, text_column, bad_rows, rows):
            yield from _checked(row.get(text_column), where, text_column, rows, bad_rows)

    if path.suffix.lower() in (".jsonl", ".json"):  # Arrow's reader while the lines are regular
        yield from jsonl_texts(path, text_column, python_path)
    else:
        yield from python_path()


def sample_texts(units: list[Unit], s: EncodeSettings, limit: int | None) -> list[str]:
    """The first ``limit`` documents of ``units`` (all when None), redacted: what a tokenizer
    bloomray trains learns from."""
    redact = Redactor(**s.redact) if s.redact is not None else None
    out: list[str] = []
    for unit in units:
        for text in texts_of(unit, s.text_column, Rows(), s.bad_rows):
            out.append(redact(text) if redact else text)
            if limit is not None and len(out) >= limit:
                return out
    return out


def _checked(text: Any, where: str, column: str, rows: Rows, policy: str) -> Iterator[str]:
    if isinstance(text, str) and text.strip():
        yield text
    else:
        rows.reject(where, f"missing or empty {column!r}", policy)


def redact_arguments(rc: Any) -> dict[str, Any] | None:
    """``data.redact`` as :class:`Redactor` keyword arguments (None when it is off)."""
    return (
        {"kinds": list(rc.kinds), "patterns": list(rc.patterns), "min_digits": rc.min_digits}
        if rc.enabled
        else None
    )
