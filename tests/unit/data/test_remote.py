"""Prepared datasets at a URI (``data/remote.py``): each node copies one into its cache once,
checks it against the index before it counts as a copy, and a bad remote fails fast and says
what to fix. ``file://`` URIs go through the same code as ``s3://``; a moto S3 server on the
loopback stands in for S3."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_shards import cfg_for, docs_of, write_synthetic

from bloomray.config import ConfigError
from bloomray.data import remote
from bloomray.data.corpus import DataError
from bloomray.data.shards import INDEX, TokenDataset, all_blocks, is_token_dataset


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """This test's dataset cache (``BLOOMRAY_DATA_CACHE``)."""
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def copies(monkeypatch) -> list[str]:
    """The remote files copied so far (``_copy_file`` counted)."""
    done, real = [], remote._copy_file
    monkeypatch.setattr(remote, "_copy_file", lambda fs, src, dst: done.append(src) or real(fs, src, dst))
    return done


def dataset(tmp_path: Path) -> Path:
    """A small prepared dataset dir with many shards and a nested ``tokenizer/`` file."""
    write_synthetic(tmp_path / "ds", [np.arange(50)] * 20, 100, shard_tokens=64)
    (tmp_path / "ds" / "tokenizer").mkdir()
    (tmp_path / "ds" / "tokenizer" / "tokenizer.json").write_text("{}")
    return tmp_path / "ds"


def complete_copies(cache: Path) -> list[Path]:
    """Dirs in the cache that look like a finished copy (an index inside)."""
    return [d for d in cache.iterdir() if (d / INDEX).exists()] if cache.exists() else []


def test_a_file_uri_is_copied_once_and_reads_like_the_original(tmp_path: Path, cache: Path, copies):
    src = dataset(tmp_path)
    uri = f"file://{src}/"
    assert is_token_dataset(uri) and remote.is_remote(uri) and not remote.is_remote(str(src))
    assert remote.local_dataset_dir(str(src)) == src  # a plain path is read in place
    ds = TokenDataset.open(uri)
    assert ds.path.parent == cache and ds.source == uri and ds.index == TokenDataset.open(src).index
    assert (ds.path / "tokenizer" / "tokenizer.json").read_text() == "{}"
    want = all_blocks(TokenDataset.open(src).blocks("train", 8))["input_ids"]
    assert np.array_equal(all_blocks(ds.blocks("train", 8))["input_ids"], want)
    n, mtime = len(copies), (ds.path / "train-00001.bin").stat().st_mtime_ns
    assert n == len([p for p in src.rglob("*") if p.is_file()]) - 1  # all but the index, written as read
    again = TokenDataset.open(uri.rstrip("/"))
    assert again.path == ds.path and len(copies) == n  # reused: nothing copied again
    assert (ds.path / "train-00001.bin").stat().st_mtime_ns == mtime
    assert complete_copies(cache) == [ds.path]


def test_a_worker_on_another_node_copies_the_uri_its_blocks_pickled_as(tmp_path: Path, cache, monkeypatch):
    src = dataset(tmp_path)
    blocks = TokenDataset.open(f"file://{src}").blocks("train", 8)
    data = pickle.dumps(blocks)
    assert len(data) < 1000 and f"file://{src}".encode() in data  # the URI, not the driver's copy
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "other-node"))
    worker = pickle.loads(data)
    assert np.array_equal(
        worker.take(np.array([5, 1]))["input_ids"], blocks.take(np.array([5, 1]))["input_ids"]
    )
    assert [d.parent for d in complete_copies(tmp_path / "other-node")] == [tmp_path / "other-node"]
    assert worker.fingerprint() == blocks.fingerprint()


def test_a_corrupt_or_truncated_remote_shard_is_named_and_leaves_no_copy(tmp_path: Path, cache: Path):
    src = dataset(tmp_path)
    shard = src / "train-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    with pytest.raises(DataError, match=rf"file://{src}/train-00001\.bin is corrupt \(sha256 differs"):
        TokenDataset.open(f"file://{src}")
    assert complete_copies(cache) == [] and not [p for p in cache.iterdir() if p.is_dir()]
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train-00001\.bin is 126 bytes, index\.json says 128"):
        TokenDataset.open(f"file://{src}")
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00001\.bin is missing"):
        TokenDataset.open(f"file://{src}")
    assert complete_copies(cache) == []


def test_an_interrupted_copy_leaves_no_complete_dir_and_the_next_one_finishes(
    tmp_path: Path, cache: Path, monkeypatch
):
    import bloomray.files

    src, real, done = dataset(tmp_path), remote._copy_file, []

    def dies_half_way(fs, path: str, dst: Path) -> tuple[int, str]:
        if len(done) == 8:
            dst.write_bytes(b"\0" * 10)  # a shard half written
            raise OSError("connection reset")
        done.append(path)
        return real(fs, path, dst)

    monkeypatch.setattr(remote, "_copy_file", dies_half_way)
    with pytest.raises(DataError, match=r"copying file://.*/train-\d+\.bin to .* failed: connection reset"):
        remote.local_dataset_dir(f"file://{src}")
    assert complete_copies(cache) == [] and not [p for p in cache.iterdir() if p.is_dir()]
    # A process killed mid-copy cleans nothing up: its temp dir stays, and does not look complete.
    with monkeypatch.context() as m:
        m.setattr(bloomray.files.shutil, "rmtree", lambda *a, **k: None)
        done.clear()
        with pytest.raises(DataError):
            remote.local_dataset_dir(f"file://{src}")
    monkeypatch.setattr(remote, "_copy_file", real)
    (left,) = [p for p in cache.iterdir() if p.is_dir()]
    assert left.name.startswith(".") and not (left / INDEX).exists() and complete_copies(cache) == []
    ds = TokenDataset.open(f"file://{src}")  # the next try removes it and copies afresh
    assert [p for p in cache.iterdir() if p.is_dir()] == [ds.path]
    assert np.array_equal(
        all_blocks(ds.blocks("eval", 8))["input_ids"],
        all_blocks(TokenDataset.open(src).blocks("eval", 8))["input_ids"],
    )


def test_two_workers_of_a_node_copy_once(tmp_path: Path, cache: Path, monkeypatch):
    src, real, done = dataset(tmp_path), remote._copy_file, []

    def slow(fs, path: str, dst: Path) -> tuple[int, str]:
        done.append(path)
        time.sleep(0.01)
        return real(fs, path, dst)

    monkeypatch.setattr(remote, "_copy_file", slow)
    got: list[Path] = []
    workers = [
        threading.Thread(target=lambda: got.append(remote.local_dataset_dir(f"file://{src}")))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(got) == 3 and len(set(got)) == 1
    assert sorted(done) == sorted(str(p) for p in src.rglob("*") if p.is_file() and p.name != INDEX)


def test_a_rewritten_remote_dataset_gets_a_fresh_copy(tmp_path: Path, cache: Path):
    src = dataset(tmp_path)
    first = TokenDataset.open(f"file://{src}")
    (src / "tokenizer" / "tokenizer.json").write_text('{"v": 2}')
    index = (src / INDEX).read_text()
    (src / INDEX).write_text(index.replace('"bad_rows": 0', '"bad_rows": 1'))
    second = TokenDataset.open(f"file://{src}")
    assert second.path != first.path and second.index["bad_rows"] == 1
    assert (second.path / "tokenizer" / "tokenizer.json").read_text() == '{"v": 2}'


def test_a_uri_without_a_dataset_fails_before_copying(tmp_path: Path, cache: Path, copies):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"index\.json not found: data\.path=file://.*empty is not a prepared"
    ):
        TokenDataset.open(f"file://{tmp_path / 'empty'}")
    (tmp_path / "empty" / INDEX).write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match=r"not a 'bloomray-tokens' v1 index"):
        TokenDataset.open(f"file://{tmp_path / 'empty'}")
    with pytest.raises(DataError, match=r"unknown URI option\(s\) \['nope'\]"):
        remote.local_dataset_dir("s3://bucket/ds?nope=1")
    assert copies == []


def test_an_unreachable_s3_bucket_fails_fast_naming_the_uri_and_the_fix(cache: Path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    start = time.monotonic()
    with pytest.raises(DataError) as err:  # no network here; with one, no such bucket (or no access)
        TokenDataset.open("s3://AKIAEXAMPLE:s3cr3t@bloomray-test-no-such-bucket-4242/prepared/ds")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "s3://bloomray-test-no-such-bucket-4242/prepared/ds/index.json" in msg
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_PROFILE" in msg and "mount" in msg
    assert "s3cr3t" not in msg and "AKIAEXAMPLE" not in msg  # credentials never printed
    assert not cache.exists()  # nothing made before the index was read


def test_a_dataset_on_s3_is_copied_and_verified(tmp_path: Path, cache: Path, monkeypatch):
    pytest.importorskip("moto")
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        opts = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        s3 = pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            endpoint_override=f"{host}:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir("data-bucket")
        src = dataset(tmp_path)
        pafs.copy_files(str(src), "data-bucket/corpora/ds", destination_filesystem=s3)
        uri = f"s3://testing:testing@data-bucket/corpora/ds?{opts}"
        ds = TokenDataset.open(uri)
        assert ds.path.parent == cache
        want = all_blocks(TokenDataset.open(src).blocks("train", 8))["input_ids"]
        assert np.array_equal(all_blocks(ds.blocks("train", 8))["input_ids"], want)
        with s3.open_output_stream("data-bucket/corpora/ds/eval-00000.bin") as f:
            f.write(b"\0" * 8)  # replaced remotely, after the copy: this node keeps its checked copy
        assert TokenDataset.open(uri).path == ds.path
        with pytest.raises(DataError, match=rf"s3://data-bucket/corpora/gone/index\.json\?{opts} not found"):
            TokenDataset.open(f"s3://testing:testing@data-bucket/corpora/gone?{opts}")
    finally:
        server.stop()


def test_a_run_with_a_uri_data_path_reads_the_nodes_copy(tmp_path: Path, cache: Path):
    from bloomray.data.prepare import prepare_data
    from bloomray.data.tokens import build_dataset, prepare_dataset_dir

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(docs_of(200, 4)))
    built = build_dataset(cfg_for(corpus), None, tmp_path / "ds")
    uri = f"file://{built.path}"
    data = prepare_data(cfg_for(uri, "data.block_size=16"))
    assert data.stats["source"] == uri and Path(data.stats["dataset"]).parent == cache
    local = prepare_data(cfg_for(built.path, "data.block_size=16"))
    assert np.array_equal(all_blocks(data.train)["input_ids"], all_blocks(local.train)["input_ids"])
    assert data.train.fingerprint() == local.train.fingerprint()  # a resume may switch between them
    assert len(data.tokenizer) == len(local.tokenizer)
    assert pickle.loads(pickle.dumps(data.eval)).root == uri
    with pytest.raises(ConfigError, match="prepare-data reads local files"):
        prepare_dataset_dir(cfg_for("s3://bucket/raw-corpus"), tmp_path / "out")
