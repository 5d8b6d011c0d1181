"""The Arrow reader of JSONL texts gives exactly what the Python line reader gives: the same
documents in the same order and the same bad-row report, on regular files and on every kind of
line where the two could differ (it hands those files over to the Python reader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bloomray.data.jsonl as jsonl_mod
import bloomray.data.sources as sources_mod
from bloomray.data.corpus import DataError, Rows, iter_file_rows
from bloomray.data.sources import Unit, texts_of


def python_texts(path: Path, bad_rows: str = "skip") -> tuple[list[str], Rows]:
    """The reference: the line-by-line Python reader alone."""
    rows = Rows()
    out = []
    for _, row in iter_file_rows(path, "text", bad_rows, rows):
        t = row.get("text")
        if isinstance(t, str) and t.strip():
            out.append(t)
        else:
            rows.reject("x", "missing or empty 'text'", bad_rows)
    return out, rows


def read(path: Path, bad_rows: str = "skip") -> tuple[list[str], Rows]:
    rows = Rows()
    return list(texts_of(Unit("file", str(path)), "text", rows, bad_rows)), rows


def regular_lines(n: int) -> list[str]:
    return [
        json.dumps({"text": f"document {i} \u00e9 \U0001f600", "id": i, "meta": {"k": [i]}}) for i in range(n)
    ]


def test_a_regular_file_is_read_by_arrow_alone(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(regular_lines(500)) + "\n\n   \n")  # blank lines are skipped by both
    monkeypatch.setattr(jsonl_mod, "BLOCK_BYTES", 1000)  # many blocks, lines cut across reads
    want = python_texts(path)[0]

    def python_reader(*args):
        raise AssertionError("a regular file went to the Python reader")

    monkeypatch.setattr(sources_mod, "iter_file_rows", python_reader)
    texts, rows = read(path)
    assert (texts, rows.bad) == (want, 0) and len(texts) == 500


IRREGULAR = {
    "malformed": '{"text": "broken"',
    "two objects on a line": '{"text": "a"} {"text": "b"}',
    "not an object": '["text", "a"]',
    "a number": '{"text": 5}',
    "blank text": '{"text": "   "}',
    "no text field": '{"other": "x"}',
    "null": '{"text": null}',
    "duplicate keys": '{"text": "a", "text": "b"}',
    "lone surrogate escape": '{"text": "\\ud83d alone"}',
    "a raw tab": '{"text": "a\tb"}',
}


@pytest.mark.parametrize("kind", list(IRREGULAR))
def test_an_irregular_line_anywhere_gives_what_the_python_reader_gives(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(jsonl_mod, "BLOCK_BYTES", 2000)
    lines = regular_lines(300)
    lines.insert(200, IRREGULAR[kind])  # past the first blocks: some documents already given
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    texts, rows = read(path)
    want, want_rows = python_texts(path)
    assert texts == want
    assert rows.bad == want_rows.bad and len(texts) >= 300


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bom", b"\xef\xbb\xbf" + "\n".join(regular_lines(5)).encode()),
        ("crlf", "\r\n".join(regular_lines(5)).encode()),
        ("lone cr", "\r".join(regular_lines(5)).encode()),
        ("no final newline", "\n".join(regular_lines(5)).encode()),
        ("invalid utf-8", b'{"text": "ok"}\n{"text": "bad \xff byte"}\n'),
    ],
)
def test_encodings_and_line_ends(tmp_path, name, data):
    path = tmp_path / "a.jsonl"
    path.write_bytes(data)
    texts, rows = read(path)
    want, want_rows = python_texts(path)
    assert (texts, rows.bad) == (want, want_rows.bad), name


def test_bad_rows_fail_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([*regular_lines(3), '{"text": 7}']) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:4"):
        read(path, bad_rows="fail")
