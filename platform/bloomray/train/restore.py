"""Resume from the newest loadable checkpoint, on every rank alike.

A corrupt newest checkpoint (truncated DeepSpeed file, missing ``bloomray.json``, unreadable
hook state) is skipped with a warning naming it, and the older ones beside it are tried
newest first. Every rank votes on every candidate, so all ranks load the same one. A candidate
whose optimizer state is partitioned for another number of workers is converted to DeepSpeed's
universal checkpoint first and loaded from there (``universal.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch

from bloomray.train.checkpoint import (
    CHECKPOINT_PREFIX,
    DS_TAG,
    META_FILE,
    CorruptCheckpointError,
    local_checkpoint_dir,
)
from bloomray.train.collectives import all_reduce_sum
from bloomray.train.hook_state import load_hook_states
from bloomray.train.universal import convert_on_every_node, load_universal, needs_universal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """What a resume loaded: the step (0: a fresh start), the step every restart so far resumed
    from (this one included), the step hooks' saved states and the checkpoint's bloomray.json
    (empty for a fresh start)."""

    step: int
    restarts: list[int]
    hook_states: list[dict[str, Any]]
    meta: dict[str, Any]


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint directory on a (pyarrow) filesystem and the step its bloomray.json records.

    ``step`` is None when that file is missing or unreadable.
    """

    path: str
    step: int | None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def describe(self) -> str:
        return f"{self.path} (step {self.step if self.step is not None else 'unknown'})"


def fallback_order(latest: CheckpointRef, siblings: Sequence[CheckpointRef]) -> list[CheckpointRef]:
    """The checkpoints to try, newest first: the one Ray handed back, then older siblings.

    Siblings are ordered by their recorded step (name breaks ties, Ray's names count up).
    A sibling newer than ``latest`` is left out: Ray never registered it, so it is an upload
    that a crash cut short. So is one without a readable step (not a whole bloomray
    checkpoint). When ``latest``'s own step is unreadable, "older" falls back to the name.

    Args:
        latest: the checkpoint ``ray.train.get_checkpoint()`` returned.
        siblings: the other ``checkpoint_*`` directories beside it (``latest`` may be among them).

    Returns:
        ``latest`` first, then the usable older siblings, newest first.
    """
    known = [s for s in siblings if s.name != latest.name and s.step is not None]
    if latest.step is not None:
        rest = [s for s in known if s.step <= latest.step]  # type: ignore[operator]
    else:
        rest = [s for s in known if s.name < latest.name]
    rest.sort(key=lambda s: (s.step, s.name), reverse=True)
    return [latest, *rest]


def read_checkpoint_meta(fs: pafs.FileSystem, checkpoint_path: str) -> dict[str, Any] | None:
    """``bloomray.json`` of a checkpoint on ``fs`` (one small read); None if missing or unreadable."""
    try:
        with fs.open_input_stream(f"{checkpoint_path.rstrip('/')}/{META_FILE}") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def read_step(fs: pafs.FileSystem, checkpoint_path: str) -> int | None:
    """The step in ``bloomray.json`` of a checkpoint on ``fs``; None if missing or unreadable."""
    try:
        return int((read_checkpoint_meta(fs, checkpoint_path) or {})["step"])
    except (KeyError, ValueError, TypeError):
        return None


def checkpoint_candidates(fs: pafs.FileSystem, latest_path: str) -> list[CheckpointRef]:
    """``latest_path`` and its ``checkpoint_*`` siblings on ``fs``, in :func:`fallback_order`.

    Works on any pyarrow filesystem (local disk, NFS, S3, GCS): only listing and small reads.

    Args:
        fs: the checkpoint's filesystem (``ray.train.Checkpoint.filesystem``).
        latest_path: its path on ``fs`` (``ray.train.Checkpoint.path``).

    Returns:
        The candidates to try, newest first; just ``latest_path`` if its parent cannot be listed.
    """
    latest_path = latest_path.rstrip("/")
    latest = CheckpointRef(latest_path, read_step(fs, latest_path))
    try:
        infos = fs.get_file_info(pafs.FileSelector(posixpath.dirname(latest_path)))
    except OSError as e:
        log.warning("[bloomray] cannot list the checkpoints beside %s (%s): no fallback", latest_path, e)
        return [latest]
    siblings = [
        CheckpointRef(i.path, read_step(fs, i.path))
        for i in infos
        if i.type == pafs.FileType.Directory
        and i.base_name.startswith(CHECKPOINT_PREFIX)
        and i.base_name != latest.name
    ]
    return fallback_order(latest, siblings)


def validate_checkpoint_dir(directory: str | Path) -> dict[str, Any]:
    """Cheap checks that a local checkpoint dir is whole, before DeepSpeed reads it.

    ``bloomray.json`` must parse and hold a step; ``ds/`` must hold a model-states file; every
    DeepSpeed ``*.pt`` (a zip archive) must keep its central directory, which sits at the end
    of the file, so a truncated file fails here without reading the tensors.

    Args:
        directory: a local checkpoint directory.

    Returns:
        Its ``bloomray.json``.

    Raises:
        CorruptCheckpointError: naming the missing or damaged file.
    """
    d = Path(directory)
    try:
        meta = json.loads((d / META_FILE).read_text())
        int(meta["step"])
    except FileNotFoundError:
        raise CorruptCheckpointError(f"no {META_FILE}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{META_FILE} is unreadable or has no step ({e!r})") from None
    ds_files = sorted((d / DS_TAG).glob("*.pt"))
    if not any(p.name.endswith("model_states.pt") for p in ds_files):
        raise CorruptCheckpointError(f"no DeepSpeed model states in {DS_TAG}/")
    for p in ds_files:
        try:
            with zipfile.ZipFile(p):
                pass
        except (zipfile.BadZipFile, OSError) as e:
            raise CorruptCheckpointError(f"{DS_TAG}/{p.name} is truncated or damaged ({e})") from None
    return meta


def restore_latest(engine: Any, device: torch.device | None = None) -> Restored:
    """Load the latest loadable reported checkpoint into ``engine`` (collective: all ranks).

    Args:
        engine: this rank's DeepSpeed engine.
        device: this rank's device, for the vote and the hook tensors (``engine.device`` if None).

    Returns:
        What was loaded; step 0 and nothing else when the run has no checkpoint yet.

    Raises:
        RuntimeError: no candidate loaded on every rank; lists each one tried and its error.
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return Restored(0, [], [], {})
    device = device if device is not None else engine.device
    candidates = checkpoint_candidates(ckpt.filesystem, ckpt.path)
    return restore_first_loadable(engine, ckpt.filesystem, candidates, device)


def restore_first_loadable(
    engine: Any, fs: pafs.FileSystem, candidates: Sequence[CheckpointRef], device: torch.device
) -> Restored:
    """Try ``candidates`` in order; the first one that every rank loads wins (collective).

    Args:
        engine: this rank's DeepSpeed engine.
        fs: the filesystem the candidates live on.
        candidates: newest first (see :func:`checkpoint_candidates`); the same on every rank.
        device: this rank's device.

    Returns:
        What the winning candidate held (:class:`Restored`).

    Raises:
        RuntimeError: none loaded on every rank; lists each candidate and why it failed.
    """
    failures: list[str] = []
    for i, ref in enumerate(candidates):
        loaded, reason = _try_candidate(engine, fs, ref, device)
        if loaded is not None:
            return loaded
        failures.append(f"  {ref.describe()}: {reason}")
        nxt = f"falling back to {candidates[i + 1].describe()}" if i + 1 < len(candidates) else "none left"
        log.warning("[bloomray] skipping checkpoint %s: %s; %s", ref.describe(), reason, nxt)
    raise RuntimeError(
        "no checkpoint could be loaded on every rank; tried, newest first:\n"
        + "\n".join(failures)
        + "\nRepair or delete them, or train into a new output directory."
    )


def _try_candidate(
    engine: Any, fs: pafs.FileSystem, ref: CheckpointRef, device: torch.device
) -> tuple[Restored | None, str]:
    """Load one candidate on every rank, or on none: (what it held, "") or (None, why).

    Two votes keep ranks in lockstep. The first follows the local checks (download, files,
    hook state, whether the universal conversion is needed), so a damaged file stops every rank
    before DeepSpeed's load, which can run collectives a failing rank would never join. The
    second follows the load itself; a conversion adds two in between
    (``universal.convert_on_every_node``).
    """
    key = ref.step if ref.step is not None else -1
    with contextlib.ExitStack() as stack:
        meta: dict[str, Any] = {}
        hooks: list[dict[str, Any]] = []
        d: Path | str = ""
        universal = False
        try:
            d = stack.enter_context(local_checkpoint_dir(ray.train.Checkpoint(ref.path, filesystem=fs)))
            meta = validate_checkpoint_dir(d)
            hooks = load_hook_states(d, device)
            universal = needs_universal(Path(d) / DS_TAG, engine.dp_world_size)
            error = ""
        except Exception as e:  # noqa: BLE001 - any local failure is voted on, never raised alone
            error = _reason(e)
        verdict = _vote(error, key, device, universal)
        if not verdict and universal:
            verdict = convert_on_every_node(engine, d, lambda err: _vote(err, key, device))
        if verdict:
            return None, verdict
        client_state = None
        try:
            _, client_state = (
                load_universal(engine, d) if universal else engine.load_checkpoint(d, tag=DS_TAG)
            )
            if client_state is None:
                error = "DeepSpeed found no checkpoint to load"
        except Exception as e:  # noqa: BLE001 - as above: the other ranks must hear of it
            error = _reason(e)
        verdict = _vote(error, key, device)
        if verdict:
            return None, verdict
    step = int(client_state["step"])  # type: ignore[index]  # not None: checked above
    return Restored(step, [*meta.get("restarts", []), step], hooks, meta), ""


def _vote(error: str, key: int, device: torch.device, universal: bool = False) -> str:
    """All ranks' verdict on a candidate: "" when every rank succeeded on the same one, else why not.

    One all-reduce of (failed, 1, key, key^2, universal): ``n * sum(key^2) == sum(key)^2``
    holds exactly when every rank's key (the candidate's step) is the same, so ranks whose
    listings of the storage differ never load different checkpoints; ``universal`` (whether
    the rank's copy needs the conversion) must agree too, or the ranks would run different
    collectives. Whether the verdict is empty depends on the summed values only, so it is the
    same on every rank (the reason given may differ).
    """
    k = float(key)
    t = torch.tensor([float(bool(error)), 1.0, k, k * k, float(universal)], dtype=torch.float64)
    failed, n, total, squares, universals = all_reduce_sum(t, device).tolist()
    if failed:
        return error or f"{int(failed)} other rank(s) failed to load it"
    if n * squares != total * total:
        return "the ranks disagree on which checkpoint this is (their views of the storage differ)"
    if universals not in (0.0, n):
        return "the ranks' copies disagree on the worker count its optimizer state was saved for"
    return ""


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, CorruptCheckpointError) else f"{type(e).__name__}: {e}"
