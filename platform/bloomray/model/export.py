"""Consolidate a DeepSpeed (ZeRO) checkpoint into an HF model dir, atomically.

The export is written to a hidden temp dir next to the target and renamed into place only
after it reloads and reproduces the trained engine's probe logits, so a crash or a bad
checkpoint never leaves half an export behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BloomConfig

from bloomray.model.build import build_from_config, count_parameters, model_class
from bloomray.model.card import write_model_card
from bloomray.train.checkpoint import DS_TAG, PROBE_FILE, TOKENIZER_DIR, read_meta


class ExportError(RuntimeError):
    """The checkpoint could not be exported; the message says why."""


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a ZeRO checkpoint (master copies), or bf16 module states for ZeRO-0."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = checkpoint_dir / DS_TAG
    if not tag_dir.is_dir():
        raise ExportError(f"{checkpoint_dir} has no DeepSpeed checkpoint (missing {DS_TAG}/)")
    if list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")) and _zero_stage(tag_dir) > 0:
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DS_TAG))
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def _zero_stage(tag_dir: Path) -> int:
    # ZeRO-3 names its files zero_pp_rank_R_mp_rank_00_model_states.pt; others mp_rank_00_...
    first = sorted(tag_dir.glob("*model_states.pt"))[0]
    states = torch.load(first, map_location="cpu", weights_only=False)
    return int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def load_checkpoint_model(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model (LoRA merged) as a plain HF module in fp32, plus the checkpoint meta."""
    ckpt = Path(checkpoint_dir)
    meta = read_meta(ckpt)
    config = BloomConfig.from_dict(meta["model_config"])
    model = build_from_config(meta["task"], config, seed=0)
    if meta.get("lora"):
        model = _wrap_lora(model, meta)
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


def _wrap_lora(model: torch.nn.Module, meta: dict[str, Any]) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lc = meta["lora"]
    task_type = TaskType.SEQ_CLS if meta["task"] == "classification" else TaskType.CAUSAL_LM
    return get_peft_model(
        model,
        LoraConfig(
            task_type=task_type,
            r=lc["r"],
            lora_alpha=lc["alpha"],
            lora_dropout=lc["dropout"],
            target_modules=lc["target_modules"],
        ),
    )


def check_probe(model_dir: Path, checkpoint_dir: Path, task: str, dtype: torch.dtype) -> float | None:
    """Max |logit difference| between the reloaded export and the engine's probe logits."""
    probe_path = checkpoint_dir / PROBE_FILE
    if not probe_path.exists():
        return None
    probe = torch.load(probe_path, map_location="cpu")
    reloaded = model_class(task).from_pretrained(str(model_dir), dtype=dtype).eval()
    with torch.no_grad():
        inputs = {k: v for k, v in probe.items() if k != "logits"}
        logits = reloaded(**inputs).logits.float()
    return float((logits - probe["logits"]).abs().max())


def export_checkpoint(
    checkpoint_dir: str | Path, output_dir: str | Path, overwrite: bool = False, tolerance: float = 1e-2
) -> dict[str, Any]:
    """Write ``output_dir`` as an HF model dir (safetensors, config, tokenizer, model card).

    Args:
        checkpoint_dir: an ``OUTPUT/checkpoints/checkpoint_*`` dir.
        output_dir: the target; must not exist unless ``overwrite``.
        tolerance: largest accepted |logit| difference vs the engine (in its dtype).

    Returns:
        Export facts: parameters, size on disk, probe logit difference.

    Raises:
        FileNotFoundError / ExportError: not a checkpoint, shapes mismatch, logits differ.
    """
    ckpt, out = Path(checkpoint_dir), Path(output_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite or choose another --output")
    model, meta = load_checkpoint_model(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if (ckpt / TOKENIZER_DIR).is_dir():
            AutoTokenizer.from_pretrained(str(ckpt / TOKENIZER_DIR)).save_pretrained(str(tmp))
        precision = meta["config"]["deepspeed"]["precision"]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        diff = check_probe(tmp, ckpt, meta["task"], dtype)
        if diff is not None and diff > tolerance:
            raise ExportError(
                f"exported model's logits differ from the trained engine's by {diff:.3g} (> {tolerance})"
            )
        info = {
            "parameters": count_parameters(model),
            "size_on_disk_bytes": sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
            "max_abs_logit_diff": diff,
            "checkpoint": str(ckpt),
        }
        write_model_card(tmp, meta, info)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
