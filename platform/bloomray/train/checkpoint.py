"""DeepSpeed checkpoints through Ray Train: every rank saves its shard, Ray merges them.

A checkpoint directory is self-contained: DeepSpeed's files (tag ``ds``), ``bloomray.json``
(step, task, model config, final metrics), the step hooks' state (``hooks.safetensors`` and
``hooks.json``: no pickle, see ``hook_state.py``) and the tokenizer, so export needs nothing
else. Loading one on resume, with fallback past a corrupt newest one, is ``restore.py``; on
another number of workers, through DeepSpeed's universal checkpoint, ``universal.py``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch

from bloomray.errors import EXIT_USAGE, BloomrayError

DS_TAG = "ds"
META_FILE = "bloomray.json"
PROBE_FILE = "probe.pt"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_PREFIX = "checkpoint_"


class CorruptCheckpointError(BloomrayError, ValueError):
    """A checkpoint directory is incomplete or damaged; the message says which file and how.

    Exit code 2: the checkpoint path given is not a (complete) bloomray checkpoint.
    """

    exit_code = EXIT_USAGE


def checkpoint_dir_name(step: int, attempt_tag: str) -> str:
    """``checkpoint_<step>-<tag>``: the step for people, the attempt's tag so that a restarted
    attempt never writes into a directory an earlier one left (registered or not)."""
    return f"{CHECKPOINT_PREFIX}{step:06d}-{attempt_tag}"


def save_and_report(
    engine: Any,
    step: int,
    metrics: dict[str, Any],
    meta: dict[str, Any] | None,
    tokenizer_files: dict[str, bytes] | None,
    probe: dict[str, torch.Tensor] | None = None,
    hook_states: list[dict[str, Any]] | None = None,
    *,
    name: str,
    local_root: str | None = None,
) -> None:
    """Save this rank's shard and report it; every rank must call this at the same steps.

    Args:
        meta, tokenizer_files, probe, hook_states: written by rank 0 only (None elsewhere).
        name: the checkpoint's directory name (the same on every rank; see
            :func:`checkpoint_dir_name`).
        local_root: the run's checkpoint directory when it is on a filesystem every rank
            mounts (local disk, NFS): each rank then writes its files straight into
            ``local_root/name`` and Ray registers them in place. Otherwise (cloud storage)
            they go to a temp dir that Ray uploads: twice the writes, and the temp space.
    """
    if local_root:
        d = Path(local_root) / name
        d.mkdir(parents=True, exist_ok=True)
        write_checkpoint(engine, d, step, metrics, meta, tokenizer_files, probe, hook_states)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint(str(d)),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
        return
    with tempfile.TemporaryDirectory(prefix="bloomray-ckpt-") as tmp:
        write_checkpoint(engine, tmp, step, metrics, meta, tokenizer_files, probe, hook_states)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )


def write_checkpoint(
    engine: Any,
    directory: str | Path,
    step: int,
    metrics: dict[str, Any],
    meta: dict[str, Any] | None,
    tokenizer_files: dict[str, bytes] | None = None,
    probe: dict[str, torch.Tensor] | None = None,
    hook_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (no Ray: tests use it directly).

    Args:
        engine: this rank's DeepSpeed engine (``save_checkpoint`` is collective).
        directory: an existing local directory.
        step: the optimizer steps done, kept in DeepSpeed's client state and bloomray.json.
        metrics: stored in bloomray.json.
        meta, tokenizer_files, probe, hook_states: rank 0's extras (None elsewhere).
    """
    d = Path(directory)
    engine.save_checkpoint(str(d), tag=DS_TAG, client_state=ds_client_state(step))
    if meta is not None:
        (d / META_FILE).write_text(json.dumps({**meta, "step": step, "metrics": metrics}, indent=2))
    if tokenizer_files:
        tdir = d / TOKENIZER_DIR
        tdir.mkdir()
        for name, blob in tokenizer_files.items():
            (tdir / name).write_bytes(blob)
    if probe is not None:
        torch.save(probe, d / PROBE_FILE)
    if hook_states:
        from bloomray.train.hook_state import save_hook_states  # it imports this module

        save_hook_states(d, hook_states)


def ds_client_state(step: int) -> dict[str, Any]:
    """What bloomray keeps in DeepSpeed's checkpoint: the step, and the ``universal_checkpoint_info``
    that DeepSpeed's universal conversion (``ds_to_universal.py``) requires of a checkpoint, so
    that it resumes on another number of workers (``universal.py``). Without tensor or pipeline
    parallelism that info is only the format version."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {
        "step": step,
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }


def load_deepspeed_file(path: Path) -> Any:
    """A DeepSpeed ``*.pt`` file of a checkpoint, read with torch's safe (weights-only) unpickler.

    Checkpoint storage may be shared, so nothing in it may run code on load: only tensors,
    containers and the few DeepSpeed value types its state dicts hold are allowed.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([fragment_address, ZeroStageEnum, LossScaler]):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_meta(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``bloomray.json`` of a checkpoint dir.

    Raises:
        CorruptCheckpointError: ``checkpoint_dir`` has no ``bloomray.json`` (it is not a
            bloomray checkpoint); the message names what to pass instead.
    """
    path = Path(checkpoint_dir) / META_FILE
    if not path.exists():
        raise CorruptCheckpointError(
            f"{checkpoint_dir} is not a bloomray checkpoint (no {META_FILE}); pass a "
            "OUTPUT/checkpoints/checkpoint_* directory"
        )
    return json.loads(path.read_text())


def read_tokenizer_files(tokenizer_dir: Path) -> dict[str, bytes]:
    """The tokenizer dir as bytes, so it travels to workers on any node."""
    return {p.name: p.read_bytes() for p in tokenizer_dir.iterdir() if p.is_file()}


@contextlib.contextmanager
def local_checkpoint_dir(
    checkpoint: ray.train.Checkpoint | str | Path, files: list[str] | None = None
) -> Iterator[Path]:
    """A checkpoint as a local directory, for as long as the ``with`` block runs.

    Args:
        checkpoint: a ``ray.train.Checkpoint``, a local path, or a URI (``s3://``, ``gs://``,
            ``file://``, with pyarrow's query options such as ``endpoint_override``).
        files: on remote storage, download only these (relative paths); default: all of it.

    Yields:
        The checkpoint's own directory when it is on local disk; else a temp dir holding the
        download, removed on exit.
    """
    if not isinstance(checkpoint, ray.train.Checkpoint):
        if "://" not in str(checkpoint):
            yield Path(checkpoint)
            return
        checkpoint = ray.train.Checkpoint(str(checkpoint))
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
    elif files is None:
        with checkpoint.as_directory() as local_dir:
            yield Path(local_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bloomray-ckpt-") as tmp:
            for name in files:
                pafs.copy_files(
                    f"{checkpoint.path}/{name}", f"{tmp}/{name}", source_filesystem=checkpoint.filesystem
                )
            yield Path(tmp)
