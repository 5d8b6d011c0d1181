"""A 4-trial Ray Tune search with ASHA on the tiny preset: outputs, retries, winner selection."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bloomray.config import ConfigError, load_config
from bloomray.export.load import load_model
from bloomray.model.build import count_parameters
from bloomray.tune.driver import run_tune

pytestmark = pytest.mark.integration

SMALL_SEARCH = [
    "model.preset=tiny",
    "data.tokenizer.vocab_size=512",
    "data.block_size=32",
    "train.max_steps=16",
    "train.log_every=4",
    "train.checkpoint_every=16",
    "train.eval_max_batches=2",
    "prune.update_every=2",
    "tune.num_samples=1",
    "tune.search=grid",
    "tune.grace_period=3",
    "train.max_failures=0",
    "tune.max_concurrent_trials=2",  # 2 trials at a time: Ray's start-ups overlap
    "scaling.num_workers=1",  # the search is tested, not the trial (2-worker runs: everywhere else)
    "prune.final_sparsity=0.75",
    # Two trials, two global batches. 65536 blocks per step is more than the corpus holds,
    # which only the trial can find out (it depends on the data), so that trial fails on every
    # attempt, is retried, then reported. (Choosing among several finished trials: the
    # resume and NSGA-II searches below.)
    "tune.space={train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}, "
    "train.global_batch_size: {type: grid, values: [16, 65536]}}",
]


@pytest.fixture(scope="module")
def search(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("tune") / "search"
    cfg = load_config("tune-tiny-cpu", SMALL_SEARCH)
    return out, run_tune(cfg, out)


def test_search_writes_every_output(search):
    out, summary = search
    for name in ("trials.csv", "pareto.png", "lr_vs_quality.png", "summary.json", "winner/README.md"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 2
    assert {r["status"] for r in rows} == {"COMPLETED", "ERROR"}
    assert sum(r["winner"] == "True" for r in rows) == 1
    assert json.loads((out / "summary.json").read_text())["winner_dir"] == str(out / "winner")


def test_failed_trials_are_retried_and_reported(search):
    out, summary = search
    rows = list(csv.DictReader((out / "trials.csv").open()))
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert len(failed) == 1
    assert all(r["train.global_batch_size"] == "65536" for r in failed)
    assert all(int(r["attempts"]) == 2 for r in failed)  # first try + tune.max_failures=1 retry
    assert all("global_batch_size" in r["error"] for r in failed)
    assert {f["trial_id"] for f in summary["failed"]} == {r["trial_id"] for r in failed}
    assert summary["completed"] == 1 and summary["stopped_early"] == 0


def test_winner_is_a_smaller_faster_servable_model(search):
    out, summary = search
    winner = load_model(out / "winner")
    source = load_model(
        next(r for r in csv.DictReader((out / "trials.csv").open()) if r["winner"] == "True")["model_dir"]
    )
    assert count_parameters(winner) == count_parameters(source)  # winner/ is a copy of that trial's export
    config = json.loads((out / "winner" / "config.json").read_text())
    assert "bloomray_compact" in config  # structured pruning compacted into smaller shapes
    full = config["n_head"] * config["n_layer"]
    assert sum(len(h) for h in config["bloomray_compact"]["heads"]) < full
    assert summary["winner"]["latency_ms"] > 0 and summary["winner"]["eval_loss"] is not None
    ids = torch.randint(0, config["vocab_size"], (1, 8))
    assert winner.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape == (1, 12)
    card = (out / "winner" / "README.md").read_text()
    assert "Selected by bloomray tune" in card and "## Pruning" in card


def test_impossible_range_fails_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="low=0.1 must be below high=0.01"):
        load_config("tune-tiny-cpu", ["tune.space={train.lr: {type: loguniform, low: 0.1, high: 0.01}}"])
    cfg = load_config("tune-tiny-cpu", ["tune.space={data.block_size: {type: choice, values: [64, 128]}}"])
    with pytest.raises(ConfigError, match="cannot vary per trial"):
        run_tune(cfg, tmp_path / "x")
    cfg = load_config(
        "tune-tiny-cpu", ["tune.space={prune.final_sparsity: {type: choice, values: [0.5, 1.5]}}"]
    )
    with pytest.raises(ConfigError, match="1.5"):
        run_tune(cfg, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# Three trials that all finish (FIFO: none stopped early), two at a time, one worker and
# 8 steps each.
RESUME_SEARCH = [
    *SMALL_SEARCH[:3],
    "scaling.num_workers=1",
    "train.max_steps=8",
    "train.log_every=4",
    "train.checkpoint_every=8",
    "train.eval_max_batches=2",
    "prune.update_every=2",
    "tune.search=grid",
    "tune.num_samples=1",
    "tune.scheduler=fifo",
    "train.max_failures=0",
    "tune.max_concurrent_trials=2",
    "tune.space={prune.final_sparsity: {type: grid, values: [0.25, 0.5, 0.75]}}",
]


def _bloomray(log: Path, *args: str) -> subprocess.Popen:
    """``python -m bloomray.cli ARGS`` as its own Ray driver on the test Ray, output to ``log``."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "bloomray.cli", *args], env=env, stdout=f, stderr=subprocess.STDOUT
        )


def _finished_trials(out: Path) -> dict[str, str]:
    """{trial_id: its summary.json}: the last file a trial writes (after its export)."""
    return {p.parent.name: p.read_text() for p in (out / "trials").glob("*/summary.json")}


def test_resume_after_the_driver_is_killed_mid_search(tmp_path, ray_local):
    """SIGKILL the search driver once 2 of the 3 trials have finished; ``bloomray tune --resume``
    keeps those two (not re-run: one attempt each, results untouched), runs the third, and
    picks a winner among all three. The trials run two at a time, so the third cannot have
    finished when the second does (it starts only when the first ends)."""
    out, log = tmp_path / "search", tmp_path / "driver.log"
    sets = [a for o in RESUME_SEARCH for a in ("--set", o)]
    driver = _bloomray(log, "tune", "--config", "tune-tiny-cpu", "--output", str(out), *sets)
    deadline = time.time() + 600
    while driver.poll() is None and len(_finished_trials(out)) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert driver.poll() is None, f"the driver exited ({driver.returncode}):\n{log.read_text()[-3000:]}"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = _finished_trials(out)
    assert len(finished) == 2, (list(finished), log.read_text()[-3000:])

    resumed = _bloomray(log, "tune", "--resume", str(out))
    assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["completed"] == 3 and not summary["failed"], summary
    rows = {r["trial_id"]: r for r in csv.DictReader((out / "trials.csv").open())}
    assert set(finished) < set(rows) and {r["status"] for r in rows.values()} == {"COMPLETED"}
    for trial_id, before in finished.items():
        assert (out / "trials" / trial_id / "attempts").read_text() == "1", f"{trial_id} was re-run"
        assert (out / "trials" / trial_id / "summary.json").read_text() == before
        assert float(rows[trial_id]["eval_loss"]) == json.loads(before)["eval_loss"]
    assert len(_finished_trials(out)) == 3
    assert summary["winner"]["trial_id"] in rows and (out / "winner" / "config.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run_tune(load_config("tune-tiny-cpu", RESUME_SEARCH), out)


def test_two_objective_nsga2_search_writes_its_pareto_front_and_winner(tmp_path, ray_local):
    cfg = load_config(
        "tune-tiny-cpu",
        [
            *SMALL_SEARCH[:3],
            "scaling.num_workers=1",  # what is tested is the search algorithm, not the trial
            "train.max_steps=8",
            "train.log_every=4",
            "train.checkpoint_every=8",
            "train.eval_max_batches=2",
            "prune.update_every=2",
            "tune.search=optuna",
            "tune.scheduler=fifo",
            "tune.objectives=[eval_loss, size_mb]",
            "tune.num_samples=3",
            "tune.max_concurrent_trials=3",  # all at once: the trials' start-ups overlap
            "tune.space={train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}, "
            "prune.final_sparsity: {type: uniform, low: 0.2, high: 0.7}}",
        ],
    )
    out = tmp_path / "mo"
    summary = run_tune(cfg, out)
    assert summary["objectives"] == ["eval_loss", "size_mb"] and summary["completed"] == 3
    rows = {r["trial_id"]: r for r in csv.DictReader((out / "trials.csv").open())}
    assert len({r["train.lr"] for r in rows.values()}) == 3  # NSGA-II proposed three points
    pts = {tid: (float(r["eval_loss"]), float(r["size_mb"])) for tid, r in rows.items()}

    def beats(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    front = set(summary["pareto_front"])
    assert front == {t for t, r in rows.items() if r["pareto"] == "True"}
    for tid, p in pts.items():  # on the front exactly when no trial beats it on both objectives
        assert (tid in front) == (not any(beats(q, p) for q in pts.values())), (tid, pts)
    assert (
        summary["winner"]["trial_id"] in front
        and "Pareto front of eval_loss, size_mb" in summary["selection"]
    )
    # every objective was in the trial's one report (no intermediate ones for the sampler to miss)
    for tid in rows:
        results = (next((out / "tune").glob(f"*{tid}*")) / "result.json").read_text().splitlines()
        assert len(results) == 1 and {"eval_loss", "size_mb"} <= set(json.loads(results[0]))
    assert (out / "winner" / "config.json").exists()
