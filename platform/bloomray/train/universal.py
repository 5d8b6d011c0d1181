"""Resume a partitioned DeepSpeed checkpoint on another number of workers.

ZeRO-1/2/3 (and bf16 at ZeRO-1, DeepSpeed's BF16_Optimizer) save the fp32 master weights and
Adam's moments as one shard per data-parallel rank (``ds/*zero_pp_rank_<r>_*_optim_states.pt``),
cut for that world size. A resume on the same number of workers loads the shards as they are.
On another number, the checkpoint is converted once to DeepSpeed's *universal* format
(``deepspeed/checkpoint/ds_to_universal.py``: one whole fp32 tensor, ``exp_avg`` and
``exp_avg_sq`` per parameter) into ``<checkpoint>/universal/ds``, from which every rank of the
new group cuts its own partition (``"load_universal"``). ZeRO-0 in fp32 or bf16 keeps one
unpartitioned copy in ``mp_rank_00_model_states.pt`` and loads directly on any worker count.

The conversion writes into a temp dir beside its target and renames it into place, so a crash
leaves no half-written ``universal/``; a later resume reuses a finished one. It costs about the
fp32 weights and both moments once more on disk (12 bytes a parameter), kept with the checkpoint
until Ray Train deletes it (``train.keep_checkpoints``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bloomray.train.checkpoint import DS_TAG

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
# What ds_to_universal.py writes last (in the parent of its output folder): a finished conversion.
DONE_MARKER = "latest_universal"
_TEMP_PREFIX = f".{UNIVERSAL_DIR}-"
_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_partitions(ds_dir: str | Path) -> int | None:
    """How many data-parallel ranks the optimizer state of a DeepSpeed checkpoint is cut for.

    Args:
        ds_dir: the checkpoint's DeepSpeed tag dir (``<checkpoint>/ds``).

    Returns:
        The number of ranks its ZeRO (or BF16_Optimizer) shards were saved by; None when it
        has none: the optimizer state is whole (ZeRO-0 in fp32 or bf16).
    """
    ranks = {int(m.group(1)) for p in Path(ds_dir).iterdir() if (m := _SHARD.match(p.name))}
    return max(ranks) + 1 if ranks else None


def needs_universal(ds_dir: str | Path, world_size: int) -> bool:
    """Whether loading ``ds_dir`` on ``world_size`` ranks needs the universal conversion: its
    optimizer state is partitioned, for another number of ranks."""
    saved = saved_partitions(ds_dir)
    return saved is not None and saved != world_size


def universal_dir(checkpoint_dir: str | Path) -> Path:
    """Where a checkpoint's universal copy lives: load it with tag ``ds`` from here."""
    return Path(checkpoint_dir) / UNIVERSAL_DIR


def is_converted(checkpoint_dir: str | Path) -> bool:
    """Whether ``checkpoint_dir`` holds a finished universal copy."""
    target = universal_dir(checkpoint_dir)
    return (target / DONE_MARKER).is_file() and (target / DS_TAG / "zero").is_dir()


def convert_to_universal(checkpoint_dir: str | Path) -> Path:
    """Convert ``checkpoint_dir/ds`` to ``checkpoint_dir/universal/ds``, once.

    Nothing is done when a finished copy is there. Otherwise temp dirs an interrupted
    conversion left are removed, DeepSpeed's converter writes into a new one, and that is
    renamed to ``universal/``. Call it on one rank per checkpoint directory at a time (see
    ``convert_on_every_node``); a rank that loses a rename race to a finished copy keeps that one.

    Returns:
        ``checkpoint_dir/universal``.

    Raises:
        RuntimeError: the converter failed (a damaged shard, say), or a ``universal/`` that this
            module did not make is in the way; nothing is left behind.
    """
    d = Path(checkpoint_dir)
    target = universal_dir(d)
    if is_converted(d):
        return target
    for stale in d.glob(f"{_TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=d))
    try:
        run_converter(d / DS_TAG, tmp / DS_TAG)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not is_converted(d):  # this module only ever renames finished copies into place
                raise RuntimeError(
                    f"{target} exists but is no finished universal checkpoint; remove it"
                ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("[bloomray] converted %s to a universal checkpoint for a new worker count", d)
    return target


def convert_on_every_node(engine: Any, checkpoint_dir: str | Path, vote: Callable[[str], str]) -> str:
    """Make the universal copy of ``checkpoint_dir`` where every rank can read it (collective).

    Global rank 0 converts first; then the first rank of each node, for nodes that do not see
    its copy (a checkpoint downloaded from cloud storage into each node's temp dir; on a shared
    filesystem the copy is there already and this is a no-op). All ranks vote after each round.

    Args:
        engine: this rank's DeepSpeed engine (for its global and local rank).
        checkpoint_dir: this rank's local copy of the checkpoint.
        vote: all ranks' verdict on this rank's error ("" for none), "" when no rank failed.

    Returns:
        "" when every rank can load the copy, else why not (empty or not on every rank alike).
    """
    for converts in (engine.global_rank == 0, engine.local_rank == 0):
        error = ""
        if converts:
            try:
                convert_to_universal(checkpoint_dir)
            except Exception as e:  # noqa: BLE001 - voted on, so that no rank waits for this one
                error = f"{type(e).__name__}: {e}"
        verdict = vote(error)
        if verdict:
            return verdict
    return ""


def run_converter(src: Path, dst: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` from ``src`` (a tag dir) into ``dst`` (its ``parent`` gets
    the ``latest_universal`` file), in this process, its console output kept for errors.

    ``inject_missing_state`` lets checkpoints saved before bloomray recorded
    ``universal_checkpoint_info`` convert too (without tensor or pipeline parallelism it only
    holds the format version).
    """
    from deepspeed.checkpoint.ds_to_universal import main

    args = types.SimpleNamespace(
        input_folder=str(src),
        output_folder=str(dst),
        num_extract_workers=1,  # 1: no process pool (forking a training worker is unsafe)
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(args)
    except Exception as e:
        raise RuntimeError(
            f"universal checkpoint conversion of {src} failed: {e!r}; its output:\n{out.getvalue()[-2000:]}"
        ) from e
    log.debug("ds_to_universal: %s", out.getvalue())


def load_universal(engine: Any, checkpoint_dir: str | Path) -> tuple[Any, dict[str, Any] | None]:
    """``engine.load_checkpoint`` of the universal copy in ``checkpoint_dir`` (collective).

    DeepSpeed reads its ``checkpoint.load_universal`` switch only while loading
    (``engine.load_universal_checkpoint()``), so it is set for this one load: the engine is
    built as for any run, and a later same-size load of another checkpoint reads shards directly.

    Returns:
        What ``load_checkpoint`` returns: (load path, client state).
    """
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        return engine.load_checkpoint(str(universal_dir(checkpoint_dir)), tag=DS_TAG)
    finally:
        config.load_universal_checkpoint = before
