"""The SST-2 part of ``oneshot_recovery.py`` (``--parts sst2``): the same verbs on a classifier.

dense     a ``small`` classifier trained on the first 20,000 SST-2 train sentences (600 steps,
          global batch 16; cached in outputs/bench-oneshot/sst2-dense), eval on the 872 dev
          sentences.
oneshot   ``bloomray prune`` of it at 50% unstructured: magnitude, Wanda and SparseGPT, 128
          calibration blocks of 64 tokens (the train sentences' tokens, packed without
          padding). The LM's target, applied here too: Wanda's and SparseGPT's eval-loss
          increase over dense <= 0.5x magnitude's. Accuracy is reported beside it.
recovery  <= 200 steps from the dense classifier with Wanda's 50% masks and distillation from
          it (alpha 0.5, T 2). The LM's target, applied here too: within 2% of dense eval loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _results import markdown_table
from sparsity_quality import SST2, base_overrides, datasets, sst2_eval_file, train_precision

from bloomray.config import load_config

ok = {True: "met", False: "MISSED"}
METHODS = ("magnitude", "wanda", "sparsegpt")


def sst2_base(steps: int, quick: bool, cache: Path) -> list[str]:
    """sparsity_quality's SST-2 settings and shared run settings, on 20,000 train sentences."""
    cls = datasets(quick, sst2_eval_file(cache))[1].overrides
    return [
        *cls,
        *base_overrides(steps),
        f"data.max_documents={512 if quick else 20000}",  # after cls: the later value wins
    ]


def train_dense(quick: bool, cache: Path) -> dict[str, Any]:
    import json

    from bloomray.export.run import run_training

    out = cache / ("sst2-dense-quick" if quick else "sst2-dense")
    if (out / "summary.json").is_file():
        print(f"[bench] SST-2 dense classifier cached in {out}", flush=True)
        return json.loads((out / "summary.json").read_text())
    steps = 20 if quick else 600
    cfg = load_config(None, [*sst2_base(steps, quick, cache), "train.lr=1.0e-3", "train.lr_schedule=linear"])
    print(f"[bench] training the SST-2 dense classifier: {steps} steps", flush=True)
    return run_training(cfg, out)


def oneshot(dense_dir: str, quick: bool, cache: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    import time

    from bloomray.export.oneshot import prune_model_dir

    results = {}
    for method in METHODS:
        cfg = load_config(
            None,
            [
                *sst2_base(1, quick, cache),
                f"prune.method={method}",
                "prune.final_sparsity=0.5",
                f"prune.calibration_samples={8 if quick else 128}",
            ],
        )
        t0 = time.perf_counter()
        s = prune_model_dir(dense_dir, cfg, tmp / f"sst2-{method}")
        s["wall_s"] = time.perf_counter() - t0
        results[method] = s
        print(
            f"[bench] SST-2 {method}: loss {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}, accuracy "
            f"{s['eval_accuracy_before']:.4f} -> {s['eval_accuracy_after']:.4f}",
            flush=True,
        )
    return results


def recovery(dense_dir: str, quick: bool, cache: Path, tmp: Path) -> dict[str, Any]:
    from bloomray.export.run import run_training

    steps = 10 if quick else 200
    cfg = load_config(
        None,
        [
            *sst2_base(steps, quick, cache),
            f"model.path={dense_dir}",
            "train.lr=5.0e-4",
            "train.lr_schedule=cosine",
            "prune.method=wanda",
            "prune.initial_sparsity=0.5",
            "prune.final_sparsity=0.5",
            "prune.start_fraction=0.0",
            f"prune.calibration_samples={8 if quick else 128}",
            "prune.distill.enabled=true",
            "prune.distill.alpha=0.5",
            "prune.distill.temperature=2.0",
        ],
    )
    print(f"[bench] SST-2 recovery: {steps} steps with distillation", flush=True)
    return run_training(cfg, tmp / "sst2-recover")


def run(quick: bool, cache: Path, tmp: Path) -> dict[str, Any]:
    if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
        raise SystemExit(f"[bench] SST-2 not found: need {SST2}/train.tsv and dev.tsv")
    cache.mkdir(parents=True, exist_ok=True)  # sst2_eval_file writes the renamed dev file there
    dense = train_dense(quick, cache)
    return {
        "dense": dense,
        "oneshot": oneshot(dense["model_dir"], quick, cache, tmp),
        "recovery": recovery(dense["model_dir"], quick, cache, tmp),
    }


def lines(res: dict[str, Any]) -> list[str]:
    dense, shots, rec = res["dense"], res["oneshot"], res["recovery"]
    d_loss, d_acc = dense["eval_loss"], dense["eval_accuracy"]
    rows = [
        {
            "model": f"one-shot {m} 50%",
            "sparsity": f"{100 * s['sparsity']:.1f}%",
            "eval loss": f"{s['eval_loss_after']:.4f}",
            "increase over dense": f"{s['eval_loss_after'] - s['eval_loss_before']:+.4f}",
            "accuracy": f"{100 * s['eval_accuracy_after']:.2f}%",
            "vs dense": f"{100 * (s['eval_accuracy_after'] - s['eval_accuracy_before']):+.2f} pts",
            "time s": f"{s['wall_s']:.0f}",
        }
        for m, s in shots.items()
    ]
    rows.append(
        {
            "model": f"Wanda 50% + {rec['steps']} steps distillation",
            "sparsity": f"{100 * rec['sparsity']:.1f}%",
            "eval loss": f"{rec['eval_loss']:.4f}",
            "increase over dense": f"{rec['eval_loss'] - d_loss:+.4f}",
            "accuracy": f"{100 * rec['eval_accuracy']:.2f}%",
            "vs dense": f"{100 * (rec['eval_accuracy'] - d_acc):+.2f} pts",
            "time s": "-",
        }
    )
    out = [
        f"- dense: `small` classifier, {dense['steps']} steps on the first {dense['data']['train_examples']:,} SST-2 "
        f"train sentences, {train_precision()}, dev "
        f"(872 sentences) eval loss {d_loss:.4f}, accuracy {100 * d_acc:.2f}%",
        "",
        markdown_table(rows),
        "",
    ]
    mag = shots["magnitude"]
    mag_up = mag["eval_loss_after"] - mag["eval_loss_before"]
    for m in ("wanda", "sparsegpt"):
        s = shots[m]
        up = s["eval_loss_after"] - s["eval_loss_before"]
        if mag_up <= 0:
            out.append(
                f"- SST-2 one-shot {m}: eval-loss increase {up:+.4f}; magnitude's is {mag_up:+.4f}, no ratio"
            )
            continue
        frac = up / mag_up
        out.append(
            f"- SST-2 one-shot {m}: eval-loss increase {up:+.4f} = {frac:.2f}x magnitude's (LM target <= 0.5x: "
            f"{ok[frac <= 0.5]})"
        )
    r = rec["eval_loss"] / d_loss
    out.append(
        f"- SST-2 recovered 50% unstructured: eval loss {100 * (r - 1):+.2f}% vs dense (LM target within 2%: "
        f"{ok[r <= 1.02]}), accuracy {100 * (rec['eval_accuracy'] - d_acc):+.2f} pts"
    )
    return out
