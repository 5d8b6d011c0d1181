"""DeepSpeed checkpoints through Ray Train: every rank saves its shard, Ray merges them.

A checkpoint directory is self-contained: DeepSpeed's files (tag ``ds``), ``bloomray.json``
(step, task, model config, final metrics), the step hooks' state (``hooks.safetensors`` and
``hooks.json``: no pickle, see ``hook_state.py``) and the tokenizer, so export needs nothing
else. Loading one on resume, with fallback past a corrupt newest one, is ``restore.py``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch

DS_TAG = "ds"
META_FILE = "bloomray.json"
PROBE_FILE = "probe.pt"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_PREFIX = "checkpoint_"


class CorruptCheckpointError(ValueError):
    """A checkpoint directory is incomplete or damaged; the message says which file and how."""


def save_and_report(
    engine: Any,
    step: int,
    metrics: dict[str, Any],
    meta: dict[str, Any] | None,
    tokenizer_files: dict[str, bytes] | None,
    probe: dict[str, torch.Tensor] | None = None,
    hook_states: list[dict[str, Any]] | None = None,
) -> None:
    """Save this rank's shard and report it; every rank must call this at the same steps.

    Args:
        meta, tokenizer_files, probe, hook_states: written by rank 0 only (None elsewhere).
    """
    with tempfile.TemporaryDirectory(prefix="bloomray-ckpt-") as tmp:
        write_checkpoint(engine, tmp, step, metrics, meta, tokenizer_files, probe, hook_states)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


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
    engine.save_checkpoint(str(d), tag=DS_TAG, client_state={"step": step})
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
    """``bloomray.json`` of a checkpoint dir; FileNotFoundError names what is expected."""
    path = Path(checkpoint_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a bloomray checkpoint (no {META_FILE}); pass a "
            "OUTPUT/checkpoints/checkpoint_* directory"
        )
    return json.loads(path.read_text())


def read_tokenizer_files(tokenizer_dir: Path) -> dict[str, bytes]:
    """The tokenizer dir as bytes, so it travels to workers on any node."""
    return {p.name: p.read_bytes() for p in tokenizer_dir.iterdir() if p.is_file()}
