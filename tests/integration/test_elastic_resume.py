"""Elastic resume: a run checkpointed on 2 workers continues on 1 worker from the same global
sample offset. Per-step loss matches the uninterrupted 2-worker run (fp32, ZeRO-0: the optimizer
state is whole), and the sample audit shows every example of the schedule seen exactly once."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from tb_helpers import scalars

from bloomray.config import load_config
from bloomray.export.run import run_training
from bloomray.train.run import resume_config

pytestmark = pytest.mark.integration

STEPS, GLOBAL = 8, 16
ELASTIC = [
    "model.preset=tiny",
    "data.tokenizer.vocab_size=512",
    "data.block_size=32",
    "data.eval_fraction=0.1",
    "deepspeed.zero_stage=0",
    "deepspeed.precision=fp32",
    "scaling.num_workers=2",  # global 16 = 2 workers x micro 4 x 2 accumulation steps
    "train.micro_batch_size=4",
    f"train.global_batch_size={GLOBAL}",
    "train.lr_schedule=constant",  # so extending max_steps on the resume keeps every step's LR
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.eval_every=100",
    "train.eval_max_batches=1",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=4",
    "train.log_sample_ids=true",
    "output.export=false",
]


def losses(out: Path) -> dict[int, float]:
    return scalars(out, "train_loss")


def audit(out: Path) -> dict[int, list[int]]:
    """{step: every example id of that step, over all ranks and attempts} from the sample logs."""
    per_step: dict[int, list[int]] = defaultdict(list)
    for f in (out / "logs" / "samples").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            per_step[row["step"]] += row["ids"]
    return dict(per_step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("elastic")
    text = root / "notes.txt"
    text.write_text(
        "\n\n".join(f"Note {i}: the quick brown fox {i % 7} jumps over dog {i}." for i in range(1500))
    )
    base = [*ELASTIC, f"data.path={text}"]
    whole = root / "whole"
    run_training(load_config("tiny-cpu", [*base, f"train.max_steps={STEPS}"]), whole)
    elastic = root / "elastic"
    run_training(
        load_config("tiny-cpu", [*base, "train.max_steps=4"]), elastic
    )  # stops after step 4's checkpoint
    resumed = run_training(
        resume_config(elastic, ["scaling.num_workers=1", f"train.max_steps={STEPS}"]), elastic, resume=True
    )
    return {"whole": whole, "elastic": elastic, "summary": resumed}


def test_resumed_on_one_worker_continues_the_two_worker_loss_curve(runs):
    whole, elastic = losses(runs["whole"]), losses(runs["elastic"])
    assert sorted(whole) == sorted(elastic) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert elastic[step] == pytest.approx(whole[step], abs=1e-3), (step, whole, elastic)
    assert whole[STEPS] < whole[1]  # it trains
    assert runs["summary"]["steps"] == STEPS


def test_every_example_of_the_schedule_is_seen_once(runs):
    whole, elastic = audit(runs["whole"]), audit(runs["elastic"])
    assert sorted(elastic) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert len(elastic[step]) == GLOBAL and len(set(elastic[step])) == GLOBAL  # 2 ranks, then 1
        assert sorted(elastic[step]) == sorted(whole[step])
    seen = [i for step in range(1, STEPS + 1) for i in elastic[step]]
    assert len(seen) == len(set(seen)) == STEPS * GLOBAL  # within the first epoch: nothing twice
    files = sorted(p.name for p in (runs["elastic"] / "logs" / "samples").glob("*.jsonl"))
    assert len(files) == 3 and sum(f.startswith("rank1-") for f in files) == 1  # rank 1 only before
