"""Reading documents and rows from every supported source, and explaining bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bloomray.data.corpus import DataError, Rows, embedded_documents, read_documents, read_rows


def write_jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_embedded_corpus_is_nonempty_english():
    docs = embedded_documents()
    text = "\n".join(docs)
    assert len(docs) > 50
    assert len(text) > 100_000
    assert all(d.strip() == d and d for d in docs)
    words = text.lower().split()
    for common in ("the", "and", "statement", "function"):
        assert common in words
    # Mostly ASCII letters: English, not binary or markup noise.
    assert sum(c.isascii() for c in text) / len(text) > 0.99


def test_none_source_is_the_embedded_corpus():
    docs, rows = read_documents(None)
    assert docs == embedded_documents()
    assert rows.bad == 0


def test_txt_paragraphs(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_text("First paragraph\nstill first.\n\n\nSecond one.\n   \nThird.\n\n", encoding="utf-8")
    docs, rows = read_documents(str(f))
    assert docs == ["First paragraph\nstill first.", "Second one.", "Third."]
    assert rows.bad == 0


def test_jsonl_text_column(tmp_path: Path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha", "id": 1}, {"text": "beta"}], ("",))
    docs, rows = read_documents(str(f))
    assert docs == ["alpha", "beta"]
    assert rows.rows[0]["id"] == 1


def test_jsonl_other_text_column(tmp_path: Path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"body": "alpha"}, {"body": "beta"}])
    docs, _ = read_documents(str(f), text_column="body")
    assert docs == ["alpha", "beta"]


def test_malformed_jsonl_is_skipped_and_counted(tmp_path: Path):
    f = write_jsonl(
        tmp_path / "a.jsonl", [{"text": "good"}, {"text": "also good"}], ('{"text": "broken', "[1, 2]")
    )
    docs, rows = read_documents(str(f), bad_rows="skip")
    assert docs == ["good", "also good"]
    assert rows.bad == 2
    assert rows.bad_examples[0].startswith(f"{f}:3: not valid JSON")
    assert rows.bad_examples[1] == f"{f}:4: a JSON line must be an object"


def test_malformed_jsonl_fails_naming_file_and_line(tmp_path: Path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "good"}, {"text": "fine"}], ("{oops",))
    with pytest.raises(DataError) as exc:
        read_documents(str(f), bad_rows="fail")
    msg = str(exc.value)
    assert f"{f}:3" in msg
    assert "not valid JSON" in msg
    assert "data.bad_rows=skip" in msg


def test_rows_without_text_are_bad_rows(tmp_path: Path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"text": ""}, {"other": "x"}, {"text": 5}])
    docs, rows = read_documents(str(f))
    assert docs == ["ok"]
    assert rows.bad == 3
    assert len(rows.rows) == 1
    with pytest.raises(DataError, match="missing or empty 'text'"):
        read_documents(str(f), bad_rows="fail")


def test_no_documents_at_all_is_an_error(tmp_path: Path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"other": "x"}])
    with pytest.raises(DataError, match="no documents with text in column 'text'"):
        read_documents(str(f))


def test_bad_example_list_is_capped():
    rows = Rows()
    for i in range(9):
        rows.reject(f"f:{i}", "bad", "skip")
    assert rows.bad == 9
    assert len(rows.bad_examples) == 5


def test_csv(tmp_path: Path):
    f = tmp_path / "a.csv"
    f.write_text('text,label\n"hello, world",pos\nplain,neg\n"multi ""quoted""",pos\n', encoding="utf-8")
    rows = read_rows(str(f), "text")
    assert rows.rows == [
        {"text": "hello, world", "label": "pos"},
        {"text": "plain", "label": "neg"},
        {"text": 'multi "quoted"', "label": "pos"},
    ]


def test_tsv(tmp_path: Path):
    f = tmp_path / "a.tsv"
    f.write_text("sentence\tlabel\na, b and c\t1\nsecond\t0\n", encoding="utf-8")
    docs, rows = read_documents(str(f), text_column="sentence")
    assert docs == ["a, b and c", "second"]
    assert rows.rows[0]["label"] == "1"


def test_csv_rows_with_wrong_field_count(tmp_path: Path):
    f = tmp_path / "a.csv"
    f.write_text("text,label\ngood,1\nshort\ntoo,many,fields\nfine,0\n", encoding="utf-8")
    rows = read_rows(str(f), "text", bad_rows="skip")
    assert [r["text"] for r in rows.rows] == ["good", "fine"]
    assert rows.bad == 2
    assert rows.bad_examples[0] == f"{f}:3: wrong number of fields"
    with pytest.raises(DataError, match=f"{f}:3"):
        read_rows(str(f), "text", bad_rows="fail")


def test_csv_missing_text_column_names_it(tmp_path: Path):
    f = tmp_path / "a.csv"
    f.write_text("sentence,label\nhi,1\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read_rows(str(f), "text")
    msg = str(exc.value)
    assert "no column 'text'" in msg
    assert "sentence" in msg  # the columns that are there
    assert "data.text_column" in msg


def test_empty_csv(tmp_path: Path):
    f = tmp_path / "a.csv"
    f.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no column 'text'"):
        read_rows(str(f), "text")


def test_parquet(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one", "two", None], "label": [0, 1, 1]}), f)
    rows = read_rows(str(f), "text")
    assert rows.rows[0] == {"text": "one", "label": 0}
    docs, rows = read_documents(str(f))
    assert docs == ["one", "two"]
    assert rows.bad == 1


def test_folder_of_mixed_files_recursive(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("from txt\n\nsecond para", encoding="utf-8")
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "from jsonl"}], ("not json",))
    (tmp_path / "c.csv").write_text("text\nfrom csv\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    docs, rows = read_documents(str(tmp_path))
    assert sorted(docs) == sorted(["from txt", "second para", "from jsonl", "from csv"])
    assert "ignored" not in docs
    assert rows.bad == 1
    assert "b.jsonl:2" in rows.bad_examples[0]


def test_folder_without_data_files(tmp_path: Path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match="holds no data files"):
        read_rows(str(tmp_path), "text")


def test_saved_hf_dataset_dir(tmp_path: Path):
    import datasets

    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "ds"))
    docs, _ = read_documents(str(tmp_path / "ds"))
    assert docs == ["saved one", "saved two"]
    with pytest.raises(DataError, match="no column 'body'"):
        read_rows(str(tmp_path / "ds"), "body")


def test_missing_path_explains_what_to_give(tmp_path: Path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as exc:
        read_rows(str(missing), "text")
    msg = str(exc.value)
    assert f"data path not found: {missing}" in msg
    assert ".jsonl" in msg
    assert "embedded corpus" in msg


def test_unsupported_file_type(tmp_path: Path):
    f = tmp_path / "a.xml"
    f.write_text("<a/>")
    with pytest.raises(DataError, match="unsupported data file"):
        read_rows(str(f), "text")


def test_unreachable_hub_dataset_advises_a_local_path():
    # HF_HUB_OFFLINE=1 (tests/conftest.py): fails at once instead of retrying the network.
    with pytest.raises(DataError) as exc:
        read_rows("no-such-org/no-such-dataset-bloomray", "text")
    msg = str(exc.value)
    assert "no-such-org/no-such-dataset-bloomray" in msg
    assert "save_to_disk" in msg
