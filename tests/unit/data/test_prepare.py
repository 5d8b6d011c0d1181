"""The driver-side data step: corpus -> tokenizer -> train/eval blocks (token shards for causal
LM, arrays for classification)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bloomray.config import load_config, preset_names
from bloomray.data.corpus import DataError
from bloomray.data.ingest import is_eval
from bloomray.data.packing import pack_blocks, tokenize_documents
from bloomray.data.prepare import configured_tokenizer, prepare_data
from bloomray.data.shards import all_blocks
from bloomray.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def paragraphs(n: int) -> str:
    return "\n\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(n))


def causal_cfg(path: Path | None, *extra: str):
    over = [
        "train.max_steps=2",
        "data.block_size=16",
        "data.eval_fraction=0.25",
        "data.tokenizer.vocab_size=300",
    ]
    if path is not None:
        over.append(f"data.path={path}")
    return load_config(None, [*over, *extra])


def cls_cfg(path: Path, *extra: str):
    return load_config(
        None,
        [
            "task=classification",
            "train.max_steps=2",
            f"data.path={path}",
            "data.block_size=16",
            "data.eval_fraction=0.25",
            "data.tokenizer.vocab_size=300",
            *extra,
        ],
    )


def write_labelled(path: Path, rows: list[tuple[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rows) + "\n")
    return path


def split_blocks(tok, docs: list[str], fraction: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The expected (train, eval) blocks: documents split by their hash, each side packed in order."""
    sides = {True: [], False: []}
    for d in docs:
        sides[is_eval(d, fraction, 0)].append(d)
    return tuple(pack_blocks(tokenize_documents(tok, sides[side]), block) for side in (False, True))


def test_causal_blocks_split_by_document_and_tokenizer_saved(tmp_path: Path):
    f = tmp_path / "corpus.txt"
    f.write_text(paragraphs(40))
    tok_dir = tmp_path / "tok"
    data = prepare_data(causal_cfg(f), tokenizer_dir=tok_dir)
    tr, ev = all_blocks(data.train)["input_ids"], all_blocks(data.eval)["input_ids"]
    assert tr.ndim == 2 and tr.shape[1] == 16 and ev.shape[1] == 16
    # Train and eval are the 16-token blocks of their own documents (chosen by hash), in order.
    want_tr, want_ev = split_blocks(data.tokenizer, paragraphs(40).split("\n\n"), 0.25, 16)
    assert np.array_equal(tr, want_tr) and np.array_equal(ev, want_ev)
    assert 0 < len(ev) < len(tr)
    assert tr.max() < len(data.tokenizer) and tr.min() >= 0
    assert data.id2label is None
    s = data.stats
    assert s["documents"] == 40
    assert s["train_blocks"] == len(tr) and s["eval_blocks"] == len(ev)
    assert s["train_tokens"] == tr.size
    assert s["source"] == str(f)
    assert s["bad_rows"] == 0
    # The saved tokenizer is the one the blocks were made with.
    again = load_tokenizer(str(tok_dir))
    assert again("alpha beta")["input_ids"] == data.tokenizer("alpha beta")["input_ids"]


def test_causal_is_deterministic(tmp_path: Path):
    f = tmp_path / "corpus.txt"
    f.write_text(paragraphs(30))
    a, b = prepare_data(causal_cfg(f)), prepare_data(causal_cfg(f))
    for split in ("train", "eval"):
        assert np.array_equal(
            all_blocks(getattr(a, split))["input_ids"], all_blocks(getattr(b, split))["input_ids"]
        )
    assert a.train.fingerprint() == b.train.fingerprint()


def test_causal_separate_eval_file(tmp_path: Path):
    f, e = tmp_path / "train.txt", tmp_path / "eval.txt"
    f.write_text(paragraphs(30))
    e.write_text(paragraphs(5))
    data = prepare_data(causal_cfg(f, f"data.eval_path={e}"))
    # Nothing held out of the training file when an eval file is given, and the eval blocks
    # are the eval file's, in order.
    tok = data.tokenizer
    want_train = pack_blocks(tokenize_documents(tok, paragraphs(30).split("\n\n")), 16)
    want_eval = pack_blocks(tokenize_documents(tok, paragraphs(5).split("\n\n")), 16)
    assert np.array_equal(all_blocks(data.train)["input_ids"], want_train)
    assert np.array_equal(all_blocks(data.eval)["input_ids"], want_eval)


def test_causal_max_documents(tmp_path: Path):
    f = tmp_path / "corpus.txt"
    f.write_text(paragraphs(40))
    data = prepare_data(causal_cfg(f, "data.max_documents=10"))
    assert data.stats["documents"] == 10


def test_causal_embedded_corpus(tmp_path: Path):
    data = prepare_data(causal_cfg(None, "data.max_documents=60", "data.block_size=64"))
    assert data.stats["source"] == "embedded:pydoc_data.topics"
    assert len(data.train) > 1


def test_causal_too_little_text(tmp_path: Path):
    f = tmp_path / "corpus.txt"
    f.write_text("alpha beta")
    with pytest.raises(ValueError, match="data.block_size"):
        prepare_data(causal_cfg(f, "data.block_size=256"))


def test_causal_no_eval_block_names_the_fix(tmp_path: Path):
    f = tmp_path / "corpus.txt"
    f.write_text(paragraphs(12))  # 12 distinct documents: at 1% none is likely to hash into eval
    docs = paragraphs(12).split("\n\n")
    assert not any(is_eval(d, 0.01, 0) for d in docs)
    with pytest.raises(DataError, match="eval split has 0 documents.*raise data.eval_fraction"):
        prepare_data(causal_cfg(f, "data.eval_fraction=0.01"))


def test_classification_infers_sorted_labels(tmp_path: Path):
    rows = [(f"{WORDS[i % 12]} good text {i}", ["pos", "neg", "neutral"][i % 3]) for i in range(24)]
    f = write_labelled(tmp_path / "cls.jsonl", rows)
    data = prepare_data(cls_cfg(f))
    assert data.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert data.stats["labels"] == ["neg", "neutral", "pos"]
    labels = np.concatenate([data.train["labels"], data.eval["labels"]])
    assert sorted(np.bincount(labels).tolist()) == [8, 8, 8]
    assert data.stats["train_examples"] + data.stats["eval_examples"] == 24
    assert data.stats["eval_examples"] == 6
    for split in (data.train, data.eval):
        assert set(split) == {"input_ids", "attention_mask", "labels"}
        assert split["input_ids"].shape == split["attention_mask"].shape
        assert split["input_ids"].shape[1] <= 16
        assert len(split["labels"]) == len(split["input_ids"])


def test_classification_labels_stay_with_their_texts(tmp_path: Path):
    rows = [
        (f"always positive {i}" if i % 2 else f"never negative {i}", "pos" if i % 2 else "neg")
        for i in range(20)
    ]
    f = write_labelled(tmp_path / "cls.jsonl", rows)
    data = prepare_data(cls_cfg(f, "data.block_size=64"))
    tok = data.tokenizer
    for split in (data.train, data.eval):
        for ids, mask, lab in zip(split["input_ids"], split["attention_mask"], split["labels"], strict=True):
            text = tok.decode(ids[mask.astype(bool)].tolist())
            assert text.startswith("always" if data.id2label[int(lab)] == "pos" else "never")


def test_classification_numeric_labels_sort_numerically(tmp_path: Path):
    rows = [(f"text number {i}", [10, 2, 1][i % 3]) for i in range(12)]
    f = write_labelled(tmp_path / "cls.jsonl", rows)
    data = prepare_data(cls_cfg(f))
    assert data.id2label == {0: "1", 1: "2", 2: "10"}


def test_classification_numeric_labels_map_to_given_names(tmp_path: Path):
    f = tmp_path / "cls.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"movie review {i}\t{i % 2}\n" for i in range(12)))
    data = prepare_data(cls_cfg(f, "data.text_column=sentence", "data.labels=[negative, positive]"))
    assert data.id2label == {0: "negative", 1: "positive"}
    assert data.stats["bad_rows"] == 0
    assert data.stats["train_examples"] + data.stats["eval_examples"] == 12


def test_classification_unknown_labels_skipped_and_counted(tmp_path: Path):
    rows = [(f"text {i}", ["pos", "neg"][i % 2]) for i in range(12)] + [("odd one", "maybe"), ("", "pos")]
    f = write_labelled(tmp_path / "cls.jsonl", rows)
    data = prepare_data(cls_cfg(f, "data.labels=[neg, pos]"))
    assert data.stats["bad_rows"] == 2
    assert data.stats["train_examples"] + data.stats["eval_examples"] == 12
    assert any("unknown label 'maybe'" in e for e in data.stats["bad_row_examples"])


def test_classification_unknown_label_fails_with_fail_policy(tmp_path: Path):
    rows = [(f"text {i}", ["pos", "neg"][i % 2]) for i in range(12)] + [("odd one", "maybe")]
    f = write_labelled(tmp_path / "cls.jsonl", rows)
    with pytest.raises(DataError) as exc:
        prepare_data(cls_cfg(f, "data.labels=[neg, pos]", "data.bad_rows=fail"))
    msg = str(exc.value)
    assert "row 12" in msg
    assert "unknown label 'maybe'" in msg
    assert "['neg', 'pos']" in msg


def test_classification_needs_two_labels(tmp_path: Path):
    f = write_labelled(tmp_path / "cls.jsonl", [(f"t {i}", "same") for i in range(10)])
    with pytest.raises(DataError, match="1 distinct labels"):
        prepare_data(cls_cfg(f))


def test_classification_label_column_missing(tmp_path: Path):
    f = write_labelled(tmp_path / "cls.jsonl", [(f"t {i}", i % 2) for i in range(10)])
    with pytest.raises(DataError, match="'sentiment' has 0 distinct labels"):
        prepare_data(cls_cfg(f, "data.label_column=sentiment"))


def test_classification_needs_a_path():
    cfg = load_config(None, ["task=classification", "train.max_steps=1"])
    with pytest.raises(DataError, match="needs data.path"):
        prepare_data(cfg)


def test_classification_separate_eval_file(tmp_path: Path):
    f = write_labelled(tmp_path / "train.jsonl", [(f"train {i}", ["a", "b"][i % 2]) for i in range(10)])
    e = write_labelled(
        tmp_path / "eval.jsonl", [(f"eval {i}", ["a", "b"][i % 2]) for i in range(4)] + [("x", "c")]
    )
    data = prepare_data(cls_cfg(f, f"data.eval_path={e}"))
    assert data.stats["train_examples"] == 10
    assert data.stats["eval_examples"] == 4
    assert data.stats["bad_rows"] == 1  # the eval file's unknown label 'c'


def test_tokenizer_comes_from_the_configured_path_then_the_model(tmp_path: Path):
    saved = train_tokenizer([paragraphs(10)], vocab_size=270)
    saved.save_pretrained(str(tmp_path / "tok"))
    cfg = causal_cfg(None, f"data.tokenizer.path={tmp_path / 'tok'}")
    assert configured_tokenizer(cfg).get_vocab() == saved.get_vocab()
    saved.save_pretrained(str(tmp_path / "model"))
    cfg = causal_cfg(None, f"model.path={tmp_path / 'model'}")
    assert configured_tokenizer(cfg).get_vocab() == saved.get_vocab()
    # Another copy of the model's own tokenizer is fine.
    cfg = causal_cfg(None, f"model.path={tmp_path / 'model'}", f"data.tokenizer.path={tmp_path / 'tok'}")
    assert configured_tokenizer(cfg).get_vocab() == saved.get_vocab()
    # A preset model without data.tokenizer.path trains one (None = train).
    assert configured_tokenizer(causal_cfg(None)) is None


def test_pretrained_model_never_gets_a_trained_tokenizer(tmp_path: Path, monkeypatch):
    import bloomray.data.prepare as prepare

    def no_training(*a, **k):
        raise AssertionError("a tokenizer was trained for a pretrained model")

    monkeypatch.setattr(prepare, "train_tokenizer", no_training)
    (tmp_path / "bare").mkdir()
    with pytest.raises(TokenizerError, match="has no tokenizer files.*data.tokenizer.path"):
        prepare_data(causal_cfg(None, f"model.path={tmp_path / 'bare'}"))
    with pytest.raises(TokenizerError, match="hub name 'bigscience/bloom-560m'.*--local-dir"):
        prepare_data(causal_cfg(None, "model.path=bigscience/bloom-560m"))


def test_a_foreign_tokenizer_for_a_pretrained_model_names_both(tmp_path: Path):
    train_tokenizer([paragraphs(10)], vocab_size=270).save_pretrained(str(tmp_path / "model"))
    train_tokenizer([paragraphs(10)], vocab_size=300).save_pretrained(str(tmp_path / "other"))
    cfg = causal_cfg(None, f"model.path={tmp_path / 'model'}", f"data.tokenizer.path={tmp_path / 'other'}")
    with pytest.raises(TokenizerError) as err:
        configured_tokenizer(cfg)
    msg = str(err.value)
    assert str(tmp_path / "model") in msg and str(tmp_path / "other") in msg and "not the tokenizer" in msg


HUB_PRESETS = [name for name in preset_names() if load_config(name).model.path]


def test_some_presets_name_a_hub_model():
    assert "bloom-560m-zero2" in HUB_PRESETS  # else the test below checks nothing


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_hub_named_presets_never_train_a_tokenizer(preset: str, monkeypatch):
    import bloomray.data.prepare as prepare

    cfg = load_config(preset)
    monkeypatch.setattr(prepare, "train_tokenizer", lambda *a, **k: pytest.fail("trained a tokenizer"))
    with pytest.raises(TokenizerError, match=cfg.model.path):  # offline here: the hub load fails first
        prepare_data(cfg)
