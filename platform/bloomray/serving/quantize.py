"""W8A8 int8 copy of a BLOOM export, in the compressed-tensors format vLLM serves (CPU too).

What is written (checked against vLLM 0.29's ``CompressedTensorsConfig`` and
``CompressedTensorsW8A8Int8`` scheme, and compressed-tensors 0.17's ``int-quantized`` format):

- every transformer block's ``query_key_value``, ``dense``, ``dense_h_to_4h`` and
  ``dense_4h_to_h`` weight as ``<layer>.weight`` (int8, ``[out, in]``) plus
  ``<layer>.weight_scale`` (float32, ``[out, 1]``): symmetric per-output-channel, no zero
  point; biases stay in the model's dtype;
- activations are not stored: vLLM quantizes them at run time, dynamic symmetric per token;
- embeddings, LayerNorms and the (tied) LM head stay in the model's dtype (``lm_head`` is in
  the config's ``ignore`` list);
- config.json gets a ``quantization_config`` (``quant_method: compressed-tensors``,
  ``format: int-quantized``) with one config group targeting ``Linear``; vLLM matches it
  against its ``*ParallelLinear`` layers by class name.

On vLLM's CPU backend the scheme runs on oneDNN int8 GEMMs (``CPUInt8ScaledMMLinearKernel``;
the AMX "sgl" kernel where the CPU has AMX). Without VNNI (AVX2-only x86, e.g. AMD Zen 3) those
GEMMs multiply with ``vpmaddubsw``, which saturates the int16 sum of each pair of u8 x s8
products: a few products in 10^4 are clipped, outputs move ~1% (8x bf16 rounding) and depend
on the order of the input features; :func:`cpu_int8_caveat` says so where it applies.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bloomray.cpu import cpu_flags, lacks_vnni
from bloomray.errors import EXIT_USAGE, BloomrayError
from bloomray.export.load import load_model
from bloomray.export.sparse import SPARSE_KEY
from bloomray.files import atomic_dir
from bloomray.model.compact import SPEC_KEY
from bloomray.model.compact_hf import COMPACT_MODEL_TYPE

QUANT_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
INT8_MAX = 127
WEIGHTS_FILE = "model.safetensors"
# Files copied from the source dir besides the weights: tokenizer and generation settings.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizeError(BloomrayError, ValueError):
    """The model cannot be quantized as asked; the message says what to do instead.

    Exit code 2: the model dir is not an unquantized BLOOM export, or the output exists.
    """

    exit_code = EXIT_USAGE


def w8a8_int8_config(ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json: int8 W8A8, dynamic per-token activations."""
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**int8, "strategy": "channel", "dynamic": False},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(q int8 [out, in], scale float32 [out, 1])``.

    ``scale = max|row| / 127``, ``q = round(w / scale)``, so ``|q * scale - w| <= scale / 2``.
    An all-zero row gets scale 1 (its q is 0 either way).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale``: what the int8 GEMM multiplies with."""
    return q.float() * scale.float()


def is_quant_target(name: str) -> bool:
    """A ``.weight`` of a transformer block Linear (``transformer.h.N.<...>.<target>.weight``)."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in QUANT_TARGETS and ".h." in f".{name}"


def _source_config(src: Path) -> dict[str, Any]:
    cfg_path = src / "config.json"
    if not src.is_dir() or not cfg_path.is_file():
        raise QuantizeError(
            f"{src} is not a model directory (no config.json); pass a dir written by `bloomray export` "
            "or an HF BLOOM dir"
        )
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") not in ("bloom", COMPACT_MODEL_TYPE):
        raise QuantizeError(
            f"{src} holds a {raw.get('model_type')!r} model; quantize_w8a8 writes BLOOM only, pass a BLOOM export"
        )
    if "quantization_config" in raw:
        raise QuantizeError(
            f"{src} is already quantized ({raw['quantization_config'].get('quant_method')}); "
            "pass the unquantized export it was made from"
        )
    return raw


def _quantized_state(
    model: torch.nn.Module, dtype: torch.dtype, tied: bool
) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors to write, and the largest |dequantized - original| weight error."""
    state: dict[str, torch.Tensor] = {}
    max_err = 0.0
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # tied to the word embeddings; vLLM ties it again from the config
        if is_quant_target(name):
            q, scale = quantize_weight(tensor)
            max_err = max(max_err, float((dequantize_weight(q, scale) - tensor.float()).abs().max()))
            state[name] = q.contiguous()
            state[name[: -len("weight")] + "weight_scale"] = scale.contiguous()
        else:
            state[name] = tensor.detach().to(dtype).contiguous()
    return state, max_err


def _card(src: Path, out: Path, raw: dict[str, Any], facts: dict[str, Any]) -> str:
    source_card = ""
    if (src / "README.md").is_file():
        text = (src / "README.md").read_text()
        if text.startswith("---"):
            end = text.find("\n---", 3)
            text = text[end + 4 :] if end >= 0 else text
        text = re.sub(r"^(#+) ", r"\1## ", text.strip(), flags=re.MULTILINE)  # below this card's headings
        source_card = "\n## Source model card\n\n" + text + "\n"
    compact_note = (
        " A compacted (structured-pruned) export: vLLM serves it through bloomray's vLLM plugin "
        "(architecture `BloomrayCompactForCausalLM`, installed with bloomray)."
        if SPEC_KEY in raw
        else ""
    )
    return f"""---
library_name: vllm
tags: [bloom, bloomray, int8, w8a8, compressed-tensors]
---
# {out.name} — W8A8 int8 copy of `{src.name}` for vLLM

Quantized {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")} by `bloomray.serving.quantize.quantize_w8a8` from `{src}`.

## Quantization
- format: compressed-tensors `int-quantized` (`quantization_config` in config.json); vLLM runs it
  with its int8 GEMM kernels (CPU: oneDNN, or AMX where the CPU has it)
- weights: int8, symmetric, one float32 scale per output channel (`weight_scale`), no zero point
- activations: int8, symmetric, dynamic per token (computed by vLLM at run time; nothing stored)
- quantized: {facts["quantized_layers"]} Linear layers (`{"`, `".join(QUANT_TARGETS)}` of {raw.get("n_layer")} blocks)
- kept in {facts["dtype"]}: embeddings, LayerNorms, biases, LM head (tied to the embeddings; in `ignore`)
- largest weight error |int8 x scale - w|: {facts["max_abs_error"]:.3g} (at most half a quantization step)
- size on disk: {facts["source_bytes"] / 2**20:.2f} MiB -> {facts["bytes"] / 2**20:.2f} MiB (safetensors)

## Serve
```python
from vllm import LLM
llm = LLM(model="{out.name}", dtype="bfloat16")
```
or `bloomray serve --model DIR`.{compact_note} transformers loads it only with the
`compressed-tensors` package installed, and dequantizes it (no speed-up); for transformers use the
unquantized source `{src.name}`.
{source_card}"""


def cpu_int8_caveat(cpuinfo: str | None = None) -> str | None:
    """Why W8A8 on this x86 CPU is less accurate than elsewhere, or None (VNNI, AMX, not x86).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (this machine's when None).
    """
    if not lacks_vnni(cpu_flags(cpuinfo)):
        return None
    return (
        "this CPU has no VNNI (avx512_vnni/avx_vnni): vLLM's oneDNN int8 GEMMs saturate int16 pair sums "
        "here, so W8A8 output drifts from bf16 about 2.5x more than on a VNNI CPU; serve the bf16 export "
        "where accuracy matters, or int8 on a CPU with VNNI/AMX or a GPU (fp8)"
    )


def quantize_w8a8(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a W8A8 int8 (compressed-tensors) copy of the BLOOM export ``src_dir`` to ``out_dir``.

    Reads any export bloomray writes (plain, compacted, sparse-packed) through
    :func:`bloomray.export.load.load_model`; writes dense int8 weights. Compacted exports keep
    their ``model_type``, ``architectures`` and ``bloomray_compact`` spec, so bloomray's vLLM
    plugin serves them (its loader splits ``weight_scale`` per q/k/v shard like the weights);
    a sparse export's ``bloomray_sparse`` key is dropped (the copy is dense). The copy is
    built in a temp dir next to ``out_dir`` and renamed into place when complete.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        QuantizeError: ``src_dir`` is not an unquantized BLOOM model dir, or ``out_dir`` exists.
    """
    src, out = Path(src_dir).expanduser(), Path(out_dir).expanduser()
    raw = _source_config(src)
    if out.exists():
        raise QuantizeError(f"{out} already exists; remove it or choose another output dir")
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = _DTYPES.get(str(dtype_name), torch.float32)
    try:
        model = load_model(src)
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"{src} could not be loaded ({str(exc)[:200]}); pass a complete export") from None
    tied = bool(raw.get("tie_word_embeddings", True))
    state, max_err = _quantized_state(model, dtype, tied)
    quantized = [k for k in state if k.endswith(".weight_scale")]
    if not quantized:
        raise QuantizeError(f"{src} has no transformer block Linear weights to quantize")
    # Every other 2-D weight (the LM head; a classifier's score) stays unquantized; embeddings
    # are no Linear, vLLM does not match them anyway.
    matrices = {k.rsplit(".", 1)[0] for k in state if k.endswith(".weight") and state[k].ndim == 2}
    done = {k.rsplit(".", 1)[0] for k in quantized}
    ignore = sorted((matrices - done - {"transformer.word_embeddings"}) | {"lm_head"})

    config = {k: v for k, v in raw.items() if k != SPARSE_KEY}
    config["quantization_config"] = w8a8_int8_config(ignore)

    try:
        with atomic_dir(out, replace=False) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            facts = {
                "quantized_layers": len(quantized),
                "dtype": str(dtype).removeprefix("torch."),
                "max_abs_error": max_err,
                "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
                "bytes": (tmp / WEIGHTS_FILE).stat().st_size,
            }
            (tmp / "README.md").write_text(_card(src, out, raw, facts))
    except FileExistsError as exc:
        raise QuantizeError(
            f"{out} was created while quantizing; remove it or choose another output dir"
        ) from exc
    return out
