"""vLLM general plugin: lets vLLM load bloomray's compacted (structured-pruned) BLOOM exports.

Installed as the ``vllm.general_plugins`` entry point ``bloomray`` (pyproject.toml), so vLLM
calls :func:`register` in every process it starts (front end, engine core, workers) before it
reads a model config. It registers

- the config: ``model_type: bloomray_compact`` -> ``BloomrayCompactConfig`` with transformers'
  AutoConfig (vLLM parses configs through it), and the HF model class with
  AutoModelForCausalLM;
- the model: architecture ``BloomrayCompactForCausalLM`` -> ``bloomray.model.vllm_bloom``
  (by name, imported only when vLLM builds such a model);
- architecture ``BloomForCausalLM`` (plain and dense BLOOM) -> vLLM's own BLOOM with BLOOM's
  tanh-approximation GELU instead of exact GELU, so vLLM's greedy tokens equal transformers'
  (vLLM 0.29's BLOOM differs at near ties). Same parallelism and quantization support.
"""

from __future__ import annotations

VLLM_MODEL_CLASS = "bloomray.model.vllm_bloom:BloomrayCompactForCausalLM"
VLLM_BLOOM_CLASS = "bloomray.model.vllm_bloom:BloomrayBloomForCausalLM"


def register() -> None:
    """Register bloomray's compacted BLOOM with transformers and vLLM (safe to call repeatedly)."""
    from vllm import ModelRegistry

    from bloomray.model.compact_hf import COMPACT_ARCHITECTURE, register_with_transformers

    register_with_transformers()
    ModelRegistry.register_model(COMPACT_ARCHITECTURE, VLLM_MODEL_CLASS)
    ModelRegistry.register_model("BloomForCausalLM", VLLM_BLOOM_CLASS)
