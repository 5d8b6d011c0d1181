""".venv/bin/python benchmarks/scale_check.py [--stages 3,2] [--quick]

bloom-560m end to end on this box: the real bloom-560m shape (24 layers, hidden 1024, 16 heads,
vocab 250,880), random init, 2 workers, bf16 with activation checkpointing, sequence 512,
through ``run_training`` exactly as a user runs it:

  ZeRO-3: 10 steps with a checkpoint at step 5, a SIGKILLed worker after it and Ray Train's
  resume; then export (consolidated from the ZeRO shards, checked against the engine's probe
  logits), reload, and 3 completions served over HTTP by ``bloomray serve`` (vLLM).
  ZeRO-2: the same 10 steps without the fault (it fits in 24 GB too).

Records per-worker peak RSS (polled), step time, tokens/s, checkpoint size, checkpoint save
and restore time (measured in the loop), export time, and compares each worker's peak RSS
with the ZeRO memory model (bytes per parameter per stage plus the measured process baseline
and the activation/logit working set). Appends a dated section to benchmarks/RESULTS.md.
``--quick`` runs 2 steps of ZeRO-3 without the fault or serving, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _results import report  # benchmarks/ is on sys.path when run as a script

from bloomray.config import load_config
from bloomray.export.run import run_training
from bloomray.raycluster import init_ray, train_worker_processes
from bloomray.train.progress import latest_registered_step

HIDDEN, LAYERS, HEADS, VOCAB, SEQ, WORKERS = 1024, 24, 16, 250_880, 512, 2
GIB = 1024**3
MEMORY_TOLERANCE = 0.20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("--stages", default="3,2", help="ZeRO stages to run, in order (default 3,2)")
    p.add_argument("--quick", action="store_true", help="2 steps of ZeRO-3 only; no RESULTS.md")
    p.add_argument("--keep", help="keep the run dirs under this folder (default: a temp dir)")
    return p.parse_args()


def overrides(stage: int, steps: int) -> list[str]:
    return [
        "model.preset=bloom-560m",
        f"model.vocab_size={VOCAB}",
        "model.activation_checkpointing=true",
        f"deepspeed.zero_stage={stage}",
        "deepspeed.precision=bf16",
        f"scaling.num_workers={WORKERS}",
        "scaling.cpus_per_worker=1",
        "scaling.worker_start_timeout_s=600",
        f"data.block_size={SEQ}",
        "data.tokenizer.vocab_size=4096",
        f"train.max_steps={steps}",
        "train.micro_batch_size=1",
        f"train.global_batch_size={WORKERS}",
        "train.lr=3e-4",
        "train.warmup_steps=2",
        "train.log_every=1",
        f"train.eval_every={steps}",
        "train.eval_max_batches=1",
        f"train.checkpoint_every={max(steps // 2, 1)}",
        "train.keep_checkpoints=2",
        "train.max_failures=1",
        "output.export=false",  # timed separately below
        "output.tensorboard=false",
    ]


def parameter_count() -> int:
    """Parameters of the bloom-560m shape (tied head), counted from the HF module itself."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    with torch.device("meta"):
        model = BloomForCausalLM(
            BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)
        )
    return sum(p.numel() for p in model.parameters())


def memory_model(stage: int, n_params: int, baseline: float) -> dict[str, float]:
    """Expected peak RSS per worker (bytes): ZeRO model states + step transients + working set.

    Model states per parameter (mixed-precision Adam, ZeRO paper): bf16 weights 2 B, bf16
    gradients 2 B, fp32 master + Adam m + v 12 B. Stage 3 partitions all of them; stage 2
    keeps the full bf16 weights on every rank. The optimizer step adds an fp32 copy of the
    gradient partition (4 B per element; torch AdamW would add one temporary of the same size,
    DeepSpeed's CPU Adam, the CPU default, updates in place): per ZeRO-3 sub-group
    (``engine.ZERO3_SUB_GROUP``), or the whole partition under ZeRO-2.
    Working set: one micro-batch's logits (bf16 output, fp32 upcast and log-softmax for the
    loss, their gradients: 14 B per logit), the gradient bucket (bf16), the largest gathered
    parameter under ZeRO-3 (the embedding: bf16 weight + gradient) and the checkpointed layer
    inputs (2 B x hidden x seq per layer).
    """
    from bloomray.train.engine import MIN_BUCKET, ZERO3_SUB_GROUP

    part = n_params / WORKERS
    bucket = 2 * max(HIDDEN**2, MIN_BUCKET)
    if stage == 3:
        states = 16 * part
        step = 4 * min(part, ZERO3_SUB_GROUP)
        gathered = VOCAB * HIDDEN * (2 + 2)
    else:
        states = 2 * n_params + 14 * part
        step = 4 * part
        gathered = 0
    working = SEQ * VOCAB * 14 + bucket + gathered + LAYERS * SEQ * HIDDEN * 2
    total = states + step + working + baseline
    return {"states": states, "step": step, "working": working, "baseline": baseline, "total": total}


def worker_baseline_rss() -> float:
    """RSS of a Ray worker that has imported what a train worker imports, before any model."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> float:
        import deepspeed  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return float(psutil.Process().memory_info().rss)

    return ray.get(probe.remote())


class RssMonitor:
    """Polls the RSS of every Ray Train worker process below this one; keeps each one's peak."""

    def __init__(self, interval: float = 0.25) -> None:
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def workers(self) -> list[psutil.Process]:
        return train_worker_processes()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            for proc in self.workers():
                try:
                    rss = float(proc.memory_info().rss)
                except psutil.Error:
                    continue
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0.0), rss)
            time.sleep(interval)


def kill_after_checkpoint(out: Path, monitor: RssMonitor, step: int, done: threading.Event) -> dict[str, Any]:
    """SIGKILL one train worker once the checkpoint of ``step`` is registered."""
    facts: dict[str, Any] = {}
    while not done.is_set():
        if latest_registered_step(out) >= step:
            workers = monitor.workers()
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                facts = {"killed_pid": workers[-1].pid, "after_checkpoint": step, "at": time.time()}
            return facts
        time.sleep(0.2)
    return facts


def run_stage(stage: int, steps: int, root: Path, fault: bool) -> dict[str, Any]:
    """One training run; returns its summary plus the measured memory and timings.

    The facts are also written to ``zero<stage>/scale_facts.json``; a ``--keep`` dir that
    already holds them is reused, so a failure in a later part does not cost the training.
    """
    out = root / f"zero{stage}"
    facts_file = out / "scale_facts.json"
    if facts_file.exists():
        print(f"[scale] reusing {facts_file}", flush=True)
        return {**json.loads(facts_file.read_text()), "out": out}
    cfg = load_config("tiny-cpu", overrides(stage, steps))
    done = threading.Event()
    box: dict[str, Any] = {}
    with RssMonitor() as monitor:
        killer = None
        if fault:
            killer = threading.Thread(
                target=lambda: box.update(kill=kill_after_checkpoint(out, monitor, steps // 2, done)),
                daemon=True,
            )
            killer.start()
        t0 = time.perf_counter()
        try:
            summary = run_training(cfg, out)
        finally:
            done.set()
        wall = time.perf_counter() - t0
        if killer:
            killer.join()
    ckpt = Path(summary["checkpoint"])
    meta = json.loads((ckpt / "bloomray.json").read_text())
    facts = {
        "stage": stage,
        "summary": summary,
        "meta": meta,
        "wall_s": wall,
        "peaks": sorted(monitor.peaks.values(), reverse=True),
        "kill": box.get("kill"),
        "ckpt_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
    }
    facts_file.write_text(json.dumps(facts, indent=2))
    return {**facts, "out": out}


def export_and_serve(run: dict[str, Any], serve: bool) -> dict[str, Any]:
    """Export the final checkpoint (timed), reload it, and serve 3 completions over HTTP."""
    import httpx

    from bloomray.export.consolidate import export_checkpoint
    from bloomray.export.load import load_model

    model_dir = run["out"] / "model"
    t0 = time.perf_counter()
    info = export_checkpoint(run["summary"]["checkpoint"], model_dir, overwrite=True)
    facts: dict[str, Any] = {"export_s": time.perf_counter() - t0, "logit_diff": info["max_abs_logit_diff"]}
    t0 = time.perf_counter()
    load_model(model_dir)
    facts["reload_s"] = time.perf_counter() - t0
    if not serve:
        return facts
    from bloomray.serving.run import start_server

    os.environ.setdefault("BLOOMRAY_API_KEYS", "scale-check-key")
    key = os.environ["BLOOMRAY_API_KEYS"].split(",")[0]
    t0 = time.perf_counter()
    # float32 engine, as the serving tests use: vLLM-CPU's bf16 path is not the one under test
    url = start_server(
        {"bloom560": str(model_dir)}, port=8123, overrides={"dtype": "float32", "max_context": 1024}
    )
    facts["serve_start_s"] = time.perf_counter() - t0
    completions = []
    with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {key}"}) as client:
        for prompt in ("The history of", "In the beginning", "Ray Serve"):
            r = client.post(
                f"{url}/v1/completions", json={"model": "bloom560", "prompt": prompt, "max_tokens": 8}
            )
            r.raise_for_status()
            body = r.json()
            completions.append((prompt, body["choices"][0]["text"], body["usage"]["completion_tokens"]))
    facts["completions"] = completions
    from ray import serve as ray_serve

    ray_serve.shutdown()
    return facts


def describe(run: dict[str, Any], n_params: int, baseline: float) -> list[str]:
    s, m = run["summary"], run["meta"]
    timings = m.get("timings", {})
    model = memory_model(run["stage"], n_params, baseline)
    peak = run["peaks"][0] if run["peaks"] else float("nan")
    gap = (peak - model["total"]) / model["total"]
    verdict = "within" if abs(gap) <= MEMORY_TOLERANCE else "OUTSIDE"
    step_s = 1.0 / (s["tokens_per_s"] / (WORKERS * SEQ)) if s.get("tokens_per_s") else float("nan")
    lines = [
        f"### ZeRO-{run['stage']}",
        "",
        f"- steps {s['steps']}, restarts {s['restarts']}, wall {run['wall_s']:.0f} s (incl. Ray start, data, eval)",
        f"- tokens/s {s['tokens_per_s']:.1f} (2 workers, last log interval), step time {step_s:.1f} s, "
        f"MFU {s['mfu']:.3f} (vs measured CPU matmul peak)",
        f"- train loss {s['train_loss']:.3f}, eval loss {s['eval_loss']:.3f} (initial {_fmt(s['initial_eval_loss'])})",
        f"- per-worker peak RSS (GiB): {', '.join(f'{p / GIB:.2f}' for p in run['peaks'])}",
        f"- memory model per worker: states {model['states'] / GIB:.2f} + optimizer step "
        f"{model['step'] / GIB:.2f} + working set {model['working'] / GIB:.2f} + baseline "
        f"{baseline / GIB:.2f} = {model['total'] / GIB:.2f} GiB; "
        f"measured peak {peak / GIB:.2f} GiB: {gap:+.0%} ({verdict} ±{MEMORY_TOLERANCE:.0%})",
        f"- checkpoint {run['ckpt_bytes'] / GIB:.2f} GiB; save {_fmt(timings.get('save_s'))} s; "
        f"restore {_fmt(timings.get('restore_s'))} s",
    ]
    if run["kill"]:
        lines.append(
            f"- SIGKILLed worker {run['kill']['killed_pid']} after checkpoint {run['kill']['after_checkpoint']}"
        )
    return lines


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return "/".join(f"{x:.1f}" for x in v) if v else "n/a"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def main() -> int:
    args = parse_args()
    stages = [3] if args.quick else [int(s) for s in args.stages.split(",")]
    steps = 2 if args.quick else 10
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bloomray-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=4)
    n_params = parameter_count()
    baseline = worker_baseline_rss()
    print(
        f"[scale] {n_params / 1e6:.1f}M parameters; worker baseline RSS {baseline / GIB:.2f} GiB", flush=True
    )
    body = [
        f"bloom-560m shape ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, vocab {VOCAB:,}; "
        f"{n_params / 1e6:.1f}M parameters), random init, {WORKERS} workers x 1 CPU, bf16, activation "
        f"checkpointing, sequence {SEQ}, micro-batch 1, {steps} steps. Command: `{__doc__.splitlines()[0]}`",
        "",
    ]
    for i, stage in enumerate(stages):
        run = run_stage(stage, steps, root, fault=not args.quick and i == 0)
        body += describe(run, n_params, baseline)
        if i == 0:
            facts = export_and_serve(run, serve=not args.quick)
            body.append(
                f"- export {facts['export_s']:.1f} s (max |logit diff| vs engine {facts['logit_diff']:.2e}), "
                f"reload {facts['reload_s']:.1f} s"
            )
            for prompt, text, n in facts.get("completions", []):
                body.append(f"- served: {prompt!r} -> {text!r} ({n} tokens)")
        body.append("")
        print("\n".join(body), flush=True)
    report("scale_check", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
