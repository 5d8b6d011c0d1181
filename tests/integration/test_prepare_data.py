"""`bloomray prepare-data` on Ray Data: the same bytes for any number of workers, a dataset dir
that is never silently replaced, and a worker's memory that does not grow with the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray

from bloomray.cli import main
from bloomray.config import load_config
from bloomray.data.shards import ShardWriter, TokenDataset
from bloomray.data.tokens import build_dataset

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def corpus(root: Path) -> Path:
    """Five files of three formats, with bad rows, so the work splits into several units."""
    rng = np.random.default_rng(0)

    def text() -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 60))))

    root.mkdir()
    for k in range(3):
        rows = [json.dumps({"text": text()}) for _ in range(400)] + ["{broken"]
        (root / f"part{k}.jsonl").write_text("\n".join(rows) + "\n")
    (root / "notes.txt").write_text("\n\n".join(text() for _ in range(300)))
    (root / "table.csv").write_text("text,id\n" + "".join(f"{text()},{i}\n" for i in range(200)))
    return root


def cfg(path: Path, *extra: str):
    return load_config(
        None, ["train.max_steps=1", f"data.path={path}", "data.tokenizer.vocab_size=300", *extra]
    )


def files_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_shards_are_identical_with_0_1_and_2_ray_data_workers(tmp_path: Path, ray_local):
    src = corpus(tmp_path / "corpus")
    local = build_dataset(cfg(src), None, tmp_path / "w0")
    import ray.data

    from bloomray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(local.tokenizer_dir))
    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size)
    one = build_dataset(cfg(src), tok, tmp_path / "w1", workers=1, shard_tokens=5000)
    # the driver's own Ray Data settings are back (the encoding set its own for its run only)
    assert (
        ctx.execution_options.preserve_order,
        ctx.enable_progress_bars,
        ctx.target_max_block_size,
    ) == before
    assert before != (True, False, 1 << 20)
    two = build_dataset(cfg(src), tok, tmp_path / "w2", workers=2, shard_tokens=5000)
    assert files_of(one.path) == files_of(two.path)
    assert len(one.index["splits"]["train"]["shards"]) > 3  # the 5,000-token shards were rolled
    # in-process encoding writes the same token streams (its shards are just not cut at 5,000)
    for split in ("train", "eval"):
        assert np.array_equal(
            local.blocks(split, 1).span(0, local.tokens(split)),
            one.blocks(split, 1).span(0, one.tokens(split)),
        )
    assert one.index["bad_rows"] == 3
    assert one.documents("train") + one.documents("eval") == 3 * 400 + 300 + 200


def test_cli_prepares_a_dataset_and_never_replaces_what_it_did_not_make(tmp_path: Path, ray_local, capsys):
    src = corpus(tmp_path / "corpus")
    out = tmp_path / "ds"
    args = ["prepare-data", "--output", str(out), "--workers", "2", "--set", f"data.path={src}"]
    assert main([*args, "--set", "data.tokenizer.vocab_size=300"]) == 0
    printed = json.loads(capsys.readouterr().out)
    ds = TokenDataset.open(out)
    assert printed["train"]["tokens"] == ds.tokens("train") and printed["bad_rows"] == 3
    assert main(args) == 2
    assert "holds a prepared dataset; pass --overwrite" in capsys.readouterr().err
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.md").write_text("mine")
    assert main(["prepare-data", "--output", str(keep), "--set", f"data.path={src}", "--overwrite"]) == 2
    assert "not a prepared dataset; choose another --output" in capsys.readouterr().err
    assert files_of(keep) == {"notes.md": b"mine"}


@ray.remote(num_cpus=1, max_calls=1)  # a fresh worker process per call
def _read_like_a_worker(blocks, steps: int) -> dict[str, float]:
    """A Ray worker reading ``steps`` micro-batches the way the train loop does; its resident
    memory after, in MiB: private (RssAnon) and mapped file pages (RssFile, the shards' too)."""
    from bloomray.train.batches import ShardedBatches

    batches = ShardedBatches(blocks, rank=0, world=2, micro_batch_size=8, grad_accum=1, seed=0)
    for i in range(steps):
        batches.get(i)
    status = Path("/proc/self/status").read_text()
    kinds = ("RssAnon", "RssFile")
    return {
        k: int(line.split()[1]) / 1024
        for line in status.splitlines()
        for k in kinds
        if line.startswith(k + ":")
    }


def test_worker_memory_does_not_grow_with_a_10x_larger_corpus(tmp_path: Path, ray_local):
    def dataset(name: str, tokens: int) -> TokenDataset:
        out = tmp_path / name
        out.mkdir()
        w = ShardWriter(out, 50_000, shard_tokens=1 << 22)
        ids = np.random.default_rng(0).integers(0, 50_000, size=tokens)
        for a in range(0, tokens, 1000):
            w.add("train", ids[a : a + 1000])
        w.add("eval", ids[:1000])
        w.close({"vocab_size": 50_000, "bad_rows": 0})
        return TokenDataset.open(out)

    small, large = dataset("small", 3_000_000), dataset("large", 30_000_000)  # 6 MB and 60 MB of uint16
    steps = 300
    small_mem = ray.get(_read_like_a_worker.remote(small.blocks("train", 128), steps))
    large_mem = ray.get(_read_like_a_worker.remote(large.blocks("train", 128), steps))
    # Loading the large corpus into memory would add 60 MB to a worker of this size, and so
    # would keeping the shard pages it read mapped (a fault maps up to 2 MiB around a block).
    rss_small, rss_large = sum(small_mem.values()), sum(large_mem.values())
    assert rss_large <= 1.1 * rss_small, (small_mem, large_mem)
    assert large_mem["RssAnon"] - small_mem["RssAnon"] < 30, (small_mem, large_mem)
    assert large_mem["RssFile"] - small_mem["RssFile"] < 20, (small_mem, large_mem)


def test_a_prepared_dataset_refuses_a_separate_eval_file(tmp_path: Path):
    from bloomray.config import ConfigError
    from bloomray.data.prepare import prepare_data

    src = corpus(tmp_path / "corpus")
    build_dataset(cfg(src), None, tmp_path / "ds")
    with pytest.raises(ConfigError, match="own eval split; leave data.eval_path unset"):
        prepare_data(cfg(tmp_path / "ds", f"data.eval_path={src / 'notes.txt'}"))
