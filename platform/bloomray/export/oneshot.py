"""``bloomray prune``: one-shot prune a model dir with calibration data, in one Ray task.

The driver checks everything cheap first (the method and pattern, the model dir, the output,
the tokenizer) and raises a :class:`~bloomray.errors.BloomrayError` before any real work. It
then prepares ``data.*`` of the config with the model dir's *own* tokenizer (as training does,
on the driver) and takes two small arrays from it: the calibration set, the first
``prune.calibration_samples`` train blocks of ``data.block_size`` tokens (deterministic; for a
classifier its train sentences' tokens without padding, packed into such blocks), and the eval
rows (``train.eval_max_batches`` micro-batches of ``train.micro_batch_size``, or all; a
classifier's with their labels, for accuracy). Everything else runs in :func:`_prune_task`, one Ray task on a cluster node
(``scaling.cpus_per_worker`` CPUs, one GPU with ``scaling.use_gpu``): load the model, eval
loss, prune (``prune.oneshot``: Wanda, SparseGPT or magnitude; unstructured or 2:4), eval loss
again, and write the output atomically as a normal export in the sparse format
(``export/sparse.py``) with its model card. The model dir and the output must be on storage
that node sees (a local path on one box; NFS or a PVC on a cluster).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from transformers import AutoTokenizer, BloomConfig

from bloomray.config import Config, ConfigError
from bloomray.data.prepare import prepare_data
from bloomray.data.tokenizer import load_tokenizer
from bloomray.errors import BloomrayError
from bloomray.export.card import write_model_card
from bloomray.export.consolidate import ExportError, write_model
from bloomray.export.load import load_model, task_of
from bloomray.files import atomic_dir
from bloomray.model.build import ModelLoadError
from bloomray.model.compact import SPEC_KEY
from bloomray.prune.initial import calibration_and_eval, check_task_resources, prune_measured
from bloomray.prune.oneshot import METHODS, OneShotError
from bloomray.raycluster import init_ray

log = logging.getLogger(__name__)


def check_request(
    model_dir: str | Path, cfg: Config, output_dir: str | Path, overwrite: bool
) -> dict[str, Any]:
    """Every check that needs no data and no model weights; returns the model's config.json.

    Raises:
        OneShotError: the method is not one this verb runs, 2:4 with sparsity != 0.5 or a
            hidden size not divisible by 4, the model is compacted, the output exists (without
            ``overwrite``) or is the model dir (exit 2).
        ConfigError: ``task`` is not the model's (causal_lm, or classification for a
            classifier) (exit 2).
        ModelLoadError: ``model_dir`` is not a model dir (exit 2).
    """
    p = cfg.prune
    if p.method not in METHODS:
        hint = " (for 2:4 set prune.method=wanda and prune.pattern=2:4)" if p.method == "2:4" else ""
        raise OneShotError(
            f"bloomray prune runs prune.method {', '.join(METHODS)}; got prune.method={p.method}{hint}"
        )
    if p.pattern == "2:4" and p.final_sparsity != 0.5:
        raise OneShotError(
            f"prune.pattern=2:4 keeps 2 of every 4 weights, so prune.final_sparsity must be 0.5, got "
            f"{p.final_sparsity}"
        )
    src = Path(model_dir).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise ModelLoadError(
            f"--model {model_dir} is not a model dir (no config.json there); pass an export such as "
            "OUTPUT/model of a training run"
        )
    raw = json.loads((src / "config.json").read_text())
    if SPEC_KEY in raw:
        raise OneShotError(
            f"--model {model_dir} is a compacted structured-pruned export; prune the dense model it came from"
        )
    task = task_of(raw)
    if cfg.task != task:
        fix = (
            "task=classification and data.path to labelled rows"
            if task == "classification"
            else "task=causal_lm"
        )
        raise ConfigError(
            f"--model {model_dir} is a {'classifier' if task == 'classification' else 'causal LM'} but the "
            f"config has task={cfg.task}: set {fix}"
        )
    if p.pattern == "2:4" and BloomConfig.from_dict(raw).hidden_size % 4:
        raise OneShotError(
            f"2:4 needs a hidden size divisible by 4; {model_dir} has {raw.get('hidden_size')}"
        )
    out = Path(output_dir).expanduser().resolve()
    if out == src:
        raise OneShotError("--output is the --model dir; write the pruned model to a new dir")
    if out.exists() and not overwrite:
        raise OneShotError(
            f"--output {output_dir} exists; pass --overwrite to replace it, or choose another dir"
        )
    return raw


def check_labels(model_dir: str | Path, raw: dict[str, Any], data_labels: dict[int, str]) -> None:
    """A classifier's labels (config.json ``id2label``) are the data's, id for id.

    Raises:
        OneShotError: they differ; the accuracy would compare the wrong classes.
    """
    model_labels = {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}
    data_labels = {int(k): str(v) for k, v in data_labels.items()}
    if model_labels != data_labels:
        raise OneShotError(
            f"--model {model_dir} has labels {model_labels} but data.path has {data_labels}: calibrate on "
            "the model's own labelled data (or set data.labels to the model's label names in id order)"
        )


def _prune_task(
    model_dir: str,
    output_dir: str,
    overwrite: bool,
    cfg_dict: dict[str, Any],
    calib: np.ndarray,
    evals: dict[str, np.ndarray],
    data_stats: dict[str, Any],
) -> dict[str, Any]:
    """The Ray task: load, eval, prune, eval, write the sparse export and its card; the summary."""
    cfg = Config.model_validate(cfg_dict)
    p = cfg.prune
    t0 = time.perf_counter()
    model = load_model(model_dir)
    measured = prune_measured(model, cfg, p.final_sparsity, calib, evals)
    before, after = measured["eval_loss_before"], measured["eval_loss_after"]
    accuracy = {k: measured[k] for k in ("eval_accuracy_before", "eval_accuracy_after") if k in measured}
    shot = {
        "source_model": model_dir,
        "method": p.method,
        "pattern": p.pattern,
        "sparsity_target": p.final_sparsity,
        "targets": list(p.targets),
        "sparsity": measured["sparsity"],
        "sparsity_by_kind": measured["sparsity_by_kind"],
        "calibration_samples": int(calib.shape[0]),
        "block_size": int(calib.shape[1]),
        "calibration_tokens": int(calib.size),
        "eval_blocks": int(evals["input_ids"].shape[0]),  # a classifier's: eval sentences
        "eval_loss_before": before,
        "eval_loss_after": after,
        **accuracy,
        **({"percdamp": p.percdamp, "blocksize": p.blocksize} if p.method == "sparsegpt" else {}),
    }
    meta = {
        "task": cfg.task,  # the model's own (check_request)
        "config": cfg.model_dump(mode="json"),
        "model_config": model.config.to_dict(),
        "base_model": model_dir,
        "data": data_stats,
        "metrics": {
            "eval_loss": after,
            "eval_loss_dense": before,
            "sparsity": measured["sparsity"],
            **({"eval_accuracy": accuracy["eval_accuracy_after"]} if accuracy else {}),
        },
        "oneshot": shot,
    }
    info = _write_export(model, model_dir, output_dir, overwrite, meta, torch.tensor(calib[:2]))
    return {
        "model_dir": output_dir,
        **shot,
        "max_abs_logit_diff": info["max_abs_logit_diff"],
        "size_on_disk_bytes": info["size_on_disk_bytes"],
        "dense_size_bytes": info["dense_size_bytes"],
        "task_s": round(time.perf_counter() - t0, 3),
    }


def _write_export(
    model: torch.nn.Module,
    model_dir: str,
    output_dir: str,
    overwrite: bool,
    meta: dict[str, Any],
    probe: torch.Tensor,
) -> dict[str, Any]:
    """Write the pruned ``model`` (on the CPU) as a sparse export with the source's tokenizer and a card.

    The written dir is reloaded and must reproduce the pruned model's logits on ``probe``
    before it is renamed into place (``files.atomic_dir``).
    """
    method = meta["oneshot"]["method"]
    try:
        with atomic_dir(output_dir, replace=overwrite) as tmp:
            facts = write_model(model, tmp, method)  # every one-shot method writes the sparse format
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(tmp))
            with torch.no_grad():
                diff = float(
                    (load_model(tmp)(input_ids=probe).logits - model(input_ids=probe).logits).abs().max()
                )
            if diff > 1e-4:
                raise ExportError(f"the written model's logits differ from the pruned model's by {diff:.3g}")
            info = {
                **facts,
                "size_on_disk_bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
                "max_abs_logit_diff": diff,
                "checkpoint": model_dir,
                "prune_method": method,
            }
            write_model_card(tmp, meta, info, name=Path(output_dir).name)
    except FileExistsError as exc:  # the output appeared while this task ran (no --overwrite)
        raise OneShotError(str(exc)) from None
    return info


def prune_model_dir(
    model_dir: str | Path, cfg: Config, output_dir: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """One-shot prune the model dir ``model_dir`` per ``cfg.prune`` into ``output_dir``; the summary.

    Sparsity is ``prune.final_sparsity`` of every ``prune.targets`` weight (per output row for
    Wanda unstructured, per layer for SparseGPT and magnitude, 2 of every 4 for ``2:4``).

    Returns:
        The summary: method, pattern, sparsity overall and per target kind, calibration size,
        eval loss (and a classifier's accuracy) before and after on the eval rows, the output dir.

    Raises:
        OneShotError / ConfigError / ModelLoadError / TokenizerError / DataError: bad input
            (checked before the data is prepared) or data, or a cluster without the task's
            CPUs/GPU; all before the model is loaded (exit 2).
        ExportError: the written model does not reproduce the pruned one (exit 1).
    """
    raw = check_request(model_dir, cfg, output_dir, overwrite)
    src = Path(model_dir).expanduser().resolve()
    out = Path(output_dir).expanduser().resolve()
    tokenizer = load_tokenizer(str(src))
    vocab = BloomConfig.from_dict(raw).vocab_size
    if len(tokenizer) > vocab:
        raise OneShotError(
            f"{model_dir}'s tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size={vocab}"
        )
    data = prepare_data(cfg, tokenizer=tokenizer)
    if cfg.task == "classification":
        check_labels(model_dir, raw, data.id2label or {})
    calib, evals = calibration_and_eval(cfg, data)
    if len(calib) == 0:
        raise OneShotError(
            f"the train data holds fewer than data.block_size={cfg.data.block_size} tokens: no calibration "
            "block; lower data.block_size or add data"
        )
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    check_task_resources(cfg, ray.cluster_resources())
    task = ray.remote(
        num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0, max_retries=0
    )(_prune_task)
    ref = task.remote(str(src), str(out), overwrite, cfg.model_dump(mode="json"), calib, evals, data.stats)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, BloomrayError):
            raise exc.cause from None
        raise
