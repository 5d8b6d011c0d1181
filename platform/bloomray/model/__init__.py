"""Model building: presets, pretrained loading, LoRA, the compacted BLOOM (``compact.py``, ``compact_hf.py``) and its vLLM twin.

Importing this package registers compacted causal-LM exports (``model_type``
``bloomray_compact``) with transformers' AutoConfig and AutoModelForCausalLM.
"""

from bloomray.model.compact_hf import register_with_transformers

register_with_transformers()
