""".venv/bin/python benchmarks/optimizer_step.py [--shape small|125m|both] [--rounds N] [--threads N]

Micro-benchmark: one AdamW step on CPU, torch's three implementations vs DeepSpeed's CPU Adam,
on the parameters of the shapes train_throughput.py trains (2 threads, like its workers).

- ``torch for-loop``: ``torch.optim.AdamW()`` as constructed by default on CPU (neither foreach
  nor fused: torch enables foreach by default only on accelerators);
- ``torch foreach``: ``foreach=True``; ``torch fused``: ``fused=True`` (one C++ kernel per tensor);
- ``ds cpu_adam``: ``deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True)`` (AVX-512 C++ op,
  JIT-built once into ~/.cache/torch_extensions and loaded from there afterwards): what
  bloomray's ``deepspeed.optimizer=auto`` uses on CPU.

Every optimizer steps on fp32 weights with fp32 gradients, which is what each of them sees in
training: the plain loop's fp32 model, and DeepSpeed bf16's fp32 master copy (the bf16 model
weights are written from it after the step, by DeepSpeed, whatever the optimizer). Two layouts:

- ``per-param``: one tensor per model parameter (the plain loop; DeepSpeed ZeRO-0 bf16, whose
  FP16_UnfusedOptimizer keeps one fp32 master tensor per parameter);
- ``flat``: one flat tensor per param group (decay / no decay): DeepSpeed's ZeRO-1/2/3
  partitions (a 1-rank partition is the whole group).

Rounds interleave the candidates and the layouts (fresh tensors and optimizer state each round,
2 untimed steps first). Reported per candidate: the best and the median wall time of all timed
steps, and the best process CPU time (all threads). On a shared box the best wall time is the
least disturbed step and the median shows the noise; CPU time does not count time spent
descheduled (with ``--threads 1`` it is the cleanest measure of the work itself; with more
threads it includes OpenMP's spin-waiting). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import BloomConfig, BloomForCausalLM  # noqa: E402

THREADS = 2
# The shapes train_throughput.py trains; vocab 4096 = the BPE trained on the embedded corpus,
# 50304 = GPT-2's 50,257 tokens padded to a multiple of 64.
SHAPES = {
    "small": {"hidden_size": 256, "n_layer": 4, "n_head": 8, "vocab_size": 4096},
    "125m": {"hidden_size": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50304},
}
LR, BETAS, WD = 1e-3, (0.9, 0.95), 0.01
Maker = Callable[[list[dict]], torch.optim.Optimizer]


def param_shapes(model_config: dict[str, Any]) -> list[tuple[str, torch.Size]]:
    """(name, shape) of every parameter of the BLOOM model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = BloomForCausalLM(BloomConfig.from_dict(model_config))
    return [(n, p.shape) for n, p in model.named_parameters()]  # tied head listed once


def make_groups(shapes: list[tuple[str, torch.Size]], layout: str) -> list[dict]:
    """fp32 weights with fp32 random gradients, in bloomray's two param groups."""
    decay, no_decay = [], []
    for name, s in shapes:
        (no_decay if len(s) < 2 or "layernorm" in name else decay).append(s)
    groups = []
    for sizes, wd in ((decay, WD), (no_decay, 0.0)):
        if layout == "flat":
            sizes = [torch.Size([sum(s.numel() for s in sizes)])]
        params = []
        for s in sizes:
            p = torch.nn.Parameter(torch.randn(s) * 0.02)
            p.grad = torch.randn(s) * 1e-3
            params.append(p)
        groups.append({"params": params, "weight_decay": wd})
    return groups


def torch_variants() -> dict[str, dict[str, bool]]:
    """torch AdamW's implementations on CPU, by the constructor arguments that select them."""
    return {"torch for-loop": {}, "torch foreach": {"foreach": True}, "torch fused": {"fused": True}}


def torch_makers() -> dict[str, Maker]:
    """torch AdamW in each of its CPU implementations, by name."""
    kw = {"lr": LR, "betas": BETAS}
    return {name: (lambda g, v=v: torch.optim.AdamW(g, **kw, **v)) for name, v in torch_variants().items()}


def candidates() -> dict[str, Maker]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return {
        **torch_makers(),
        "ds cpu_adam": lambda g: DeepSpeedCPUAdam(g, adamw_mode=True, lr=LR, betas=BETAS),
    }


def time_steps(opt: torch.optim.Optimizer, steps: int) -> list[tuple[float, float]]:
    """(wall s, process CPU s) of ``steps`` steps, after 2 untimed ones (state allocation)."""
    for _ in range(2):
        opt.step()
    out = []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        opt.step()
        out.append((time.perf_counter() - w, time.process_time() - c))
    return out


def time_candidates(
    shapes: list[tuple[str, torch.Size]],
    makers: dict[str, Maker],
    layouts: tuple[str, ...],
    rounds: int,
    steps: int,
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Step times per (layout, candidate); one layout's tensors in memory at a time."""
    times: dict[tuple[str, str], list[tuple[float, float]]] = {
        (lay, n): [] for lay in layouts for n in makers
    }
    for _ in range(rounds):  # interleaved: a burst of load on a shared box hits every candidate
        for layout in layouts:
            groups = make_groups(shapes, layout)
            for name, make in makers.items():
                opt = make(groups)
                times[layout, name] += time_steps(opt, steps)
                del opt
            del groups
    return times


def bench(shape: str, rounds: int, steps: int) -> list[dict]:
    shapes = param_shapes(SHAPES[shape])
    n = sum(s.numel() for _, s in shapes)
    n_tensors = {"per-param": len(shapes), "flat": 2}
    times = time_candidates(shapes, candidates(), ("per-param", "flat"), rounds, steps)
    rows = []
    for (layout, name), ts in times.items():
        best = min(w for w, _ in ts)
        ref = min(w for w, _ in times[layout, "torch for-loop"])
        rows.append(
            {
                "shape": f"{shape} ({n / 1e6:.1f}M)",
                "layout": f"{layout} ({n_tensors[layout]} tensors)",
                "optimizer": name,
                "best ms": f"{1e3 * best:.1f}",
                "median ms": f"{1e3 * statistics.median(w for w, _ in ts):.1f}",
                "best CPU ms": f"{1e3 * min(c for _, c in ts):.1f}",
                "ns/param (best)": f"{1e9 * best / n:.2f}",
                "best vs for-loop": f"{ref / best:.2f}x",
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description="AdamW step time: torch for-loop/foreach/fused vs DeepSpeedCPUAdam"
    )
    p.add_argument("--shape", choices=["small", "125m", "both"], default="both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per candidate per round")
    p.add_argument("--threads", type=int, default=THREADS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    candidates()["ds cpu_adam"]([torch.nn.Parameter(torch.zeros(8))])  # JIT build or load of the op
    print(f"[bench] DeepSpeedCPUAdam op ready in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for shape in ("small", "125m") if args.shape == "both" else (args.shape,):
        rows += bench(shape, args.rounds, args.steps)
    from _results import markdown_table  # benchmarks/ is on sys.path when run as a script

    print(f"\n{args.threads} threads, {args.rounds} rounds x {args.steps} timed steps per candidate\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
