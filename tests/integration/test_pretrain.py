"""Pretraining on real Ray (2 CPU workers) + DeepSpeed ZeRO-2 and export (resume: test_resume_contract).

The preset's precision (auto): bf16, fp32 on x86 CPUs without AVX-512 (119 s in bf16 there
against 50 s in fp32); bf16 ZeRO-2 is also trained by test_resume_contract on every CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bloomray.cli import main as cli_main
from bloomray.config import load_config
from bloomray.export.run import run_training
from bloomray.train.engine import compute_dtype
from bloomray.train.run import resume_config

pytestmark = pytest.mark.integration

TINY = [
    "model.preset=tiny",
    "train.max_steps=30",
    "train.log_every=10",
    "train.eval_every=30",
    "train.checkpoint_every=15",
    "train.lr=1e-2",
    "data.tokenizer.vocab_size=1024",
    "data.block_size=64",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    summary = run_training(load_config("tiny-cpu", TINY), out)
    return out, summary


def test_output_contract(pretrained):
    out, summary = pretrained
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_perplexity", "tokens_per_s", "steps"):
        assert on_disk[key] is not None, key
    assert on_disk["steps"] == 30
    assert (out / "model" / "model.safetensors").exists()
    assert (out / "model" / "tokenizer.json").exists()
    assert list((out / "checkpoints").glob("checkpoint_*"))
    assert list((out / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "logs" / "mlflow.db").exists()
    assert on_disk["tokens_per_s"] > 0 and 0 < on_disk["mfu"] < 1
    # rank 0's console lines, one per log step, also in a file (what the quiet demo echoes)
    progress = (out / "logs" / "progress.txt").read_text().splitlines()
    steps = [int(line.split(" | ")[0].removeprefix("[bloomray] step ").split("/")[0]) for line in progress]
    assert {10, 20, 30} <= set(steps) and steps == sorted(set(steps)) and steps[-1] == 30, progress


def test_loss_falls_on_embedded_corpus(pretrained):
    _, summary = pretrained
    uniform = torch.log(torch.tensor(float(summary["data"]["vocab_size"]))).item()
    # A random init starts near log(vocab); training must move eval loss well below that.
    assert abs(summary["initial_eval_loss"] - uniform) < 0.5
    assert summary["eval_loss"] < summary["initial_eval_loss"] - 0.7, summary
    assert summary["train_loss"] < summary["initial_eval_loss"] - 0.7


# The loss curve of the fixture's run (seed 0, TINY): what TensorBoard logged at every log /
# checkpoint step, and the untrained step-0 eval from summary.json. A change to the init,
# optimizer, LR schedule, loss masking or the rank all-reduce moves these. A new data order
# moves them less: re-pinned on 2026-12-04 for the document-hash split and step-addressed
# batches (token shards), which moved the points by 0.1-2.0% (old: 6.6016, 6.1343, 6.0334,
# 5.9874; eval 6.9307, 5.9811).
PINNED_TRAIN_LOSS = {10: 6.6407, 15: 6.0576, 20: 5.9885, 30: 5.8679}
PINNED_EVAL_LOSS = {0: 6.9373, 30: 5.9450}
# bf16 matmuls + gloo all-reduce on CPU: bit-identical between runs on one machine, but
# oneDNN picks bf16 kernels (and accumulation orders) by CPU ISA, which drifts the curve by
# ~1e-3 relative across CPUs; the values are bf16's, and the fp32 run (auto, on CPUs without
# AVX-512) passes within the same bound. 2% relative (~0.12 nats) absorbs both and still fails
# when a point moves by more than about an eighth of the curve's 0.94-nat fall over 30 steps.
LOSS_REL_TOL = 0.02


def test_loss_curve_matches_pinned_values(pretrained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary = pretrained
    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    train = {e.step: e.value for e in events.Scalars("train_loss")}
    evals = {e.step: e.value for e in events.Scalars("eval_loss")}
    evals[0] = summary["initial_eval_loss"]
    assert sorted(train) == sorted(PINNED_TRAIN_LOSS) and sorted(evals) == sorted(PINNED_EVAL_LOSS)
    assert train == pytest.approx(PINNED_TRAIN_LOSS, rel=LOSS_REL_TOL), train
    assert evals == pytest.approx(PINNED_EVAL_LOSS, rel=LOSS_REL_TOL), evals
    assert summary["train_loss"] == pytest.approx(train[30])  # the summary reports the last point
    assert summary["eval_loss"] == pytest.approx(evals[30])


def test_export_reloads_with_matching_logits(pretrained):
    out, summary = pretrained
    assert summary["export_max_abs_logit_diff"] is not None
    assert summary["export_max_abs_logit_diff"] <= 1e-2
    # in the compute dtype the run recorded (the preset's auto: bf16, or fp32 where bf16 is
    # emulated), as the probe's logits were taken
    dtype = compute_dtype(resume_config(out, []))
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    probe = torch.load(Path(summary["checkpoint"]) / "probe.pt")
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits.float()
    assert torch.allclose(logits, probe["logits"], atol=1e-2)
    ids = tok("The for statement", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=5, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 5
    card = (out / "model" / "README.md").read_text()
    assert "steps: 30" in card and "eval_loss" in card and "embedded:pydoc_data.topics" in card


def test_cli_export_is_atomic_and_refuses_overwrite(pretrained, tmp_path, capsys):
    _, summary = pretrained
    target = tmp_path / "exported"
    assert cli_main(["export", "--checkpoint", summary["checkpoint"], "--output", str(target)]) == 0
    assert (target / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    assert cli_main(["export", "--checkpoint", summary["checkpoint"], "--output", str(target)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "not a bloomray checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_new_output_dir_refuses_existing_run(pretrained):
    out, _ = pretrained
    from bloomray.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run_training(load_config("tiny-cpu", TINY), out)
