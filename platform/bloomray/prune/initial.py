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

from bloomray.config import ONESHOT_METHODS, Config
from bloomray.data.prepare import PreparedData
from bloomray.errors import BloomrayError
from bloomray.files import atomic_dir
from bloomray.model.build import load_pretrained
from bloomray.prune.masks import target_names
from bloomray.prune.oneshot import OneShotError, oneshot_prune
from bloomray.raycluster import outside_placement_group

log = logging.getLogger(__name__)
FACTS_FILE = "oneshot.json"


def calibration_and_eval(cfg: Config, data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """(first ``prune.calibration_samples`` train blocks, the eval blocks), int64 ``[n, block_size]``.

    Fewer train blocks than asked calibrate on all of them (the summary says how many). The
    eval blocks are the first ``train.eval_max_batches * train.micro_batch_size`` (all if unset).
    """
    n_calib = min(cfg.prune.calibration_samples, len(data.train))
    if n_calib < cfg.prune.calibration_samples:
        log.warning(
            "prune.calibration_samples=%d but the data has %d train blocks: calibrating on all of them",
            cfg.prune.calibration_samples,
            n_calib,
        )
    t = cfg.train
    n_eval = (
        len(data.eval)
        if t.eval_max_batches is None
        else min(len(data.eval), t.eval_max_batches * t.micro_batch_size)
    )
    calib = data.train.take(np.arange(n_calib))["input_ids"].astype(np.int64)
    evals = data.eval.take(np.arange(n_eval))["input_ids"].astype(np.int64)
    return calib, evals


@torch.no_grad()
def eval_loss(model: torch.nn.Module, ids: np.ndarray | torch.Tensor, batch_size: int) -> float:
    """Next-token loss over ``ids`` in batches, each batch's mean weighted by its rows (as training's eval)."""
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)  # a copy: Ray arrays are read-only
    device = next(model.parameters()).device
    total, rows = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch, use_cache=False).loss.double()) * batch.shape[0]
        rows += batch.shape[0]
    return total / rows


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
    model: torch.nn.Module, cfg: Config, sparsity: float, calib: np.ndarray, evals: np.ndarray
) -> dict[str, Any]:
    """Prune ``model`` per ``cfg.prune`` at ``sparsity`` on ``calib`` (on the task's device, then
    back on the CPU); the eval loss before and after and the sparsity reached."""
    p, mb = cfg.prune, cfg.train.micro_batch_size
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    before = eval_loss(model, evals, mb)
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
    after = eval_loss(model, evals, mb)
    model.cpu()
    overall, by_kind = sparsity_by_kind(model, list(p.targets))
    return {
        "sparsity": overall,
        "sparsity_by_kind": by_kind,
        "eval_loss_before": before,
        "eval_loss_after": after,
    }


def _initial_task(
    dest: str, cfg_dict: dict[str, Any], calib: np.ndarray, evals: np.ndarray, key: dict[str, Any]
) -> dict[str, Any]:
    """The Ray task: load the starting model, prune it one-shot, write it with its facts."""
    cfg = Config.model_validate(cfg_dict)
    model = load_pretrained("causal_lm", str(cfg.model.path), dtype=torch.float32)
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
    ref = task.remote(str(dest), cfg.model_dump(mode="json"), calib, evals, key)
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
