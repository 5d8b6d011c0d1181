"""Trained byte-level BPE: lossless, BLOOM's special ids, and reloadable from disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bloomray.data.tokenizer import SPECIAL_TOKENS, TokenizerError, load_tokenizer, train_tokenizer

CORPUS = [
    "The for statement is used to iterate over the elements of a sequence.",
    "A function definition defines a user-defined function object.",
    "Les élèves naïfs mangent des crêpes au café. Größe, Straße, 日本語のテキスト.",
    "Numbers like 3.14159 and 2,718 and symbols #@$%^&*() appear too.",
] * 20

SAMPLES = [
    "The for statement iterates.",
    "unseen words: zyxwvut qqqq",
    "a , b . c 's n't -- spaces  twice\n\nand\ttabs",
    "naïve café, Straße, 日本語, emoji 😀🚀, Ελληνικά, русский",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400, min_frequency=2)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_lossless(tok, text: str):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    if text:
        # Byte-level: every byte is representable, so <unk> never appears.
        assert tok.unk_token_id not in ids


def test_special_ids_follow_bloom(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == SPECIAL_TOKENS


def test_vocab_is_bounded_and_learned(tok):
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 400
    # Merges were learned: a frequent word costs fewer tokens than its bytes.
    assert len(tok("statement", add_special_tokens=False)["input_ids"]) < len("statement")


def test_larger_vocab_compresses_more():
    small = train_tokenizer(CORPUS, vocab_size=270, min_frequency=2)
    big = train_tokenizer(CORPUS, vocab_size=400, min_frequency=2)
    text = CORPUS[0]
    assert len(big(text)["input_ids"]) < len(small(text)["input_ids"])


def test_generation_pads_left(tok):
    assert tok.padding_side == "left"
    enc = tok(["a", "longer text here"], padding=True)
    assert enc["input_ids"][0][0] == tok.pad_token_id
    assert enc["attention_mask"][0][0] == 0


def test_save_and_reload_gives_identical_ids(tok, tmp_path: Path):
    tok.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").exists()
    again = load_tokenizer(str(tmp_path))
    for text in SAMPLES:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(again(text)["input_ids"]) == text
    assert len(again) == len(tok)
    assert (again.unk_token_id, again.bos_token_id, again.eos_token_id, again.pad_token_id) == (0, 1, 2, 3)
    assert again.padding_side == "left"


def test_missing_hub_name_fails_fast_with_advice():
    start = time.monotonic()
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer("no-such-org/no-such-tokenizer-bloomray")
    assert time.monotonic() - start < 10  # HF_HUB_OFFLINE=1: no network retries
    msg = str(exc.value)
    assert "hub name 'no-such-org/no-such-tokenizer-bloomray'" in msg
    assert "huggingface-cli download NAME --local-dir DIR" in msg


def test_directory_without_tokenizer(tmp_path: Path):
    with pytest.raises(TokenizerError) as exc:
        load_tokenizer(str(tmp_path))
    assert f"directory {str(tmp_path)!r}" in str(exc.value)
    assert "directory holding tokenizer.json" in str(exc.value)


def test_tokenizer_without_pad_gets_eos_as_pad(tmp_path: Path):
    from transformers import PreTrainedTokenizerFast

    base = train_tokenizer(CORPUS, vocab_size=300)
    no_pad = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="</s>")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>"
    assert loaded.pad_token_id == 2
