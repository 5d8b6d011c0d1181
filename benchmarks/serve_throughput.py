""".venv/bin/python benchmarks/serve_throughput.py

Serving throughput and latency, in one run on one box, with the same prompts, all over HTTP on
127.0.0.1 (servers bind 127.0.0.1 only):

  (a) plain FastAPI + transformers server of the DENSE model (benchmarks/_plain_server.py): one
      uvicorn process, fp32, a sync ``def`` endpoint (FastAPI runs it in its thread pool, as its
      docs advise for blocking code) calling ``model.generate`` for one prompt; no batching, no
      streaming, no lock; OMP_NUM_THREADS = the replicas' num_cpus;
  (b) bloomray Serve, dense fp32, 1 replica, max_batch_size=1, quantize=none;
  (c) bloomray Serve winner: 50% structured (MLP neurons + heads) pruned and compacted, int8,
      max_batch_size=16, autoscaling 1..2 replicas (the shipped serve/config.yaml policy otherwise).

Both models are built here without network: preset ``small`` with random weights (throughput
does not depend on weight values) and a BPE tokenizer trained on the embedded corpus. Every
request is greedy (temperature 0), max_tokens 32, no stop; tokens/s counts the completion tokens
the servers report, and the script checks every request generated exactly 32.

Per server: a warmup, then concurrency 1 (16 sequential requests) and 16 (64 requests):
tokens/s (completion tokens / wall time), req/s, p50/p99 latency, and time to first token from
a second pass of stream=true requests (bloomray; it does not batch streams). (a) cannot stream,
so its TTFT is its full latency. Prints a table and ratios vs (a). Targets: (c) >= 4x (a)'s
tokens/s at concurrency 16; (c)'s p50 latency at concurrency 1 no worse than (a)'s. Appends a
dated table to benchmarks/RESULTS.md. ``--quick`` sends fewer requests and writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from _results import markdown_table, report  # benchmarks/ is on sys.path when run as a script

from bloomray.config import PruneConfig, TokenizerConfig
from bloomray.data.corpus import embedded_documents
from bloomray.data.tokenizer import train_tokenizer
from bloomray.model.build import build_from_config, count_parameters, preset_config
from bloomray.model.export import compact_model
from bloomray.prune.masks import structured_masks, target_names
from bloomray.serving.run import DEFAULT_CONFIG, read_serve_config

ROOT = Path(__file__).resolve().parents[1]
PLAIN_APP_DIR = ROOT / "benchmarks"  # holds _plain_server.py
HOST = "127.0.0.1"
RAY_CPUS = 4  # logical CPUs: room for (c)'s second replica (2 x THREADS)
THREADS = 2  # num_cpus of every Serve replica (Ray sets OMP_NUM_THREADS from it) == (a)'s OMP_NUM_THREADS
PRESET = "small"
SPARSITY = 0.5
MAX_TOKENS = 32
PROMPT_WORDS = 12
N_PROMPTS = 16
CONCURRENCY = (1, 16)
WINNER_BATCH = 16
WINNER_REPLICAS = (1, 2)
APP_TIMEOUT_S = 120  # the app's 504 limit; generous, so a busy shared box gets slow answers, not 504s
CLIENT_TIMEOUT_S = 300
THROUGHPUT_TARGET = 4.0
ok = {True: "met", False: "MISSED"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("--quick", action="store_true", help="fewer requests to check the script; no RESULTS.md")
    return p.parse_args()


# --------------------------------------------------------------------------- models and prompts


def build_models(root: Path) -> dict[str, Any]:
    """Dense ``small`` BLOOM (random weights) and its 50% structured-pruned, compacted twin."""
    tc = TokenizerConfig()
    tok = train_tokenizer(embedded_documents(), tc.vocab_size, tc.min_frequency)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    config = preset_config(PRESET, len(tok), **ids)
    dense = build_from_config("causal_lm", config, seed=0).eval()
    dense_dir, winner_dir = root / "dense", root / "winner"
    dense.save_pretrained(str(dense_dir))
    tok.save_pretrained(str(dense_dir))

    pruned = copy.deepcopy(dense)
    params = dict(pruned.named_parameters())
    names = target_names(pruned, PruneConfig().targets)  # qkv, attention dense, both MLP Linears
    masks = structured_masks(
        {n: params[n].detach().abs() for n in names}, SPARSITY, "mlp+heads", config.n_head
    )
    with torch.no_grad():
        for name, mask in masks.items():  # weights and the biases of removed units
            params[name].mul_(mask)
    winner, info = compact_model(pruned)  # raises if the compact logits differ from the masked model's
    winner.save_pretrained(str(winner_dir))  # config.json carries bloomray_compact
    tok.save_pretrained(str(winner_dir))
    return {
        "dense_dir": dense_dir,
        "winner_dir": winner_dir,
        "vocab": len(tok),
        "dense_params": count_parameters(dense),
        "winner_params": count_parameters(winner),
        "kept_heads": info["kept_heads"],
        "kept_neurons": info["kept_neurons"],
        "n_head": config.n_head,
        "ffn": 4 * config.hidden_size,
    }


def pick_prompts(models: dict[str, Any]) -> tuple[list[str], list[int], int]:
    """N_PROMPTS corpus openings; those where no model greedily emits EOS within MAX_TOKENS first.

    Screened with bloomray's own loader and engine (dense fp32 and winner int8, as served), so
    every server should generate exactly MAX_TOKENS; the run still checks what they report.
    Returns the prompts, their token counts and how many candidates had to be dropped.
    """
    from bloomray.serving.engine import GenerationEngine, GenParams
    from bloomray.serving.models import default_loader

    docs = embedded_documents()
    step = max(1, len(docs) // (2 * N_PROMPTS))
    candidates = [" ".join(d.split()[:PROMPT_WORDS]) for d in docs[::step]][: 2 * N_PROMPTS]
    clean = set(range(len(candidates)))
    for path, quantize in ((models["dense_dir"], "none"), (models["winner_dir"], "int8")):
        engine = GenerationEngine(*default_loader(str(path), quantize))
        results = engine.generate([GenParams(p, MAX_TOKENS, 0.0) for p in candidates])
        clean &= {i for i, r in enumerate(results) if r.completion_tokens == MAX_TOKENS}
    chosen = [candidates[i] for i in sorted(clean)][:N_PROMPTS]
    if not chosen:  # every candidate stops early: use them anyway; tokens/s counts actual tokens
        chosen = candidates[:N_PROMPTS]
    return chosen, [engine.count_tokens(p) for p in chosen], len(candidates) - len(clean)


# --------------------------------------------------------------------------- load generation


@dataclass
class Pass:
    """One batch of requests at one concurrency against one server."""

    concurrency: int
    wall_s: float
    latencies: list[float]
    tokens: list[int | None]  # completion tokens per request (None for streams)
    texts: list[str]
    ttfts: list[float] = field(default_factory=list)
    replicas: int | None = None  # most RUNNING replicas seen during the pass

    def tokens_per_s(self) -> float:
        return sum(t or 0 for t in self.tokens) / self.wall_s

    def req_per_s(self) -> float:
        return len(self.latencies) / self.wall_s


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], stream: bool) -> tuple:
    """(latency s, completion tokens or None, text, ttft s or None) of one request."""
    start = time.perf_counter()
    if not stream:
        r = await client.post(url, json=body)
        latency = time.perf_counter() - start
        if r.status_code != 200:
            raise RuntimeError(f"POST {url} -> {r.status_code}: {r.text[:300]}")
        out = r.json()
        return latency, out["usage"]["completion_tokens"], out["choices"][0]["text"], None
    ttft, text = None, ""
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"POST {url} (stream) -> {r.status_code}: {r.text[:300]}")
        async for line in r.aiter_lines():  # read to the end: leaving early would cancel the request
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[len("data: ") :])["choices"][0]["text"]
            if delta and ttft is None:
                ttft = time.perf_counter() - start
            text += delta
    latency = time.perf_counter() - start
    return latency, None, text, latency if ttft is None else ttft


async def _drive(url: str, bodies: list[dict[str, Any]], concurrency: int, stream: bool, headers: dict):
    """Send ``bodies`` with ``concurrency`` requests in flight; (wall s, per-request results in order)."""
    results: list[tuple | None] = [None] * len(bodies)
    todo = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, headers=headers, limits=limits) as client:

        async def worker() -> None:
            for i in todo:  # one shared iterator: each worker takes the next request when free
                results[i] = await _one(client, url, bodies[i], stream)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return wall, results


class ReplicaWatch:
    """Most RUNNING replicas of a Serve app seen while the ``with`` block runs (polled every second)."""

    def __init__(self, app: str | None) -> None:
        self.app, self.peak = app, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def count(self) -> int:
        from ray import serve

        status = serve.status().applications[self.app].deployments["BloomServer"]
        return int(dict(status.replica_states).get("RUNNING", 0))

    def _poll(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.count())
            except Exception:  # noqa: BLE001 - a failed poll just misses one sample
                pass
            if self._stop.wait(1.0):
                return

    def __enter__(self) -> ReplicaWatch:
        if self.app:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.app:
            self._stop.set()
            self._thread.join()


def run_passes(
    url: str, name: str, prompts: list[str], counts: dict[int, int], warmup: int, app: str | None, key: str
) -> dict[str, Pass]:
    """Warmup, then per concurrency: a timed non-streaming pass and (Serve apps) a streaming pass."""
    endpoint = f"{url}/v1/completions"
    headers = {"Authorization": f"Bearer {key}"} if app else {}

    def bodies(n: int) -> list[dict[str, Any]]:
        return [
            {"model": name, "prompt": prompts[i % len(prompts)], "max_tokens": MAX_TOKENS, "temperature": 0}
            for i in range(n)
        ]

    asyncio.run(_drive(endpoint, bodies(warmup), 1, False, headers))
    asyncio.run(_drive(endpoint, bodies(max(CONCURRENCY)), max(CONCURRENCY), False, headers))
    if app:
        asyncio.run(_drive(endpoint, bodies(1), 1, True, headers))
    out: dict[str, Pass] = {}
    for c in CONCURRENCY:
        with ReplicaWatch(app) as watch:
            wall, res = asyncio.run(_drive(endpoint, bodies(counts[c]), c, False, headers))
        p = Pass(c, wall, [r[0] for r in res], [r[1] for r in res], [r[2] for r in res])
        p.replicas = watch.peak if app else None
        if app:
            with ReplicaWatch(app) as watch:
                _, sres = asyncio.run(_drive(endpoint, bodies(counts[c]), c, True, headers))
            p.ttfts = [r[3] for r in sres]
            p.replicas = max(p.replicas or 0, watch.peak)
        else:
            p.ttfts = list(p.latencies)  # no streaming: the first token arrives with the last
        out[f"c{c}"] = p
        print(
            f"[bench]   c={c}: {p.tokens_per_s():,.0f} tokens/s, p50 {1000 * np.median(p.latencies):.0f} ms",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run_plain(model_dir: Path, logs: Path, **kw: Any) -> dict[str, Pass]:
    """(a): uvicorn on _plain_server:app in a subprocess; killed when done."""
    port = free_port()
    env = {
        **os.environ,
        "PLAIN_SERVER_MODEL": str(model_dir),
        "OMP_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "uvicorn", "_plain_server:app", "--app-dir", str(PLAIN_APP_DIR)]
    cmd += ["--host", HOST, "--port", str(port), "--workers", "1"]  # uvicorn's defaults otherwise
    log = logs / "plain_server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://{HOST}:{port}"
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"plain server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"plain server not up after 180 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        return run_passes(url, "dense", app=None, key="", **kw)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ray_threads(cpus: float) -> tuple[str | None, int]:
    """(OMP_NUM_THREADS, torch threads) of a Ray actor holding ``cpus`` CPUs, as a replica does."""
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


def serve_variant(
    name: str, model_dir: Path, port: int, overrides: dict[str, Any], autoscaling: dict[str, Any], **kw: Any
) -> dict[str, Pass]:
    """Deploy one bloomray app under /<name>, load it, then delete the app (frees its CPUs)."""
    from ray import serve

    from bloomray.serving.run import start_server

    url = start_server(
        {name: str(model_dir)},
        DEFAULT_CONFIG,
        port=port,
        host=HOST,
        name=name,
        route_prefix=f"/{name}",
        overrides={"request_timeout_s": APP_TIMEOUT_S, **overrides},
        deployment_overrides={
            "autoscaling_config": autoscaling,
            "max_ongoing_requests": 64,  # above max_batch_size and the concurrency
            "max_queued_requests": 128,
            "ray_actor_options": {"num_cpus": THREADS},
        },
    )
    try:
        return run_passes(url, name, app=name, key=os.environ["BLOOMRAY_API_KEYS"], **kw)
    finally:
        serve.delete(name)


def run_bloomray(
    models: dict[str, Any], **kw: Any
) -> tuple[dict[str, Pass], dict[str, Pass], dict[str, Any]]:
    """(b) then (c) on one Serve instance (one HTTP port), one app at a time."""
    port = free_port()
    shipped = dict(read_serve_config(DEFAULT_CONFIG)[2].get("autoscaling_config") or {})
    winner_scaling = {**shipped, "min_replicas": WINNER_REPLICAS[0], "max_replicas": WINNER_REPLICAS[1]}
    print("[bench] (b) bloomray dense fp32, 1 replica, max_batch_size=1", flush=True)
    dense = serve_variant(
        "dense",
        models["dense_dir"],
        port,
        {"quantize": "none", "max_batch_size": 1},
        {"min_replicas": 1, "max_replicas": 1},
        **kw,
    )
    print(
        f"[bench] (c) bloomray winner int8, max_batch_size={WINNER_BATCH}, "
        f"{WINNER_REPLICAS[0]}..{WINNER_REPLICAS[1]} replicas",
        flush=True,
    )
    winner = serve_variant(
        "winner",
        models["winner_dir"],
        port,
        {"quantize": "int8", "max_batch_size": WINNER_BATCH},
        winner_scaling,
        **kw,
    )
    return dense, winner, winner_scaling


# --------------------------------------------------------------------------- report


def ms(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.0f}"


def build_rows(runs: dict[str, dict[str, Pass]]) -> list[dict[str, Any]]:
    base = runs["(a)"]
    labels = {
        "(a)": "(a) plain FastAPI + generate, dense fp32",
        "(b)": "(b) bloomray dense fp32, batch 1",
        "(c)": f"(c) bloomray pruned+int8, batch {WINNER_BATCH}, autoscale",
    }
    rows = []
    for c in CONCURRENCY:
        for key, passes in runs.items():
            p, a = passes[f"c{c}"], base[f"c{c}"]
            rows.append(
                {
                    "run": labels[key],
                    "concurrency": c,
                    "requests": len(p.latencies),
                    "completion tokens": sum(t or 0 for t in p.tokens),
                    "tokens/s": f"{p.tokens_per_s():,.1f}",
                    "vs (a)": f"{p.tokens_per_s() / a.tokens_per_s():.2f}x",
                    "req/s": f"{p.req_per_s():.2f}",
                    "p50 ms": ms(p.latencies, 50),
                    "p50 vs (a)": f"{np.median(p.latencies) / np.median(a.latencies):.2f}x",
                    "p99 ms": ms(p.latencies, 99),
                    "TTFT p50 ms": ms(p.ttfts, 50) + ("*" if key == "(a)" else ""),
                    "TTFT p99 ms": ms(p.ttfts, 99) + ("*" if key == "(a)" else ""),
                    "replicas": "-" if p.replicas is None else p.replicas,
                }
            )
    return rows


def token_check(runs: dict[str, dict[str, Pass]]) -> str:
    """Did every request of every server generate exactly MAX_TOKENS tokens?"""
    short = {
        f"{k} c={p.concurrency}": sorted({t for t in p.tokens if t != MAX_TOKENS})
        for k, passes in runs.items()
        for p in passes.values()
    }
    short = {k: v for k, v in short.items() if v}
    if not short:
        return f"- completion tokens: every request of every server generated exactly {MAX_TOKENS} (checked)"
    return (
        f"- WARNING: not every request generated {MAX_TOKENS} tokens (EOS): {short}; tokens/s above counts "
        "the tokens actually generated"
    )


def describe(
    models: dict[str, Any],
    prompts: list[str],
    lens: list[int],
    dropped: int,
    counts: dict[int, int],
    warmup: int,
    probe: tuple[str | None, int],
    scaling: dict[str, Any],
    runs: dict[str, dict[str, Pass]],
    load: tuple[float, float],
) -> list[str]:
    """The settings and check lines above the table."""
    import transformers

    same = sum(x == y for x, y in zip(runs["(a)"]["c1"].texts, runs["(b)"]["c1"].texts, strict=True))
    n1 = len(runs["(a)"]["c1"].texts)
    passes = ", ".join(f"{counts[c]} at concurrency {c}" for c in CONCURRENCY)
    return [
        f"- models: preset `{PRESET}`, random weights (seed 0; throughput does not depend on weight values), "
        f"BPE tokenizer trained on the embedded corpus (vocab {models['vocab']}); dense "
        f"{models['dense_params'] / 1e6:.2f}M params; winner: {100 * SPARSITY:.0f}% structured mlp+heads masks on "
        f"|w| then compacted: {models['winner_params'] / 1e6:.2f}M params, heads kept "
        f"{models['kept_heads']}/{models['n_head']}, MLP neurons kept {models['kept_neurons']}/{models['ffn']}",
        f"- requests: greedy (temperature 0), max_tokens {MAX_TOKENS}, no stop; {len(prompts)} corpus prompts "
        f"({min(lens)}-{max(lens)} tokens, {dropped} candidates dropped for an early EOS), cycled; per server "
        f"{passes}, after a warmup ({warmup} sequential + {max(CONCURRENCY)} concurrent requests); httpx "
        f"AsyncClient in the benchmark process, loopback only ({HOST})",
        "- tokens/s = completion tokens reported by the server / wall time of the pass; latency per request "
        "at the client; p99 of few samples is close to the max",
        "- TTFT: (b)/(c) from a second pass of stream=true requests at the same concurrency (time to the first "
        "non-empty chunk; bloomray streams are not batched); *(a) does not stream: TTFT = its full latency",
        f"- (a): one uvicorn process, transformers {transformers.__version__} `model.generate`, sync `def` "
        f"endpoint (FastAPI thread pool: concurrent requests run concurrent generate calls, one prompt each, "
        f"no lock), OMP_NUM_THREADS={THREADS}",
        f"- (b)/(c): Ray with {RAY_CPUS} logical CPUs on {os.cpu_count()} cores; each Serve replica "
        f"num_cpus={THREADS} (a Ray actor with {THREADS} CPUs gets OMP_NUM_THREADS={probe[0]}, torch threads "
        f"{probe[1]}); one app deployed at a time; (c)'s second replica would share the same cores "
        "(autoscaling adds capacity on a real cluster, not on one small box)",
        f"- (c) autoscaling: {json.dumps(scaling)} (serve/config.yaml's policy, replicas {WINNER_REPLICAS[0]}.."
        f"{WINNER_REPLICAS[1]}); 'replicas' = most RUNNING replicas seen during the pass (both passes for "
        "bloomray)",
        token_check(runs),
        f"- (a) vs (b) greedy texts at concurrency 1 (same dense weights): {same}/{n1} identical",
        f"- 1-min load average at start / end: {load[0]:.2f} / {load[1]:.2f}",
    ]


def check_targets(runs: dict[str, dict[str, Pass]]) -> list[str]:
    a, b, c = runs["(a)"], runs["(b)"], runs["(c)"]
    hi = max(CONCURRENCY)
    speed = c[f"c{hi}"].tokens_per_s() / a[f"c{hi}"].tokens_per_s()
    p50_a, p50_c = np.median(a["c1"].latencies), np.median(c["c1"].latencies)
    lines = [
        f"- (c)/(a) tokens/s at concurrency {hi}: {speed:.2f}x (target >= {THROUGHPUT_TARGET:.0f}x: "
        f"{ok[speed >= THROUGHPUT_TARGET]})",
        f"- (c) p50 latency at concurrency 1: {1000 * p50_c:.0f} ms vs (a) {1000 * p50_a:.0f} ms "
        f"({p50_c / p50_a:.2f}x; target <= 1.00x: {ok[p50_c <= p50_a]})",
    ]
    for conc in CONCURRENCY:
        lines.append(
            f"- (b)/(a) tokens/s at concurrency {conc}: "
            f"{b[f'c{conc}'].tokens_per_s() / a[f'c{conc}'].tokens_per_s():.2f}x (no target)"
        )
    return lines


# --------------------------------------------------------------------------- main


def main() -> int:
    args = parse_args()
    counts = {1: 4, 16: 16} if args.quick else {1: 16, 16: 64}
    warmup = 2 if args.quick else 4
    key = secrets.token_urlsafe(24)
    os.environ["BLOOMRAY_API_KEYS"] = key  # the replicas get it through start_server's runtime_env
    os.environ.pop("BLOOMRAY_API_KEYS_FILE", None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()[0]

    import ray
    from ray import serve

    from bloomray.raycluster import init_ray

    with tempfile.TemporaryDirectory(prefix="bloomray-serve-bench-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        print("[bench] building the dense and winner models", flush=True)
        models = build_models(root)
        prompts, lens, dropped = pick_prompts(models)
        kw = {"prompts": prompts, "counts": counts, "warmup": warmup}
        init_ray(None, RAY_CPUS)  # before (a) too, so Ray's idle daemons run during every server's turn
        try:
            probe = ray_threads(THREADS)
            print("[bench] (a) plain FastAPI + transformers generate, dense fp32", flush=True)
            plain = run_plain(models["dense_dir"], root, **kw)
            dense, winner, scaling = run_bloomray(models, **kw)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    runs = {"(a)": plain, "(b)": dense, "(c)": winner}
    notes = describe(
        models, prompts, lens, dropped, counts, warmup, probe, scaling, runs, (load_start, os.getloadavg()[0])
    )
    report(
        "serve_throughput",
        [
            *notes,
            "",
            markdown_table(build_rows(runs)),
            "",
            *check_targets(runs),
        ],
        args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
