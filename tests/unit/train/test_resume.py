"""The resume contract: what a checkpoint records and which changes a resume refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from bloomray.config import ConfigError, load_config
from bloomray.data.packing import ArrayBlocks
from bloomray.files import hash_dir
from bloomray.train.resume import (
    ResumeContract,
    check_resume,
    check_tokenizer_settings,
    extend_lr_segments,
    fingerprint_sources,
    latest_checkpoint_meta,
)

BASE = ResumeContract(
    world_size=2,
    block_size=128,
    micro_batch_size=4,
    global_batch_size=16,
    train_seed=0,
    data_seed=0,
    data_fingerprint="a" * 64,
    tokenizer_hash="b" * 64,
    total_steps=30,
)


def test_unchanged_or_longer_run_resumes():
    check_resume(BASE.to_dict(), BASE, step=20)
    check_resume(BASE.to_dict(), dataclasses.replace(BASE, total_steps=60), step=20)


@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("block_size", 64, "data.block_size=128"),
        ("micro_batch_size", 2, "train.micro_batch_size=4"),
        ("global_batch_size", 32, "train.global_batch_size=16"),
        ("train_seed", 1, "train.seed=0"),
        ("data_seed", 3, "data.seed=0"),
        ("data_fingerprint", "c" * 64, "original data"),
        ("tokenizer_hash", "d" * 64, "tokenizer"),
    ],
)
def test_each_changed_setting_is_named_with_its_fix(field: str, value, fix: str):
    with pytest.raises(ConfigError) as err:
        check_resume(BASE.to_dict(), dataclasses.replace(BASE, **{field: value}), step=20)
    msg = str(err.value)
    assert f"{field}:" in msg and fix in msg and "step 20" in msg
    assert msg.count("\n  ") == 1  # only the changed field is listed


def test_a_field_older_checkpoints_lack_is_not_checked():
    saved = BASE.to_dict()
    del saved["block_size"]  # recorded only since block_size joined the contract
    check_resume(saved, dataclasses.replace(BASE, block_size=64), step=20)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check_resume(saved, dataclasses.replace(BASE, block_size=64, micro_batch_size=2), step=20)


def test_total_below_the_checkpoint_step_is_refused():
    with pytest.raises(ConfigError, match="at least 20"):
        check_resume(BASE.to_dict(), dataclasses.replace(BASE, total_steps=10), step=20)


def test_fingerprint_sees_every_token_the_dtype_and_the_split():
    def blocks(a: np.ndarray) -> ArrayBlocks:
        return ArrayBlocks({"input_ids": a})

    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    ev = blocks(np.zeros((1, 4), dtype=np.int64))
    a = fingerprint_sources(blocks(ids), ev)
    assert fingerprint_sources(blocks(ids.copy()), ev) == a
    one_token = ids.copy()
    one_token[2, 3] = 99
    assert fingerprint_sources(blocks(one_token), ev) != a
    assert fingerprint_sources(blocks(ids.astype(np.int32)), ev) != a
    assert fingerprint_sources(ev, blocks(ids)) != a  # train and eval swapped


def test_hash_dir_changes_with_a_file(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text("{}")
    before = hash_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"x": 1}')
    assert hash_dir(tmp_path) != before


def test_latest_checkpoint_meta_is_the_newest_with_metadata(tmp_path: Path):
    assert latest_checkpoint_meta(str(tmp_path), "run") is None
    run = tmp_path / "run"
    for name, step in (
        ("checkpoint_2026-12-01_10-00-00.000001", 10),
        ("checkpoint_2026-12-01_11-00-00.000001", 20),
    ):
        (run / name).mkdir(parents=True)
        (run / name / "bloomray.json").write_text(json.dumps({"step": step}))
    (run / "checkpoint_2026-12-01_12-00-00.000001").mkdir()  # a save that never wrote its metadata
    assert latest_checkpoint_meta(str(tmp_path), "run")["step"] == 20
    assert latest_checkpoint_meta(f"file://{tmp_path}", "run")["step"] == 20  # a URI goes through pyarrow


def test_lr_segments_grow_only_when_the_total_does():
    assert extend_lr_segments(None, 0, 30) == [[0, 30]]
    saved = {"lr_segments": [[0, 30]]}
    assert extend_lr_segments(saved, 20, 30) == [[0, 30]]
    assert extend_lr_segments(saved, 20, 60) == [[0, 30], [20, 60]]


def test_tokenizer_overrides_are_refused_on_resume():
    saved = load_config(None, ["train.max_steps=2"])
    check_tokenizer_settings(saved, load_config(None, ["train.max_steps=9"]))
    with pytest.raises(ConfigError, match="OUTPUT/tokenizer.*data.tokenizer.*'vocab_size': 512"):
        check_tokenizer_settings(
            saved, load_config(None, ["train.max_steps=2", "data.tokenizer.vocab_size=512"])
        )
    with pytest.raises(ConfigError, match="model.path: None → '/x'"):
        check_tokenizer_settings(saved, load_config(None, ["train.max_steps=2", "model.path=/x"]))


@pytest.mark.parametrize(
    ("stage", "precision"), [(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "fp32"), (3, "bf16"), (None, None)]
)  # None: a checkpoint from before the contract recorded them
def test_every_stage_and_precision_resumes_on_another_worker_count(stage, precision):
    saved = dataclasses.replace(BASE, zero_stage=stage, precision=precision)
    for world in (1, 3, 8):  # partitioned state goes through the universal conversion on the workers
        check_resume(saved.to_dict(), dataclasses.replace(saved, world_size=world, total_steps=60), step=5)


def test_the_stage_and_precision_still_cannot_change():
    whole = dataclasses.replace(BASE, zero_stage=0, precision="fp32")
    with pytest.raises(ConfigError, match="zero_stage: 0 → 2; resume with deepspeed.zero_stage=0"):
        check_resume(whole.to_dict(), dataclasses.replace(whole, zero_stage=2), step=5)
    with pytest.raises(ConfigError, match="precision: fp32 → bf16; resume with deepspeed.precision=fp32"):
        check_resume(whole.to_dict(), dataclasses.replace(whole, precision="bf16"), step=5)
