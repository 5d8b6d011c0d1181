""".venv/bin/python benchmarks/gpu_throughput.py

GPU training throughput on one GPU, in one run, on the bloom-560m shape (24 layers, hidden 1024,
16 heads, vocabulary 250,880 as BLOOM pads it; random init: throughput does not depend on the
weights), the embedded corpus packed into blocks of ``--seq`` (1024) tokens, bf16:

  (a) plain PyTorch loop: fp32 weights, ``torch.optim.AdamW(fused=True)``, bf16 under
      ``torch.autocast`` (fp32 master weights, bf16 compute: DeepSpeed bf16's recipe), the same
      batches, parameter groups, LR schedule and gradient clipping as (b);
  (b) bloomray: ``run_training``, 1 worker, DeepSpeed ZeRO-2 bf16, ``deepspeed.optimizer``
      fused_adam where DeepSpeed's FusedAdam builds on this machine (else adamw, said so).

The micro batch (= global batch, no accumulation) is the largest of a few candidates whose
training step fits in 85% of the GPU's memory in (a) (``--micro-batch`` fixes it). Reports
tokens/s, achieved TFLOP/s and MFU against the datasheet dense bf16 peak
(``bloomray.train.metrics.datasheet_peak_tflops``), bloomray's own MFU, peak memory and the
ratio (b)/(a). Target: (b) MFU >= 45% on an H100/H200-class GPU. Appends a dated section to
benchmarks/RESULTS.md. ``--quick`` runs a few steps to check the script and writes nothing.
``--dry-run`` needs no GPU: it builds and validates the GPU configs, prepares the real data,
counts the model on the meta device, and runs both code paths for a few steps on the CPU with
the tiny preset (nothing is measured, nothing is written). ``--plain-only`` runs (a) alone
(where Ray or DeepSpeed is missing).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _results import markdown_table, report  # benchmarks/ is on sys.path when run as a script

from bloomray.config import Config, load_config
from bloomray.data.prepare import PreparedData, prepare_data
from bloomray.model.build import build_from_config, count_parameters, resolve_model_config
from bloomray.train.batches import ShardedBatches
from bloomray.train.engine import build_scheduler, deepspeed_config
from bloomray.train.metrics import datasheet_peak_tflops, flops_per_token, matmul_params

PRESET = "bloom-560m"
SHAPE = {"n_layer": 24, "hidden_size": 1024, "n_head": 16, "vocab_size": 250_880}
MFU_TARGET = 0.45
MEM_FRACTION = 0.85  # a micro batch fits when (a)'s peak step memory stays below this share of the GPU
MICRO_CANDIDATES = (32, 24, 16, 12, 8, 4, 2, 1)  # at seq 1024; scaled by 1024 / seq
TARGET_CLASS = ("H100", "H200", "GH200")  # where the 45% MFU target applies
FUSED_ADAM_TIMEOUT_S = 150  # DeepSpeed JIT-builds FusedAdam with nvcc (about a minute, cached after)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("--quick", action="store_true", help="a few steps to check the script; no RESULTS.md")
    p.add_argument("--dry-run", action="store_true", help="no GPU needed: configs, data, CPU smoke run")
    p.add_argument("--plain-only", action="store_true", help="run (a) only (no Ray/DeepSpeed needed)")
    p.add_argument("--seq", type=int, default=1024, choices=(1024, 2048), help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=0, help="micro batch (default 0: largest that fits)")
    p.add_argument("--steps", type=int, default=0, help="bloomray steps (default: 60, --quick 10)")
    p.add_argument(
        "--optimizer",
        default="auto",
        choices=("auto", "fused_adam", "adamw"),
        help="bloomray's deepspeed.optimizer (auto: fused_adam if DeepSpeed's FusedAdam builds here)",
    )
    p.add_argument("--output", help="keep bloomray's run dir here (default: a temp dir, removed)")
    p.add_argument("--export", action="store_true", help="export bloomray's model (OUTPUT/bloomray/model)")
    p.add_argument("--device-name", default="NVIDIA H200", help="--dry-run: the GPU name to check a peak for")
    return p.parse_args()


# --------------------------------------------------------------------------- configs


def overrides(
    seq: int,
    micro: int,
    steps: int,
    log_every: int,
    optimizer: str,
    export: bool,
    gpu: bool = True,
) -> list[str]:
    """(b)'s run (and, minus the scaling keys, (a)'s data and schedule). bloomray's final tokens/s
    covers the last ``log_every`` steps; eval and the one checkpoint come after its timer stops."""
    return [
        f"model.preset={PRESET}",
        f"model.vocab_size={SHAPE['vocab_size']}",
        f"data.block_size={seq}",
        "data.eval_fraction=0.05",
        f"train.max_steps={steps}",
        f"train.micro_batch_size={micro}",
        f"train.global_batch_size={micro}",
        f"train.log_every={log_every}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.eval_max_batches=1",
        "train.keep_checkpoints=1",
        "train.max_failures=0",
        "train.lr=1e-4",
        "train.warmup_steps=0",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
        f"deepspeed.optimizer={optimizer}",
        "scaling.num_workers=1",
        f"scaling.use_gpu={str(gpu).lower()}",
        f"scaling.cpus_per_worker={min(8, max(1, (os.cpu_count() or 2) // 2))}",
        f"output.export={str(export).lower()}",
        "output.tensorboard=false",
    ]


def tiny_cpu(base: list[str]) -> list[str]:
    """``base`` with the tiny shape and CPU settings: what --dry-run runs."""
    swap: dict[str, str | None] = {  # None: dropped
        "model.preset": "tiny",
        "model.vocab_size": None,  # the tokenizer's size
        "data.block_size": "64",
        "data.tokenizer.vocab_size": "1024",
        "deepspeed.optimizer": "adamw",
        "scaling.use_gpu": "false",
        "scaling.cpus_per_worker": "1",
        "output.export": "true",
        "ray.num_cpus": "4",
    }
    kept = [o for o in base if o.split("=", 1)[0] not in swap]
    return kept + [f"{k}={v}" for k, v in swap.items() if v is not None]


def model_shape(cfg: Config, data: PreparedData) -> dict[str, Any]:
    return resolve_model_config(
        cfg.task, cfg.model.preset, None, data.tokenizer, vocab_size=cfg.model.vocab_size
    )


def check_shape(mc: dict[str, Any]) -> None:
    got = {k: mc[k] for k in SHAPE}
    if got != SHAPE:
        raise SystemExit(f"[bench] preset {PRESET} no longer builds the bloom-560m shape: {got} != {SHAPE}")


def flop_count(model: torch.nn.Module, mc: dict[str, Any], seq: int) -> tuple[int, int, float]:
    """(parameters, matmul parameters, training FLOPs per token): bloomray's own formula."""
    n_matmul = matmul_params(model, mc["vocab_size"], mc["hidden_size"], lm_head=True)
    return count_parameters(model), n_matmul, flops_per_token(n_matmul, mc["n_layer"], mc["hidden_size"], seq)


def meta_model(mc: dict[str, Any]) -> torch.nn.Module:
    """The model on the meta device: shapes and counts, no memory, no init time."""
    from transformers import AutoModelForCausalLM, BloomConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(BloomConfig.from_dict(mc))


# --------------------------------------------------------------------------- optimizer choice


def fused_adam_choice(requested: str) -> tuple[str, str]:
    """(deepspeed.optimizer, why): fused_adam when DeepSpeed's FusedAdam loads here.

    DeepSpeed JIT-builds the op with nvcc and ninja (cached in ~/.cache/torch_extensions, where
    the Ray worker finds it); built in a subprocess with a timeout, so a missing compiler or a
    slow build falls back to torch's AdamW instead of failing the benchmark.
    """
    if requested == "adamw":
        return "adamw", "adamw (--optimizer adamw)"
    if importlib.util.find_spec("deepspeed") is None:
        return "adamw", "adamw (deepspeed is not installed)"
    cmd = "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()"
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    start = time.perf_counter()
    try:
        r = subprocess.run(
            [sys.executable, "-c", cmd], env=env, capture_output=True, text=True, timeout=FUSED_ADAM_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        why = f"FusedAdam did not build in {FUSED_ADAM_TIMEOUT_S} s"
    else:
        if r.returncode == 0:
            return (
                "fused_adam",
                f"fused_adam (DeepSpeed FusedAdam loaded in {time.perf_counter() - start:.0f} s)",
            )
        last = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        why = f"FusedAdam did not build: {last}"
    if requested == "fused_adam":
        raise SystemExit(f"[bench] --optimizer fused_adam: {why}")
    return "adamw", f"adamw ({why})"


# --------------------------------------------------------------------------- (a) plain loop


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """bloomray's groups (engine.build_optimizer): no decay on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "layernorm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PlainLoop:
    """Single-process PyTorch training on ``device``: fp32 weights, fused AdamW, bf16 autocast."""

    def __init__(self, cfg: Config, mc: dict[str, Any], device: torch.device, total_steps: int) -> None:
        from transformers import BloomConfig

        self.cfg, self.device = cfg, device
        self.model = build_from_config(cfg.task, BloomConfig.from_dict(mc), cfg.train.seed).to(device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.train.weight_decay),
            lr=cfg.train.lr,
            betas=tuple(cfg.train.betas),
            fused=device.type == "cuda",
        )
        self.scheduler = build_scheduler(cfg, self.optimizer, total_steps)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def fits(self, data: PreparedData, micro: int) -> tuple[bool, float]:
        """(fits, peak GB) of one training step at ``micro`` (CUDA only)."""
        ids = torch.from_numpy(data.train["input_ids"][:micro].astype("int64"))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        oom = False
        try:
            self.step(ids)
            torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if oom:  # outside the except block: its traceback no longer holds the step's tensors
            self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            return False, float("inf")
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        return peak <= MEM_FRACTION * total, peak / 2**30

    def run(self, data: PreparedData, micro: int, warmup: int, timed: int) -> dict[str, Any]:
        batches = ShardedBatches(data.train, 0, 1, micro, 1, self.cfg.train.seed)  # what rank 0 of 1 reads
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        loss_sum, tokens, t0 = torch.zeros((), device=self.device), 0, time.perf_counter()
        for step in range(warmup + timed):
            if step == warmup:
                self._sync()
                loss_sum, tokens, t0 = torch.zeros((), device=self.device), 0, time.perf_counter()
            ids = batches.get(step)["input_ids"]
            loss_sum += self.step(ids).float()  # on the device, like bloomray: no host sync per step
            tokens += ids.numel()
        self._sync()
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return {
            "tokens_per_s": tokens / elapsed,
            "train_loss": loss_sum.item() / max(timed, 1),
            "peak_mem_gb": peak,
        }

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        del self.model, self.optimizer, self.scheduler
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the GPU goes to (b)'s Ray worker next


def pick_micro_batch(loop: PlainLoop, data: PreparedData, seq: int) -> tuple[int, list[str]]:
    """The largest candidate micro batch whose step fits (candidates above the data are skipped)."""
    n = len(data.train["input_ids"])
    tried = []
    for micro in sorted({max(1, c * 1024 // seq) for c in MICRO_CANDIDATES}, reverse=True):
        if micro > n:
            continue
        ok, peak = loop.fits(data, micro)
        tried.append(f"{micro}: {'OOM' if peak == float('inf') else f'{peak:.1f} GB'}")
        print(f"[bench] micro batch {micro} x {seq}: {tried[-1]}{'' if ok else ' (too big)'}", flush=True)
        if ok:
            return micro, tried
    raise SystemExit("[bench] not even micro batch 1 fits on this GPU")


# --------------------------------------------------------------------------- (b) bloomray


def run_bloomray(args_overrides: list[str], out: Path, data: PreparedData) -> dict[str, Any]:
    """``run_training`` on a local Ray; checks it trained on the same data as (a)."""
    import ray

    from bloomray.export.run import run_training

    try:
        summary = run_training(load_config(None, args_overrides), out)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if summary["data"] != data.stats:
        raise RuntimeError(f"bloomray prepared different data: {summary['data']} vs {data.stats}")
    return summary


# --------------------------------------------------------------------------- report


def build_rows(
    plain: dict[str, Any],
    ours: dict[str, Any] | None,
    fpt: float,
    peak: float,
    micro: int,
    seq: int,
    opt: str,
) -> list[dict[str, Any]]:
    runs = [("(a) plain PyTorch: AdamW fused, autocast bf16, fp32 master", plain, None, "AdamW fused")]
    if ours is not None:
        runs.append(("(b) bloomray: Ray Train + DeepSpeed ZeRO-2 bf16", ours, ours.get("mfu"), opt))
    rows = []
    for name, r, own_mfu, optimizer in runs:
        flops = r["tokens_per_s"] * fpt
        mem = r.get("peak_mem_gb")
        rows.append(
            {
                "run": name,
                "optimizer": optimizer,
                "micro batch x seq": f"{micro} x {seq}",
                "tokens/s": f"{r['tokens_per_s']:,.0f}",
                "vs (a)": f"{r['tokens_per_s'] / plain['tokens_per_s']:.3f}x",
                "TFLOP/s": f"{flops / 1e12:.1f}",
                "MFU": f"{100 * flops / peak:.1f}%",
                "bloomray MFU": "-" if own_mfu is None else f"{100 * own_mfu:.1f}%",
                "peak GPU mem GB": "-" if mem is None else f"{mem:.1f}",
            }
        )
    return rows


def check_targets(
    plain: dict[str, Any],
    ours: dict[str, Any] | None,
    fpt: float,
    peak: float,
    gpu: str,
    compare_own: bool = True,
) -> list[str]:
    ok = {True: "met", False: "MISSED"}
    plain_mfu = plain["tokens_per_s"] * fpt / peak
    lines = [
        f"- (a) plain PyTorch MFU: {100 * plain_mfu:.1f}% (the baseline HF BLOOM reaches here; no target)"
    ]
    if ours is None:
        return [*lines, "- (b) bloomray: not run (--plain-only): the 45% MFU target is unchecked"]
    mfu = ours["tokens_per_s"] * fpt / peak
    in_class = any(k.lower() in gpu.lower() for k in TARGET_CLASS)
    verdict = ok[mfu >= MFU_TARGET] if in_class else f"not judged: {gpu} is not H100/H200 class"
    lines += [
        f"- (b) bloomray MFU: {100 * mfu:.1f}% (target >= {100 * MFU_TARGET:.0f}% on H100/H200 class: {verdict})",
        f"- (b)/(a) bloomray vs plain PyTorch tokens/s: {ours['tokens_per_s'] / plain['tokens_per_s']:.3f}x (no target)",
    ]
    if compare_own and ours.get("mfu") is not None and abs(ours["mfu"] - mfu) > 0.005:
        lines.append(
            f"- WARNING: bloomray's own MFU {100 * ours['mfu']:.1f}% differs from this script's {100 * mfu:.1f}% "
            "(same tokens/s, formula and datasheet peak expected)"
        )
    return lines


def section_body(
    plain: dict[str, Any],
    ours: dict[str, Any] | None,
    counts: tuple[int, int, float],
    gpu: str,
    tflops: float,
    run: dict[str, Any],
    compare_own: bool = True,
) -> list[str]:
    """The notes, the table and the target lines of a section (``run``: how it was run)."""
    n_params, n_matmul, fpt = counts
    peak = tflops * 1e12
    notes = [
        f"- GPU: {gpu}, datasheet dense bf16 peak {tflops:.0f} TFLOP/s (the MFU denominator); {versions()}",
        f"- model: {run['shape']}, random init: {n_params / 1e6:.1f}M params, {n_matmul / 1e6:.1f}M in "
        f"matmuls, {fpt / 1e9:.3f} GFLOP/token trained (6N + attention, bloomray's formula)",
        f"- data: embedded corpus, {run['train_blocks']} train blocks of {run['seq']} tokens; micro batch = "
        f"global batch = {run['micro']} (no accumulation); micro batches tried in (a): {'; '.join(run['tried'])}",
        f"- timed: (b) bloomray's last log interval ({run['log_every']} of {run['steps']} steps; eval and the "
        f"checkpoint after the timer); (a) {run['log_every']} steps after {run['warmup']} warmup",
        f"- (b) deepspeed.optimizer: {run['why'] if ours is not None else 'not run'}",
    ]
    table = markdown_table(build_rows(plain, ours, fpt, peak, run["micro"], run["seq"], run["optimizer"]))
    return [*notes, "", table, "", *check_targets(plain, ours, fpt, peak, gpu, compare_own)]


def versions() -> str:
    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for name in ("deepspeed", "ray", "transformers"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            parts.append(f"{name} missing")
    return ", ".join(parts)


# --------------------------------------------------------------------------- main


def dry_run(args: argparse.Namespace, base: list[str], steps: int, log_every: int) -> int:
    """Everything but the GPU: the GPU configs validate, the data and the shape are right, and
    both code paths (plain loop, run_training + summary + report) run on the CPU, tiny."""
    print("[dry-run] GPU configs (validated, not run):", flush=True)
    for opt in ("fused_adam", "adamw"):
        cfg = load_config(
            None,
            [*[o for o in base if not o.startswith("deepspeed.optimizer=")], f"deepspeed.optimizer={opt}"],
        )
        assert cfg.scaling.use_gpu and cfg.grad_accum_steps == 1 and cfg.deepspeed.zero_stage == 2
    cfg = load_config(None, base)
    print(
        "  --set "
        + " --set ".join(base)
        + "  (train.micro_batch_size: the largest that fits, found on the GPU)"
    )
    data = prepare_data(cfg)
    mc = model_shape(cfg, data)
    check_shape(mc)
    # the engine sizes ZeRO's buckets from the model's width where its deepspeed_config takes it
    sized = "hidden_size" in inspect.signature(deepspeed_config).parameters
    ds = deepspeed_config(cfg, mc["hidden_size"]) if sized else deepspeed_config(cfg)
    print("  deepspeed config: " + json.dumps(ds))
    n_params, n_matmul, fpt = flop_count(meta_model(mc), mc, args.seq)
    n = len(data.train["input_ids"])
    micros = [
        m for m in sorted({max(1, c * 1024 // args.seq) for c in MICRO_CANDIDATES}, reverse=True) if m <= n
    ]
    if not micros:
        raise SystemExit(f"[dry-run] {n} train blocks of {args.seq}: no micro batch candidate fits the data")
    tflops = datasheet_peak_tflops(args.device_name)
    if tflops is None:
        raise SystemExit(f"[dry-run] no datasheet peak for {args.device_name!r}")
    need = MFU_TARGET * tflops * 1e12 / fpt
    print(
        f"[dry-run] shape ok: {n_params / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M in matmuls), "
        f"{fpt / 1e9:.2f} GFLOP/token at seq {args.seq}; data: {data.stats}; micro batch candidates {micros}; "
        f"{args.device_name}: {tflops:.0f} TFLOP/s datasheet bf16, {MFU_TARGET:.0%} MFU = {need:,.0f} tokens/s",
        flush=True,
    )
    have_nvcc = (
        shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc").exists()
    )
    print(
        f"[dry-run] fused_adam: deepspeed {'installed' if importlib.util.find_spec('deepspeed') else 'MISSING'}, "
        f"nvcc {'found' if have_nvcc else 'not found here'} (built on the GPU box at run time, else adamw)"
    )

    print("[dry-run] CPU smoke run of both code paths (tiny preset; nothing is measured)", flush=True)
    tiny = tiny_cpu(overrides(args.seq, 4, 4, 2, "adamw", export=True, gpu=False))
    tcfg = load_config(None, tiny)
    tdata = prepare_data(tcfg)
    tmc = model_shape(tcfg, tdata)
    loop = PlainLoop(tcfg, tmc, torch.device("cpu"), 4)
    plain = loop.run(tdata, 4, 1, 2)
    tcounts = flop_count(loop.model, tmc, tcfg.data.block_size)
    loop.close()
    with tempfile.TemporaryDirectory(prefix="bloomray-gpu-bench-dry-") as tmp:
        ours = run_bloomray(tiny, Path(tmp) / "bloomray", tdata)
        assert ours["steps"] == 4 and Path(ours["model_dir"], "config.json").is_file(), ours
    ours["peak_mem_gb"] = None
    run = {
        "shape": "tiny preset",
        "train_blocks": tdata.stats["train_blocks"],
        "seq": tcfg.data.block_size,
        "micro": 4,
        "tried": ["fixed"],
        "steps": 4,
        "log_every": 2,
        "warmup": 1,
        "why": "adamw (CPU)",
        "optimizer": "adamw",
    }
    # a made-up 1 TFLOP/s peak: the smoke run checks the report's code, not a number
    body = section_body(plain, ours, tcounts, "CPU (dry run)", 1.0, run, compare_own=False)
    print("\n## gpu_throughput --dry-run (CPU smoke: not a measurement)\n\n" + "\n".join(body))
    print("\n[dry-run] ok: RESULTS.md left unchanged")
    return 0


def main() -> int:
    args = parse_args()
    steps = args.steps or (10 if args.quick else 60)
    log_every = max(1, steps // 2)  # (b) times its last log interval: steps/2 .. steps
    warmup = 2 if args.quick else 5
    base = overrides(args.seq, args.micro_batch or 1, steps, log_every, "fused_adam", args.export)
    if args.dry_run:
        return dry_run(args, base, steps, log_every)
    if not torch.cuda.is_available():
        raise SystemExit("[bench] needs a CUDA GPU (torch.cuda.is_available() is false); try --dry-run")
    if not args.plain_only:
        missing = [m for m in ("ray", "deepspeed") if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(
                f"[bench] {', '.join(missing)} not importable: install them, or run --plain-only"
            )
    device = torch.device("cuda", 0)
    gpu = torch.cuda.get_device_name(device)
    tflops = datasheet_peak_tflops(gpu)
    if tflops is None:
        raise SystemExit(
            f"[bench] no datasheet bf16 peak for {gpu!r}: add it to metrics.GPU_BF16_PEAK_TFLOPS"
        )
    peak = tflops * 1e12
    optimizer, why = ("adamw", "-") if args.plain_only else fused_adam_choice(args.optimizer)
    print(
        f"[bench] {gpu}: datasheet dense bf16 {tflops:.0f} TFLOP/s; {versions()}; optimizer {why}", flush=True
    )

    # (a)'s config: the data, the LR schedule and clipping of (b)
    cfg = load_config(None, [*base, "scaling.use_gpu=false", "deepspeed.optimizer=adamw"])
    data = prepare_data(cfg)
    mc = model_shape(cfg, data)
    check_shape(mc)
    loop = PlainLoop(cfg, mc, device, warmup + log_every + len(MICRO_CANDIDATES))
    counts = flop_count(loop.model, mc, args.seq)
    fpt = counts[2]
    if args.micro_batch:
        micro, tried = args.micro_batch, ["fixed by --micro-batch"]
    else:
        micro, tried = pick_micro_batch(loop, data, args.seq)
    print(
        f"[bench] (a) plain loop: micro batch {micro}, {warmup} warmup + {log_every} timed steps", flush=True
    )
    plain = loop.run(data, micro, warmup, log_every)
    loop.close()
    del loop
    print(
        f"[bench] (a): {plain['tokens_per_s']:,.0f} tokens/s, MFU {100 * plain['tokens_per_s'] * fpt / peak:.1f}%",
        flush=True,
    )

    ours = None
    if not args.plain_only:
        run_overrides = overrides(args.seq, micro, steps, log_every, optimizer, args.export)
        print(f"[bench] (b) bloomray ZeRO-2: {steps} steps, last {log_every} timed", flush=True)
        keep = Path(args.output).expanduser().resolve() if args.output else None
        tmp = tempfile.mkdtemp(prefix="bloomray-gpu-bench-") if keep is None else None
        try:
            ours = run_bloomray(run_overrides, (keep or Path(tmp)) / "bloomray", data)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        ours["peak_mem_gb"] = ours["peak_mem_mb"] / 1024 if ours.get("peak_mem_mb") else None
        mfu = ours["tokens_per_s"] * fpt / peak
        print(f"[bench] (b): {ours['tokens_per_s']:,.0f} tokens/s, MFU {100 * mfu:.1f}%", flush=True)
        if args.export and keep is not None:
            print(
                f"[bench] export: {ours['model_dir']} (max |logit diff| {ours['export_max_abs_logit_diff']})"
            )

    run = {
        "shape": f"bloom-560m shape (24 layers, hidden 1024, 16 heads, vocab {SHAPE['vocab_size']:,})",
        "train_blocks": data.stats["train_blocks"],
        "seq": args.seq,
        "micro": micro,
        "tried": tried,
        "steps": steps,
        "log_every": log_every,
        "warmup": warmup,
        "why": why,
        "optimizer": optimizer,
    }
    report("gpu_throughput", section_body(plain, ours, counts, gpu, tflops, run), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
