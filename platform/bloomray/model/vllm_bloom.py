"""vLLM model for compacted (structurally pruned) BLOOM exports: ``BloomrayCompactForCausalLM``.

vLLM imports this module through its model registry only (``bloomray.serving.vllm_plugin``
registers it lazily by name); nothing else in bloomray imports it, so bloomray works without
vLLM installed. It also holds :class:`BloomrayBloomForCausalLM`, vLLM's own BLOOM with BLOOM's
GELU, which the plugin registers for plain (dense) BLOOM exports.

A compacted export (``model_type`` ``bloomray_compact``, see ``bloomray.model.compact_hf``)
keeps, per layer, a subset of the original attention heads and MLP neurons:

- MLP: each layer gets its own width (``len(spec["neurons"][i])``); nothing else changes.
- Attention: vLLM's KV cache wants one page size for every layer, so every layer gets the same
  number of heads, the largest kept count over layers. A layer that kept fewer is padded with
  dummy heads whose q/k/v weights and biases are zero and whose ``dense`` input columns are
  zero: their values are zero, so they add exactly nothing. Each real head keeps the ALiBi
  slope of its *original* index among ``n_head`` heads; dummy heads get slope 0.
- Weights: BLOOM stores ``query_key_value`` per head as ``[q, k, v]`` rows; they are split into
  vLLM's q/k/v shards with the layer's own head count, zero-padded to the padded head count and
  handed to ``QKVParallelLinear``'s weight loader shard by shard (so quantized parameters,
  e.g. per-channel scales, take the same path as the weights).

Only tensor- and pipeline-parallel size 1 is supported (asserted at construction).

(Longer than bloomray's usual ~300 lines: vLLM's module interface — layers, model, causal-LM
wrapper and weight loading — is one unit that vLLM imports by name.)
"""

import math
import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.bloom import BloomForCausalLM as VllmBloomForCausalLM
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from bloomray.model.compact import SPEC_KEY

_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")
# BLOOM's GELU is the tanh approximation (transformers' bloom_gelu_forward, Megatron's bias_gelu).
# Exact (erf) GELU differs by up to ~1e-3, enough to flip greedy tokens at near ties. vLLM's
# "gelu_pytorch_tanh" is torch's fused GELU(approximate="tanh"), the same formula; its
# "gelu_fast" too, but on x86 CPUs that runs as six elementwise torch ops: 16% of a decode
# step's time at hidden 768 (py-spy of the engine core, 64 streams).
BLOOM_GELU = "gelu_pytorch_tanh"


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi slope of each of ``n_head`` heads, as BLOOM defines them.

    For the largest power of two p <= n_head, head i < p gets ``(2 ** (-8 / p)) ** (i + 1)``;
    the remaining heads j = 0, 1, ... take the odd powers of the base for 2p heads,
    ``(2 ** (-4 / p)) ** (2j + 1)`` (n_head < 2p, so there are fewer than p of them).
    """
    p = 2 ** math.floor(math.log2(n_head))  # largest power of two <= n_head
    # float32 powers of a float32 base, as transformers computes them (so slopes match bit for bit);
    # explicit dtype: vLLM builds models under the serving dtype as torch's default dtype
    slopes = torch.pow(
        torch.tensor(2.0 ** (-8.0 / p), dtype=torch.float32), torch.arange(1, p + 1, dtype=torch.int32)
    )
    if p < n_head:
        extra = torch.arange(1, 2 * (n_head - p), 2, dtype=torch.int32)  # 1, 3, 5, ...
        slopes = torch.cat([slopes, torch.pow(torch.tensor(2.0 ** (-4.0 / p), dtype=torch.float32), extra)])
    return slopes.tolist()


def padded_head_count(spec: dict) -> int:
    """Heads every layer gets in vLLM: the most any layer kept."""
    return max(len(heads) for heads in spec["heads"])


class CompactBloomAttention(nn.Module):
    """Self-attention over one layer's kept heads, padded with zero heads to ``num_heads``."""

    def __init__(
        self,
        config,
        kept_heads: list[int],
        num_heads: int,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.head_dim = config.hidden_size // config.n_head
        assert self.head_dim * config.n_head == config.hidden_size, "hidden_size must divide by n_head"
        assert 0 < len(kept_heads) <= num_heads, (len(kept_heads), num_heads)
        self.kept_heads = list(kept_heads)
        self.num_heads = num_heads
        self.query_key_value = QKVParallelLinear(
            self.hidden_size,
            self.head_dim,
            num_heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.query_key_value",
        )
        self.dense = RowParallelLinear(
            num_heads * self.head_dim,
            self.hidden_size,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.dense",
        )
        all_slopes = alibi_slopes(config.n_head)
        slopes = [all_slopes[h] for h in kept_heads] + [0.0] * (num_heads - len(kept_heads))
        self.attn = Attention(
            num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            alibi_slopes=slopes,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.query_key_value(hidden_states)
        q, k, v = qkv.chunk(chunks=3, dim=-1)
        output, _ = self.dense(self.attn(q, k, v))
        return output

    def load_qkv(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Load a BLOOM fused ``query_key_value`` tensor (rows: per kept head, [q, k, v])."""
        kept, d = len(self.kept_heads), self.head_dim
        loader = getattr(param, "weight_loader", default_weight_loader)
        if loaded.ndim == 0 or loaded.shape[0] != 3 * kept * d:
            loader(param, loaded)  # e.g. a per-tensor quantization scale: nothing per head
            return
        rest = tuple(loaded.shape[1:])
        per_head = loaded.reshape(kept, 3, d, *rest)
        for i, shard_id in enumerate("qkv"):
            shard = per_head[:, i].reshape(kept * d, *rest)
            if kept < self.num_heads:
                pad = shard.new_zeros(((self.num_heads - kept) * d, *rest))
                shard = torch.cat([shard, pad])
            loader(param, shard.contiguous(), shard_id)

    def pad_dense_weight(self, loaded: torch.Tensor) -> torch.Tensor:
        """``dense`` weight with zero input columns for the padded heads."""
        kept, d = len(self.kept_heads), self.head_dim
        if loaded.ndim != 2 or kept == self.num_heads or loaded.shape[1] != kept * d:
            return loaded
        pad = loaded.new_zeros((loaded.shape[0], (self.num_heads - kept) * d))
        return torch.cat([loaded, pad], dim=1)


class CompactBloomMLP(nn.Module):
    """BLOOM MLP with ``width`` kept neurons (BLOOM's tanh-approximation GELU)."""

    def __init__(
        self, config, width: int, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, width, quant_config=quant_config, prefix=f"{prefix}.dense_h_to_4h"
        )
        self.gelu = get_act_fn(BLOOM_GELU)
        self.dense_4h_to_h = RowParallelLinear(
            width, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.dense_4h_to_h"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.dense_h_to_4h(x)
        x, _ = self.dense_4h_to_h(self.gelu(x))
        return x


class CompactBloomBlock(nn.Module):
    def __init__(
        self,
        config,
        layer: int,
        num_heads: int,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        spec = getattr(config, SPEC_KEY)
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = CompactBloomAttention(
            config,
            spec["heads"][layer],
            num_heads,
            cache_config,
            quant_config,
            prefix=f"{prefix}.self_attention",
        )
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = CompactBloomMLP(config, len(spec["neurons"][layer]), quant_config, prefix=f"{prefix}.mlp")
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        residual = normed if self.residual_after_norm else hidden_states
        hidden_states = self.self_attention(normed) + residual
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_after_norm else hidden_states
        return self.mlp(normed) + residual


@support_torch_compile
class CompactBloomModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = getattr(config, SPEC_KEY, None)
        if not spec or len(spec["heads"]) != config.n_layer or len(spec["neurons"]) != config.n_layer:
            raise ValueError(
                f"BloomrayCompactForCausalLM needs config.{SPEC_KEY} with kept heads and neurons "
                f"for each of the {config.n_layer} layers (a bloomray compacted export)"
            )
        self.config = config
        self.num_heads = padded_head_count(spec)
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(
            CompactBloomBlock(
                config,
                i,
                self.num_heads,
                vllm_config.cache_config,
                vllm_config.quant_config,
                prefix=f"{prefix}.h.{i}",
            )
            for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        del positions, intermediate_tensors  # ALiBi: positions live in the attention kernel
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        hidden = self.word_embeddings_layernorm(hidden)
        for block in self.h:
            hidden = block(hidden)
        return self.ln_f(hidden)


class BloomrayCompactForCausalLM(nn.Module, SupportsQuant):
    """vLLM causal LM for bloomray's compacted BLOOM exports (tensor/pipeline parallel size 1)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        tp, pp = get_tensor_model_parallel_world_size(), get_pp_group().world_size
        if tp != 1 or pp != 1:
            raise NotImplementedError(
                f"BloomrayCompactForCausalLM supports tensor_parallel_size=1 and pipeline_parallel_size=1 "
                f"only (got {tp} and {pp}): compacted layers have per-layer head counts"
            )
        config = vllm_config.model_config.hf_config
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.transformer = CompactBloomModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer")
        )
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head")
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.word_embeddings)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load an HF-format compacted BLOOM state dict (names with or without ``transformer.``)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue  # tied to the word embeddings
            if name not in params:
                raise KeyError(
                    f"{name}: no such parameter in BloomrayCompactForCausalLM (shape {tuple(tensor.shape)})"
                )
            param = params[name]
            match = _LAYER.match(name)
            attn = self.transformer.h[int(match.group(1))].self_attention if match else None
            if attn is not None and ".self_attention.query_key_value." in name:
                attn.load_qkv(param, tensor)
            else:
                if attn is not None and name.endswith(".self_attention.dense.weight"):
                    tensor = attn.pad_dense_weight(tensor)
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


class BloomrayBloomForCausalLM(VllmBloomForCausalLM):
    """vLLM's own BLOOM (all its parallelism and quantization) with BLOOM's tanh-approximation GELU.

    vLLM 0.29's ``BloomForCausalLM`` uses exact (erf) GELU, which differs from the GELU BLOOM was
    trained with and transformers runs; greedy tokens then differ from transformers at near ties.
    The bloomray plugin registers this class for architecture ``BloomForCausalLM``.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        if getattr(vllm_config.model_config.hf_config, SPEC_KEY, None) is not None:
            # A compacted export from before compacted causal LMs had their own architecture.
            raise ValueError(
                f"this BLOOM dir is a bloomray compacted export (config.json has {SPEC_KEY}) but names "
                "architecture BloomForCausalLM; re-export it, or pass "
                "hf_overrides={'architectures': ['BloomrayCompactForCausalLM']} to vLLM"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        for block in self.transformer.h:
            mlp = getattr(block, "mlp", None)  # blocks of other pipeline stages have none
            if mlp is None:
                continue
            if not hasattr(mlp, "gelu_impl"):
                raise AttributeError(
                    "vLLM's BloomMLP has no gelu_impl any more: update BloomrayBloomForCausalLM "
                    "(bloomray/model/vllm_bloom.py) for this vLLM version"
                )
            mlp.gelu_impl = get_act_fn(BLOOM_GELU)
