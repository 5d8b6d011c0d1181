"""Recovery with distillation on real Ray + DeepSpeed: a student that starts as its teacher
(``model.path``), is pruned to 50% and trains against the frozen dense teacher. The KL to the
teacher falls as it recovers, and the masks hold: magnitude pruning after the first step under
ZeRO-2; Wanda (2:4) under ZeRO-0 and SparseGPT under ZeRO-3 (where the teacher is a partitioned
ZeRO-3 inference engine) as the initial masks, one-shot on calibration data before step 1.
Under ZeRO-2/3 the optimizer's fp32 masters hold the zeros too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serve_helpers import make_model_dirs
from tb_helpers import scalars

from bloomray.config import load_config
from bloomray.export.consolidate import consolidated_state_dict
from bloomray.export.load import load_model
from bloomray.export.run import run_training
from bloomray.prune.masks import target_names

pytestmark = pytest.mark.integration

TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def kd_points(out: Path) -> dict[int, float]:
    return scalars(out, "distill_kl")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_model_dirs(tmp_path_factory.mktemp("teacher"))["lm"]


CASES = {
    "zero2-magnitude": (2, ["prune.method=magnitude", "prune.schedule=one_shot", "prune.final_sparsity=0.5"]),
    "zero0-wanda-2to4": (
        0,
        ["prune.method=wanda", "prune.pattern=2:4", "prune.initial_sparsity=0.5", "prune.final_sparsity=0.5"],
    ),
    "zero3-sparsegpt": (
        3,
        [
            "prune.method=sparsegpt",
            "prune.initial_sparsity=0.5",
            "prune.final_sparsity=0.5",
            "prune.blocksize=16",
        ],
    ),
}


def two_four(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every 4 consecutive input columns."""
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


@pytest.mark.parametrize("case", list(CASES))
def test_distillation_recovers_toward_the_teacher_and_masks_hold(teacher, tmp_path, ray_local, case: str):
    stage, prune = CASES[case]
    text = tmp_path / "notes.txt"
    text.write_text(
        "\n\n".join(f"Note {i}: the quick brown fox {i % 9} jumps over the dog." for i in range(600))
    )
    cfg = load_config(
        "tiny-cpu",
        [
            f"model.path={teacher}",
            f"data.path={text}",
            "data.block_size=32",
            "data.eval_fraction=0.1",
            f"deepspeed.zero_stage={stage}",
            "train.max_steps=16",
            "train.micro_batch_size=4",
            "train.global_batch_size=8",
            "train.lr=3e-3",
            "train.warmup_steps=0",
            "train.log_every=2",
            "train.eval_every=16",
            "train.eval_max_batches=1",
            "train.checkpoint_every=16",
            *prune,
            "prune.start_fraction=0.0",
            "prune.calibration_samples=16",
            "prune.distill.enabled=true",
            "prune.distill.alpha=1.0",  # the KL alone: the teacher is a random model, not the data's
            "prune.distill.temperature=1.0",
        ],
    )
    summary = run_training(cfg, tmp_path / "run")
    kd = kd_points(tmp_path / "run")
    assert sorted(kd) == list(range(2, 17, 2)), kd
    # magnitude: step 1 trains the unpruned student (KL 0), the masks come after it and move the
    # student off its teacher. One-shot: the student starts pruned, the teacher stays the dense
    # model.path (else the KL would start at 0). From there it recovers.
    # (SparseGPT's weight updates keep the pruned student close: its KL starts ~10x lower.)
    first, last = (kd[4], kd[16]) if stage == 2 else (kd[2], kd[16])
    assert first > (1e-3 if stage == 2 else 2e-4) and last < 0.7 * first, kd
    model = load_model(summary["model_dir"])
    params = dict(model.named_parameters())
    # ZeRO-2/3: the optimizer's fp32 masters themselves (what a resume continues from) keep the
    # zeros, not only the exported weights (ZeRO-0's bf16 masters: test_prune_train).
    masters = consolidated_state_dict(Path(summary["checkpoint"])) if stage else None
    initial = None
    if stage != 2:  # the one-shot initial model: pruned at 0.5, and every zero of it still zero
        facts = json.loads((tmp_path / "run" / "oneshot" / "oneshot.json").read_text())
        assert facts["method"] == prune[0].split("=")[1] and facts["sparsity"] == pytest.approx(0.5, abs=1e-3)
        initial = dict(load_model(tmp_path / "run" / "oneshot").named_parameters())
    for name in target_names(model, TARGETS):
        zeros = (params[name] == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=1e-3), name
        if masters is not None:
            assert torch.equal(masters[name] == 0, params[name] == 0), (
                f"{name}: the optimizer revived weights"
            )
        if initial is not None:
            assert bool((params[name][initial[name] == 0] == 0).all()), (
                f"{name}: a one-shot pruned weight came back"
            )
        if "pattern=2:4" in " ".join(prune):
            assert two_four(params[name]), name
    assert torch.isfinite(torch.tensor(summary["eval_loss"]))


def test_a_classifier_recovers_from_wanda_masks_calibrated_on_its_sentences(tmp_path, ray_local):
    """Initial Wanda masks of a classifier (calibration: its train sentences' tokens, packed), then
    distillation from the dense classifier on the label distribution; the masks hold."""
    clf = make_model_dirs(tmp_path / "models")["clf"]  # labels negative / positive
    rows = "".join(
        f"the {w} film was {('dull', 'fine')[i % 2]} and {w} {i % 7}\t{('negative', 'positive')[i % 2]}\n"
        for i, w in enumerate(["quick", "slow", "bright", "grey"] * 60)
    )
    data = tmp_path / "reviews.tsv"
    data.write_text("text\tlabel\n" + rows)
    cfg = load_config(
        "classify-tiny-cpu",
        [
            f"model.path={clf}",
            f"data.path={data}",
            "data.block_size=16",
            "train.max_steps=12",
            "train.micro_batch_size=8",
            "train.global_batch_size=16",
            "train.lr=3e-3",
            "train.warmup_steps=0",
            "train.log_every=2",
            "train.eval_every=12",
            "train.checkpoint_every=12",
            "prune.method=wanda",
            "prune.initial_sparsity=0.5",
            "prune.final_sparsity=0.5",
            "prune.start_fraction=0.0",
            "prune.calibration_samples=8",
            "prune.distill.enabled=true",
            "prune.distill.alpha=1.0",
            "prune.distill.temperature=1.0",
        ],
    )
    summary = run_training(cfg, tmp_path / "run")
    facts = json.loads((tmp_path / "run" / "oneshot" / "oneshot.json").read_text())
    assert (facts["method"], facts["calibration_samples"], facts["block_size"]) == ("wanda", 8, 16)
    assert facts["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0.0 <= facts["eval_accuracy_after"] <= 1.0 and "eval_accuracy_before" in facts
    kd = kd_points(tmp_path / "run")
    assert sorted(kd) == list(range(2, 13, 2)) and kd[2] > 0, kd  # the pruned student is off its teacher
    model = load_model(summary["model_dir"])
    assert type(model).__name__ == "BloomForSequenceClassification"
    params = dict(model.named_parameters())
    initial = dict(load_model(tmp_path / "run" / "oneshot").named_parameters())
    for name in target_names(model, TARGETS):  # Wanda's zeros (half of every row) all still zero
        assert (initial[name] == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6), name
        assert bool((params[name][initial[name] == 0] == 0).all()), f"{name}: a pruned weight came back"
    assert summary["sparsity"] == pytest.approx(0.5, abs=2e-3)  # the schedule's re-ranking moves a few
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
