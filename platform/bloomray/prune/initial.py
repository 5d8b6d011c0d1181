"""A training run's initial masks by Wanda or SparseGPT: the starting model pruned one-shot.

With ``prune.method`` wanda or sparsegpt, the driver (``train/run.fit``) calls
:func:`initial_model` before any worker starts. One Ray task (``scaling.cpus_per_worker``
CPUs, a GPU with ``scaling.use_gpu``) loads ``model.path``, prunes it per ``prune.*`` at
``prune.initial_sparsity`` on the calibration blocks (the first ``prune.calibration_samples``
train blocks), and writes it as a plain HF model dir to ``OUTPUT/oneshot`` (atomically, with
``oneshot.json``: the settings, the sparsity, the eval loss before and after). The workers
start from that dir; the prune hook takes its zeros as the masks and keeps them for the rest
of the run, while the schedule goes on by magnitude to ``prune.final_sparsity``. The dense
``model.path`` stays the distillation teacher. A resumed run or a retried tune trial reuses the
dir when its settings and calibration data are the same.

The helpers the one-shot verb (``export/oneshot.py``) shares live here too: the calibration
and eval slices, the eval loss, and the resource check of the task.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from transformers import BloomConfig

from bloomray.config import ONESHOT_METHODS, Config
from bloomray.data.prepare import PreparedData
from bloomray.data.shards import BlockSource
from bloomray.errors import BloomrayError
from bloomray.files import atomic_dir
from bloomray.model.build import load_pretrained, resolve_model_config
from bloomray.prune.masks import target_names
from bloomray.prune.oneshot import OneShotError, oneshot_prune
from bloomray.raycluster import outside_placement_group

log = logging.getLogger(__name__)
FACTS_FILE = "oneshot.json"


def calibration_and_eval(cfg: Config, data: PreparedData) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(calibration blocks int64 ``[n, block_size]``, the eval arrays by column name).

    Calibration: the first ``prune.calibration_samples`` train blocks; for a classifier, whose
    rows are right-padded sentences, their tokens without the padding, concatenated in order
    and cut into blocks of ``data.block_size`` (calibration needs activations of real text,
    not labels, and no pad token may count in the statistics). Fewer than asked calibrate on
    all there are (the summary says how many). Eval: the first ``train.eval_max_batches *
    train.micro_batch_size`` eval rows (all if unset), with their ``attention_mask`` and
    ``labels`` for a classifier.
    """
    want = cfg.prune.calibration_samples
    calib = (
        _packed_sentences(data.train, want, cfg.data.block_size)
        if cfg.task == "classification"
        else data.train.take(np.arange(min(want, len(data.train))))["input_ids"].astype(np.int64)
    )
    if len(calib) < want:
        log.warning(
            "prune.calibration_samples=%d but the train data makes %d calibration blocks: calibrating on all of them",
            want,
            len(calib),
        )
    t = cfg.train
    n_eval = (
        len(data.eval)
        if t.eval_max_batches is None
        else min(len(data.eval), t.eval_max_batches * t.micro_batch_size)
    )
    rows = data.eval.take(np.arange(n_eval))
    columns = ("input_ids", "attention_mask", "labels") if cfg.task == "classification" else ("input_ids",)
    return calib, {k: rows[k].astype(np.int64) for k in columns}


def _packed_sentences(train: BlockSource, n_blocks: int, block_size: int, chunk: int = 1024) -> np.ndarray:
    """The first ``n_blocks`` blocks of the train rows' non-pad tokens, concatenated in row order."""
    need, parts, have = n_blocks * block_size, [], 0
    for start in range(0, len(train), chunk):
        rows = train.take(np.arange(start, min(start + chunk, len(train))))
        tokens = rows["input_ids"][rows["attention_mask"].astype(bool)]  # row by row, pads dropped
        parts.append(tokens)
        have += len(tokens)
        if have >= need:
            break
    flat = np.concatenate(parts)[:need] if parts else np.zeros(0, np.int64)
    n = len(flat) // block_size
    return flat[: n * block_size].reshape(n, block_size).astype(np.int64)


@torch.no_grad()
def eval_scores(model: torch.nn.Module, evals: dict[str, np.ndarray], batch_size: int) -> dict[str, float]:
    """``eval_loss`` over ``evals`` in batches, each batch's mean weighted by its rows (as training's
    eval); with ``labels`` in ``evals`` (a classifier) also ``eval_accuracy``."""
    device = next(model.parameters()).device
    cols = {k: torch.tensor(v) for k, v in evals.items()}  # copies: Ray arrays are read-only
    n = cols["input_ids"].shape[0]
    total, correct = 0.0, 0
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in cols.items()}
        if "labels" in batch:  # classification: the label of each row
            out = model(**batch, use_cache=False)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:
            out = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False)
        total += float(out.loss.double()) * batch["input_ids"].shape[0]
    return {"eval_loss": total / n, **({"eval_accuracy": correct / n} if "labels" in cols else {})}


def sparsity_by_kind(model: torch.nn.Module, targets: list[str]) -> tuple[float, dict[str, float]]:
    """(overall, per module kind) fraction of exact zeros in the target weights of every block."""
    params = dict(model.named_parameters())
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name in target_names(model, targets):
        kind = name.split(".")[-2]
        zeros[kind] = zeros.get(kind, 0) + int((params[name] == 0).sum())
        sizes[kind] = sizes.get(kind, 0) + params[name].numel()
    overall = sum(zeros.values()) / max(1, sum(sizes.values()))
    return overall, {k: zeros[k] / sizes[k] for k in sizes}


def check_task_resources(cfg: Config, resources: dict[str, float], what: str = "prune task") -> None:
    """The task's CPUs (and GPU) exist in the cluster now; Ray would otherwise wait for them forever."""
    need = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1.0} if cfg.scaling.use_gpu else {})}
    for kind, amount in need.items():
        if resources.get(kind, 0.0) < amount:
            raise OneShotError(
                f"the {what} needs {amount:g} {kind} but the Ray cluster has {resources.get(kind, 0.0):g}; "
                "lower scaling.cpus_per_worker, or set scaling.use_gpu=false, or add nodes"
            )


def settings_key(cfg: Config, calib: np.ndarray) -> dict[str, Any]:
    """What the initial model depends on: the source, the one-shot settings, the calibration data."""
    p = cfg.prune
    source = Path(cfg.model.path or "").expanduser()
    return {
        "source_model": str(source.resolve()) if source.exists() else cfg.model.path,
        "method": p.method,
        "pattern": p.pattern,
        "sparsity_target": p.initial_sparsity,
        "targets": list(p.targets),
        "percdamp": p.percdamp,
        "blocksize": p.blocksize,
        "calibration_sha256": hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest(),
        "calibration_samples": int(calib.shape[0]),
        "block_size": int(calib.shape[1]),
    }


def prune_measured(
    model: torch.nn.Module, cfg: Config, sparsity: float, calib: np.ndarray, evals: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Prune ``model`` per ``cfg.prune`` at ``sparsity`` on ``calib`` (on the task's device, then
    back on the CPU); the eval loss (and a classifier's accuracy) before and after, and the
    sparsity reached."""
    p, mb = cfg.prune, cfg.train.micro_batch_size
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    before = eval_scores(model, evals, mb)
    oneshot_prune(
        model,
        torch.tensor(calib),  # a copy: Ray hands the task read-only arrays
        p.method,
        sparsity,
        p.pattern,
        list(p.targets),
        batch_size=mb,
        blocksize=p.blocksize,
        percdamp=p.percdamp,
    )
    after = eval_scores(model, evals, mb)
    model.cpu()
    overall, by_kind = sparsity_by_kind(model, list(p.targets))
    return {
        "sparsity": overall,
        "sparsity_by_kind": by_kind,
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
    }


def _initial_task(
    dest: str,
    cfg_dict: dict[str, Any],
    model_config: dict[str, Any],
    calib: np.ndarray,
    evals: dict[str, np.ndarray],
    key: dict[str, Any],
) -> dict[str, Any]:
    """The Ray task: load the starting model (with the config the workers build from, so a
    classifier has the data's labels), prune it one-shot, write it with its facts."""
    cfg = Config.model_validate(cfg_dict)
    config = BloomConfig.from_dict(model_config)
    model = load_pretrained(cfg.task, str(cfg.model.path), config=config, dtype=torch.float32)
    facts = {**key, **prune_measured(model, cfg, cfg.prune.initial_sparsity, calib, evals)}
    with atomic_dir(dest, replace=True) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / FACTS_FILE).write_text(json.dumps(facts, indent=2))
    return facts


def initial_model(cfg: Config, out: Path, data: PreparedData) -> tuple[str, dict[str, Any]] | None:
    """(the dir the workers start from, its facts) for a one-shot ``prune.method``; None otherwise.

    Ray must be up. The dir is ``OUTPUT/oneshot``; it is reused when its ``oneshot.json``
    matches this run's settings and calibration data, and rewritten otherwise.

    Raises:
        OneShotError: the cluster lacks the task's CPUs/GPU, or pruning was impossible.
        ModelLoadError: ``model.path`` is not a loadable model.
    """
    if cfg.prune.method not in ONESHOT_METHODS:
        return None
    dest = out / "oneshot"
    calib, evals = calibration_and_eval(cfg, data)
    key = settings_key(cfg, calib)
    facts_file = dest / FACTS_FILE
    if facts_file.is_file():
        facts = json.loads(facts_file.read_text())
        if {k: facts.get(k) for k in key} == key:
            return str(dest), facts
        log.warning("%s was pruned with other settings or data: pruning the starting model again", dest)
    check_task_resources(cfg, ray.cluster_resources(), "one-shot initial-mask task")
    task = ray.remote(  # out of a Tune trial's placement group, which holds only the trial's CPU
        num_cpus=cfg.scaling.cpus_per_worker,
        num_gpus=1 if cfg.scaling.use_gpu else 0,
        max_retries=0,
        scheduling_strategy=outside_placement_group(),
    )(_initial_task)
    model_config = resolve_model_config(
        cfg.task, cfg.model.preset, cfg.model.path, data.tokenizer, data.id2label, cfg.model.vocab_size
    )
    ref = task.remote(str(dest), cfg.model_dump(mode="json"), model_config, calib, evals, key)
    try:
        facts = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, BloomrayError):
            raise exc.cause from None
        raise
    print(
        f"[bloomray] {cfg.prune.method} one-shot masks at {facts['sparsity']:.3f} sparsity: eval "
        f"{facts['eval_loss_before']:.4f} dense -> {facts['eval_loss_after']:.4f} pruned",
        flush=True,
    )
    return str(dest), facts
