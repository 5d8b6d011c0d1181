"""Instruction data (task: sft): row formats, response-only labels, right padding, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bloomray.config import load_config
from bloomray.data.corpus import DataError
from bloomray.data.prepare import prepare_data
from bloomray.data.sft import IGNORE, encode_conversation, encode_examples, to_messages
from bloomray.data.tokenizer import PLAIN_CHAT_TEMPLATE, load_tokenizer, train_tokenizer

WORDS = "red green blue cyan black white".split()


def pair_rows(n: int) -> list[dict]:
    return [
        {
            "prompt": f"reverse: {WORDS[i % 6]} {WORDS[(i // 6) % 6]}",
            "response": f"{WORDS[(i // 6) % 6]} {WORDS[i % 6]}",
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sft_cfg(path: Path, *extra: str):
    return load_config(
        None,
        [
            "task=sft",
            "train.max_steps=2",
            f"data.path={path}",
            "data.block_size=64",
            "data.eval_fraction=0.25",
            "data.tokenizer.vocab_size=300",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([r["prompt"] + " " + r["response"] for r in pair_rows(36)], 300)


def test_both_row_formats_give_the_same_conversation():
    pair, why = to_messages({"prompt": "hi", "response": "hello"})
    chat, _ = to_messages(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    assert why == "" and pair == chat == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    turns = [("system", "be brief"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    multi, why = to_messages(
        {"messages": [{"role": r, "content": c, "name": "extra keys are dropped"} for r, c in turns]}
    )
    assert why == "" and multi == [{"role": r, "content": c} for r, c in turns]  # every turn, in order


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ({"prompt": "x"}, "missing or empty 'response'"),
        ({"prompt": "", "response": "y"}, "missing or empty 'prompt'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 needs a role"),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]},
            "no user",
        ),
    ],
)
def test_malformed_rows_say_why(row, why):
    messages, reason = to_messages(row)
    assert messages is None and why in reason


def test_labels_cover_exactly_the_response_and_eos(tok):
    messages = [
        {"role": "user", "content": "reverse: red blue"},
        {"role": "assistant", "content": "blue red"},
    ]
    prompt, response = encode_conversation(tok, messages)
    # The prompt is what the server tokenizes: the template with the generation prompt, no specials.
    served = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert served == "User: reverse: red blue\nAssistant:"
    assert prompt == tok(served, add_special_tokens=False)["input_ids"]
    assert response[-1] == tok.eos_token_id and tok.eos_token_id not in response[:-1]
    assert tok.decode(response[:-1]) == " blue red"
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    arrays, dropped = encode_examples(tok, [messages, short], block_size=64)
    ids, mask, labels = arrays["input_ids"], arrays["attention_mask"], arrays["labels"]
    n, p = len(prompt) + len(response), len(prompt)
    assert dropped == 0 and ids.shape[1] == n  # padded to the longest example, not block_size
    assert ids[0].tolist() == prompt + response and mask[0].all()
    assert (labels[0, :p] == IGNORE).all() and labels[0, p:].tolist() == response
    sp, sr = encode_conversation(tok, short)
    m = len(sp) + len(sr)
    assert mask[1].tolist() == [1] * m + [0] * (n - m)
    assert (ids[1, m:] == tok.pad_token_id).all()  # right padding
    assert labels[1].tolist() == [IGNORE] * len(sp) + sr + [IGNORE] * (n - m)


def test_multi_turn_trains_only_the_last_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "red"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "green"},
        {"role": "assistant", "content": "cyan"},
    ]
    prompt, response = encode_conversation(tok, messages)
    assert "Assistant: blue" in tok.decode(prompt)  # earlier turns are context
    assert tok.decode(response, skip_special_tokens=True) == " cyan"


def test_prepare_sft_splits_mixed_formats_and_saves_the_template(tmp_path: Path):
    rows = pair_rows(30) + [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in WORDS
    ]
    f = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = prepare_data(sft_cfg(f), tokenizer_dir=tmp_path / "tok")
    s = data.stats
    assert s["train_examples"] + s["eval_examples"] == 36 and s["eval_examples"] == 9
    assert s["bad_rows"] == 0 and s["dropped_too_long"] == 0
    assert set(data.train) == {"input_ids", "attention_mask", "labels"}
    assert data.train["input_ids"].shape == data.train["labels"].shape
    assert s["train_response_tokens"] == int((data.train["labels"] != IGNORE).sum())
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded.chat_template == PLAIN_CHAT_TEMPLATE  # saved by save_pretrained, served as is


def test_bad_rows_skip_counts_and_fail_names_the_line(tmp_path: Path):
    rows = [*pair_rows(8), "{not json", {"prompt": "only a prompt"}, {"messages": "nope"}, *pair_rows(4)]
    f = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = prepare_data(sft_cfg(f))
    assert data.stats["bad_rows"] == 3
    assert data.stats["train_examples"] + data.stats["eval_examples"] == 12
    assert any(e.startswith(f"{f}:10:") for e in data.stats["bad_row_examples"])
    f2 = write_jsonl(tmp_path / "fail.jsonl", [*pair_rows(4), "", {"prompt": "only a prompt"}])
    with pytest.raises(DataError) as exc:
        prepare_data(sft_cfg(f2, "data.bad_rows=fail"))
    msg = str(exc.value)
    assert f"{f2}:6" in msg and "missing or empty 'response'" in msg and "data.bad_rows=skip" in msg


def test_over_long_examples_are_dropped_and_counted(tmp_path: Path):
    rows = pair_rows(12) + [{"prompt": "reverse: " + " ".join(WORDS * 6), "response": "x"}]
    f = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = prepare_data(
        sft_cfg(
            f, "data.block_size=24", "data.eval_path=" + str(write_jsonl(tmp_path / "ev.jsonl", pair_rows(4)))
        )
    )
    assert data.stats["dropped_too_long"] == 1 and data.stats["train_examples"] == 12
    assert data.train["input_ids"].shape[1] <= 24
    with pytest.raises(DataError, match="raise data.block_size"):
        prepare_data(sft_cfg(f, "data.block_size=8"))


def test_sft_needs_a_data_path():
    with pytest.raises(DataError, match="task=sft needs data.path"):
        prepare_data(load_config(None, ["task=sft", "train.max_steps=1"]))


def test_a_tokenizers_own_template_is_kept(tok, tmp_path: Path):
    own = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(str(tmp_path / "own"))
    copy = AutoTokenizer.from_pretrained(str(tmp_path / "own"))
    copy.chat_template = own
    copy.save_pretrained(str(tmp_path / "own"))
    loaded = load_tokenizer(str(tmp_path / "own"))
    assert loaded.chat_template == own  # ensure_chat_template keeps a model's own template
    prompt, response = encode_conversation(
        loaded, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    )
    assert loaded.decode(prompt) == "<user>a<assistant>"
    assert loaded.decode(response) == "b" + loaded.eos_token  # EOS ends the trained response
