"""Build BLOOM models: from a preset shape (random, seeded) or from a pretrained dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BloomConfig,
    PreTrainedModel,
)

from bloomray.config import ConfigError
from bloomray.errors import EXIT_USAGE, BloomrayError

# Real BLOOM shapes (bigscience model cards) plus tiny ones for CPU runs and tests.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "n_layer": 2, "n_head": 4},
    "small": {"hidden_size": 256, "n_layer": 4, "n_head": 8},
    "bloom-560m": {"hidden_size": 1024, "n_layer": 24, "n_head": 16},
    "bloom-1b7": {"hidden_size": 2048, "n_layer": 24, "n_head": 16},
    "bloom-7b1": {"hidden_size": 4096, "n_layer": 30, "n_head": 32},
}


class ModelLoadError(BloomrayError, OSError):
    """A model could not be loaded; the message says what to pass instead.

    Exit code 2: ``model.path`` (or a model dir passed on the command line) is wrong.
    """

    exit_code = EXIT_USAGE


def preset_config(preset: str, vocab_size: int, **extra: Any) -> BloomConfig:
    """A BloomConfig of a preset shape with the tokenizer's vocabulary and special ids."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model.preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return BloomConfig(vocab_size=vocab_size, **PRESETS[preset], **extra)


def model_class(task: str) -> type:
    """The Auto class for a task."""
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def build_from_config(task: str, config: BloomConfig, seed: int) -> PreTrainedModel:
    """Random-init model of ``config``; the same seed gives the same weights on every rank."""
    torch.manual_seed(seed)
    return model_class(task).from_config(config)


def load_pretrained(task: str, path: str, **kwargs: Any) -> PreTrainedModel:
    """``from_pretrained`` on a local dir or hub name, with a clear error when offline.

    Raises:
        ModelLoadError: the dir has no model, or the hub cannot be reached.
    """
    local = Path(path).expanduser()
    source = str(local) if local.exists() else path
    try:
        return model_class(task).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # a dir without a model config raises ValueError
        if local.exists():
            raise ModelLoadError(f"{path} is not a loadable model directory ({str(exc)[:200]})") from None
        if not isinstance(exc, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"could not load model {path!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ' (no network?)'}. Download it where you "
            "have network (huggingface-cli download NAME --local-dir DIR) and set model.path=DIR"
        ) from None


def resolve_model_config(
    task: str,
    preset: str,
    path: str | None,
    tokenizer: Any,
    id2label: dict[int, str] | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The model config (as a dict) that every worker builds from.

    For a pretrained path the stored config is used; the vocabulary must fit the tokenizer.
    ``vocab_size`` (presets only) pads the embedding beyond the tokenizer, as real BLOOM does.

    Raises:
        ModelLoadError: the tokenizer has ids the model's vocabulary cannot hold.
    """
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    labels: dict[str, Any] = {}
    if id2label:
        labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if path is None:
        if vocab_size is not None and vocab_size < len(tokenizer):
            raise ModelLoadError(
                f"model.vocab_size={vocab_size} is below the tokenizer's {len(tokenizer)} tokens; "
                "raise model.vocab_size or leave it unset"
            )
        return preset_config(preset, vocab_size=vocab_size or len(tokenizer), **ids, **labels).to_dict()
    local = Path(path).expanduser()
    try:
        config = BloomConfig.from_pretrained(str(local) if local.exists() else path)
    except OSError:
        load_pretrained(task, path)  # raises the explained error
        raise
    if config.vocab_size < len(tokenizer):
        raise ModelLoadError(
            f"model {path} has vocab_size={config.vocab_size} but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '') or '(trained)'} has {len(tokenizer)} tokens; use "
            "the model's own tokenizer (leave data.tokenizer.path unset)"
        )
    config.update(
        {
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else ids["pad_token_id"],
            **labels,
        }
    )
    return config.to_dict()


def add_lora(model: PreTrainedModel, task: str, lora: dict[str, Any]) -> Any:
    """Wrap ``model`` with peft LoRA adapters (r, alpha, dropout, target_modules from ``lora``).

    Only the adapters (and a classifier head) train; used for training and, with the same
    settings from the checkpoint, to rebuild the module the checkpoint's weights belong to.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    config = LoraConfig(
        task_type=task_type,
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
    )
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once).

    Under ZeRO-3 a module's parameters are empty placeholders (``numel() == 0``) and the
    full size is in DeepSpeed's ``ds_numel``; counting ``numel()`` would report almost nothing.
    """
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(getattr(p, "ds_numel", p.numel()) for p in unique if p.requires_grad or not trainable_only)
