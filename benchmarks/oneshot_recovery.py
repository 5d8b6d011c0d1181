""".venv/bin/python benchmarks/oneshot_recovery.py [--parts oneshot,recovery,search,sst2] [--quick]

The pruning benchmark of a *trained* model (``sparsity_quality.py`` prunes during training from
scratch): one-shot pruning with calibration data, recovery with distillation, and a
multi-objective search, all through bloomray's own verbs on one local Ray.

  dense     the ``small`` preset trained 300 steps on the embedded corpus (cached in
            outputs/bench-oneshot/dense: trained once, reused by later runs).
  oneshot   ``bloomray prune`` of the dense export at 50%: magnitude, Wanda and SparseGPT,
            unstructured and 2:4, 128 calibration blocks. Target: Wanda's and SparseGPT's
            eval-loss increase over dense each <= 0.5x magnitude's (unstructured).
  recovery  <= 200 steps of training from the dense export with distillation from it
            (alpha 0.5, T 2): 50% unstructured (Wanda initial masks), 2:4 (Wanda 2:4), and
            50% structured heads + MLP (gradual, compacted at export). Targets: within 2%, 6%
            and 8% of dense eval loss; the structured model >= 1.4x the dense model's decode
            tokens/s in vLLM at batch 16 (``tune.engine_latency.decode_latency``, ABBA rounds).
  search    ``bloomray tune`` over lr and structured sparsity with objectives eval loss and
            decode_rel (vLLM decode latency relative to dense): NSGA-II with 12 trials against
            random search with 24; the Pareto hypervolume of each (both objectives minimised,
            reference point: the worst value of each over both searches). Target: NSGA-II's >=
            random's.
  sst2      the one-shot and recovery parts on an SST-2 classifier (``oneshot_sst2.py``).

Eval losses are on the whole eval split (the same blocks for every model: the same tokenizer and
document-hash split). Appends a dated section to benchmarks/RESULTS.md; ``--quick`` runs tiny
step counts and trial numbers to check the script, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import oneshot_sst2
from _results import ROOT, markdown_table, report  # benchmarks/ is on sys.path when run as a script
from sparsity_quality import RAY_CPUS, base_overrides, train_precision

from bloomray.config import load_config

CACHE = ROOT / "outputs" / "bench-oneshot"
ok = {True: "met", False: "MISSED"}
RECOVERY_TOLERANCE = {"unstructured": 0.02, "2:4": 0.06, "structured": 0.08}
SPEEDUP_TARGET = 1.4


def base(steps: int, quick: bool) -> list[str]:
    """sparsity_quality's shared run settings (small preset, ZeRO-2, 2 workers), on the LM corpus."""
    return [
        "task=causal_lm",
        "data.block_size=128",
        "data.tokenizer.vocab_size=4096",
        *base_overrides(steps),
        f"train.warmup_steps={2 if quick else 20}",  # after base_overrides: the later value wins
    ]


def train_dense(quick: bool) -> dict[str, Any]:
    from bloomray.export.run import run_training

    out = CACHE / ("dense-quick" if quick else "dense")
    if (out / "summary.json").is_file():
        print(f"[bench] dense model cached in {out}", flush=True)
        return json.loads((out / "summary.json").read_text())
    steps = 20 if quick else 300  # 800 overfits the 106k-token corpus (eval 5.51); 300: 4.62
    cfg = load_config(None, [*base(steps, quick), "train.lr=2.0e-3", "train.lr_schedule=cosine"])
    print(f"[bench] training the dense model: {steps} steps", flush=True)
    return run_training(cfg, out)


def oneshot(dense_dir: str, quick: bool, tmp: Path) -> dict[str, dict[str, Any]]:
    from bloomray.export.oneshot import prune_model_dir

    calib = 8 if quick else 128
    results = {}
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            cfg = load_config(
                None,
                [
                    *base(1, quick),
                    f"prune.method={method}",
                    f"prune.pattern={pattern}",
                    "prune.final_sparsity=0.5",
                    f"prune.calibration_samples={calib}",
                ],
            )
            t0 = time.perf_counter()
            s = prune_model_dir(dense_dir, cfg, tmp / f"{method}-{pattern}".replace(":", ""))
            s["wall_s"] = time.perf_counter() - t0
            results[f"{method} {pattern}"] = s
            print(f"[bench] {method} {pattern}: {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}")
    return results


RECOVERY = {
    "unstructured": [
        "prune.method=wanda",
        "prune.initial_sparsity=0.5",
        "prune.final_sparsity=0.5",
    ],
    "2:4": [
        "prune.method=wanda",
        "prune.pattern=2:4",
        "prune.initial_sparsity=0.5",
        "prune.final_sparsity=0.5",
    ],
    "structured": [
        "prune.method=structured",
        "prune.structure=mlp+heads",
        "prune.final_sparsity=0.5",
        "prune.schedule=cubic",
        "prune.end_fraction=0.5",
    ],
}


def recovery(dense_dir: str, quick: bool, tmp: Path) -> dict[str, dict[str, Any]]:
    from bloomray.export.run import run_training

    steps = 10 if quick else 200
    results = {}
    for kind, prune in RECOVERY.items():
        cfg = load_config(
            None,
            [
                *base(steps, quick),
                f"model.path={dense_dir}",
                "train.lr=5.0e-4",
                "train.lr_schedule=cosine",
                *prune,
                "prune.start_fraction=0.0",
                f"prune.update_every={max(1, steps // 20)}",
                f"prune.calibration_samples={8 if quick else 128}",
                "prune.distill.enabled=true",
                "prune.distill.alpha=0.5",
                "prune.distill.temperature=2.0",
            ],
        )
        print(f"[bench] recovery {kind}: {steps} steps with distillation", flush=True)
        results[kind] = run_training(cfg, tmp / f"recover-{kind}".replace(":", ""))
    return results


def engine_speed(dense_dir: str, structured_dir: str, quick: bool) -> dict[str, float]:
    """Decode ms per token of both exports in vLLM at batch 16 (run after Ray is down)."""
    from bloomray.tune.engine_latency import cpu_bind, decode_latency

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind()
    got = decode_latency(
        {"dense": dense_dir, "structured": structured_dir},
        batch=16,
        prompt_len=64,
        new_tokens=16 if quick else 64,
        rounds=2 if quick else 6,
    )
    return got["ms"]


def search(quick: bool, tmp: Path) -> dict[str, Any]:
    from bloomray.tune.driver import run_tune
    from bloomray.tune.objectives import hypervolume_2d

    steps = 8 if quick else 30  # 36 trials of ~75 s each on 2 cores
    n_mo, n_random = (3, 4) if quick else (12, 24)
    common = [
        *base(steps, quick),
        "scaling.num_workers=1",
        f"train.warmup_steps={2 if quick else 5}",
        "train.lr_schedule=cosine",
        "prune.method=structured",
        "prune.structure=mlp+heads",
        "prune.start_fraction=0.1",
        "prune.end_fraction=0.6",
        "prune.update_every=4",
        "tune.max_concurrent_trials=1",
        "tune.max_failures=0",
        "tune.scheduler=fifo",
        "select.latency_batch=16",
        "select.latency_seq=32",
        "select.decode_tokens=32",
        "tune.space={train.lr: {type: loguniform, low: 3.0e-4, high: 1.0e-2}, "
        "prune.final_sparsity: {type: uniform, low: 0.0, high: 0.8}}",
    ]
    mo = [*common, "tune.search=optuna", "tune.objectives=[eval_loss, decode_rel]"]
    runs = {
        "nsga2": [*mo, "tune.sampler=nsga2", f"tune.num_samples={n_mo}"],
        "random": [*mo, "tune.sampler=random", f"tune.num_samples={n_random}"],
    }
    points: dict[str, list[tuple[float, float]]] = {}
    for name, overrides in runs.items():
        print(f"[bench] search {name}", flush=True)
        out = tmp / f"search-{name}"
        run_tune(load_config(None, overrides), out)
        points[name] = []
        for s in sorted((out / "trials").glob("*/summary.json")):
            summary = json.loads(s.read_text())
            if "decode_rel" in summary:
                points[name].append((summary["eval_loss"], summary["decode_rel"]))
    everything = [p for pts in points.values() for p in pts]
    ref = (max(p[0] for p in everything) * 1.01, max(p[1] for p in everything) * 1.01)
    return {
        "points": points,
        "ref": ref,
        "hv": {name: hypervolume_2d(pts, ref) for name, pts in points.items()},
        "trials": {"nsga2": n_mo, "random": n_random},
        "steps": steps,
    }


# --------------------------------------------------------------------------- report


def oneshot_lines(dense: dict[str, Any], shots: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        {
            "method": name,
            "sparsity": f"{100 * s['sparsity']:.1f}%",
            "eval loss": f"{s['eval_loss_after']:.4f}",
            "increase over dense": f"{s['eval_loss_after'] - s['eval_loss_before']:+.4f}",
            "time s": f"{s['wall_s']:.0f}",
        }
        for name, s in shots.items()
    ]
    lines = [markdown_table(rows), ""]
    for pattern in ("unstructured", "2:4"):
        mag = shots[f"magnitude {pattern}"]
        mag_up = mag["eval_loss_after"] - mag["eval_loss_before"]
        for method in ("wanda", "sparsegpt"):
            s = shots[f"{method} {pattern}"]
            up = s["eval_loss_after"] - s["eval_loss_before"]
            frac = up / mag_up if mag_up > 0 else float("inf")
            target = f"target <= 0.5x: {ok[frac <= 0.5]}" if pattern == "unstructured" else "no target"
            lines.append(
                f"- one-shot {method} {pattern}: increase {up:+.4f} = {frac:.2f}x magnitude's ({target})"
            )
    return lines


def recovery_lines(
    dense: dict[str, Any], rec: dict[str, dict[str, Any]], speed: dict[str, float]
) -> list[str]:
    d = dense["eval_loss"]
    rows = [
        {
            "recovery run": kind,
            "steps": s["steps"],
            "sparsity": "-" if s.get("sparsity") is None else f"{100 * s['sparsity']:.1f}%",
            "one-shot eval loss": f"{s['initial_oneshot']['eval_loss_after']:.4f}"
            if "initial_oneshot" in s
            else "-",
            "eval loss after": f"{s['eval_loss']:.4f}",
            "vs dense": f"{s['eval_loss'] / d:.3f}x",
        }
        for kind, s in rec.items()
    ]
    lines = [markdown_table(rows), ""]
    for kind, s in rec.items():
        r = s["eval_loss"] / d
        tol = RECOVERY_TOLERANCE[kind]
        lines.append(
            f"- recovered {kind}: {100 * (r - 1):+.2f}% vs dense (target within {100 * tol:.0f}%: {ok[r <= 1 + tol]})"
        )
    up = speed["dense"] / speed["structured"]
    lines.append(
        f"- vLLM decode at batch 16: dense {1000 / speed['dense']:.1f}, structured {1000 / speed['structured']:.1f} "
        f"steps/s ({up:.2f}x; target >= {SPEEDUP_TARGET}x: {ok[up >= SPEEDUP_TARGET]})"
    )
    return lines


def search_lines(res: dict[str, Any]) -> list[str]:
    hv, n = res["hv"], res["trials"]
    lines = [
        f"- each trial: `small` preset, {res['steps']} steps, 1 worker, structured mlp+heads pruning; objectives "
        "eval loss and decode_rel (vLLM, batch 16, 32 prompt + 32 new tokens, 5 ABBA rounds against the dense shape); "
        f"NSGA-II population {max(2, min(50, n['nsga2'] // 3))} (the tune.population_size default), both samplers "
        "seeded 0 (the same first generation)",
        f"- hypervolume reference point (eval loss, decode_rel) = ({res['ref'][0]:.4f}, {res['ref'][1]:.4f})",
    ]
    for name in ("nsga2", "random"):
        pts = ", ".join(f"({a:.3f}, {b:.3f})" for a, b in sorted(res["points"][name]))
        lines.append(
            f"- {name}: {len(res['points'][name])} of {n[name]} trials measured, hypervolume {hv[name]:.4f}; points {pts}"
        )
    lines.append(
        f"- NSGA-II with {n['nsga2']} trials vs random with {n['random']}: {hv['nsga2']:.4f} vs {hv['random']:.4f} "
        f"(target >=: {ok[hv['nsga2'] >= hv['random']]})"
    )
    return lines


def main() -> int:
    import ray

    from bloomray.raycluster import init_ray

    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("--parts", default="oneshot,recovery,search,sst2")
    p.add_argument("--quick", action="store_true", help="tiny step counts to check the script; no RESULTS.md")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    tmp = CACHE / ("runs-quick" if args.quick else f"runs-{int(time.time())}")
    # Ray Train's controller notices a finished run at its next poll (every 2 s by default):
    # ~4 s less per run of a few minutes, 36 of them in the search. Results do not depend on it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    init_ray(None, RAY_CPUS)
    try:
        # The search trains its trials from scratch: the dense model only for the other parts.
        dense = train_dense(args.quick) if parts & {"oneshot", "recovery"} else None
        shots = oneshot(dense["model_dir"], args.quick, tmp) if "oneshot" in parts else None
        rec = recovery(dense["model_dir"], args.quick, tmp) if "recovery" in parts else None
        found = search(args.quick, tmp) if "search" in parts else None
        sst2 = oneshot_sst2.run(args.quick, CACHE, tmp) if "sst2" in parts else None
    finally:
        ray.shutdown()
    speed = engine_speed(dense["model_dir"], rec["structured"]["model_dir"], args.quick) if rec else None
    import torch

    body = [
        f"- training precision {train_precision()} (CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        "bf16 only with AVX-512)",
        "",
    ]
    if dense:
        body += [
            f"- dense: `small` preset, {dense['steps']} steps on the embedded corpus, eval loss {dense['eval_loss']:.4f} "
            f"(whole eval split; untrained {dense['initial_eval_loss']:.4f})",
            "",
        ]
    if shots:
        body += [
            "### one-shot at 50% (`bloomray prune`, 128 calibration blocks of 128 tokens)",
            "",
            *oneshot_lines(dense, shots),
            "",
        ]
    if rec:
        body += [
            "### recovery with distillation from the dense model",
            "",
            *recovery_lines(dense, rec, speed),
            "",
        ]
    if found:
        body += ["### multi-objective search", "", *search_lines(found), ""]
    if sst2:
        body += ["### SST-2 (classification): one-shot and recovery", "", *oneshot_sst2.lines(sst2), ""]
    report("oneshot_recovery", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
