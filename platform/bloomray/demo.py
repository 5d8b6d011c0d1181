"""The end-to-end demo on the embedded corpus (``bloomray demo`` / ``make demo``).

pretrain a small BLOOM -> Tune search over learning rate and structured-pruning schedules
-> the winner, compacted -> served on Ray Serve + vLLM (autoscaling) -> real HTTP requests
-> shut down; a completion that repeats one token through it fails the demo (exit 1).
About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bloomray.config import ConfigError, load_config
from bloomray.errors import BloomrayError
from bloomray.export.run import run_training
from bloomray.train.progress import PROGRESS_FILE


def _banner(text: str) -> None:
    print(f"\n{'=' * 8} {text} {'=' * max(4, 70 - len(text))}", flush=True)


# Written into every output dir the demo creates: only such a dir is ever replaced.
DEMO_MARKER = ".bloomray-demo"


def claim_output(output: Path) -> Path:
    """Make ``output`` the demo's fresh output dir, replacing only a dir an earlier demo made.

    Raises:
        ConfigError: ``output`` exists, is not empty and was not made by the demo (nothing is
            deleted; the message says how to proceed).
    """
    output = output.expanduser().resolve()
    if output.exists():
        if not (output / DEMO_MARKER).is_file() and (not output.is_dir() or any(output.iterdir())):
            raise ConfigError(
                f"--output {output} exists and was not created by `bloomray demo`; "
                "the demo only replaces its own output dirs: pick another --output or remove it yourself"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True)
    (output / DEMO_MARKER).write_text(
        "made by bloomray demo; `bloomray demo` replaces this dir on its next run\n"
    )
    return output


# The demo's pretraining on top of the tiny-cpu preset: one compiled ZeRO-0 worker on both
# cores (the fastest setting here, see the README's benchmarks) and enough steps that the served
# model writes text that reads like the corpus. The user's --set overrides come after these.
PRETRAIN = [
    "train.max_steps=400",
    "train.compile=true",
    "scaling.num_workers=1",
    "scaling.cpus_per_worker=2",
    "deepspeed.zero_stage=0",
    "train.warmup_steps=20",
    "train.log_every=50",
    "train.eval_every=400",
    "train.checkpoint_every=400",
    "train.eval_max_batches=32",
]

# What the demo's requests ask for: sampled as a user would (greedy decoding of a small model
# loops), with a mild frequency penalty against repeats.
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "frequency_penalty": 0.5, "seed": 0}


class DegenerateCompletionError(BloomrayError, RuntimeError):
    """Exit code 1: a completion of the served winner repeats one token through it."""


def repeated_token(text: str, min_units: int = 4, share: float = 0.5) -> str | None:
    """The word, punctuation mark or newline making up ``share`` or more of a completion of at
    least ``min_units`` of them (a degenerate model's "the the the", ",,,,"), or None."""
    units = re.findall(r"\w+|[^\w\s]|\n", text.lower())
    unit = max(set(units), key=units.count, default=None)
    return unit if len(units) >= min_units and units.count(unit) >= share * len(units) else None


def _verdict(text: str) -> str:
    unit = repeated_token(text)
    return f"  <- DEGENERATE: {unit!r} repeated through the completion" if unit else ""


def run_demo(
    output: Path, overrides: list[str] | None = None, trials: int = 4, verbose: bool = False
) -> dict:
    """Run every stage; the output dir is replaced (only one an earlier demo made), so
    ``make demo`` can run again. Without ``verbose`` Ray's own log lines stay in its log files."""
    import ray

    from bloomray.raycluster import QUIET_ENV

    output = claim_output(output)
    if not verbose:
        os.environ[QUIET_ENV] = "1"
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy reporter: silent at verbose=0
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    start = time.time()

    cfg = load_config("tiny-cpu", [*PRETRAIN, *(overrides or [])])
    _banner(
        "1/4 pretrain: small BLOOM on the embedded corpus "
        f"(Ray Train + DeepSpeed, {cfg.deepspeed.precision}, compiled)"
    )
    with _echo_progress(output / "pretrain" / "logs" / PROGRESS_FILE, enabled=not verbose):
        pre = run_training(cfg, output / "pretrain")
    print(
        f"[demo] pretrained: eval loss {pre['initial_eval_loss']:.3f} -> {pre['eval_loss']:.3f} "
        f"(perplexity {pre['eval_perplexity']:.1f}) in {pre['steps']} steps, "
        f"{pre['tokens_per_s']:,.0f} tok/s, {time.time() - start:.0f}s",
        flush=True,
    )

    _banner(f"2/4 tune: {trials} trials of learning rate x structured-pruning schedule (Ray Tune, ASHA)")
    from bloomray.tune.driver import run_tune

    tcfg = load_config(
        "tune-tiny-cpu",
        [
            f"model.path={pre['model_dir']}",
            f"tune.num_samples={trials}",
            "train.max_steps=30",
            "train.warmup_steps=2",
        ],
    )
    search = run_tune(tcfg, output / "tune")
    _print_pareto(output / "tune" / "trials.csv", search)
    gain = compare(Path(pre["model_dir"]), Path(search["winner_dir"]), pre, search)

    _banner("3/4 serve: the winner on vLLM (Ray Serve LLM), autoscaling 1-2 replicas, OpenAI-style HTTP")
    from ray import serve

    from bloomray.serving.run import DEFAULT_CONFIG, start_server

    if not verbose:  # Serve's and Ray Serve LLM's driver-side INFO lines (deployment options, ...)
        for name in ("ray", "ray.serve", "ray.llm"):
            logging.getLogger(name).setLevel(logging.WARNING)

    os.environ.setdefault("BLOOMRAY_API_KEYS", os.urandom(16).hex())
    port = _free_port()
    url = start_server(
        {"winner": search["winner_dir"]},
        DEFAULT_CONFIG,
        port=port,
        host="127.0.0.1",
        overrides={
            "max_context": 512,
            "max_tokens_limit": 256,
            "kv_cache_gib": 1,
            "engine_deployment": {
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
                "logging_config": {"enable_access_log": False},  # keep the demo's console readable
            },
        },
    )
    print(f"[demo] serving at {url}", flush=True)

    _banner("4/4 requests over real HTTP")
    completions = _send_requests(url, os.environ["BLOOMRAY_API_KEYS"].split(",")[0])
    serve.shutdown()
    ray.shutdown()

    print(f"\n[demo] done in {time.time() - start:.0f}s. {gain}")
    print("[demo] artifacts:")
    for label, path in [
        ("pretrained model", pre["model_dir"]),
        ("pretrain summary", output / "pretrain" / "summary.json"),
        ("checkpoints", output / "pretrain" / "checkpoints"),
        ("training logs", output / "pretrain" / "logs"),
        ("trials", output / "tune" / "trials.csv"),
        ("Pareto plot", output / "tune" / "pareto.png"),
        ("lr vs quality plot", output / "tune" / "lr_vs_quality.png"),
        ("winner model", search["winner_dir"]),
        ("search summary", output / "tune" / "summary.json"),
    ]:
        print(f"  {label:<20} {path}")
    bad = [(text, unit) for text in completions if (unit := repeated_token(text))]
    if bad:
        raise DegenerateCompletionError(
            f"the served winner repeats {bad[0][1]!r} through its completion {bad[0][0]!r}",
            hint="pretrain longer (--set train.max_steps=...) or search more trials (--trials)",
        )
    return {"pretrain": pre, "tune": search}


@contextmanager
def _echo_progress(path: Path, enabled: bool) -> Iterator[None]:
    """While the block runs, print each new line of the run's progress file (rank 0's step lines,
    which quiet mode keeps off the console along with the rest of Ray's worker output)."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def tail() -> None:
        seen, done = 0, False
        while not done:
            done = stop.wait(1.0)  # one last read after the block ended
            if path.is_file():
                lines = path.read_text().splitlines()
                for line in lines[seen:]:
                    print(line, flush=True)
                seen = len(lines)

    thread = threading.Thread(target=tail, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def compare(dense_dir: Path, winner_dir: Path, pre: dict, search: dict) -> str:
    """One line: the winner's quality, size and CPU forward latency against the dense model it
    was pruned from (latencies timed here, alternating the two models, best of 3 rounds)."""
    import math

    import torch

    from bloomray.export.latency import forward_latency_ms
    from bloomray.export.load import load_model
    from bloomray.model.build import count_parameters

    models = {"dense": load_model(dense_dir), "winner": load_model(winner_dir)}
    best = {k: math.inf for k in models}
    with torch.inference_mode():
        for _ in range(3):
            for k, m in models.items():
                best[k] = min(best[k], forward_latency_ms(m, repeats=5))
    params = {k: count_parameters(m) for k, m in models.items()}
    w = search["winner"]
    ppl = math.exp(w["eval_loss"]) if w.get("eval_loss") is not None else float("nan")
    return (
        f"Winner vs dense: perplexity {ppl:.1f} vs {pre['eval_perplexity']:.1f}, "
        f"{params['winner'] / 1e6:.2f}M vs {params['dense'] / 1e6:.2f}M parameters "
        f"({1 - params['winner'] / params['dense']:.0%} fewer), forward "
        f"{best['winner']:.1f} ms vs {best['dense']:.1f} ms ({best['dense'] / best['winner']:.2f}x faster on this CPU)."
    )


def _print_pareto(trials_csv: Path, search: dict) -> None:
    rows = list(csv.DictReader(trials_csv.open()))
    print(
        f"\n{'trial':<12} {'status':<14} {'lr':>9} {'sparsity':>8} {'eval_loss':>9} {'latency ms':>10} "
        f"{'params':>9}  pareto winner"
    )
    for r in rows:

        def num(k: str, fmt: str, r: dict = r) -> str:
            return format(float(r[k]), fmt) if r.get(k) else "-"

        print(
            f"{r['trial_id']:<12} {r['status']:<14} {num('train.lr', '.2e'):>9} {num('sparsity', '.2f'):>8} "
            f"{num('eval_loss', '.3f'):>9} {num('latency_ms', '.2f'):>10} {r.get('parameters') or '-':>9}  "
            f"{'*' if r.get('pareto') == 'True' else '':^6} {'<==' if r.get('winner') == 'True' else ''}"
        )
    print(f"[demo] winner: {search['selection']}", flush=True)


def _send_requests(url: str, key: str) -> list[str]:
    """Send the demo's requests, print each answer; returns the completions' texts."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "winner", "prompt": "The for statement", "max_tokens": 32, **SAMPLING}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    texts = [r.json()["choices"][0]["text"], ""]
    print(
        f"[demo] POST /v1/completions -> {r.status_code}: {json.dumps(texts[0])} "
        f"usage={r.json()['usage']}{_verdict(texts[0])}"
    )
    print("[demo] POST /v1/completions stream=true -> ", end="", flush=True)
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={**body, "prompt": "A class is", "stream": True},
        headers=headers,
        timeout=120,
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                texts[1] += (piece := json.loads(line[6:])["choices"][0]["text"])
                print(piece, end="", flush=True)
            elif line == "data: [DONE]":
                print(f"  [DONE]{_verdict(texts[1])}")
    bad = httpx.post(
        f"{url}/v1/completions",
        json={"model": "winner", "prompt": "", "max_tokens": 5},
        headers=headers,
        timeout=60,
    )
    print(f"[demo] bad request (empty prompt) -> {bad.status_code}: {bad.json()['error']['message']}")
    unauth = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    print(f"[demo] no API key -> {unauth.status_code}: {unauth.json()['error']['message']}")
    return texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
