"""The transformers side of compacted causal-LM exports: their own ``model_type``.

A compacted (structurally pruned) BLOOM has smaller per-layer attention/MLP shapes than stock
``BloomConfig`` describes, so its config.json must not pass for plain BLOOM: no loader may
build a full-shape ``BloomForCausalLM`` from it and fail on (or, worse, half-load) the weights.
Compacted causal-LM exports therefore carry

- ``model_type: "bloomray_compact"``: :class:`BloomrayCompactConfig`, BloomConfig plus the spec;
- ``architectures: ["BloomrayCompactForCausalLM"]``: the class that serves them, here for
  transformers (:class:`BloomrayCompactForCausalLM`, BloomForCausalLM reshaped by the spec) and,
  under the same name, for vLLM (``bloomray.model.vllm_bloom``, registered by the vLLM plugin
  ``bloomray.serving.vllm_plugin``).

``import bloomray.model`` registers both with transformers' Auto classes, so afterwards
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load such a dir. Compacted
classifiers keep ``model_type: "bloom"`` plus the spec (only transformers serves them, through
:func:`bloomray.export.load.load_model`).
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from bloomray.model.compact import SPEC_KEY, CompactBloomAttention, reshape_model

COMPACT_MODEL_TYPE = "bloomray_compact"
COMPACT_ARCHITECTURE = "BloomrayCompactForCausalLM"


@strict
class BloomrayCompactConfig(BloomConfig):
    """BloomConfig of a compacted causal LM: ``n_head`` and ``hidden_size`` stay the original
    (they fix the head size and every head's ALiBi slope); ``bloomray_compact`` holds the kept
    heads and MLP neurons of each layer (see ``bloomray.model.compact``)."""

    model_type = COMPACT_MODEL_TYPE
    bloomray_compact: dict | None = None

    def validate_compact_spec(self) -> None:
        """Raise ValueError unless the spec names valid heads/neurons for every layer."""
        spec = self.bloomray_compact
        if not spec or "heads" not in spec or "neurons" not in spec:
            raise ValueError(
                f"a {COMPACT_MODEL_TYPE} config needs {SPEC_KEY}: {{'heads': ..., 'neurons': ...}}"
            )
        if not len(spec["heads"]) == len(spec["neurons"]) == self.n_layer:
            raise ValueError(
                f"{SPEC_KEY} must list kept heads and neurons for each of the {self.n_layer} layers"
            )
        ffn = 4 * self.hidden_size
        for i, (heads, neurons) in enumerate(zip(spec["heads"], spec["neurons"], strict=True)):
            if not heads or not all(0 <= h < self.n_head for h in heads) or len(set(heads)) != len(heads):
                raise ValueError(
                    f"{SPEC_KEY}: layer {i} heads {heads} are not distinct ids in [0, {self.n_head})"
                )
            if not neurons or not all(0 <= n < ffn for n in neurons):
                raise ValueError(f"{SPEC_KEY}: layer {i} neurons are not ids in [0, {ffn})")


def compact_config(config: BloomConfig, spec: dict[str, Any]) -> BloomrayCompactConfig:
    """``config`` (a BloomConfig, or a dict of one) as a compact config carrying ``spec``."""
    raw = dict(config if isinstance(config, dict) else config.to_dict())
    raw.pop("model_type", None)
    raw[SPEC_KEY] = spec
    out = BloomrayCompactConfig.from_dict(raw)
    out.validate_compact_spec()
    return out


class BloomrayCompactForCausalLM(BloomForCausalLM):
    """BloomForCausalLM whose blocks take the compact shapes of ``config.bloomray_compact``."""

    config_class = BloomrayCompactConfig

    def __init__(self, config: BloomrayCompactConfig) -> None:
        super().__init__(config)
        spec = getattr(config, SPEC_KEY, None)
        if spec is None:
            raise ValueError(f"{type(self).__name__} needs config.{SPEC_KEY} (the kept heads and neurons)")
        reshape_model(self, spec)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        model = super().from_pretrained(*args, **kwargs)
        model.restore_kept_heads()
        return model

    def restore_kept_heads(self) -> None:
        """Set each compact attention's ``kept_heads`` from the spec.

        It is a non-persistent buffer: ``from_pretrained`` builds the model on the meta device
        and only allocates such buffers (uninitialized), so they are rewritten after loading.
        """
        for i, block in enumerate(self.transformer.h):
            attn = block.self_attention
            if isinstance(attn, CompactBloomAttention):
                device = attn.query_key_value.weight.device
                attn.kept_heads = torch.tensor(self.config.bloomray_compact["heads"][i], device=device)


def register_with_transformers() -> None:
    """Let AutoConfig / AutoModelForCausalLM read ``model_type: bloomray_compact`` dirs (idempotent)."""
    AutoConfig.register(COMPACT_MODEL_TYPE, BloomrayCompactConfig, exist_ok=True)
    AutoModelForCausalLM.register(BloomrayCompactConfig, BloomrayCompactForCausalLM, exist_ok=True)
