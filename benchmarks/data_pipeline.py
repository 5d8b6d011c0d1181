""".venv/bin/python benchmarks/data_pipeline.py [--mb 40] [--quick]

The data pipeline of issue 9, measured in one run on this box:

  (1) tokenization: ``bloomray prepare-data``'s Ray Data pipeline (one tokenizer task per
      core) against ``datasets.map(batched=True, num_proc=<cores>)`` with the same fast
      tokenizer on the same JSONL files (both write their output to disk), tokens/s; target
      >= 1.0x. The files are the embedded corpus's paragraphs and SST-2's sentences, shuffled
      and repeated to ``--mb`` MB of text.
  (2) training tokens/s, 2 workers, preset ``tiny``, the same run twice: blocks read from the
      memory-mapped shards (what every causal run does now) vs the same blocks as arrays
      shipped through Ray's object store (the path before); target >= 0.98x.
  (3) peak RSS per training worker on token datasets the size of 100 MB and 1 GB of text
      (25 M and 250 M tokens, uint16; synthetic ids, since RSS does not depend on which ids):
      the ratio 1 GB / 100 MB; target <= 1.1.

Appends a dated section to benchmarks/RESULTS.md (``--quick``: small sizes, writes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import markdown_table, report  # benchmarks/ is on sys.path when run as a script

from bloomray.config import load_config

SST2 = Path("/work/shared/data/sst2/train.tsv")
CORES = os.cpu_count() or 2
TEXT_BYTES_PER_TOKEN = 4.0  # English BPE: ~4 bytes of text per token (for the RSS datasets' sizes)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=40.0, help="MB of text for the tokenization race")
    p.add_argument("--steps", type=int, default=60, help="training steps per throughput run")
    p.add_argument("--quick", action="store_true", help="small sizes, RESULTS.md untouched")
    p.add_argument(
        "--parts", default="tok,train,rss", help="comma-separated subset of tok, train, rss (default: all)"
    )
    return p.parse_args()


def make_corpus(root: Path, mb: float) -> list[Path]:
    from bloomray.data.corpus import embedded_documents

    paras = [p.strip() for t in embedded_documents() for p in re.split(r"\n\s*\n", t) if p.strip()]
    if SST2.exists():
        paras += [line.split("\t")[0] for line in SST2.read_text().splitlines()[1:]]
    rng = random.Random(0)
    root.mkdir(parents=True)
    files, written, k = [], 0, 0
    per_file = max(1, int(mb * 1e6 / (2 * CORES)))  # 2 files per core, so the work splits evenly
    while written < mb * 1e6:
        f = root / f"part{k:03d}.jsonl"
        with f.open("w") as fh:
            n = 0
            while n < per_file:
                line = json.dumps({"text": rng.choice(paras)}) + "\n"
                fh.write(line)
                n += len(line)
        files.append(f)
        written += n
        k += 1
    return files


def tokenization(tmp: Path, mb: float, timed: bool = True) -> list[dict]:
    import datasets

    from bloomray.data.tokenizer import load_tokenizer, train_tokenizer
    from bloomray.data.tokens import build_dataset
    from bloomray.raycluster import init_ray

    files = make_corpus(tmp / "corpus", mb)
    tok_dir = tmp / "tok"
    train_tokenizer(
        [json.loads(x)["text"] for x in files[0].read_text().splitlines()[:20000]], 8192
    ).save_pretrained(str(tok_dir))
    tok = load_tokenizer(str(tok_dir))
    if not timed:  # only the tokenizer, for the training datasets
        return []
    cfg = load_config(
        None, ["train.max_steps=1", f"data.path={tmp / 'corpus'}", f"data.tokenizer.path={tok_dir}"]
    )
    init_ray(num_cpus=CORES + 2)
    build_dataset(cfg, tok, tmp / "warm", workers=CORES)  # Ray Data start-up and imports, once
    t = time.perf_counter()
    ds = build_dataset(cfg, tok, tmp / "ours", workers=CORES)
    ours_s = time.perf_counter() - t
    ours_tokens = ds.tokens("train") + ds.tokens("eval")

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    cache = tmp / "hf-cache"
    t = time.perf_counter()
    raw = datasets.load_dataset(
        "json", data_files=[str(f) for f in files], split="train", cache_dir=str(cache)
    )
    eos = tok.eos_token_id

    def encode(batch: dict) -> dict:
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    mapped = raw.map(encode, batched=True, batch_size=1000, num_proc=CORES, remove_columns=["text"])
    hf_s = time.perf_counter() - t
    import pyarrow.compute as pc

    hf_tokens = int(pc.sum(pc.list_value_length(mapped.data.column("input_ids"))).as_py())
    assert hf_tokens == ours_tokens, (hf_tokens, ours_tokens)  # the same work
    return [
        {
            "pipeline": f"bloomray prepare-data (Ray Data, {CORES} tasks at a time)",
            "tokens": ours_tokens,
            "seconds": round(ours_s, 1),
            "tokens_per_s": round(ours_tokens / ours_s),
        },
        {
            "pipeline": f"datasets.map(num_proc={CORES})",
            "tokens": hf_tokens,
            "seconds": round(hf_s, 1),
            "tokens_per_s": round(hf_tokens / hf_s),
        },
    ]


def synthetic_dataset(out: Path, tokens: int, tok_dir: Path) -> Path:
    from bloomray.data.shards import ShardWriter
    from bloomray.data.tokenizer import load_tokenizer

    out.mkdir(parents=True)
    tok = load_tokenizer(str(tok_dir))
    w = ShardWriter(out, len(tok))
    rng = np.random.default_rng(0)
    chunk = 1 << 20
    for a in range(0, tokens, chunk):
        w.add("train", rng.integers(0, len(tok), size=min(chunk, tokens - a)))
    w.add("eval", rng.integers(0, len(tok), size=64 * 128))
    tok.save_pretrained(str(out / "tokenizer"))
    w.close({"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bad_rows": 0, "sources": []})
    return out


def train_run(tmp: Path, name: str, data_path: Path, steps: int, object_store: bool) -> dict:
    from bloomray.data.packing import ArrayBlocks
    from bloomray.data.prepare import PreparedData, prepare_data
    from bloomray.data.shards import all_blocks
    from bloomray.export.run import train_prepared

    cfg = load_config(
        "tiny-cpu",
        [
            f"data.path={data_path}",
            f"train.max_steps={steps}",
            f"train.log_every={steps // 2}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "train.eval_max_batches=2",
            "output.export=false",
            "scaling.num_workers=2",
            "deepspeed.zero_stage=2",
        ],
    )
    out = tmp / name
    out.mkdir()
    data = prepare_data(cfg, out / "tokenizer")
    if object_store:
        data = PreparedData(
            data.tokenizer,
            ArrayBlocks(all_blocks(data.train)),
            ArrayBlocks(all_blocks(data.eval)),
            None,
            data.stats,
        )
    summary = train_prepared(cfg, out, data, out / "tokenizer")
    return {"tokens_per_s": summary["tokens_per_s"], "peak_rss_mb": summary["peak_mem_mb"]}


def main() -> int:
    args = parse_args()
    mb = 2.0 if args.quick else args.mb
    steps = 10 if args.quick else args.steps
    parts = set(args.parts.split(","))
    body: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as t:
        tmp = Path(t)
        tok_rows = tokenization(tmp, mb, timed="tok" in parts)
        tok_dir = tmp / "tok"
        small_tokens = int((2e6 if args.quick else 100e6) / TEXT_BYTES_PER_TOKEN)
        small = synthetic_dataset(tmp / "ds-100mb", small_tokens, tok_dir)
        if "tok" in parts:
            r_tok = tok_rows[0]["tokens_per_s"] / tok_rows[1]["tokens_per_s"]
            body += [
                f"Tokenization, {mb:g} MB of JSONL text, vocab 8192, {CORES} cores:",
                "",
                markdown_table(tok_rows),
                "",
                f"- tokenization prepare-data / datasets.map: **{r_tok:.2f}x** "
                f"(target >= 1.0: {'met' if r_tok >= 1.0 else 'missed'})",
                "",
            ]
        if "train" in parts:
            rounds = [  # interleaved, so drift on a noisy box hits both sides alike
                (
                    train_run(tmp, f"mmap{i}", small, steps, False),
                    train_run(tmp, f"store{i}", small, steps, True),
                )
                for i in range(1 if args.quick else 2)
            ]
            mmap = {k: float(np.mean([r[0][k] for r in rounds])) for k in rounds[0][0]}
            store = {k: float(np.mean([r[1][k] for r in rounds])) for k in rounds[0][1]}
            r_train = mmap["tokens_per_s"] / store["tokens_per_s"]
            rows = [
                {"run": "memory-mapped shards", **{k: round(v) for k, v in mmap.items()}},
                {
                    "run": "object store (arrays ray.put), same blocks",
                    **{k: round(v) for k, v in store.items()},
                },
            ]
            body += [
                f"Training, preset tiny, 2 workers ZeRO-2, {steps} steps on the 100 MB-of-text dataset, mmap and "
                f"object store interleaved over {len(rounds)} rounds (mean tokens/s of the last log interval):",
                "",
                markdown_table(rows),
                "",
                f"- training mmap / object store: **{r_train:.3f}x** "
                f"(target >= 0.98: {'met' if r_train >= 0.98 else 'missed'})",
                "",
            ]
        if "rss" in parts:
            large = synthetic_dataset(tmp / "ds-1gb", small_tokens * 10, tok_dir)
            rss = {
                name: train_run(tmp, f"rss-{name}", d, steps, False)
                for name, d in (("100mb", small), ("1gb", large))
            }
            r_rss = rss["1gb"]["peak_rss_mb"] / rss["100mb"]["peak_rss_mb"]
            rows = [
                {
                    "dataset": f"{name} of text ({n:,} tokens)",
                    "peak_rss_mb_rank0": round(rss[name]["peak_rss_mb"]),
                }
                for name, n in (("100mb", small_tokens), ("1gb", small_tokens * 10))
            ]
            body += [
                f"Peak RSS of a training worker (rank 0, ru_maxrss: private memory plus the shard pages it "
                f"touched), preset tiny, 2 workers, {steps} steps:",
                "",
                markdown_table(rows),
                "",
                f"- peak RSS 1 GB / 100 MB: **{r_rss:.3f}** (target <= 1.1: {'met' if r_rss <= 1.1 else 'missed'})",
            ]
    report("data_pipeline", body, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
