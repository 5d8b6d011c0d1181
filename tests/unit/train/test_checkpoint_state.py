"""Resume that cannot go wrong silently: pickle-free hook state and checkpoint fallback.

The pure parts (hook-state files, fallback order, validation) run without Ray or DeepSpeed.
The rest drives real single-process DeepSpeed engines (tiny BLOOM, fp32 ZeRO-0, gloo, CPU).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

import bloomray.train.restore as restore_mod
from bloomray.config import load_config
from bloomray.model.build import preset_config
from bloomray.train.checkpoint import DS_TAG, META_FILE, CorruptCheckpointError, write_checkpoint
from bloomray.train.hook_state import (
    HOOKS_META_FILE,
    HOOKS_TENSORS_FILE,
    LEGACY_HOOKS_FILE,
    load_hook_states,
    save_hook_states,
)
from bloomray.train.restore import (
    CheckpointRef,
    checkpoint_candidates,
    fallback_order,
    restore_first_loadable,
    validate_checkpoint_dir,
)

CPU = torch.device("cpu")
VOCAB, SEQ, BATCH = 128, 16, 2
MODEL_STATES = f"{DS_TAG}/mp_rank_00_model_states.pt"

# ---------------------------------------------------------------------- hook state files


def _states() -> list[dict]:
    flat = torch.arange(12, dtype=torch.float32)  # global-scope masks are views of one tensor
    return [
        {
            "masks": {
                "h.0.dense.weight": (torch.arange(6).reshape(2, 3) % 2).bool(),
                "h.1.dense.weight": flat[:6].view(2, 3),
                "h.0.qkv.weight": flat[6:].view(3, 2),
            },
            "taylor": {"h.0.dense.weight": torch.tensor([[1.5, -2.25, 3.0]], dtype=torch.bfloat16)},
            "target": 0.375,
            "note": "kept",
        },
        {"masks": {}, "taylor": {}, "target": 0.0},
    ]


def test_hook_states_round_trip_keeps_values_dtypes_and_order(tmp_path: Path):
    states = _states()
    save_hook_states(tmp_path, states)
    assert sorted(p.name for p in tmp_path.iterdir()) == [HOOKS_META_FILE, HOOKS_TENSORS_FILE]
    back = load_hook_states(tmp_path, CPU)
    assert len(back) == 2
    assert back[0]["target"] == 0.375 and back[0]["note"] == "kept"
    assert back[1] == {"masks": {}, "taylor": {}, "target": 0.0}
    for key in ("masks", "taylor"):
        assert list(back[0][key]) == list(states[0][key])  # order: global top-k ties depend on it
        for name, t in states[0][key].items():
            got = back[0][key][name]
            assert got.dtype == t.dtype and got.device == CPU, name
            assert torch.equal(got, t), name
    # no pickle anywhere: the JSON holds the non-tensor values and the tensor names only
    meta = json.loads((tmp_path / HOOKS_META_FILE).read_text())
    assert meta["hooks"][0]["values"] == {"target": 0.375, "note": "kept"}
    assert meta["hooks"][0]["tensor_dicts"]["taylor"] == ["h.0.dense.weight"]


def test_hook_state_rejects_values_it_cannot_write_back(tmp_path: Path):
    # A bare tensor is neither a tensor dict nor JSON.
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_hook_states(tmp_path, [{"count": torch.tensor([7])}])
    assert not (tmp_path / HOOKS_META_FILE).exists()  # no hooks.json: the partial state never reads as whole
    with pytest.raises(ValueError, match="must not contain '/'"):
        save_hook_states(tmp_path, [{"masks": {"a/b": torch.ones(2)}}])


def test_hook_state_missing_tensor_is_reported(tmp_path: Path):
    save_hook_states(tmp_path, [{"masks": {"a": torch.ones(2), "b": torch.zeros(2)}}])
    from safetensors.torch import save_file

    save_file({"0/masks/a": torch.ones(2)}, tmp_path / HOOKS_TENSORS_FILE)  # "b" lost
    with pytest.raises(CorruptCheckpointError, match=r"lacks hook 0 masks \['b'\]"):
        load_hook_states(tmp_path, CPU)


def test_legacy_hooks_pt_still_reads_and_no_state_is_empty(tmp_path: Path):
    assert load_hook_states(tmp_path, CPU) == []
    torch.save([{"masks": {"w": torch.ones(3)}, "target": 0.5}], tmp_path / LEGACY_HOOKS_FILE)
    back = load_hook_states(tmp_path, CPU)
    assert back[0]["target"] == 0.5 and torch.equal(back[0]["masks"]["w"], torch.ones(3))


@pytest.mark.gpu
def test_hook_states_load_onto_the_given_device(tmp_path: Path):
    cuda = torch.device("cuda", 0)
    save_hook_states(tmp_path, [{"masks": {"w": torch.ones(4, device=cuda)}, "target": 0.5}])
    on_cpu = load_hook_states(tmp_path, CPU)[0]["masks"]["w"]
    on_gpu = load_hook_states(tmp_path, cuda)[0]["masks"]["w"]
    assert on_cpu.device == CPU and on_gpu.device == cuda
    assert torch.equal(on_gpu.cpu(), torch.ones(4))


# ---------------------------------------------------------------------- fallback order


def _ref(name: str, step: int | None) -> CheckpointRef:
    return CheckpointRef(f"/runs/r/{name}", step)


def test_fallback_order_is_latest_then_older_by_step():
    latest = _ref("checkpoint_000003", 40)
    siblings = [
        _ref("checkpoint_000000", 10),
        _ref("checkpoint_000002", 30),
        _ref("checkpoint_000001", 20),
        _ref("checkpoint_000004", 50),  # newer than Ray's latest: an upload cut short
        _ref("checkpoint_000005", None),  # no readable bloomray.json
        latest,
    ]
    order = [r.name for r in fallback_order(latest, siblings)]
    assert order == ["checkpoint_000003", "checkpoint_000002", "checkpoint_000001", "checkpoint_000000"]


def test_fallback_order_uses_the_recorded_step_not_the_name():
    latest = _ref("checkpoint_c", 9)
    order = fallback_order(latest, [_ref("checkpoint_a", 8), _ref("checkpoint_b", 2)])
    assert [r.name for r in order] == ["checkpoint_c", "checkpoint_a", "checkpoint_b"]


def test_fallback_order_with_an_unreadable_latest_falls_back_to_names():
    latest = _ref("checkpoint_000002", None)
    siblings = [_ref("checkpoint_000001", 20), _ref("checkpoint_000003", 5), _ref("checkpoint_000000", 10)]
    order = [r.name for r in fallback_order(latest, siblings)]
    assert order == ["checkpoint_000002", "checkpoint_000001", "checkpoint_000000"]


def test_checkpoint_candidates_lists_siblings_on_a_pyarrow_filesystem(tmp_path: Path):
    for name, step in [("checkpoint_000000", 4), ("checkpoint_000001", 8), ("checkpoint_000002", 12)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / META_FILE).write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint_000003").mkdir()  # no bloomray.json: never a candidate
    (tmp_path / "checkpoint_notes.txt").write_text("a file, not a checkpoint")
    (tmp_path / "other").mkdir()
    refs = checkpoint_candidates(pafs.LocalFileSystem(), str(tmp_path / "checkpoint_000002"))
    assert [(r.name, r.step) for r in refs] == [
        ("checkpoint_000002", 12),
        ("checkpoint_000001", 8),
        ("checkpoint_000000", 4),
    ]
    assert refs[1].path == str(tmp_path / "checkpoint_000001")


# ---------------------------------------------------------------------- real DeepSpeed engines
# (``dist_group``: conftest.py)


def _cfg(seed: int, taylor: bool, extra: list[str]):
    overrides = [
        "model.preset=tiny",
        "deepspeed.zero_stage=0",
        "deepspeed.precision=fp32",
        "scaling.num_workers=1",
        f"train.global_batch_size={BATCH}",
        f"train.micro_batch_size={BATCH}",
        "train.max_steps=8",
        "train.lr=0.01",
        f"train.seed={seed}",
        "prune.method=magnitude",
        "prune.importance=" + ("taylor" if taylor else "magnitude"),
        "prune.schedule=linear",
        "prune.initial_sparsity=0.25",
        "prune.final_sparsity=0.5",
        "prune.start_fraction=0.5",  # masks at steps 4 and 8, Taylor windows 1-4 and 5-8
        "prune.end_fraction=1.0",
        "prune.update_every=4",
        *extra,
    ]
    return load_config(None, overrides)


# Masks once, at step 2: the checkpoints at steps 2 and 4 both hold masks.
ONE_SHOT_AT_2 = ["prune.schedule=one_shot", "prune.start_fraction=0.25"]


def _build(seed: int = 0, taylor: bool = False, extra: list[str] | None = None):
    """A fresh worker: engine, model and prune hook, as the loop builds them."""
    from bloomray.prune.hook import PruneHook
    from bloomray.train.engine import build_engine

    cfg = _cfg(seed, taylor, extra or [])
    model_config = preset_config("tiny", VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2).to_dict()
    engine, model = build_engine(cfg, model_config, total_steps=8)
    return engine, model, PruneHook(cfg, engine, model, total_steps=8)


def _train(engine, hook, steps: range) -> None:
    """The loop's step order: backward, hooks' before_step, optimizer step, after_step."""
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)  # the data depends on the step only
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        hook.before_step(engine, step)
        engine.step()
        hook.after_step(engine, step)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _save(engine, hook, directory: Path, step: int) -> None:
    directory.mkdir(parents=True)
    write_checkpoint(
        engine, directory, step, {"step": step}, {"restarts": []}, None, None, [hook.state_dict()]
    )


@pytest.fixture(scope="module")
def two_checkpoints(dist_group, tmp_path_factory):
    """A run dir with checkpoint_000000 (step 2) and checkpoint_000001 (step 4), and step 2's state."""
    run = tmp_path_factory.mktemp("run")
    engine, model, hook = _build(extra=ONE_SHOT_AT_2)
    _train(engine, hook, range(1, 3))
    _save(engine, hook, run / "checkpoint_000000", 2)
    at_two = {"weights": _weights(model), "masks": {n: m.clone() for n, m in hook.masks.items()}}
    _train(engine, hook, range(3, 5))
    _save(engine, hook, run / "checkpoint_000001", 4)
    assert len(at_two["masks"]) == 8  # 4 target matrices in each of 2 blocks
    w = "transformer.h.0.mlp.dense_4h_to_h.weight"
    assert not torch.equal(_weights(model)[w], at_two["weights"][w])  # step 4 differs from step 2
    return run, at_two


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _corrupt(ckpt: Path, how: str) -> str:
    """Damage a checkpoint; returns the words the skip warning must contain."""
    if how == "truncated-ds-file":
        path = ckpt / MODEL_STATES
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "ds/mp_rank_00_model_states.pt is truncated"
    if how == "ds-file-deepspeed-rejects":  # an intact zip that DeepSpeed cannot use
        torch.save({"nothing": torch.zeros(1)}, ckpt / MODEL_STATES)
        return "KeyError"
    if how == "missing-meta":
        (ckpt / META_FILE).unlink()
        return f"no {META_FILE}"
    path = ckpt / HOOKS_TENSORS_FILE  # unreadable hook state
    path.write_bytes(path.read_bytes()[:-16])
    return "SafetensorError"


@pytest.mark.parametrize(
    "how", ["truncated-ds-file", "ds-file-deepspeed-rejects", "missing-meta", "unreadable-hooks"]
)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(how, two_checkpoints, tmp_path, caplog):
    run, at_two = two_checkpoints
    run = _copy(run, tmp_path)
    words = _corrupt(run / "checkpoint_000001", how)
    engine, model, _ = _build(seed=123, extra=ONE_SHOT_AT_2)  # other init: weights must be loaded
    fs = pafs.LocalFileSystem()
    with caplog.at_level(logging.WARNING, logger="bloomray.train.restore"):
        restored = restore_first_loadable(
            engine, fs, checkpoint_candidates(fs, str(run / "checkpoint_000001")), CPU
        )
    step, restarts, hooks = restored.step, restored.restarts, restored.hook_states
    assert restored.meta["step"] == 2  # the checkpoint's own bloomray.json
    assert (step, restarts) == (2, [2])
    assert list(hooks[0]["masks"]) == list(at_two["masks"])
    assert all(torch.equal(hooks[0]["masks"][n], m) for n, m in at_two["masks"].items())
    weights = _weights(model)
    assert all(torch.equal(weights[n], w) for n, w in at_two["weights"].items())
    skips = [r.getMessage() for r in caplog.records if r.name == "bloomray.train.restore"]
    assert len(skips) == 1, skips
    assert "checkpoint_000001" in skips[0] and words in skips[0], skips[0]
    assert "falling back to" in skips[0] and "checkpoint_000000 (step 2)" in skips[0]


def test_fallback_works_on_a_non_local_pyarrow_filesystem(two_checkpoints, tmp_path, caplog):
    """As on S3: siblings listed and read through pyarrow, each candidate downloaded by Ray."""
    run, at_two = two_checkpoints
    run = _copy(run, tmp_path)
    _corrupt(run / "checkpoint_000001", "truncated-ds-file")
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a LocalFileSystem
    refs = checkpoint_candidates(fs, "run/checkpoint_000001")
    assert [(r.path, r.step) for r in refs] == [("run/checkpoint_000001", 4), ("run/checkpoint_000000", 2)]
    engine, model, _ = _build(seed=123, extra=ONE_SHOT_AT_2)
    with caplog.at_level(logging.WARNING, logger="bloomray.train.restore"):
        restored = restore_first_loadable(engine, fs, refs, CPU)
    step, restarts, hooks = restored.step, restored.restarts, restored.hook_states
    assert (step, restarts) == (2, [2])
    assert all(torch.equal(hooks[0]["masks"][n], m) for n, m in at_two["masks"].items())
    weights = _weights(model)
    assert all(torch.equal(weights[n], w) for n, w in at_two["weights"].items())
    (skip,) = [r.getMessage() for r in caplog.records if r.name == "bloomray.train.restore"]
    assert "run/checkpoint_000001 (step 4): ds/mp_rank_00_model_states.pt is truncated" in skip


def _restore_with_fake_peer(monkeypatch, run: Path, peer: list[torch.Tensor]):
    """Restore with vote ``i`` summed with ``peer[i]`` (another rank's part): (step, flags, model)."""
    calls: list[float] = []

    def vote(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        calls.append(t[0].item())  # this rank's own "failed" flag
        return t + peer[len(calls) - 1]

    monkeypatch.setattr(restore_mod, "all_reduce_sum", vote)
    engine, model, _ = _build(seed=123, extra=ONE_SHOT_AT_2)
    fs = pafs.LocalFileSystem()
    refs = checkpoint_candidates(fs, str(run / "checkpoint_000001"))
    return restore_first_loadable(engine, fs, refs, CPU).step, calls, model


def _peer(failed: float, step: float) -> torch.Tensor:
    return torch.tensor([failed, 1.0, step, step * step, 0.0], dtype=torch.float64)  # 0: no conversion


def test_every_rank_moves_on_when_another_rank_fails(two_checkpoints, monkeypatch, caplog):
    """This rank loads step 4, but the other rank's DeepSpeed load fails: both move to step 2."""
    run, at_two = two_checkpoints
    peer = [_peer(0, 4), _peer(1, 4), _peer(0, 2), _peer(0, 2)]
    with caplog.at_level(logging.WARNING, logger="bloomray.train.restore"):
        step, calls, model = _restore_with_fake_peer(monkeypatch, run, peer)
    assert step == 2
    weights = _weights(model)  # step 2's load overwrote everything step 4's had put there
    assert all(torch.equal(weights[n], w) for n, w in at_two["weights"].items())
    assert calls == [0.0, 0.0, 0.0, 0.0]  # this rank itself succeeded at every vote
    (skip,) = [r.getMessage() for r in caplog.records if r.name == "bloomray.train.restore"]
    assert "checkpoint_000001 (step 4): 1 other rank(s) failed to load it" in skip


def test_ranks_that_disagree_on_the_candidate_never_load_it(two_checkpoints, monkeypatch):
    """The other rank's listing says step 5 where this one's says 4: neither loads it."""
    run, _ = two_checkpoints
    step, calls, _ = _restore_with_fake_peer(monkeypatch, run, [_peer(0, 5), _peer(0, 2), _peer(0, 2)])
    assert step == 2
    assert calls == [0.0, 0.0, 0.0]  # no DeepSpeed load of step 4: skipped after the first vote


def test_no_loadable_checkpoint_raises_listing_every_candidate(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints[0], tmp_path)
    _corrupt(run / "checkpoint_000001", "truncated-ds-file")
    _corrupt(run / "checkpoint_000000", "unreadable-hooks")
    engine, _, _ = _build(extra=ONE_SHOT_AT_2)
    fs = pafs.LocalFileSystem()
    refs = checkpoint_candidates(fs, str(run / "checkpoint_000001"))
    with pytest.raises(RuntimeError) as err:
        restore_first_loadable(engine, fs, refs, CPU)
    lines = str(err.value).splitlines()
    assert lines[1] == f"  {run / 'checkpoint_000001'} (step 4): {DS_TAG}/mp_rank_00_model_states.pt " + (
        "is truncated or damaged (File is not a zip file)"
    )
    assert lines[2].startswith(f"  {run / 'checkpoint_000000'} (step 2): SafetensorError"), lines[2]
    assert len(lines) == 4  # header, two candidates, what to do


def test_validate_accepts_a_whole_checkpoint(two_checkpoints):
    run, _ = two_checkpoints
    assert validate_checkpoint_dir(run / "checkpoint_000000")["step"] == 2


def test_taylor_pruning_resumed_mid_window_gives_the_same_masks(dist_group, tmp_path):
    """Kill after step 6 (mid Taylor window 5-8), resume, finish: masks equal an unbroken run's."""
    engine, model, hook = _build(taylor=True)
    _train(engine, hook, range(1, 9))
    unbroken_masks, unbroken_weights = hook.masks, _weights(model)

    engine, _, hook = _build(taylor=True)
    _train(engine, hook, range(1, 7))
    assert sorted(hook.taylor) == sorted(hook.names)  # mid-window: scores accumulated, not yet used
    taylor_at_six = {n: t.clone() for n, t in hook.taylor.items()}
    _save(engine, hook, tmp_path / "checkpoint_000000", 6)
    del engine, hook

    def resume(drop_taylor: bool = False):
        engine, model, hook = _build(seed=7, taylor=True)  # a fresh worker, other init
        fs = pafs.LocalFileSystem()
        refs = checkpoint_candidates(fs, str(tmp_path / "checkpoint_000000"))
        restored = restore_first_loadable(engine, fs, refs, CPU)
        step, states = restored.step, restored.hook_states
        if drop_taylor:
            states[0]["taylor"] = {}
        hook.load_state_dict(states[0])
        _train(engine, hook, range(step + 1, 9))
        return hook, model, states[0]

    hook, model, state = resume()
    assert all(torch.equal(state["taylor"][n], t) for n, t in taylor_at_six.items())
    assert list(hook.masks) == list(unbroken_masks)
    for n, m in unbroken_masks.items():
        assert torch.equal(hook.masks[n], m), n
    weights = _weights(model)
    # Not bit-equal: DeepSpeed's CPU Adam (the CPU default) recomputes its bias corrections
    # as beta**step after a load, where the unbroken run multiplied them up step by step.
    for n, w in unbroken_weights.items():
        torch.testing.assert_close(weights[n], w, rtol=1e-5, atol=1e-6, msg=n)
    # The control: without the saved scores the resumed masks differ, so the check above can fail.
    hook, _, _ = resume(drop_taylor=True)
    assert any(not torch.equal(hook.masks[n], m) for n, m in unbroken_masks.items())


# ---------------------------------------------------------------------- compiled engine


def test_compiled_engine_trains_and_checkpoints_like_the_eager_one(dist_group, tmp_path):
    """``train.compile=true``: same masks, weights within fp32 reordering, same saved names."""
    eager, eager_model, eager_hook = _build(extra=ONE_SHOT_AT_2)
    _train(eager, eager_hook, range(1, 5))
    compiled, compiled_model, compiled_hook = _build(extra=[*ONE_SHOT_AT_2, "train.compile=true"])
    assert compiled.is_compiled and not eager.is_compiled
    _train(compiled, compiled_hook, range(1, 5))
    assert all(torch.equal(compiled_hook.masks[n], m) for n, m in eager_hook.masks.items())
    weights = _weights(compiled_model)
    for n, w in _weights(eager_model).items():
        torch.testing.assert_close(weights[n], w, rtol=1e-4, atol=1e-5, msg=n)
    _save(eager, eager_hook, tmp_path / "eager", 4)
    _save(compiled, compiled_hook, tmp_path / "compiled", 4)
    from bloomray.train.checkpoint import load_deepspeed_file

    names = [
        sorted(load_deepspeed_file(tmp_path / d / MODEL_STATES)["module"]) for d in ("eager", "compiled")
    ]
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])
