"""Recovery with distillation on real Ray + DeepSpeed: a student that starts as its teacher
(``model.path``), is pruned to 50% at the first step and trains against the frozen teacher. The
KL to the teacher falls as it recovers, and the masks hold, under ZeRO-2 and under ZeRO-3 (where
the teacher is a partitioned ZeRO-3 inference engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serve_helpers import make_model_dirs
from tb_helpers import scalars

from bloomray.config import load_config
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


@pytest.mark.parametrize("stage", [2, 3])
def test_distillation_recovers_toward_the_teacher_and_masks_hold(teacher, tmp_path, ray_local, stage: int):
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
            "prune.method=magnitude",
            "prune.schedule=one_shot",
            "prune.final_sparsity=0.5",
            "prune.start_fraction=0.0",
            "prune.distill.enabled=true",
            "prune.distill.alpha=1.0",  # the KL alone: the teacher is a random model, not the data's
            "prune.distill.temperature=1.0",
        ],
    )
    summary = run_training(cfg, tmp_path / "run")
    kd = kd_points(tmp_path / "run")
    assert sorted(kd) == list(range(2, 17, 2)), kd
    # step 1 trains the unpruned student (KL 0); the masks come after it and move the student
    # off its teacher; from there it recovers
    first, last = kd[4], kd[16]
    assert first > 1e-3 and last < 0.7 * first, kd
    model = load_model(summary["model_dir"])
    params = dict(model.named_parameters())
    for name in target_names(model, TARGETS):
        zeros = (params[name] == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=1e-3), name
    assert torch.isfinite(torch.tensor(summary["eval_loss"]))
