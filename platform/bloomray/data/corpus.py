"""Read documents (and labelled rows) from local files, HF datasets or the embedded corpus.

Supported: ``.txt`` (blank-line separated paragraphs), ``.jsonl``, ``.csv``, ``.tsv``,
``.parquet``, a folder of those, a dataset saved with ``datasets.save_to_disk``, or a hub
dataset name (needs network). ``None`` means the embedded default: Python's bundled
documentation text, present on every CPython, so a first run needs no files.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloomray.errors import EXIT_USAGE, BloomrayError

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataError(BloomrayError, ValueError):
    """A data problem, with the file/row and the fix in the message.

    Exit code 2: the data path, its format, columns or rows are wrong.
    """

    exit_code = EXIT_USAGE


@dataclass
class Rows:
    """Rows read from a source: dicts of column -> value, plus bad-row bookkeeping."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "file:line" of each row, where known

    def where(self, i: int, source: str) -> str:
        """Where row ``i`` came from: ``file:line`` for JSONL/CSV, else ``source row i``."""
        return self.origins[i] if len(self.origins) == len(self.rows) else f"{source} row {i}"

    def reject(self, where: str, why: str, policy: str) -> None:
        """Count a malformed row, or raise when the policy is ``fail``."""
        if policy == "fail":
            raise DataError(f"{where}: {why} (set data.bad_rows=skip to skip such rows)")
        self.bad += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(f"{where}: {why}")


def embedded_documents() -> list[str]:
    """The default corpus: pydoc's topic texts (~465k characters of English)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def read_rows(source: str, text_column: str, bad_rows: str = "skip") -> Rows:
    """Read rows from a file, folder, saved dataset or hub name.

    Args:
        source: path or dataset name.
        text_column: column holding the text (ignored for ``.txt``, whose rows are paragraphs).
        bad_rows: ``skip`` counts malformed rows, ``fail`` raises on the first.

    Raises:
        DataError: missing path, unsupported format, unreadable row (with ``fail``).
    """
    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        return _rows_from_hf(_load_saved_dataset(path), text_column, str(path), bad_rows)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path} holds no data files ({', '.join(SUFFIXES)})")
        out = Rows()
        for f in files:
            part = _read_file(f, text_column, bad_rows)
            out.rows += part.rows
            out.origins += part.origins or [f"{f} row {j}" for j in range(len(part.rows))]
            out.bad += part.bad
            out.bad_examples += part.bad_examples[: 5 - len(out.bad_examples)]
        return out
    if path.is_file():
        return _read_file(path, text_column, bad_rows)
    if _HUB_NAME.match(source) and not source.endswith(SUFFIXES):
        return _rows_from_hf(_load_hub_dataset(source), text_column, source, bad_rows)
    raise DataError(
        f"data path not found: {source}. Give a file ({', '.join(SUFFIXES)}), a folder of "
        "them, a saved HF dataset dir, or leave data.path unset for the embedded corpus"
    )


def _read_file(path: Path, text_column: str, bad_rows: str) -> Rows:
    out = Rows()
    for where, row in iter_file_rows(path, text_column, bad_rows, out):
        out.rows.append(row)
        out.origins.append(where)
    return out


def iter_file_rows(
    path: Path, text_column: str, bad_rows: str, rows: Rows
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(where, row)`` from one data file; malformed rows are counted in ``rows``.

    ``.txt`` rows are blank-line separated paragraphs (``{text_column: paragraph}``); JSONL,
    CSV/TSV and Parquet are read line by line or by row group, so memory stays flat.

    Raises:
        DataError: an unsupported suffix, a missing text column, a bad row with ``fail``.
    """
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for i, para in enumerate(_paragraphs(path)):
            yield f"{path} paragraph {i}", {text_column: para}
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path, bad_rows, rows)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",", text_column, bad_rows, rows)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    else:
        raise DataError(f"unsupported data file {path}; use one of {', '.join(SUFFIXES)}")


def _paragraphs(path: Path) -> Iterator[str]:
    para: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).strip()
                para = []
    if para:
        yield "".join(para).strip()


def _jsonl_rows(path: Path, bad_rows: str, out: Rows) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                out.reject(f"{path}:{lineno}", f"not valid JSON ({exc.msg})", bad_rows)
                continue
            if not isinstance(row, dict):
                out.reject(f"{path}:{lineno}", "a JSON line must be an object", bad_rows)
                continue
            yield f"{path}:{lineno}", row


def _csv_rows(
    path: Path, delimiter: str, text_column: str, bad_rows: str, out: Rows
) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        if reader.fieldnames is None or text_column not in reader.fieldnames:
            raise DataError(
                f"{path} has no column {text_column!r} (columns: {reader.fieldnames}); set data.text_column"
            )
        for lineno, row in enumerate(reader, 2):
            if None in row or any(v is None for v in row.values()):
                out.reject(f"{path}:{lineno}", "wrong number of fields", bad_rows)
                continue
            yield f"{path}:{lineno}", row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _load_saved_dataset(path: Path) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))
    return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds


def _load_hub_dataset(name: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same advice
        raise DataError(
            f"could not load dataset {name!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Without network, download it elsewhere, then point data.path "
            "at a local file or a dataset saved with save_to_disk"
        ) from None


def _rows_from_hf(ds: Any, text_column: str, where: str, bad_rows: str) -> Rows:
    if text_column not in ds.column_names:
        raise DataError(
            f"{where} has no column {text_column!r} (columns: {ds.column_names}); set data.text_column"
        )
    return Rows(rows=list(_iter_hf(ds)))


def _iter_hf(ds: Any) -> Iterator[dict[str, Any]]:
    yield from ds


def read_documents(
    source: str | None, text_column: str = "text", bad_rows: str = "skip"
) -> tuple[list[str], Rows]:
    """Documents for language modelling: the text column of every good row.

    Returns:
        (documents, rows) where rows carries the bad-row count and examples.
    """
    if source is None:
        return embedded_documents(), Rows()
    rows = read_rows(source, text_column, bad_rows)
    docs: list[str] = []
    good: list[int] = []
    for i, row in enumerate(rows.rows):
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            rows.reject(rows.where(i, source), f"missing or empty {text_column!r}", bad_rows)
            continue
        docs.append(text)
        good.append(i)
    rows.origins = [rows.where(i, source) for i in good]
    rows.rows = [rows.rows[i] for i in good]
    if not docs:
        raise DataError(f"{source} yielded no documents with text in column {text_column!r}")
    return docs, rows
