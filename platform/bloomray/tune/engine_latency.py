"""Decode latency in the serving engine (vLLM), for the ``decode_rel`` search objective.

A trial's export and a *reference* (the search's dense shape with random weights: the speed of
a dense kernel does not depend on the weights, ``write_reference``) are started as two vLLM
engines side by side and given the same fixed request mix: ``select.latency_batch`` prompts of
``select.latency_seq`` token ids (seeded) that each generate ``select.decode_tokens`` tokens,
greedy, EOS ignored, all in one batch (continuous batching decodes them together). Rounds
alternate between the two engines (ABBA order), so a background hiccup hits both alike; the
trial reports ``decode_ms`` (median ms per generated token of a round) and ``decode_rel``
(its median over the reference's: 1.0 is the dense model's speed on that machine at that time),
which compares fairly across trials measured minutes apart on a noisy machine.

Measured in one Ray task per trial (``scaling.cpus_per_worker`` CPUs, a GPU with
``scaling.use_gpu``; the task's worker process exits after it, so the engines' memory goes
with it). A sparse-packed export is measured as vLLM serves it: expanded to dense. The engines
run their cores in the task's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the same
scheduler, model runner and kernels as a served replica, without the engine-core and worker
processes, whose hand-offs on a 2-core box added ~10 ms to every decode step and most of the
time (two tiny models, 5 ABBA rounds: 52 s and 8-12 ms per token with them, 8.5 s and 2 ms
without), the same for both engines of a pair.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bloomray.config import Config

REFERENCE_DIR = "engine-reference"


def cpu_bind(cpus: set[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND``: the cores this process may run on (ids, ranges where contiguous)."""
    ids = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    parts, start = [], ids[0]
    for prev, cur in zip(ids, [*ids[1:], None], strict=True):
        if cur != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ",".join(parts)


def request_mix(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """The fixed prompts: ``batch`` rows of ``prompt_len`` token ids drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(batch, prompt_len)).tolist()


def decode_latency(
    dirs: dict[str, str],
    batch: int,
    prompt_len: int,
    new_tokens: int,
    rounds: int,
    gpu: bool = False,
) -> dict[str, Any]:
    """Median ms per generated token of every model dir in ``dirs``, measured in interleaved rounds.

    Returns:
        ``{"ms": {name: median ms per token}, "order": [names in the order they ran]}``.

    Raises:
        RuntimeError: an engine generated fewer tokens than asked (the mix would not be fixed).
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = min(json.loads((Path(p) / "config.json").read_text())["vocab_size"] for p in dirs.values())
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request_mix(vocab, batch, prompt_len)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    engines = {}
    try:
        for name, path in dirs.items():
            engines[name] = LLM(
                model=path,
                dtype="bfloat16" if gpu else "float32",
                enforce_eager=not gpu,
                max_model_len=prompt_len + new_tokens,
                max_num_seqs=batch,
                seed=0,
            )
        names = list(engines)
        for name in names:  # warm-up round, not timed
            engines[name].generate(prompts, params, use_tqdm=False)
        times: dict[str, list[float]] = {n: [] for n in names}
        order = []
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                outs = engines[name].generate(prompts, params, use_tqdm=False)
                dt = time.perf_counter() - t0
                got = [len(o.outputs[0].token_ids) for o in outs]
                if got != [new_tokens] * batch:
                    raise RuntimeError(f"{name}: the engine generated {got} tokens, not {new_tokens} each")
                times[name].append(1000.0 * dt / new_tokens)
                order.append(name)
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown(timeout=30)
    return {"ms": {n: statistics.median(v) for n, v in times.items()}, "order": order}


def _task(dirs: dict[str, str], batch: int, seq: int, new: int, rounds: int, gpu: bool) -> dict[str, Any]:
    if not gpu:  # before vLLM is imported: KV cache GiB, and the cores (ids, not "all")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine cores in this process
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return decode_latency(dirs, batch, seq, new, rounds, gpu)


def engine_measures(cfg: Config, model_dir: str, reference: str, rounds: int = 5) -> dict[str, Any]:
    """A trial's ``decode_ms`` and ``decode_rel`` (against ``reference``), and the rounds' order, in one Ray task."""
    import ray

    from bloomray.export.load import dense_copy
    from bloomray.export.sparse import SPARSE_KEY
    from bloomray.raycluster import outside_placement_group

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    source = dense_copy(model_dir) if SPARSE_KEY in raw else model_dir
    s, sel = cfg.scaling, cfg.select
    task = ray.remote(
        num_cpus=s.cpus_per_worker,
        num_gpus=1 if s.use_gpu else 0,
        max_calls=1,
        max_retries=0,
        scheduling_strategy=outside_placement_group(),
    )(_task)
    dirs = {"trial": source, "reference": reference}
    got = ray.get(task.remote(dirs, sel.latency_batch, sel.latency_seq, sel.decode_tokens, rounds, s.use_gpu))
    ms = got["ms"]
    return {
        "decode_ms": ms["trial"],
        "decode_ms_reference": ms["reference"],
        "decode_rel": ms["trial"] / ms["reference"],
        "decode_order": got["order"],
    }


def write_reference(cfg: Config, out: Path, model_config: dict[str, Any], tokenizer_dir: Path) -> str:
    """The search's dense shape with random weights (and its tokenizer) in ``out/engine-reference``, once."""
    from transformers import AutoTokenizer, BloomConfig

    from bloomray.files import atomic_dir
    from bloomray.model.build import build_from_config

    dest = out / REFERENCE_DIR
    if (dest / "config.json").is_file():
        return str(dest)
    model = build_from_config("causal_lm", BloomConfig.from_dict(model_config), cfg.train.seed)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    return str(dest)
