"""The text column of a JSON-lines file, parsed by Arrow's C++ reader a block at a time.

What :func:`bloomray.data.sources.texts_of` gives for a JSONL file, fast: the Python line parser
(``corpus.iter_file_rows``) costs more than the tokenizer on short documents. Arrow parses
only the text column of each ~1 MB block of whole lines; a block is taken only when it is
*regular*: every non-blank line one JSON object (as many rows as lines), every text a
non-blank string, no byte order mark and no lone ``\\r`` (where Python and Arrow could read a
line differently; Arrow refuses what Python's ``json`` refuses, and more: a lone surrogate
escape, a raw control character, a duplicate key). At the first irregular block the rest of the
file comes from the Python path, which counts and reports bad rows with their line numbers as
before (it re-reads the file and skips the documents already given), so the documents, their
order, and the bad-row report are the same whichever path read them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

BLOCK_BYTES = 1 << 20


class _Irregular(Exception):
    """A block the fast path does not take."""


def jsonl_texts(path: Path, column: str, python_path: Callable[[], Iterator[str]]) -> Iterator[str]:
    """Every document text of ``path`` (a JSON-lines file), in file order.

    Args:
        column: the text field of each object.
        python_path: the texts as the line-by-line Python reader gives them (bad rows counted
            there); used from the first irregular block on.
    """
    import pyarrow as pa

    given = 0
    try:
        for texts in _arrow_texts(path, column):
            yield from texts
            given += len(texts)
        return
    except (_Irregular, pa.ArrowException, UnicodeDecodeError):  # bytes Python reads with "replace"
        pass
    yield from itertools.islice(python_path(), given, None)


def _arrow_texts(path: Path, column: str) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.json as pj

    parse = pj.ParseOptions(
        explicit_schema=pa.schema([(column, pa.string())]), unexpected_field_behavior="ignore"
    )
    for i, block in enumerate(_line_blocks(path)):
        if i == 0 and block.startswith(b"\xef\xbb\xbf"):
            raise _Irregular("byte order mark")
        if block.count(b"\r") != block.count(b"\r\n"):
            raise _Irregular("a lone CR")
        lines = sum(1 for line in block.split(b"\n") if line.strip())
        if not lines:
            continue
        read = pj.ReadOptions(use_threads=False, block_size=len(block) + 1)
        table = pj.read_json(pa.BufferReader(block), read_options=read, parse_options=parse)
        if table.num_rows != lines:
            raise _Irregular("a line that is not one JSON object")
        texts = table.column(column).to_pylist()
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise _Irregular("a missing or blank text")
        yield texts


def _line_blocks(path: Path) -> Iterator[bytes]:
    """The file's bytes in blocks of whole lines (about :data:`BLOCK_BYTES` each)."""
    rest = b""
    with path.open("rb") as fh:
        while data := fh.read(BLOCK_BYTES):
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
    if rest:
        yield rest
