"""PII masking (data.redact): each kind, user regexes, what must stay, counts, config checks,
and prepare_data keeping PII out of the tokenizer and the arrays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bloomray.config import ConfigError, load_config
from bloomray.data.prepare import prepare_data
from bloomray.data.redact import KINDS, Redactor
from bloomray.data.shards import all_blocks


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("mail jane.doe+ml@mail.example.co.uk today", "mail <EMAIL> today"),
        ("ask bob_1@ex-ample.org.", "ask <EMAIL>."),
        ("call +44 20 7946 0958 now", "call <PHONE> now"),
        ("call +1 (555) 123-4567", "call <PHONE>"),
        ("call +4930123456.", "call <PHONE>."),
        (
            "US (555) 123-4567, 555-123-4567, 555.123.4567 or 1-800-555-0199",
            "US <PHONE>, <PHONE>, <PHONE> or <PHONE>",
        ),
        ("host 192.168.0.1, then 8.8.8.8.", "host <IP>, then <IP>."),
        ("v6 2001:db8::8a2e:370:7334 and fe80::1: up", "v6 <IP> and <IP>: up"),
        ("mapped ::ffff:192.0.2.1 here", "mapped <IP> here"),
        ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "full <IP>"),
        ("account 12345678 closed", "account <NUMBER> closed"),
        ("card 4111 1111 1111 1111 or 4111-1111-1111-1111", "card <NUMBER> or <NUMBER>"),
        ("ssn 123-45-6789", "ssn <NUMBER>"),
    ],
)
def test_each_kind_becomes_its_placeholder(text: str, want: str):
    assert Redactor()(text) == want


@pytest.mark.parametrize(
    "text",
    [
        "in 2024 we shipped 3.14 times more",
        "version 1.2.3 and python 3.11.4",
        "PIN 1234 and code 99999",  # under min_digits=6
        "pi is 3.14159265, total 1,234,567 and $1234567.89",
        "on 2024-01-15T12:30:45, at 12:30:45",
        "slices s[::2] and the loopback ::1",
        "999.1.1.1 and 10.0.0.256 are not addresses",
        "score +1 2 3 and room 101-2",
        "years 2019 2020 2021 2022",  # grouped fours that fail the card checksum
        "user@localhost has no domain",
    ],
)
def test_ordinary_text_stays(text: str):
    r = Redactor()
    assert r(text) == text
    assert sum(r.counts.values()) == 0


def test_emails_and_ips_win_over_digits_and_phones():
    r = Redactor()
    assert r("5551234567@example.com at 192.168.100.200") == "<EMAIL> at <IP>"
    assert r.counts == {"email": 1, "ip": 1, "phone": 0, "digits": 0}


def test_user_patterns_run_first_and_count_apart():
    r = Redactor(patterns=[r"ACCT-\d+", r"(?i)project\s+falcon"])
    assert r("ACCT-12345678 for Project Falcon, mail a@b.io") == "<REDACTED> for <REDACTED>, mail <EMAIL>"
    assert r.counts == {"pattern": 2, "email": 1, "ip": 0, "phone": 0, "digits": 0}
    assert r.placeholders == ["<REDACTED>", "<EMAIL>", "<IP>", "<PHONE>", "<NUMBER>"]


def test_only_the_chosen_kinds_and_min_digits():
    r = Redactor(kinds=["email"], min_digits=4)
    assert r("a@b.io 12345678 +44 20 7946 0958") == "<EMAIL> 12345678 +44 20 7946 0958"
    assert r.counts == {"email": 1}
    assert Redactor(kinds=["digits"], min_digits=4)("PIN 1234") == "PIN <NUMBER>"


def test_counts_add_up_over_calls_and_messages():
    r = Redactor()
    r("a@b.io and c@d.io")
    out = r.messages(
        [{"role": "user", "content": "I am at 10.0.0.1"}, {"role": "assistant", "content": "ok"}]
    )
    assert out == [{"role": "user", "content": "I am at <IP>"}, {"role": "assistant", "content": "ok"}]
    assert r.counts["email"] == 2 and r.counts["ip"] == 1


def test_config_defaults_off_and_bool_shorthand():
    cfg = load_config(None, ["train.max_steps=1"])
    assert cfg.data.redact.enabled is False and Redactor.from_config(cfg.data.redact) is None
    assert list(cfg.data.redact.kinds) == ["email", "phone", "ip", "digits"]
    on = load_config(None, ["train.max_steps=1", "data.redact=true"]).data.redact
    assert on.enabled and on.min_digits == 6 and set(Redactor.from_config(on).kinds) == set(KINDS)
    mine = load_config(
        None, ["train.max_steps=1", "data.redact.enabled=true", r"data.redact.patterns=['ACCT-\d+']"]
    ).data.redact
    assert Redactor.from_config(mine)("ACCT-7") == "<REDACTED>"


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.redact.patterns=['(unclosed']", "'(unclosed' is not a valid regex"),
        ("data.redact.patterns=['a*']", "'a*' matches the empty string"),
        ("data.redact.kinds=[email, ssn]", "data.redact.kinds"),
        ("data.redact.min_digits=2", "data.redact.min_digits"),
        ("data.redact.mask=true", "unknown config key 'data.redact.mask'"),
    ],
)
def test_config_errors_name_the_key_and_the_pattern(override: str, says: str):
    with pytest.raises(ConfigError, match="data.redact") as info:
        load_config(None, ["train.max_steps=1", override])
    assert says in str(info.value)


def test_prepare_data_keeps_pii_out_of_the_tokenizer_and_the_blocks(tmp_path: Path):
    words = "alpha beta gamma delta epsilon zeta".split()
    paras = [
        f"{' '.join(words[i % 6 :] + words[: i % 6])} write jdoe{i % 3}@corp.example.com "
        f"or call 555-123-45{i:02d} soon"
        for i in range(30)
    ]
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(paras))
    ev = tmp_path / "eval.txt"
    ev.write_text("eval text for alpha beta with x@y.io inside it and some more words")
    cfg = load_config(
        None,
        [
            "train.max_steps=2",
            f"data.path={f}",
            f"data.eval_path={ev}",
            "data.block_size=16",
            "data.tokenizer.vocab_size=400",
            "data.tokenizer.min_frequency=1",
            "data.redact.enabled=true",
        ],
    )
    data = prepare_data(cfg)
    tok = data.tokenizer
    assert not [t for t in tok.get_vocab() for frag in ("jdoe", "corp", "xample", "@c") if frag in t]
    ids = tok.convert_tokens_to_ids(["<EMAIL>", "<PHONE>"])
    assert all(tok.convert_ids_to_tokens(i) in ("<EMAIL>", "<PHONE>") for i in ids)
    text = tok.decode(all_blocks(data.train)["input_ids"].ravel().tolist())
    assert "<EMAIL>" in text and "<PHONE>" in text
    assert "@" not in text and "jdoe" not in text and "555-123" not in text
    assert "<EMAIL>" in tok.decode(all_blocks(data.eval)["input_ids"].ravel().tolist())
    red = data.stats["redacted"]
    assert red["email"] == 31 and red["phone"] == 30 and red["ip"] == 0
    json.dumps(data.stats)  # goes into summary.json as is
    plain = prepare_data(
        load_config(
            None, ["train.max_steps=2", f"data.path={f}", "data.block_size=16", "data.eval_fraction=0.3"]
        )
    )
    assert "redacted" not in plain.stats


def test_prepare_sft_redacts_every_message(tmp_path: Path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "support desk at 10.1.2.3"},
                {"role": "user", "content": f"my mail is u{i}@example.org, fix account {i}"},
                {"role": "assistant", "content": f"done, 5550{i:04d}12 noted"},
            ]
        }
        for i in range(12)
    ]
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            "task=sft",
            "train.max_steps=2",
            f"data.path={f}",
            "data.block_size=128",
            "data.eval_fraction=0.25",
            "data.tokenizer.vocab_size=300",
            "data.redact=true",
        ],
    )
    data = prepare_data(cfg)
    text = data.tokenizer.decode(data.train["input_ids"].ravel().tolist())
    assert "<EMAIL>" in text and "<IP>" in text and "<NUMBER>" in text
    assert "example.org" not in text and "10.1.2.3" not in text
    assert data.stats["redacted"] == {"email": 12, "ip": 12, "phone": 0, "digits": 12}
