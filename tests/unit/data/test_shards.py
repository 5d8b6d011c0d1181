"""Token datasets on disk: the index round-trips, blocks cross shard boundaries, bad shards are
named, the split by document hash is stable when files are added, the bytes do not depend on how
the work was cut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bloomray.config import load_config
from bloomray.data.corpus import DataError
from bloomray.data.ingest import is_eval
from bloomray.data.packing import pack_blocks
from bloomray.data.shards import INDEX, ShardWriter, TokenDataset, all_blocks, is_token_dataset, token_dtype
from bloomray.data.tokens import build_dataset

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()


def docs_of(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))) for _ in range(n)]


def write_synthetic(out: Path, docs: list[np.ndarray], vocab: int, shard_tokens: int) -> dict:
    out.mkdir(parents=True)
    w = ShardWriter(out, vocab, shard_tokens)
    for i, d in enumerate(docs):
        w.add("eval" if i % 5 == 0 else "train", d)
    return w.close({"vocab_size": vocab, "bad_rows": 0})


def test_blocks_cross_shard_boundaries_and_match_packing(tmp_path: Path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=int(rng.integers(1, 30))) for _ in range(200)]
    index = write_synthetic(tmp_path / "ds", docs, 1000, shard_tokens=37)  # tiny shards: many boundaries
    ds = TokenDataset.open(tmp_path / "ds")
    assert ds.index == index == json.loads((tmp_path / "ds" / INDEX).read_text())
    train_docs = [d.tolist() for i, d in enumerate(docs) if i % 5]
    assert ds.documents("train") == len(train_docs) and ds.tokens("train") == sum(map(len, train_docs))
    assert len(index["splits"]["train"]["shards"]) == -(-ds.tokens("train") // 37)
    blocks = all_blocks(ds.blocks("train", 16))["input_ids"]
    assert np.array_equal(blocks, pack_blocks(train_docs, 16))
    assert blocks.dtype == np.int64
    offsets = ds.doc_offsets("train")
    assert offsets.tolist() == np.cumsum([0] + [len(d) for d in train_docs]).tolist()
    assert is_token_dataset(tmp_path / "ds") and not is_token_dataset(tmp_path)


def test_dtype_is_uint16_when_the_vocabulary_fits_else_uint32(tmp_path: Path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(250_880) == np.uint32
    big = [np.array([250_000, 7, 65_536, 1])] * 10
    write_synthetic(tmp_path / "big", big, 250_880, shard_tokens=1000)
    ds = TokenDataset.open(tmp_path / "big")
    assert ds.index["dtype"] == "<u4"
    assert all_blocks(ds.blocks("train", 4))["input_ids"][0].tolist() == [250_000, 7, 65_536, 1]
    assert (tmp_path / "big" / "train-00000.bin").stat().st_size == 8 * 4 * 4  # 8 train docs, 4 bytes each


def test_blocks_pickle_as_a_path_and_reopen(tmp_path: Path):
    import pickle

    write_synthetic(tmp_path / "ds", [np.arange(50)] * 20, 100, shard_tokens=64)
    blocks = TokenDataset.open(tmp_path / "ds").blocks("train", 8)
    first = blocks.take(np.array([3, 0]))["input_ids"]
    data = pickle.dumps(blocks)
    assert len(data) < 1000  # the path and shape, not the tokens
    assert np.array_equal(pickle.loads(data).take(np.array([3, 0]))["input_ids"], first)


def test_blocks_open_the_dataset_once_and_unmap_only_the_shards_they_read(tmp_path: Path, monkeypatch):
    import mmap
    import pickle

    write_synthetic(tmp_path / "ds", [np.arange(50)] * 20, 100, shard_tokens=64)  # 8 blocks a shard
    blocks = pickle.loads(pickle.dumps(TokenDataset.open(tmp_path / "ds").blocks("train", 8)))
    opened, real_open = [], TokenDataset.open
    monkeypatch.setattr(TokenDataset, "open", lambda path: opened.append(path) or real_open(path))
    maps, _ = blocks._open()
    advised = []

    class Spy:  # the shard's mmap, recording what is unmapped
        def __init__(self, k: int, m: mmap.mmap) -> None:
            self.k, self.m = k, m

        def __len__(self) -> int:
            return len(self.m)

        def madvise(self, *args: int) -> None:
            advised.append((self.k, *args))
            self.m.madvise(*args)

    for k, m in enumerate(maps):
        m._mmap = Spy(k, m._mmap)
    assert blocks.take(np.array([9, 0]))["input_ids"].tolist() == [list(range(22, 30)), list(range(8))]
    blocks.fingerprint()
    assert len(maps) == 13 and len(opened) == 1
    assert advised == [(0, mmap.MADV_DONTNEED, 0, 128), (1, mmap.MADV_DONTNEED, 0, 128)]


def test_truncated_missing_and_corrupt_shards_are_named(tmp_path: Path):
    write_synthetic(tmp_path / "ds", [np.arange(50)] * 20, 100, shard_tokens=64)
    shard = tmp_path / "ds" / "train-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train-00001\.bin is 126 bytes, the index says 128 bytes"):
        TokenDataset.open(tmp_path / "ds")
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00001\.bin is missing.*prepare-data"):
        TokenDataset.open(tmp_path / "ds")
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    ds = TokenDataset.open(tmp_path / "ds")
    with pytest.raises(DataError, match=r"train-00001\.bin is corrupt"):
        ds.verify()
    (tmp_path / "ds" / INDEX).write_text("{")
    with pytest.raises(DataError, match="is not a prepared dataset"):
        TokenDataset.open(tmp_path / "ds")


def cfg_for(path: Path, *extra: str):
    return load_config(
        None,
        [
            "train.max_steps=1",
            f"data.path={path}",
            "data.eval_fraction=0.2",
            "data.tokenizer.vocab_size=300",
            "data.tokenizer.min_frequency=1",
            *extra,
        ],
    )


def split_texts(ds: TokenDataset, tok) -> dict[str, list[str]]:
    out = {}
    for split in ("train", "eval"):
        offs = ds.doc_offsets(split)
        stream = ds.blocks(split, 1).span(0, ds.tokens(split))
        out[split] = [
            tok.decode(stream[a : b - 1].tolist()) for a, b in zip(offs[:-1], offs[1:], strict=True)
        ]
    return out


def test_split_is_by_document_and_stable_when_a_file_is_added(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs_of(300, 1)))
    tok_dir = tmp_path / "tok"
    first = build_dataset(cfg_for(corpus), None, tmp_path / "one")
    tok = first.tokenizer_dir
    from bloomray.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tok))
    tokenizer.save_pretrained(str(tok_dir))
    before = split_texts(first, tokenizer)
    assert before["eval"] and all(is_eval(t, 0.2, 0) for t in before["eval"])
    assert not any(is_eval(t, 0.2, 0) for t in before["train"])
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs_of(300, 2)))
    second = build_dataset(cfg_for(corpus), tokenizer, tmp_path / "two")
    after = split_texts(second, tokenizer)
    assert after["eval"][: len(before["eval"])] == before["eval"]  # a.jsonl comes first, unchanged
    assert after["train"][: len(before["train"])] == before["train"]
    assert not set(before["eval"]) & set(after["train"])  # no eval document moved into training
    assert second.index["source_fingerprint"] != first.index["source_fingerprint"]
    assert [s["source"] for s in second.index["sources"]] == [
        str(corpus / "a.jsonl"),
        str(corpus / "b.jsonl"),
    ]


def test_bad_rows_are_counted_per_file_and_max_documents_holds(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = "".join(json.dumps({"text": t}) + "\n" for t in docs_of(50, 3))
    (corpus / "a.jsonl").write_text(good + "not json\n" + json.dumps({"text": ""}) + "\n")
    (corpus / "b.csv").write_text("text,other\nhello there,1\nbroken\n")
    ds = build_dataset(cfg_for(corpus), None, tmp_path / "ds")
    bad = {Path(s["source"]).name: s["bad_rows"] for s in ds.index["sources"]}
    assert bad == {"a.jsonl": 2, "b.csv": 1} and ds.index["bad_rows"] == 3
    assert ds.documents("train") + ds.documents("eval") == 51
    examples = ds.index["sources"][0]["bad_row_examples"]
    assert examples[0].endswith("a.jsonl:51: not valid JSON (Expecting value)")
    few = build_dataset(cfg_for(corpus, "data.max_documents=7"), None, tmp_path / "few")
    assert few.documents("train") + few.documents("eval") == 7
    with pytest.raises(DataError, match=r"a.jsonl:51: not valid JSON.*data.bad_rows=skip"):
        build_dataset(cfg_for(corpus, "data.bad_rows=fail"), None, tmp_path / "fail")
    assert not (tmp_path / "fail").exists()  # nothing half-written


def test_training_on_a_prepared_dir_uses_its_blocks_and_refuses_a_foreign_tokenizer(tmp_path: Path):
    from bloomray.data.prepare import prepare_data
    from bloomray.data.tokenizer import TokenizerError, train_tokenizer

    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(docs_of(200, 4)))
    built = build_dataset(cfg_for(src), None, tmp_path / "ds")
    data = prepare_data(cfg_for(tmp_path / "ds", "data.block_size=16"))
    assert data.stats["dataset"] == str(built.path)
    assert len(data.train) == built.tokens("train") // 16
    again = prepare_data(cfg_for(src, "data.block_size=16"))  # raw input: the same shards on the fly
    assert np.array_equal(all_blocks(data.train)["input_ids"], all_blocks(again.train)["input_ids"])
    other = tmp_path / "other"
    train_tokenizer(docs_of(50, 9), 280, 1).save_pretrained(str(other))
    with pytest.raises(TokenizerError, match="tokenized with another tokenizer"):
        prepare_data(cfg_for(tmp_path / "ds", f"data.tokenizer.path={other}"))


def test_token_ids_are_the_tokenizers_own_and_a_truncating_one_still_is():
    from bloomray.data.corpus import embedded_documents
    from bloomray.data.ingest import token_ids
    from bloomray.data.tokenizer import train_tokenizer

    docs = embedded_documents()[:40]
    tok = train_tokenizer(docs, 512)
    texts = [*docs, "", "  ", f"an {tok.eos_token} inside", "caf\u00e9 \u2603 \U0001f600"]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert token_ids(tok, texts) == want
    assert any(len(ids) > 16 for ids in want)
    tok.backend_tokenizer.enable_truncation(16)  # tok() resets the Rust tokenizer's truncation per call
    assert token_ids(tok, texts) == want


def test_a_ray_data_task_needs_nothing_from_the_drivers_disk(tmp_path: Path):
    """The task gets the tokenizer's files, not the driver's path to them (a task on another node
    cannot read the driver's temp dir), and encodes exactly what the driver's tokenizer does."""
    import shutil
    from dataclasses import replace

    import bloomray.data.ingest as ingest
    from bloomray.data.sources import Unit
    from bloomray.data.tokenizer import load_tokenizer, train_tokenizer
    from bloomray.data.tokens import encode_settings

    (tmp_path / "a.txt").write_text("\n\n".join(docs_of(300, 1)))
    train_tokenizer(docs_of(200, 0), 300).save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    files = ingest._tokenizer_files(str(tmp_path / "tok"))
    settings = encode_settings(load_config(None, ["train.max_steps=1"]), tmp_path / "tok")
    shutil.rmtree(tmp_path / "tok")  # as on another node: the driver's dir is not there
    unit = Unit("file", str(tmp_path / "a.txt"))
    batch = {"order": np.array([0]), "unit": np.array([json.dumps(unit.__dict__)], dtype=object)}
    rows = list(ingest._encode_units(batch, replace(settings, tokenizer_dir="/nonexistent"), files))
    want = list(ingest.encode_unit(unit, tok, settings))
    assert len(rows) == len(want) >= 1
    for row, c in zip(rows, want, strict=True):
        assert np.array_equal(np.frombuffer(row["tokens"][0], dtype=token_dtype(len(tok))), c["tokens"])
        assert np.array_equal(np.frombuffer(row["lengths"][0], dtype="<i8"), c["lengths"])
    assert ingest._worker_tokenizer(files) is ingest._worker_tokenizer(files)  # loaded once per process
