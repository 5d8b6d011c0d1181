"""Resume on another worker count: which checkpoints need DeepSpeed's universal conversion, the
conversion's all-or-nothing output, and a real ZeRO-2 checkpoint converted and loaded through
``restore_first_loadable`` (one-rank gloo group, tiny BLOOM, CPU)."""

from __future__ import annotations

import types
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

import bloomray.train.restore as restore_mod
import bloomray.train.universal as universal_mod
from bloomray.config import load_config
from bloomray.model.build import preset_config
from bloomray.train.checkpoint import DS_TAG, load_deepspeed_file, write_checkpoint
from bloomray.train.restore import checkpoint_candidates, restore_first_loadable
from bloomray.train.universal import UNIVERSAL_DIR, convert_to_universal, is_converted, universal_dir

CPU = torch.device("cpu")
VOCAB, SEQ, BATCH = 128, 16, 2


def _ds_dir(tmp_path: Path, names: list[str]) -> Path:
    d = tmp_path / DS_TAG
    d.mkdir(parents=True)
    for name in names:
        (d / name).write_bytes(b"")
    return d


@pytest.mark.parametrize(
    ("names", "partitions"),
    [
        (["mp_rank_00_model_states.pt"], None),  # ZeRO-0, fp32 or bf16: one whole copy
        (
            ["mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))],
            2,
        ),
        (
            [
                "mp_rank_00_model_states.pt",
                *(f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3)),
            ],
            3,
        ),
        (  # ZeRO-3: model states are per rank too
            [
                f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                for r in range(4)
                for kind in ("model", "optim")
            ],
            4,
        ),
    ],
)
def test_saved_partitions_counts_the_optimizer_shards(tmp_path: Path, names: list[str], partitions):
    d = _ds_dir(tmp_path, names)
    assert universal_mod.saved_partitions(d) == partitions
    assert not universal_mod.needs_universal(d, partitions or 1)  # the same count loads the shards directly
    assert universal_mod.needs_universal(d, (partitions or 1) + 1) == (partitions is not None)


def _fake_converter(calls: list[Path], fail: bool = False):
    """A stand-in for DeepSpeed's converter: writes what it writes (``zero/`` and the marker)."""

    def run(src: Path, dst: Path) -> None:
        calls.append(src)
        (dst / "zero").mkdir(parents=True)
        (dst / "zero" / "optimizer_state.pt").write_bytes(b"x")
        if fail:
            raise RuntimeError("shard 1 is damaged")
        (dst.parent / "latest_universal").write_text(dst.name)

    return run


def _checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "checkpoint_000004-abcdef"
    _ds_dir(ckpt, ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
    return ckpt


def test_conversion_renames_a_finished_copy_into_place_and_reuses_it(tmp_path: Path, monkeypatch):
    ckpt, calls = _checkpoint(tmp_path), []
    (ckpt / f".{UNIVERSAL_DIR}-crashed").mkdir()  # what a crash mid-conversion leaves
    monkeypatch.setattr(universal_mod, "run_converter", _fake_converter(calls))
    assert convert_to_universal(ckpt) == universal_dir(ckpt) and is_converted(ckpt)
    assert (universal_dir(ckpt) / DS_TAG / "zero" / "optimizer_state.pt").is_file()
    assert sorted(p.name for p in ckpt.iterdir()) == [DS_TAG, UNIVERSAL_DIR]  # no temp dir left
    convert_to_universal(ckpt)
    assert calls == [ckpt / DS_TAG]  # converted once


def test_a_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    monkeypatch.setattr(universal_mod, "run_converter", _fake_converter([], fail=True))
    with pytest.raises(RuntimeError, match="shard 1 is damaged"):
        convert_to_universal(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [DS_TAG] and not is_converted(ckpt)


def test_a_copy_that_is_not_a_finished_conversion_is_not_overwritten(tmp_path: Path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    (universal_dir(ckpt) / DS_TAG).mkdir(parents=True)  # no marker: not this module's
    monkeypatch.setattr(universal_mod, "run_converter", _fake_converter([]))
    with pytest.raises(RuntimeError, match="no finished universal checkpoint; remove it"):
        convert_to_universal(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == [DS_TAG, UNIVERSAL_DIR]


@pytest.mark.parametrize(
    ("rank", "local_rank", "converts"),
    [(0, 0, [True, True]), (1, 0, [False, True]), (3, 1, [False, False])],  # rank 1: first on node 2
)
def test_rank_zero_converts_then_the_first_rank_of_each_node(monkeypatch, rank, local_rank, converts):
    done: list[bool] = []
    monkeypatch.setattr(universal_mod, "convert_to_universal", lambda d: done.append(True))
    engine = types.SimpleNamespace(global_rank=rank, local_rank=local_rank)
    votes: list[str] = []
    assert universal_mod.convert_on_every_node(engine, "ckpt", lambda err: votes.append(err) or "") == ""
    assert votes == ["", ""] and len(done) == converts.count(True)


def test_a_failed_conversion_is_voted_on_and_stops_every_rank(monkeypatch):
    def broken(d):
        raise OSError("disk full")

    monkeypatch.setattr(universal_mod, "convert_to_universal", broken)
    engine = types.SimpleNamespace(global_rank=0, local_rank=0)
    votes: list[str] = []
    verdict = universal_mod.convert_on_every_node(engine, "ckpt", lambda err: votes.append(err) or err)
    assert verdict == votes[0] == "OSError: disk full" and len(votes) == 1


# ---------------------------------------------------------------------- a real ZeRO-2 checkpoint


def _engine(seed: int):
    from bloomray.train.engine import build_engine

    cfg = load_config(
        None,
        [
            "model.preset=tiny",
            "deepspeed.zero_stage=2",
            "deepspeed.precision=fp32",
            "scaling.num_workers=1",
            f"train.global_batch_size={BATCH}",
            f"train.micro_batch_size={BATCH}",
            "train.max_steps=4",
            f"train.seed={seed}",
        ],
    )
    model_config = preset_config("tiny", VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2).to_dict()
    return build_engine(cfg, model_config, total_steps=4)


def _step(engine, step: int) -> float:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def test_a_zero2_checkpoint_converts_and_loads_through_restore(dist_group, tmp_path: Path, monkeypatch):
    engine, _ = _engine(seed=0)
    for step in (1, 2):
        _step(engine, step)
    ckpt = tmp_path / "checkpoint_000002-abcdef"
    ckpt.mkdir()
    write_checkpoint(engine, ckpt, 2, {"step": 2}, {"restarts": []})
    states = load_deepspeed_file(ckpt / DS_TAG / "mp_rank_00_model_states.pt")
    assert "universal_checkpoint_info" in states  # what DeepSpeed's converter asks of a checkpoint
    expected = [_step(engine, step) for step in (3, 4)]

    # The one-rank group stands in for "another worker count": every rank takes the universal path.
    monkeypatch.setattr(restore_mod, "needs_universal", lambda ds_dir, world: True)
    fresh, _ = _engine(seed=123)  # other init: the weights must come from the checkpoint
    fs = pafs.LocalFileSystem()
    restored = restore_first_loadable(fresh, fs, checkpoint_candidates(fs, str(ckpt)), CPU)
    assert restored.step == 2 and is_converted(ckpt)
    assert fresh._config.load_universal_checkpoint is False  # set for that one load only
    assert [_step(fresh, step) for step in (3, 4)] == pytest.approx(expected, abs=1e-6)
