"""The resume contract end to end: a 10-step run extended to 20 steps by ``--resume``.

The resumed run continues the LR schedule where the checkpoint left it (every logged step's
LR is ``lr_multiplier`` of the recorded segments), keeps the run's tokenizer, may change the
worker count (1 → 2: its bf16 ZeRO-2 checkpoint goes through DeepSpeed's universal checkpoint),
and a resume that changes a setting the checkpoint depends on stops with a ConfigError before
any Ray work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bloomray.export.run as job_module
import bloomray.train.run as run_module
from bloomray.config import ConfigError, load_config
from bloomray.export.run import run_training
from bloomray.files import hash_dir
from bloomray.train.engine import lr_multiplier
from bloomray.train.resume import latest_checkpoint_meta
from bloomray.train.run import checkpoint_location, resume_config

pytestmark = pytest.mark.integration

TEN_STEPS = [
    "model.preset=tiny",
    "data.tokenizer.vocab_size=1024",
    "data.block_size=64",
    "scaling.num_workers=1",  # global 16 = micro 8 x 2 accumulation steps
    "train.max_steps=10",
    "train.log_every=1",  # every step's LR reaches TensorBoard
    "train.eval_every=10",
    "train.eval_max_batches=1",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=4",  # all of 5, 10, 15, 20 stay
    "output.export=false",
    "deepspeed.precision=bf16",  # the preset's auto is fp32 on CPUs without AVX-512
]


def _checkpoint_metas(out: Path) -> dict[int, dict[str, Any]]:
    """{step: bloomray.json} of every checkpoint kept in ``OUTPUT/checkpoints``."""
    metas = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("checkpoint_*/bloomray.json")]
    return {m["step"]: m for m in metas}


def _logged(out: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` scalar in the run's TensorBoard logs (all segments)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    points = []
    for path in sorted((out / "logs" / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():  # scalars come back as 0-d tensors
            points += [
                (event.step, float(make_ndarray(v.tensor))) for v in event.summary.value if v.tag == tag
            ]
    return sorted(points)


def write_notes(path: Path) -> Path:
    """What a new user tries first: ``data.path`` at any plain text file (blank-line documents)."""
    path.write_text(
        "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i}." for i in range(400))
    )
    return path


@pytest.fixture(scope="module")
def extended(tmp_path_factory, ray_local) -> dict[str, Any]:
    """The 10-step run on a plain text file and its state before the resume."""
    root = tmp_path_factory.mktemp("resume")
    out = (root / "run").resolve()
    text = write_notes(root / "notes.txt")
    cfg = load_config("tiny-cpu", [*TEN_STEPS, f"data.path={text}"])
    first = run_training(cfg, out)
    assert first["data"]["source"] == str(text) and first["data"]["documents"] == 400  # one per paragraph
    before = {"summary": first, "tokenizer_hash": hash_dir(out / "tokenizer")}
    return {"out": out, "cfg": cfg, "before": before}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.micro_batch_size=4", "micro_batch_size: 8 → 4; resume with train.micro_batch_size=8"),
        ("data.block_size=32", "block_size: 64 → 32; resume with data.block_size=64"),
        # the worker count may change (the resume below), the optimizer's precision may not
        ("deepspeed.precision=fp32", "precision: bf16 → fp32; resume with deepspeed.precision=bf16"),
    ],
)
def test_changed_setting_stops_before_ray(extended, monkeypatch, override: str, expected: str):
    out = extended["out"]
    step = latest_checkpoint_meta(*checkpoint_location(extended["cfg"], out))["step"]
    config_yaml = (out / "config.yaml").read_text()
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*"))

    def no_ray(*args: Any, **kwargs: Any) -> None:
        pytest.fail(f"Ray work started for a resume with {override}")

    monkeypatch.setattr(run_module, "init_ray", no_ray)
    monkeypatch.setattr(job_module, "train_prepared", no_ray)
    with pytest.raises(ConfigError) as err:
        run_training(resume_config(out, [override, "train.max_steps=20"]), out, resume=True)
    msg = str(err.value)
    assert expected in msg and f"step {step}" in msg
    if override.startswith("data.block_size"):  # the packed data changes with it
        assert "data_fingerprint: " in msg and msg.count("\n  ") == 2, msg
    else:
        assert msg.count("\n  ") == 1, msg  # only the changed setting is listed
    # Nothing of the run changed: its saved config and its checkpoints are as they were.
    assert (out / "config.yaml").read_text() == config_yaml
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*")) == checkpoints


@pytest.fixture(scope="module")
def resumed(extended) -> dict[str, Any]:
    """The resume of the 10-step run to 20 steps (after the refused resumes above), on 2 workers:
    the 1-worker bf16 ZeRO-2 checkpoint goes through DeepSpeed's universal checkpoint."""
    out = extended["out"]
    summary = run_training(
        resume_config(out, ["train.max_steps=20", "scaling.num_workers=2"]), out, resume=True
    )
    return {**extended, "summary": summary}


def test_resume_continues_from_step_ten(resumed):
    assert resumed["before"]["summary"]["steps"] == 10
    assert resumed["summary"]["steps"] == 20
    assert resumed["summary"]["restarts"] == [10]
    metas = _checkpoint_metas(resumed["out"])
    assert sorted(metas) == [5, 10, 15, 20]
    assert metas[10]["lr_segments"] == [[0, 10]]
    assert metas[20]["lr_segments"] == [[0, 10], [10, 20]]
    assert metas[20]["resume_contract"]["total_steps"] == 20


def test_resume_on_two_workers_converted_the_one_worker_checkpoint(resumed):
    metas = _checkpoint_metas(resumed["out"])
    assert [metas[s]["resume_contract"]["world_size"] for s in (5, 10, 15, 20)] == [1, 1, 2, 2]
    saved = metas[10]["resume_contract"]
    assert (saved["zero_stage"], saved["precision"]) == (2, "bf16")  # partitioned per worker
    converted = sorted(p.parent.name for p in (resumed["out"] / "checkpoints").glob("checkpoint_*/universal"))
    assert len(converted) == 1 and converted[0].startswith("checkpoint_000010-")  # only the one resumed from


def test_lr_follows_the_recorded_segments_across_the_resume(resumed):
    cfg, out = resumed["cfg"], resumed["out"]
    segments = _checkpoint_metas(out)[20]["lr_segments"]
    t = cfg.train

    def expected(step: int) -> float:
        return t.lr * lr_multiplier(step, t.lr_schedule, t.warmup_steps, segments)

    logged = _logged(out, "lr")
    assert [s for s, _ in logged] == list(range(1, 21))  # each step once: no step re-run
    for step, lr in logged:  # TensorBoard stores float32
        assert lr == pytest.approx(expected(step), rel=1e-6, abs=1e-12), step
    # The 10-step cosine had ended at LR 0: the extension warms up again from there (continuous,
    # no step at LR 0 after the resume), then decays to 0 at the new end.
    assert dict(logged)[10] == pytest.approx(0.0, abs=1e-12)
    rewarm = max(1, t.warmup_steps)
    for k in range(1, rewarm + 1):
        assert dict(logged)[10 + k] == pytest.approx(t.lr * k / rewarm, rel=1e-6), 10 + k
    after = [lr for s, lr in logged if s >= 10 + rewarm]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False)) and after[-1] < 1e-9
    # The checkpoint metas report the same LRs (what the summary's metrics come from).
    metas = _checkpoint_metas(out)
    assert {s: m["metrics"]["lr"] for s, m in metas.items()} == pytest.approx(
        {s: expected(s) for s in metas}, rel=1e-9, abs=1e-15
    )


def test_resume_keeps_the_tokenizer(resumed):
    out, before = resumed["out"], resumed["before"]
    assert hash_dir(out / "tokenizer") == before["tokenizer_hash"]
    contract = latest_checkpoint_meta(*checkpoint_location(resumed["cfg"], out))["resume_contract"]
    assert contract["tokenizer_hash"] == before["tokenizer_hash"]
