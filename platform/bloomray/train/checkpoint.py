"""DeepSpeed checkpoints through Ray Train: every rank saves its shard, Ray merges them.

A checkpoint directory is self-contained: DeepSpeed's files (tag ``ds``), ``bloomray.json``
(step, task, model config, final metrics) and the tokenizer, so export needs nothing else.
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
HOOKS_FILE = "hooks.pt"
TOKENIZER_DIR = "tokenizer"


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
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step})
        if meta is not None:
            (Path(tmp) / META_FILE).write_text(
                json.dumps({**meta, "step": step, "metrics": metrics}, indent=2)
            )
        if tokenizer_files:
            tdir = Path(tmp) / TOKENIZER_DIR
            tdir.mkdir()
            for name, blob in tokenizer_files.items():
                (tdir / name).write_bytes(blob)
        if probe is not None:
            torch.save(probe, Path(tmp) / PROBE_FILE)
        if hook_states:
            torch.save(hook_states, Path(tmp) / HOOKS_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore_latest(engine: Any) -> tuple[int, list[int], list[dict[str, Any]]]:
    """Load the latest reported checkpoint into ``engine``.

    Returns:
        (step, restarts, hook_states): the checkpoint's step (0 if none), the steps every
        restart so far resumed from (this one included), and the step hooks' saved states.
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, [], []
    with ckpt.as_directory() as d:
        _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
        meta_path = Path(d) / META_FILE
        previous = json.loads(meta_path.read_text()).get("restarts", []) if meta_path.exists() else []
        hooks_path = Path(d) / HOOKS_FILE
        # masks (tensors) and floats only: the safe unpickler reads them, and nothing else runs
        hook_states = torch.load(hooks_path, weights_only=True) if hooks_path.exists() else []
    if client_state is None:
        raise RuntimeError(f"checkpoint {ckpt.path} could not be loaded by DeepSpeed")
    step = int(client_state["step"])
    return step, [*previous, step], hook_states


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
