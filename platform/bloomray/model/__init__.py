"""Model building, loading and export.

Importing this package registers compacted causal-LM exports (``model_type``
``bloomray_compact``) with transformers' AutoConfig and AutoModelForCausalLM.
"""

from bloomray.model.compact_hf import register_with_transformers

register_with_transformers()
