"""The GPU path on the GPUs present: NCCL collectives, the datasheet MFU peak, ZeRO-2/ZeRO-3
runs that finish, export and resume, and pruning under ZeRO-3.

Every test is marked ``gpu``: tests/conftest.py skips them (with the reason) where
``torch.cuda.is_available()`` is false, so on a CPU box this file costs an import. On a GPU
box one GPU is enough; with two or more, the collectives and the Ray Train runs use two, so
NCCL really reduces across ranks. The Ray Train runs also skip (with the reason) where Ray or
DeepSpeed is not importable; the collectives and peak tests need only torch.
``benchmarks/gpu_check.sh`` runs this file as its ``tests`` stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bloomray.raycluster import free_port

pytestmark = pytest.mark.gpu

STEPS = 20  # first run; the resume test extends it to STEPS + 10
TINY_GPU = [
    "model.preset=tiny",
    "data.tokenizer.vocab_size=1024",
    "data.block_size=64",
    "train.lr=1e-2",
    f"train.max_steps={STEPS}",
    "train.log_every=10",
    "train.eval_every=10",
    "train.eval_max_batches=2",
    "train.checkpoint_every=10",
    "train.max_failures=0",
    "train.micro_batch_size=4",
    "deepspeed.precision=bf16",
    "scaling.use_gpu=true",
    "scaling.cpus_per_worker=1",
]
PRUNE_GPU = [
    "train.max_steps=12",
    "train.eval_every=12",
    "train.checkpoint_every=12",
    "prune.method=magnitude",
    "prune.schedule=one_shot",
    "prune.final_sparsity=0.5",
    "prune.start_fraction=0.25",  # masks at step 3, then 9 more optimizer steps under ZeRO-3
]


def n_gpus() -> int:
    """GPUs the tests use: two where there are two or more (NCCL across ranks), else one."""
    return min(2, torch.cuda.device_count())


def gpu_overrides(extra: list[str]) -> list[str]:
    n = n_gpus()
    # global = 2 micro-batches per worker per step: gradient accumulation runs on the GPU path too
    return [*TINY_GPU, f"scaling.num_workers={n}", f"train.global_batch_size={8 * n}", *extra]


# --------------------------------------------------------------------------- collectives


def _collectives_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One NCCL rank (torch.multiprocessing.spawn): the loop's two collectives, as it calls them."""
    import torch.distributed as dist

    from bloomray.train.collectives import all_reduce_sum, barrier

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    try:
        # A CPU tensor (metrics built on the host) and a device tensor (the loop's loss sums):
        # NCCL reduces neither on the CPU, so both must travel to `device` first.
        host = torch.tensor([rank + 1.0, 10.0 * rank, 1.0], dtype=torch.float64)
        on_device = torch.tensor([2.0 * rank, 1.0], dtype=torch.float64, device=device)
        counts = torch.tensor([3], dtype=torch.int64)
        out_host = all_reduce_sum(host, device)
        out_device = all_reduce_sum(on_device, device)
        out_counts = all_reduce_sum(counts, device)
        barrier(device)
        barrier(torch.device("cuda"))  # no index: the current device
        result = {
            "backend": dist.get_backend(),
            "host": out_host.tolist(),
            "device_in": out_device.tolist(),
            "counts": out_counts.tolist(),
            "out_devices": [str(t.device) for t in (out_host, out_device, out_counts)],
            "dtypes": [str(t.dtype) for t in (out_host, out_device, out_counts)],
            "host_input_after": host.tolist(),
        }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.timeout(180)
def test_nccl_all_reduce_and_barrier(tmp_path):
    import torch.multiprocessing as mp

    world = n_gpus()
    mp.spawn(_collectives_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = range(world)
    for rank in ranks:
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["backend"] == "nccl"
        assert r["host"] == [sum(k + 1.0 for k in ranks), sum(10.0 * k for k in ranks), float(world)]
        assert r["device_in"] == [sum(2.0 * k for k in ranks), float(world)]
        assert r["counts"] == [3 * world]
        assert r["out_devices"] == ["cpu", "cpu", "cpu"]  # callers read the result on the host
        assert r["dtypes"] == ["torch.float64", "torch.float64", "torch.int64"]
        assert r["host_input_after"] == [rank + 1.0, 10.0 * rank, 1.0]  # the caller's tensor is untouched


def test_collectives_without_a_process_group_on_gpu():
    from bloomray.train.collectives import all_reduce_sum, barrier

    device = torch.device("cuda", 0)
    out = all_reduce_sum(torch.tensor([1.5, 2.5], device=device), device)
    assert out.device.type == "cpu" and out.tolist() == [1.5, 2.5]
    barrier(device)  # a no-op without a group


# --------------------------------------------------------------------------- MFU peak


def test_datasheet_peak_for_present_devices():
    from bloomray.train.metrics import datasheet_peak_tflops, peak_flops

    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        tflops = datasheet_peak_tflops(name)
        assert tflops is not None, f"no datasheet bf16 peak for {name!r}: add it to GPU_BF16_PEAK_TFLOPS"
        assert 50 < tflops < 5000, (name, tflops)
        # MFU on a GPU is measured against the datasheet, not a matmul timed at start
        assert peak_flops(None, torch.bfloat16, torch.device("cuda", i)) == tflops * 1e12
        # a configured scaling.peak_tflops wins
        assert peak_flops(123.0, torch.bfloat16, torch.device("cuda", i)) == 123.0e12


# --------------------------------------------------------------------------- Ray Train runs


def _need_ray_and_deepspeed(request: pytest.FixtureRequest) -> None:
    """Skip (with the reason) where Ray or DeepSpeed is missing, then the shared local Ray."""
    pytest.importorskip("ray", reason="Ray Train runs need ray")
    pytest.importorskip("deepspeed", reason="Ray Train runs need deepspeed")
    request.getfixturevalue("ray_local")


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, tmp_path_factory) -> tuple[int, Path, dict[str, Any]]:
    """(stage, output dir, summary) of a finished GPU run; the resume test extends it last."""
    _need_ray_and_deepspeed(request)
    from bloomray.config import load_config
    from bloomray.export.run import run_training

    stage = request.param
    out = tmp_path_factory.mktemp(f"gpu-zero{stage}") / "run"
    summary = run_training(load_config("tiny-cpu", gpu_overrides([f"deepspeed.zero_stage={stage}"])), out)
    return stage, out, summary


def test_zero_run_finishes_and_trains(zero_run):
    stage, out, summary = zero_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == STEPS
    assert on_disk["restarts"] == []
    saved = json.loads((Path(on_disk["checkpoint"]) / "bloomray.json").read_text())
    assert saved["config"]["scaling"]["use_gpu"] is True
    assert saved["config"]["deepspeed"]["zero_stage"] == stage
    assert saved["config"]["scaling"]["num_workers"] == n_gpus()
    # a random init starts near log(vocab); 20 GPU steps must move eval loss well below it
    assert on_disk["eval_loss"] < on_disk["initial_eval_loss"] - 0.3, on_disk
    assert on_disk["tokens_per_s"] > 0 and 0 < on_disk["mfu"] < 1
    assert on_disk["peak_mem_mb"] > 0  # the CUDA allocator's peak on a GPU worker


def test_zero_run_exports_and_export_reproduces_engine_logits(zero_run):
    from bloomray.export.consolidate import probe_tolerance
    from bloomray.export.load import load_model

    _, out, summary = zero_run
    ckpt = Path(summary["checkpoint"])
    tol = probe_tolerance(ckpt, torch.bfloat16)
    assert summary["model_dir"] == str(out / "model")
    assert (out / "model" / "model.safetensors").exists()
    assert (out / "model" / "tokenizer.json").exists()
    diff = summary["export_max_abs_logit_diff"]
    assert diff is not None and diff <= tol, (diff, tol)  # CPU reload vs the GPU engine
    # and on the GPU: the export in bf16 reproduces what the trained engine computed there
    probe = torch.load(ckpt / "probe.pt", map_location="cpu")
    model = load_model(out / "model", dtype=torch.bfloat16).to("cuda").eval()
    with torch.no_grad():
        inputs = {k: v.to("cuda") for k, v in probe.items() if k != "logits"}
        logits = model(**inputs).logits.float().cpu()
    assert float((logits - probe["logits"]).abs().max()) <= tol


def test_zero_run_flops_per_token_matches_model_shape(zero_run):
    """MFU's FLOPs per token are the model's, under every ZeRO stage (ZeRO-3 partitions the
    parameters the loop counts after ``deepspeed.initialize``)."""
    from bloomray.export.load import load_model
    from bloomray.train.metrics import flops_per_token, matmul_params

    _, out, summary = zero_run
    m = json.loads((Path(summary["checkpoint"]) / "bloomray.json").read_text())["metrics"]
    reported = m["flops_per_s"] / m["tokens_per_s"]
    model = load_model(out / "model")
    c = model.config
    n_matmul = matmul_params(model, c.vocab_size, c.hidden_size, lm_head=True)
    expected = flops_per_token(n_matmul, c.n_layer, c.hidden_size, summary["data"]["block_size"])
    assert reported == pytest.approx(expected, rel=1e-6)


def test_zero_run_resume_continues_from_last_step(zero_run):
    from bloomray.export.run import run_training
    from bloomray.train.run import resume_config

    _, out, _ = zero_run
    summary = run_training(resume_config(out, [f"train.max_steps={STEPS + 10}"]), out, resume=True)
    assert summary["steps"] == STEPS + 10
    assert summary["restarts"] == [STEPS]  # picked up the last checkpoint, not step 0
    assert summary["model_dir"] == str(out / "model")
    from bloomray.export.consolidate import probe_tolerance

    tol = probe_tolerance(Path(summary["checkpoint"]), torch.bfloat16)
    assert summary["export_max_abs_logit_diff"] <= tol  # the re-export matches the resumed engine


# --------------------------------------------------------------------------- pruning


def _saved_masks(ckpt: Path) -> dict[str, torch.Tensor]:
    """The prune hook's masks as the checkpoint holds them (hooks.safetensors + hooks.json)."""
    from bloomray.train.hook_state import load_hook_states

    return load_hook_states(ckpt, torch.device("cpu"))[0]["masks"]


def test_prune_hook_under_zero3_reaches_target_sparsity(request, tmp_path):
    _need_ray_and_deepspeed(request)
    from bloomray.config import load_config
    from bloomray.export.consolidate import consolidated_state_dict
    from bloomray.export.load import load_model
    from bloomray.export.run import run_training

    out = tmp_path / "prune-zero3"
    cfg = load_config("tiny-cpu", gpu_overrides(["deepspeed.zero_stage=3", *PRUNE_GPU]))
    summary = run_training(cfg, out)
    assert summary["steps"] == 12
    assert abs(summary["sparsity"] - 0.5) < 0.01, summary["sparsity"]
    ckpt = Path(summary["checkpoint"])
    masks = _saved_masks(ckpt)
    assert masks and all(0.45 < 1 - m.mean().item() < 0.55 for m in masks.values())
    masters = consolidated_state_dict(ckpt)  # the ZeRO-3 fp32 partitions, gathered
    exported = dict(load_model(out / "model").named_parameters())
    for name, mask in masks.items():
        pruned = mask == 0
        assert torch.count_nonzero(masters[name][pruned]) == 0, f"{name}: optimizer revived pruned weights"
        assert torch.count_nonzero(exported[name][pruned]) == 0, name
        assert torch.count_nonzero(masters[name][~pruned]) > 0.9 * (~pruned).sum(), name  # the rest trained
