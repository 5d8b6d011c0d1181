"""Consolidate a DeepSpeed (ZeRO) checkpoint into an HF model dir, atomically.

The export is written to a hidden temp dir next to the target and renamed into place only
after it reloads and reproduces the trained engine's probe logits, so a crash or a bad
checkpoint never leaves half an export behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BloomConfig

from bloomray.errors import EXIT_FAILED, BloomrayError
from bloomray.export.card import write_model_card
from bloomray.export.latency import bounded_latency_ms
from bloomray.export.sparse import SPARSE_FILE, SPARSE_KEY, SPARSE_METHODS, save_sparse
from bloomray.files import atomic_dir
from bloomray.model.build import add_lora, build_from_config, count_parameters, model_class
from bloomray.train.checkpoint import (
    DS_TAG,
    PROBE_FILE,
    TOKENIZER_DIR,
    CorruptCheckpointError,
    load_deepspeed_file,
    local_checkpoint_dir,
    read_meta,
)


class ExportError(BloomrayError, RuntimeError):
    """The checkpoint could not be exported; the message says why.

    Exit code 1: the export failed (target exists without --overwrite, shapes or logits mismatch).
    """

    exit_code = EXIT_FAILED


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a ZeRO checkpoint (master copies), or bf16 module states for ZeRO-0."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = checkpoint_dir / DS_TAG
    if not tag_dir.is_dir():
        raise CorruptCheckpointError(
            f"{checkpoint_dir} has no DeepSpeed checkpoint (missing {DS_TAG}/); pass a complete "
            "OUTPUT/checkpoints/checkpoint_* directory"
        )
    if read_meta(checkpoint_dir)["config"]["deepspeed"]["zero_stage"] > 0:
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DS_TAG))
    states = load_deepspeed_file(tag_dir / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in states["module"].items()}


def empty_model(task: str, config: BloomConfig, lora: dict[str, Any] | None) -> torch.nn.Module:
    """The checkpoint's module (LoRA-wrapped if it trained adapters) with uninitialised storage.

    Built on the meta device, then given empty CPU tensors: every weight is loaded from the
    checkpoint next, so nothing is randomly initialised only to be overwritten (for a 250,880 x
    1,024 embedding that init alone takes seconds). Weights the checkpoint lacks are caught
    by the caller's missing-keys check; the tied LM head is re-tied after loading.
    """
    with torch.device("meta"):
        model = build_from_config(task, config, seed=0)
        if lora:
            model = add_lora(model, task, lora)
    return model.to_empty(device="cpu")


def load_checkpoint_model(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model (LoRA merged) as a plain HF module in fp32, plus the checkpoint meta."""
    ckpt = Path(checkpoint_dir)
    meta = read_meta(ckpt)
    model = empty_model(meta["task"], BloomConfig.from_dict(meta["model_config"]), meta.get("lora"))
    state = consolidated_state_dict(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ExportError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if meta.get("lora"):
        model = model.merge_and_unload()
    model.tie_weights()
    return model.eval(), meta


def check_probe(model_dir: Path, checkpoint_dir: Path, dtype: torch.dtype) -> float | None:
    """Max |logit difference| between the reloaded export and the engine's probe logits."""
    from bloomray.export.load import load_model

    probe_path = checkpoint_dir / PROBE_FILE
    if not probe_path.exists():
        return None
    probe = torch.load(probe_path, map_location="cpu")
    reloaded = load_model(model_dir, dtype=dtype)
    with torch.no_grad():
        inputs = {k: v for k, v in probe.items() if k != "logits"}
        logits = reloaded(**inputs).logits.float()
    return float((logits - probe["logits"]).abs().max())


def probe_tolerance(checkpoint_dir: Path, dtype: torch.dtype) -> float:
    """8 ulps of ``dtype`` at the magnitude of the probe's largest logit (at least 1e-5)."""
    probe_path = checkpoint_dir / PROBE_FILE
    scale = 1.0
    if probe_path.exists():
        scale = max(1.0, float(torch.load(probe_path, map_location="cpu")["logits"].abs().max()))
    return max(8 * torch.finfo(dtype).eps * scale, 1e-5)


def compact_model(model: torch.nn.Module, tolerance: float = 1e-4) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Cut structurally pruned heads/neurons out of ``model``; check logits are unchanged.

    A causal LM comes back as :class:`~bloomray.model.compact_hf.BloomrayCompactForCausalLM`
    (saved with ``model_type`` ``bloomray_compact``); a classifier as a reshaped
    BloomForSequenceClassification with ``model_type`` ``bloom``. Both carry the spec.

    Raises:
        ExportError: the compact model's fp32 logits differ from the masked model's.
    """
    from bloomray.model.compact import SPEC_KEY, compact_state_dict, find_removable, reshape_model
    from bloomray.model.compact_hf import BloomrayCompactForCausalLM, compact_config

    cfg = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = find_removable(state, cfg.n_layer, cfg.n_head)
    if "SequenceClassification" in type(model).__name__:
        # Classifiers stay model_type "bloom" + the spec (only transformers serves them).
        compact = reshape_model(model_class("classification").from_config(cfg), spec)
        setattr(compact.config, SPEC_KEY, spec)
    else:
        # Causal LMs get their own model_type/architecture, so no loader (transformers' Auto
        # classes, vLLM) mistakes the dir for a full-shape BLOOM.
        compact = BloomrayCompactForCausalLM(compact_config(cfg, spec))
    compact.load_state_dict(compact_state_dict(state, spec, cfg.n_head), strict=False)
    compact.tie_weights()
    compact.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((compact(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())
    if diff > tolerance:
        raise ExportError(
            f"compacted model's logits differ from the masked model's by {diff:.3g} (> {tolerance})"
        )
    return compact, {
        "compact_logit_diff": diff,
        "kept_heads": [len(h) for h in spec["heads"]],
        "kept_neurons": [len(n) for n in spec["neurons"]],
    }


def write_model(model: torch.nn.Module, tmp: Path, prune_method: str) -> dict[str, Any]:
    """Save ``model`` into ``tmp`` in the most compact loadable form for its pruning method."""
    facts: dict[str, Any] = {"parameters_dense": count_parameters(model)}
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    facts["dense_size_bytes"] = dense_bytes
    facts["latency_ms_dense"] = bounded_latency_ms(model)
    if prune_method == "structured":
        model, info = compact_model(model)
        facts.update(info)
        model.save_pretrained(str(tmp), safe_serialization=True)
    elif prune_method in SPARSE_METHODS:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        facts["sparse_tensors"] = len(save_sparse(state, tmp / SPARSE_FILE))
        setattr(model.config, SPARSE_KEY, {"format": "bitmask-v1", "file": SPARSE_FILE})
        model.config.architectures = [type(model).__name__]  # load_model reads the task from it
        model.config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
    facts["parameters"] = count_parameters(model)
    # Only compaction changes the module; otherwise the dense timing is the exported one.
    facts["latency_ms"] = (
        bounded_latency_ms(model) if prune_method == "structured" else facts["latency_ms_dense"]
    )
    return facts


def export_checkpoint(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    overwrite: bool = False,
    tolerance: float | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Write ``output_dir`` as a model dir (weights, config, tokenizer, model card).

    Structurally pruned models are compacted into smaller shapes; unstructured-pruned ones
    are stored sparse (bitmask + values); both load with ``bloomray.export.load.load_model``.
    Others are plain HF dirs.

    Args:
        checkpoint_dir: an ``OUTPUT/checkpoints/checkpoint_*`` dir, or a checkpoint's URI on
            cloud storage (downloaded to a temp dir first).
        output_dir: the target; must not exist unless ``overwrite``.
        tolerance: largest accepted |logit| difference vs the engine; default: 8 units in the
            last place of the engine's dtype at the probe's largest logit (bf16 sums in another
            order differ by an ulp or two once compaction changes the matmul shapes).
        source: where ``checkpoint_dir`` came from, if it is a local copy (the model card and
            the returned facts name it); default: ``checkpoint_dir``.

    Returns:
        Export facts: parameters, size on disk, latency, probe logit difference.

    Raises:
        CorruptCheckpointError: not a (complete) bloomray checkpoint (exit code 2).
        ExportError: the output exists, shapes mismatch, logits differ (exit code 1).
    """
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite or choose another --output")
    with local_checkpoint_dir(checkpoint_dir) as ckpt:
        return _export_local(ckpt, out, tolerance, source or str(checkpoint_dir))


def _export_local(ckpt: Path, out: Path, tolerance: float | None, source: str) -> dict[str, Any]:
    """:func:`export_checkpoint` of a checkpoint on local disk."""
    model, meta = load_checkpoint_model(ckpt)
    prune_method = meta["config"].get("prune", {}).get("method", "none")
    with atomic_dir(out) as tmp:
        facts = write_model(model, tmp, prune_method)
        if (ckpt / TOKENIZER_DIR).is_dir():
            AutoTokenizer.from_pretrained(str(ckpt / TOKENIZER_DIR)).save_pretrained(str(tmp))
        precision = meta["config"]["deepspeed"]["precision"]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        diff = check_probe(tmp, ckpt, dtype)
        if tolerance is None:
            tolerance = probe_tolerance(ckpt, dtype)
        if diff is not None and diff > tolerance:
            raise ExportError(
                f"exported model's logits differ from the trained engine's by {diff:.3g} (> {tolerance})"
            )
        info = {
            **facts,
            "size_on_disk_bytes": sum(
                p.stat().st_size for p in tmp.rglob("*") if p.is_file() and p.suffix == ".safetensors"
            ),
            "max_abs_logit_diff": diff,
            "checkpoint": source,
            "prune_method": prune_method,
        }
        write_model_card(tmp, meta, info, name=out.name)
    return info
