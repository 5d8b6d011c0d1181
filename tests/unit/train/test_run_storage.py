"""Where a checkpoint is read from: its URI, and a local dir for restore, summary and export."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from ray.train import Checkpoint

from bloomray.config import load_config
from bloomray.train.checkpoint import checkpoint_dir_name, local_checkpoint_dir
from bloomray.train.run import checkpoint_location, checkpoint_uri, local_checkpoint_root


def _remote_like(root: Path) -> Checkpoint:
    """A checkpoint ``ck`` under ``root`` behind a filesystem that is not LocalFileSystem, so it
    takes the download path that S3 takes."""
    (root / "ck" / "ds").mkdir(parents=True)
    (root / "ck" / "bloomray.json").write_text(json.dumps({"step": 7}))
    (root / "ck" / "ds" / "shard.pt").write_bytes(b"x" * 1000)
    return Checkpoint("ck", filesystem=pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))


def test_local_checkpoint_uri_is_its_path(tmp_path: Path):
    assert checkpoint_uri(Checkpoint(str(tmp_path)), str(tmp_path.parent)) == str(tmp_path)


@pytest.mark.parametrize(
    ("storage", "uri"),
    [
        ("s3://bkt/runs", "s3://bkt/runs/r-1/checkpoint_1"),
        (
            "s3://key:secret@bkt/runs?endpoint_override=127.0.0.1:9&scheme=http",
            "s3://bkt/runs/r-1/checkpoint_1?endpoint_override=127.0.0.1:9&scheme=http",
        ),
    ],
)
def test_remote_checkpoint_uri_keeps_the_query_and_drops_credentials(storage: str, uri: str):
    fs = pafs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http", region="us-east-1")
    assert checkpoint_uri(Checkpoint("bkt/runs/r-1/checkpoint_1", filesystem=fs), storage) == uri


def test_a_local_checkpoint_is_used_in_place(tmp_path: Path):
    with local_checkpoint_dir(Checkpoint(str(tmp_path)), ["bloomray.json"]) as d:
        assert d == tmp_path


def test_a_local_path_or_file_uri_is_used_in_place(tmp_path: Path):
    with local_checkpoint_dir(tmp_path) as d:
        assert d == tmp_path
    with local_checkpoint_dir(f"file://{tmp_path}") as d:
        assert d == tmp_path  # no copy of a local checkpoint
    assert tmp_path.is_dir()


def test_a_remote_checkpoint_downloads_only_the_files_asked_for(tmp_path: Path):
    with local_checkpoint_dir(_remote_like(tmp_path / "store"), ["bloomray.json"]) as d:
        assert sorted(p.name for p in Path(d).iterdir()) == ["bloomray.json"]
        assert json.loads((Path(d) / "bloomray.json").read_text()) == {"step": 7}
    assert not Path(d).exists()


def test_a_remote_checkpoint_downloads_whole_for_export(tmp_path: Path):
    with local_checkpoint_dir(_remote_like(tmp_path / "store")) as d:
        assert (Path(d) / "ds" / "shard.pt").read_bytes() == b"x" * 1000
        assert not Path(d).is_relative_to(tmp_path)  # a copy, not the stored dir
    assert not Path(d).exists()


@pytest.mark.parametrize(
    ("storage", "local"),
    [
        (None, True),  # OUTPUT/checkpoints
        ("{tmp}/shared", True),  # local disk or an NFS mount: written in place
        ("file://{tmp}/shared", True),
        ("s3://bkt/runs?endpoint_override=127.0.0.1:9", False),  # uploaded from a temp dir
    ],
)
def test_checkpoints_are_written_in_place_on_local_storage_only(tmp_path: Path, storage, local):
    overrides = ["train.max_steps=1"] + (
        [f"output.storage_path={storage.format(tmp=tmp_path)}"] if storage else []
    )
    cfg = load_config(None, overrides)
    out = tmp_path / "run"
    root = local_checkpoint_root(cfg, out)
    if not local:
        assert root is None
        return
    storage_dir, name = checkpoint_location(cfg, out)
    assert root == str(Path(storage_dir.removeprefix("file://")) / name)


def test_a_file_uri_storage_is_written_in_place_at_its_path(tmp_path: Path):
    cfg = load_config(None, ["train.max_steps=1", f"output.storage_path=file://{tmp_path}/shared"])
    out = tmp_path / "run"
    _, name = checkpoint_location(cfg, out)
    assert local_checkpoint_root(cfg, out) == str(tmp_path / "shared" / name)


@pytest.mark.parametrize(("storage", "base"), [("shared", "cwd/shared"), ("~/ckpts", "home/ckpts")])
def test_a_relative_or_home_storage_path_is_made_absolute(tmp_path: Path, monkeypatch, storage, base):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["train.max_steps=1", f"output.storage_path={storage}"])
    out = tmp_path / "run"
    storage_dir, name = checkpoint_location(cfg, out)
    assert storage_dir == str((tmp_path / base).resolve())  # what Ray gets: pyarrow needs it absolute
    assert local_checkpoint_root(cfg, out) == str((tmp_path / base).resolve() / name)


def test_checkpoint_names_carry_step_and_attempt():
    assert checkpoint_dir_name(40, "0a1b2c") == "checkpoint_000040-0a1b2c"
    assert checkpoint_dir_name(40, "0a1b2c") != checkpoint_dir_name(40, "ffffff")
