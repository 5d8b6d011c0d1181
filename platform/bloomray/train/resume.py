"""What a resume depends on, recorded in every checkpoint and checked before Ray starts.

A resumed run must see the same samples in the same order with the same optimizer shape as
the run it continues. The :class:`ResumeContract` holds everything that decides this (world
size, batch sizes, seeds, a fingerprint of the packed data, a hash of the tokenizer files);
:func:`check_resume` compares the checkpoint's contract with the new run's and stops with a
message that names each change and how to proceed. ``total_steps`` may grow: the LR schedule
then continues from the checkpoint's LR (see ``train/schedule.py``). ``world_size`` may change
(:data:`FREE_FIELDS`): the batches of a step do not depend on the worker count
(``batches.ShardedBatches``), and an optimizer state partitioned for the old count is converted
to DeepSpeed's universal checkpoint on the workers before it loads (``universal.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bloomray.config import Config, ConfigError
from bloomray.data.shards import BlockSource
from bloomray.train.checkpoint import META_FILE


@dataclass(frozen=True)
class ResumeContract:
    """What a checkpoint was made with; a resume keeps all but :data:`FREE_FIELDS`."""

    world_size: int
    block_size: int
    micro_batch_size: int
    global_batch_size: int
    train_seed: int
    data_seed: int
    data_fingerprint: str
    tokenizer_hash: str
    total_steps: int
    zero_stage: int | None = None
    precision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResumeContract:
        """The contract a checkpoint recorded; fields an older checkpoint lacks are None (unchecked)."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


# The fields a resume may change: the step budget, and the number of workers (any ZeRO stage and
# precision: the same global batch is split over the new count, a partitioned optimizer state
# goes through DeepSpeed's universal checkpoint).
FREE_FIELDS = ("total_steps", "world_size")

# How to proceed when a setting changed, per field.
_ADVICE = {
    "zero_stage": "resume with deepspeed.zero_stage={old}",
    "precision": "resume with deepspeed.precision={old}",
    "block_size": "resume with data.block_size={old}",
    "micro_batch_size": "resume with train.micro_batch_size={old}",
    "global_batch_size": "resume with train.global_batch_size={old}",
    "train_seed": "resume with train.seed={old}",
    "data_seed": "resume with data.seed={old}",
    "data_fingerprint": "the packed training data differs (files, text, block size or tokenizer changed); "
    "resume on the original data",
    "tokenizer_hash": "the tokenizer differs from the run's saved OUTPUT/tokenizer; resume without "
    "data.tokenizer changes",
}


def fingerprint_sources(train: BlockSource, eval_: BlockSource) -> str:
    """sha256 over the train and eval sources' fingerprints (the shards' hashes and the block
    size for token datasets; names, dtypes, shapes and bytes for arrays)."""
    return hashlib.sha256(f"train:{train.fingerprint()}/eval:{eval_.fingerprint()}".encode()).hexdigest()


def latest_checkpoint_meta(storage: str, name: str) -> dict[str, Any] | None:
    """``bloomray.json`` of the newest checkpoint under ``storage/name`` (any pyarrow filesystem).

    Returns None when the run has no checkpoint yet (it then starts from step 0).
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return None
    infos = fs.get_file_info(pafs.FileSelector(run_dir))
    for d in sorted((i.path for i in infos if i.base_name.startswith("checkpoint_")), reverse=True):
        meta = f"{d}/{META_FILE}"
        if fs.get_file_info(meta).type == pafs.FileType.File:
            with fs.open_input_stream(meta) as f:
                return json.loads(f.read())
    return None


def check_resume(saved: dict[str, Any], new: ResumeContract, step: int) -> None:
    """Stop before Ray when ``new`` cannot continue the checkpoint that recorded ``saved``.

    Args:
        saved: the checkpoint's recorded contract (``ResumeContract.to_dict``).
        new: the contract of the run about to start.
        step: the checkpoint's step.

    Raises:
        ConfigError: listing every changed setting with its old and new value and the fix.
    """
    old = ResumeContract.from_dict(saved)
    problems = []
    for f in dataclasses.fields(ResumeContract):
        if f.name in FREE_FIELDS:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a is not None and a != b:
            long = isinstance(a, str) and len(a) > 12  # hashes: their first digits tell them apart
            shown = f"{a[:12]}… → {str(b)[:12]}…" if long else f"{a} → {b}"
            problems.append(f"{f.name}: {shown}; {_ADVICE[f.name].format(old=a)}")
    if new.total_steps < step:
        problems.append(
            f"total_steps: {new.total_steps} is below the checkpoint's step {step}; raise train.max_steps "
            f"to at least {step}"
        )
    if problems:
        raise ConfigError(
            "cannot resume: the run changed since its last checkpoint (step "
            f"{step}):\n  " + "\n  ".join(problems) + "\nTo train with new settings, start a new run "
            "(--output NEW) from this one's weights with model.path=OUTPUT/model."
        )


def check_tokenizer_settings(saved: Config, new: Config) -> None:
    """A resume keeps the run's tokenizer (OUTPUT/tokenizer): refuse overrides that would change it.

    Raises:
        ConfigError: naming the changed key, its saved value and how to proceed.
    """
    changed = [
        f"{key}: {a!r} → {b!r}"
        for key, a, b in (
            ("model.path", saved.model.path, new.model.path),
            ("data.tokenizer", saved.data.tokenizer.model_dump(), new.data.tokenizer.model_dump()),
        )
        if a != b
    ]
    if changed:
        raise ConfigError(
            "cannot resume with another tokenizer or base model (the run keeps OUTPUT/tokenizer): "
            + "; ".join(changed)
            + ". Drop these overrides, or start a new run (--output NEW) with model.path=OUTPUT/model."
        )


def extend_lr_segments(saved: dict[str, Any] | None, step: int, total: int) -> list[list[int]]:
    """The LR schedule's segments ``[[start, end], ...]`` after resuming at ``step`` with ``total``.

    A run starts with ``[[0, total]]``. A resume with a larger total adds ``[step, total]``: the
    schedule continues from the LR it had at ``step`` and decays to the end over the new total
    (no jump), see ``train/schedule.py``.
    """
    segments = [list(s) for s in (saved or {}).get("lr_segments") or []]
    if not segments:
        return [[0, total]]
    if segments[-1][1] != total:
        segments.append([step, total])
    return segments
