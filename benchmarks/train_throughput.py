""".venv/bin/python benchmarks/train_throughput.py [--shape small|125m|both] [--quick]

Training throughput, in one run per model shape, on the same model, data (the embedded corpus
through ``prepare_data``), batch sizes, sequence length and dtype (bf16):

  (a) plain single-process PyTorch loop, as many threads as (b)'s worker, with torch's fastest
      AdamW on this box (for-loop, foreach or fused: timed on the model's tensors in this run);
  (b) bloomray: Ray Train + DeepSpeed, 1 worker, ZeRO-0, through ``run_training`` with its
      defaults (``deepspeed.optimizer=auto``: DeepSpeedCPUAdam on CPU) and ``train.compile=true``
      (opt-in: torch.compile through DeepSpeed's ``engine.compile``; its one-off compile falls
      in the untimed steps);
  (b0) the same without ``train.compile`` (eager), so the compile's share is visible;
  (c) ``small`` only: bloomray ZeRO-2 on 2 workers, compiled (one CPU each, so (c) uses as many
      cores as (a) and (b)).

Shapes: ``small`` (the preset: hidden 256, 4 layers, 4.2M params) and ``125m``, GPT-2 small's
shape (hidden 768, 12 layers, 12 heads, GPT-2's 50,257-token vocabulary padded to 50,304:
124M params), random weights saved once to a model dir that (a) and (b) both load.

Prints tokens/s, the ratios to (a), achieved FLOP/s and MFU against bf16 and fp32 matmul peaks
measured in this run, peak memory per worker and, for ``small``, the per-worker optimizer-state
memory of ZeRO-0 vs ZeRO-2 (from each rank's DeepSpeed checkpoint). Targets: (b) >= 1.00x (a) at
each shape; ZeRO-2 optimizer state per worker >= 40% below ZeRO-0. Appends a dated section to
benchmarks/RESULTS.md. ``--quick`` runs a few steps to check the script and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _results import markdown_table, report  # benchmarks/ is on sys.path when run as a script
from optimizer_step import param_shapes, time_candidates, torch_makers, torch_variants

from bloomray.config import Config, load_config
from bloomray.data.prepare import PreparedData, prepare_data
from bloomray.model.build import build_from_config, count_parameters, resolve_model_config
from bloomray.train.batches import ShardedBatches
from bloomray.train.checkpoint import load_deepspeed_file
from bloomray.train.engine import build_model, build_optimizer, build_scheduler
from bloomray.train.metrics import flops_per_token, matmul_params, measure_peak_flops, peak_memory_mb

RAY_CPUS = 4  # logical CPUs: (b) needs 2, (c) needs 2; room for Train's controller
THREADS = 2  # (a)'s torch threads == (b)'s scaling.cpus_per_worker (Ray sets OMP_NUM_THREADS from it)
MICRO, GLOBAL = 4, 16
BLOCK = 128
SPEEDUP_TARGET = 1.00
ZERO_REDUCTION_TARGET = 0.40
RUN_NAMES = {
    "(a)": "(a) plain PyTorch, autocast bf16 + fp32 master",
    "(a')": "(a') plain PyTorch, pure bf16 weights",
    "(b)": "(b) bloomray ZeRO-0, compiled",
    "(b0)": "(b0) bloomray ZeRO-0, eager",
    "(c)": "(c) bloomray ZeRO-2, compiled",
}


@dataclass(frozen=True)
class Shape:
    """A benchmarked model shape and its step schedule: (steps, log_every, plain warmup)."""

    name: str
    schedule: tuple[int, int, int]
    quick: tuple[int, int, int]
    zero2: bool  # also run (c) and compare optimizer state
    arch: dict[str, int] | None = None  # None: the ``small`` preset; else a saved random model


# small: 120 steps, the first ~40 overlap Ray Train's own actors still importing and starting on
# the same 2 cores, so the timed interval (steps 81-120) is bloomray's steady state. 125m: a step
# takes ~17x longer, so its 20 untimed steps cover that start-up several times over.
SHAPES = {
    "small": Shape("small", (120, 40, 5), (10, 5, 2), zero2=True),
    "125m": Shape(
        "125m",
        (30, 10, 3),
        (4, 2, 1),
        zero2=False,
        arch={"hidden_size": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50304},
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("--quick", action="store_true", help="a few steps to check the script; no RESULTS.md")
    p.add_argument("--shape", choices=["small", "125m", "both"], default="both")
    return p.parse_args()


def base_overrides(steps: int, log_every: int, model: list[str]) -> list[str]:
    """Shared by all runs of a shape. bloomray's final tokens/s covers the last ``log_every``
    steps (the steps before it are warmup); one checkpoint (the final one) and one eval, both
    after that interval's timer stops. ``deepspeed.optimizer`` is left at its default."""
    return [
        *model,
        f"data.block_size={BLOCK}",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={GLOBAL}",
        f"train.log_every={log_every}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.eval_max_batches=1",
        "train.keep_checkpoints=1",
        "train.max_failures=0",
        "deepspeed.precision=bf16",
        "output.export=false",
        "output.tensorboard=false",
        f"ray.num_cpus={RAY_CPUS}",
    ]


def save_random_model(shape: Shape, out: Path) -> Path:
    """A random-init BLOOM of ``shape.arch`` (seed 0) and the embedded corpus's BPE tokenizer in
    ``out``: (a) and (b) load this dir (``model.path``), so both train the same weights."""
    cfg = load_config(None, ["model.preset=small", "train.max_steps=1"])
    tokenizer = prepare_data(cfg).tokenizer
    arch = dict(shape.arch or {})
    mc = resolve_model_config(cfg.task, "small", None, tokenizer, None, arch.pop("vocab_size"))
    mc.update(arch)
    from transformers import BloomConfig

    build_from_config(cfg.task, BloomConfig.from_dict(mc), cfg.train.seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- (a) plain loop


def fastest_torch_adamw(mc: dict[str, Any], quick: bool) -> tuple[str, dict[str, float]]:
    """The torch AdamW implementation that steps fastest here on the plain loop's tensors.

    Times for-loop / foreach / fused on fp32 weights and gradients of the model's parameter
    shapes (interleaved rounds, best step; ``optimizer_step.py``), so (a) is the fastest plain
    loop torch offers on this box, not a default that happens to be slow on CPU.
    """
    makers = torch_makers()
    rounds, steps = (1, 1) if quick else (3, 3)
    times = time_candidates(param_shapes(mc), makers, ("per-param",), rounds, steps)
    best = {name: min(w for w, _ in times["per-param", name]) for name in makers}
    return min(best, key=best.__getitem__), best


def plain_optimizer(cfg: Config, model: torch.nn.Module, variant: str) -> torch.optim.AdamW:
    """torch AdamW (``variant``) over bloomray's param groups (decay on matrices only)."""
    groups = build_optimizer(cfg, model).param_groups  # cfg has deepspeed.optimizer=adamw
    return torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
        lr=cfg.train.lr,
        betas=tuple(cfg.train.betas),
        **torch_variants()[variant],
    )


def run_plain(
    cfg: Config,
    mc: dict[str, Any],
    data: PreparedData,
    warmup: int,
    timed: int,
    pure_bf16: bool,
    variant: str,
) -> dict[str, Any]:
    """Single-process PyTorch loop on the same batches, optimizer groups, schedule and clipping.

    Two precisions, both reported:
    - ``pure_bf16=False`` (a): fp32 weights and AdamW, bf16 compute under ``torch.autocast``.
      That is DeepSpeed bf16's recipe (fp32 master weights, bf16 forward/backward), so it is
      the like-for-like baseline the target is judged against.
    - ``pure_bf16=True`` (a'): a bf16 model with AdamW on the bf16 weights: no master copy at
      all, the fastest loop one can write, and numerically a different (lossier) recipe.
    """
    model = build_model(cfg, mc)  # the preset (seeded) or the saved model dir, as bloomray builds it
    if pure_bf16:
        model = model.to(torch.bfloat16)
    model.train()
    optimizer = plain_optimizer(cfg, model, variant)
    scheduler = build_scheduler(cfg, optimizer, warmup + timed)
    ga = cfg.grad_accum_steps
    batches = ShardedBatches(data.train, 0, 1, MICRO, ga, cfg.train.seed)  # what rank 0 of 1 reads
    loss_sum = torch.zeros(())  # like bloomray: summed on the device, read at log steps only
    tokens, t0 = 0, time.perf_counter()
    for step in range(warmup + timed):
        if step == warmup:
            tokens, t0 = 0, time.perf_counter()
        for a in range(ga):
            ids = batches.get(step * ga + a)["input_ids"]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not pure_bf16):
                loss = model(input_ids=ids, labels=ids).loss
            (loss / ga).backward()
            loss_sum += loss.detach().float()
            tokens += ids.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(loss_sum):
        raise RuntimeError(f"plain loop diverged (loss sum {loss_sum.item()})")
    return {
        "tokens_per_s": tokens / elapsed,
        "peak_mem_mb": peak_memory_mb(torch.device("cpu")),
        "model": model,
    }


# --------------------------------------------------------------------------- (b), (c) bloomray


def run_bloomray(
    base: list[str], extra: list[str], out: Path, data: PreparedData, optim_state: bool
) -> dict[str, Any]:
    """``run_training`` with ``extra`` overrides; checks it trained on the same data as (a)."""
    from bloomray.export.run import run_training

    summary = run_training(load_config(None, base + extra), out)
    if summary["data"] != data.stats:
        raise RuntimeError(f"bloomray prepared different data: {summary['data']} vs {data.stats}")
    summary["optim_mb"] = optimizer_state_mb(Path(summary["checkpoint"])) if optim_state else None
    return summary


def optimizer_state_mb(checkpoint: Path) -> list[float]:
    """Optimizer-state MB held by each rank, read from the DeepSpeed checkpoint.

    ZeRO-1/2/3 write one ``*optim_states.pt`` per rank holding exactly that rank's partition
    (fp32 master weights + Adam moments). ZeRO-0 keeps the whole optimizer (fp32 master copy
    + moments) on every rank and saves it once, inside ``mp_rank_00_model_states.pt``
    under ``optimizer``. Counted as tensor bytes (distinct storages), not file size, so the
    ZeRO-0 figure excludes the model weights stored in the same file.
    """
    ds = checkpoint / "ds"
    shards = sorted(ds.glob("*optim_states.pt"))
    if shards:
        return [_tensor_bytes(load_deepspeed_file(p)) / 2**20 for p in shards]
    states = load_deepspeed_file(ds / "mp_rank_00_model_states.pt")
    return [_tensor_bytes(states["optimizer"]) / 2**20]


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def ray_threads(cpus: float) -> tuple[str | None, int]:
    """(OMP_NUM_THREADS, torch threads) that Ray gives an actor holding ``cpus`` CPUs.

    Ray sets OMP_NUM_THREADS=floor(assigned CPUs) in a worker whose env lacks it; Train
    workers are actors holding ``scaling.cpus_per_worker`` CPUs, so this probe sees what they
    see. An actor, not a task: a task may reuse a process whose torch already picked its
    thread count.
    """
    import ray

    @ray.remote
    class Probe:
        def threads(self) -> tuple[str | None, int]:
            return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    actor = Probe.options(num_cpus=cpus).remote()
    try:
        return ray.get(actor.threads.remote())
    finally:
        ray.kill(actor)


def measure_peaks(repeats: int = 3) -> dict[str, float]:
    """bf16 and fp32 matmul FLOP/s of this process, best of ``repeats`` 1 s windows.

    A peak is the best sustained rate; on a shared box the best window is the least disturbed.
    """
    cpu = torch.device("cpu")
    return {
        name: max(measure_peak_flops(dtype, cpu, 1.0) for _ in range(repeats))
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }


def bloomray_optimizer() -> tuple[str, float]:
    """(class, seconds): the optimizer bloomray's defaults pick here, built once in this process
    so DeepSpeed's CPU Adam op is JIT-built (first use on a machine) or loaded before Ray starts."""
    t0 = time.perf_counter()
    cfg = load_config(None, ["train.max_steps=1", "scaling.num_workers=1"])
    opt = build_optimizer(cfg, torch.nn.Linear(2, 2))
    return type(opt).__name__, time.perf_counter() - t0


def run_bloomray_runs(
    shape: Shape, base: list[str], data: PreparedData, steps: int, log_every: int, tmp: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[str | None, int]]]:
    """(b), (b0) and, for ``shape.zero2``, (c) on one local Ray: their summaries by key, and the
    thread counts Ray gives a worker of (b) and of (c)."""
    import ray

    from bloomray.raycluster import init_ray

    one = ["scaling.num_workers=1", f"scaling.cpus_per_worker={THREADS}", "deepspeed.zero_stage=0"]
    plan = {
        "(b)": ([*one, "train.compile=true"], "zero0"),
        "(b0)": (one, "zero0-eager"),
    }
    if shape.zero2:
        two = ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "deepspeed.zero_stage=2"]
        plan["(c)"] = ([*two, "train.compile=true"], "zero2")
    init_ray(None, RAY_CPUS)
    runs: dict[str, dict[str, Any]] = {}
    try:
        threads = {"(b)": ray_threads(THREADS)}
        if shape.zero2:
            threads["(c)"] = ray_threads(1)
        for key, (extra, name) in plan.items():
            print(f"[bench] {shape.name} {RUN_NAMES[key]}: {steps} steps, last {log_every} timed", flush=True)
            runs[key] = run_bloomray(base, extra, tmp / name, data, optim_state=shape.zero2 and key != "(b0)")
    finally:
        ray.shutdown()
    return runs, threads


# --------------------------------------------------------------------------- report


def build_rows(runs: dict[str, dict[str, Any]], fpt: float, peaks: dict[str, float]) -> list[dict[str, Any]]:
    """One row per run; FLOP/s = tokens/s x training FLOPs per token (bloomray's formula)."""
    layout = {"(c)": "2 x 1"}
    zero = {"(b)": "0", "(b0)": "0", "(c)": "2"}
    plain = runs["(a)"]
    rows = []
    for key, r in runs.items():
        flops = r["tokens_per_s"] * fpt
        optim = r.get("optim_mb")
        rows.append(
            {
                "run": RUN_NAMES[key],
                "workers x threads": layout.get(key, f"1 x {THREADS}"),
                "ZeRO": zero.get(key, "-"),
                "tokens/s": f"{r['tokens_per_s']:,.0f}",
                "vs (a)": f"{r['tokens_per_s'] / plain['tokens_per_s']:.3f}x",
                "GFLOP/s": f"{flops / 1e9:.1f}",
                "MFU bf16": f"{100 * flops / peaks['bf16']:.1f}%",
                "MFU fp32": f"{100 * flops / peaks['fp32']:.1f}%",
                "bloomray MFU": f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                "peak RSS MB/worker": f"{r['peak_mem_mb']:,.0f}",
                "optimizer state MB/worker": " / ".join(f"{m:.1f}" for m in optim) if optim else "-",
            }
        )
    return rows


def describe(
    shape: Shape,
    data: PreparedData,
    n_params: int,
    fpt: float,
    schedule: tuple[int, int, int],
    threads: dict[str, tuple[str | None, int] | None],
    adamw: tuple[str, dict[str, float]],
    ours: str,
) -> list[str]:
    """The settings lines above a shape's table."""
    steps, log_every, plain_warmup = schedule
    model = (
        "preset `small`"
        if shape.arch is None
        else "GPT-2-small shape (hidden {hidden_size}, {n_layer} layers, {n_head} heads, vocab {vocab_size}), "
        "random weights saved once and loaded by (a) and (b) (`model.path`)".format(**shape.arch)
    )
    variant, times = adamw
    notes = [
        f"- model: {model}: {n_params / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token trained; seq {BLOCK}, "
        f"micro batch {MICRO}, global batch {GLOBAL}, bf16, embedded corpus ({data.stats['train_tokens']:,} "
        "train tokens)",
        f"- timed: the last {log_every} of {steps} steps for bloomray (its final log interval); "
        f"{log_every} steps after {plain_warmup} warmup for the plain loops",
        f"- (a)/(a') optimizer: torch AdamW, {variant.removeprefix('torch ')}: the fastest here of "
        + ", ".join(f"{k.removeprefix('torch ')} {1e3 * v:.0f} ms" for k, v in times.items())
        + " (best step on the model's fp32 tensors, this run); clipping and LR schedule as bloomray's",
        f"- bloomray optimizer: deepspeed.optimizer=auto (the default) -> {ours}",
    ]
    b, c = threads["(b)"], threads.get("(c)")
    line = f"- threads: (a) torch.set_num_threads({THREADS}); Ray worker with {THREADS} CPUs: "
    line += f"OMP_NUM_THREADS={b[0]}, torch threads {b[1]}" if b else "-"
    if c:
        line += f"; with 1 CPU: OMP_NUM_THREADS={c[0]}, torch threads {c[1]}"
    notes.append(line)
    notes.append("- peak RSS: (a) the benchmark process (max RSS so far); bloomray: rank 0's worker process")
    if shape.zero2:
        notes.append(
            "- optimizer state: tensor bytes of each rank's optimizer state in the final DeepSpeed checkpoint "
            f"(fp32 master weights + Adam moments; expected 12 B/param = {12 * n_params / 2**20:.1f} MB "
            "unpartitioned, half that per rank for 2-way ZeRO-2); one value per rank"
        )
    if b and b[1] != THREADS or c and c[1] != 1:
        notes.append(
            f"- WARNING: Ray workers run {b and b[1]} (b) and {c and c[1]} (c) torch threads, not {THREADS} and 1"
        )
    return notes


def check_targets(runs: dict[str, dict[str, Any]], shape: Shape) -> list[str]:
    plain, pure, zero0 = runs["(a)"], runs["(a')"], runs["(b)"]
    speed = zero0["tokens_per_s"] / plain["tokens_per_s"]
    ok = {True: "met", False: "MISSED"}
    lines = [
        f"- {shape.name}: (b)/(a) bloomray ZeRO-0 compiled vs plain: {speed:.3f}x (target >= {SPEEDUP_TARGET:.2f}x: "
        f"{ok[speed >= SPEEDUP_TARGET]})",
        f"- {shape.name}: (b0)/(a) bloomray ZeRO-0 eager vs plain: "
        f"{runs['(b0)']['tokens_per_s'] / plain['tokens_per_s']:.3f}x (no target; what compiling adds: "
        f"{zero0['tokens_per_s'] / runs['(b0)']['tokens_per_s']:.3f}x)",
        f"- {shape.name}: (b)/(a') bloomray ZeRO-0 vs pure-bf16 plain loop (no master weights): "
        f"{zero0['tokens_per_s'] / pure['tokens_per_s']:.3f}x (no target)",
    ]
    if "(c)" in runs:
        zero2 = runs["(c)"]
        reduction = 1 - max(zero2["optim_mb"]) / max(zero0["optim_mb"])
        lines += [
            f"- {shape.name}: (c)/(a) bloomray ZeRO-2, 2 workers vs plain: "
            f"{zero2['tokens_per_s'] / plain['tokens_per_s']:.3f}x (no target)",
            f"- {shape.name}: optimizer state per worker: ZeRO-0 {max(zero0['optim_mb']):.1f} MB, ZeRO-2 "
            f"{max(zero2['optim_mb']):.1f} MB (largest rank): {100 * reduction:.1f}% less "
            f"(target >= {100 * ZERO_REDUCTION_TARGET:.0f}%: {ok[reduction >= ZERO_REDUCTION_TARGET]})",
        ]
    return lines


# --------------------------------------------------------------------------- main


def run_shape(shape: Shape, quick: bool, ours: str) -> Callable[[dict[str, float]], list[str]]:
    """Runs (a), (a'), (b) and, for ``small``, (c); returns the renderer of the shape's report
    section (given the matmul peaks, measured around all shapes)."""
    steps, log_every, plain_warmup = shape.quick if quick else shape.schedule
    with tempfile.TemporaryDirectory(prefix="bloomray-bench-", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        if shape.arch is None:
            model = ["model.preset=small"]
        else:
            print(f"[bench] {shape.name}: saving the random model", flush=True)
            model = [f"model.path={save_random_model(shape, tmp / 'model')}"]
        base = base_overrides(steps, log_every, model)
        cfg = load_config(None, [*base, "scaling.num_workers=1", f"scaling.cpus_per_worker={THREADS}"])
        data = prepare_data(cfg)
        mc = resolve_model_config(
            cfg.task, cfg.model.preset, cfg.model.path, data.tokenizer, None, cfg.model.vocab_size
        )
        adamw = fastest_torch_adamw(mc, quick)
        plain_cfg = load_config(None, [*base, "scaling.num_workers=1", "deepspeed.optimizer=adamw"])
        print(
            f"[bench] {shape.name} (a) plain loop, AdamW {adamw[0]}: {plain_warmup} warmup + {log_every} timed "
            f"steps, {THREADS} threads",
            flush=True,
        )
        runs: dict[str, dict[str, Any]] = {}
        runs["(a)"] = run_plain(plain_cfg, mc, data, plain_warmup, log_every, False, adamw[0])
        model_a = runs["(a)"].pop("model")
        n_matmul = matmul_params(model_a, mc["vocab_size"], mc["hidden_size"], lm_head=True)
        fpt = flops_per_token(n_matmul, mc["n_layer"], mc["hidden_size"], BLOCK)
        n_params = count_parameters(model_a)
        del model_a
        runs["(a')"] = run_plain(plain_cfg, mc, data, plain_warmup, log_every, True, adamw[0])
        runs["(a')"].pop("model")
        ours_runs, threads = run_bloomray_runs(shape, base, data, steps, log_every, tmp)
    runs.update(ours_runs)
    notes = describe(shape, data, n_params, fpt, (steps, log_every, plain_warmup), threads, adamw, ours)
    params = f"{n_params / 1e6:.1f}M" if n_params < 1e8 else f"{n_params / 1e6:.0f}M"
    title = f"### {shape.name} ({params} params)"
    targets = check_targets(runs, shape)
    return lambda peaks: [
        title,
        "",
        *notes,
        "",
        markdown_table(build_rows(runs, fpt, peaks)),
        "",
        *targets,
        "",
    ]


def main() -> int:
    args = parse_args()
    shapes = [SHAPES[s] for s in (("small", "125m") if args.shape == "both" else (args.shape,))]
    torch.set_num_threads(THREADS)
    ours, build_s = bloomray_optimizer()
    print(f"[bench] bloomray's optimizer here: {ours} (ready in {build_s:.1f} s)", flush=True)
    # The MFU denominators: the best of the windows before, between and after the shapes (a
    # peak is the best sustained rate, and one disturbed window must not inflate every MFU).
    samples = [measure_peaks()]
    renders = []
    for shape in shapes:
        renders.append(run_shape(shape, args.quick, ours))
        samples.append(measure_peaks())
    peaks = {k: max(p[k] for p in samples) for k in samples[0]}
    body = [
        f"- matmul peak ({THREADS} threads, best 1 s window before, between and after the shapes): bf16 "
        f"{peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s; 'bloomray MFU' is the "
        "library's own (per-worker peaks, measured in each worker at its start)",
        "",
    ]
    for render in renders:
        body += render(peaks)
    report("train_throughput", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
