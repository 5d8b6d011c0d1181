"""The model deployments behind the ingress: vLLM for causal LMs, transformers for classifiers.

Causal LMs run on Ray Serve LLM's ``LLMServer`` (vLLM's async engine with continuous
batching, vLLM's OpenAI serving layer, engine metrics to Ray's Prometheus endpoint). A
compacted (structured-pruned) export loads through bloomray's vLLM model plugin; an
unstructured-sparse export is expanded to dense once, next to the export, since vLLM's dense
kernels cannot use the sparsity. Classifiers (vLLM has no BLOOM classifier) run in
:class:`ClassifierServer`. Weights load when a replica starts, never on the first request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from ray import serve
from safetensors import safe_open

from bloomray.config import CPU_HEAD_SIZES, ConfigError
from bloomray.cpu import emulates_bf16
from bloomray.serving.options import ServeOptions

log = logging.getLogger(__name__)

# Ray Serve LLM's switch for the engine class: bloomray's runs a one-worker CPU engine's model in
# the engine core (serving/vllm_engine.py; named by path, so the driver does not import vLLM).
ENGINE_CLS_ENV = {"RAYLLM_VLLM_ENGINE_CLS": "bloomray.serving.vllm_engine:OneProcessVLLMEngine"}
# Its callback: a local model dir needs no node-init (download) task per replica start.
ENGINE_CALLBACK = "bloomray.serving.vllm_engine:LocalModelDir"
W8A8_DIR = "vllm-w8a8"  # where the int8 copy is cached (inside the served dir)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def inspect_model_dir(name: str, path: str) -> dict[str, Any]:
    """The served model's task and kind, checked cheaply before any deployment starts.

    Raises:
        ConfigError: not a model dir, no tokenizer, or an unreadable config (names the fix).
    """
    from bloomray.export.load import task_of
    from bloomray.export.sparse import SPARSE_KEY

    local = Path(path).expanduser()
    cfg_path = local / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(
            f"model {name!r}: {path} is not a model dir (no config.json); pass an export, a tune "
            "winner/ or a pretrained BLOOM dir"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model {name!r}: {cfg_path} is not valid JSON ({exc})") from None
    if not (local / "tokenizer.json").is_file() and not (local / "tokenizer_config.json").is_file():
        raise ConfigError(f"model {name!r}: {path} has no tokenizer (tokenizer.json); re-export the model")
    weights = list(local.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"model {name!r}: {path} has no weights (*.safetensors)")
    for file in weights:  # reads each header only: a truncated or foreign file fails here
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise ConfigError(
                f"model {name!r}: {file} is not a readable safetensors file ({exc}); re-export the model"
            ) from None
    heads = raw.get("n_head") or raw.get("num_attention_heads") or 1
    head_size = (raw.get("hidden_size") or raw.get("n_embed") or 0) // heads
    return {
        "task": task_of(raw),
        "sparse": SPARSE_KEY in raw,
        "path": str(local.resolve()),
        "head_size": head_size,
    }


def w8a8_copy(path: str) -> str:
    """The W8A8 int8 copy of a model dir (compressed-tensors, run by vLLM), written once inside it."""
    from bloomray.serving.quantize import quantize_w8a8

    out = Path(path) / W8A8_DIR
    if not (out / "config.json").is_file():
        quantize_w8a8(path, out)  # atomic: a temp dir renamed into place
    return str(out)


def engine_source(meta: dict[str, Any], opts: ServeOptions) -> str:
    """What vLLM loads for an inspected causal-LM dir: dense (sparse expanded), int8 if asked."""
    from bloomray.export.load import dense_copy
    from bloomray.serving.quantize import cpu_int8_caveat

    path = dense_copy(meta["path"]) if meta["sparse"] else meta["path"]
    if opts.quantize != "w8a8":
        return path
    if not use_gpu(opts) and (caveat := cpu_int8_caveat()):
        log.warning("quantize w8a8: %s", caveat)
    return w8a8_copy(path)


def engine_dtype(opts: ServeOptions, gpu: bool) -> str:
    """vLLM's dtype: as asked; ``auto`` is float32 on x86 CPUs without AVX-512 (bf16 GEMMs are
    emulated there, ~65x below fp32; vLLM's auto would pick bf16 for an fp32 model) unless
    int8 (the W8A8 kernels keep vLLM's choice), else vLLM's own choice from the model."""
    if opts.dtype == "auto" and not gpu and opts.quantize == "none" and emulates_bf16():
        return "float32"
    return opts.dtype


def use_gpu(opts: ServeOptions) -> bool:
    if opts.device != "auto":
        return opts.device == "gpu"
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def llm_deployment(
    name: str,
    meta: dict[str, Any],
    opts: ServeOptions,
    server_cls: type | None = None,
    bind_kwargs: dict[str, Any] | None = None,
    env_vars: dict[str, str] | None = None,
) -> serve.Application:
    """An ``LLMServer`` deployment (Ray Serve LLM + vLLM) serving an inspected dir as model ``name``.

    Args:
        meta: :func:`inspect_model_dir`'s answer; the head size is checked before any copy
            (dense expansion, int8) is written.
        server_cls: an ``LLMServer`` subclass to deploy instead of ``EngineServer`` (the
            ingress that holds this engine), bound with ``bind_kwargs`` and given ``env_vars`` too.
    """
    from ray.serve.llm import LLMConfig, build_llm_deployment

    from bloomray.serving.streaming import EngineServer

    gpu = use_gpu(opts)
    head_size = meta["head_size"]
    if not gpu and head_size not in CPU_HEAD_SIZES:
        raise ConfigError(
            f"model {name!r}: head size {head_size} is not one vLLM's CPU attention runs "
            f"({', '.join(map(str, CPU_HEAD_SIZES))}); train a shape with one of them (hidden_size / n_head)"
        )
    engine_kwargs: dict[str, Any] = {
        "dtype": engine_dtype(opts, gpu),
        "max_model_len": opts.max_context,
        "max_num_seqs": opts.max_num_seqs,
        "enforce_eager": not gpu,  # CPU: no graph capture / compile step at start
        "max_logprobs": 5,
        "seed": 0,
        "enable_log_requests": False,  # vLLM would log prompts (at DEBUG) and request params
    }
    # ENGINE_CLS_ENV: a one-worker CPU engine runs its model in the engine core, as `vllm serve` does.
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **ENGINE_CLS_ENV, **(env_vars or {})}
    placement = None
    if not gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(opts.kv_cache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{opts.cpus_per_engine - 1}"  # core ids, not "all"
        # Ray sets OMP_NUM_THREADS=1 in a replica that asks for no CPUs of its own (the engine's
        # CPUs are in its placement bundle); the engine core inherits it and torch then runs the
        # model on one thread of the bound cores (measured: 1 busy thread of 2, 220 tokens/s).
        env["OMP_NUM_THREADS"] = str(opts.cpus_per_engine)
        # The engine's OpenMP threads share their cores with Serve's proxy and this replica: spinning
        # at each barrier burns the time slices those need. Measured (hidden 768, 8 layers, 2 cores,
        # 64 streams): 255 -> 300 tokens/s and 42 -> 29 engine CPU-s; unchanged at 1 and 16 streams.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Without a CPU-only bundle Ray Serve LLM asks for a GPU and waits forever.
        placement = {"bundle_per_worker": {"CPU": opts.cpus_per_engine}}
    config = LLMConfig(
        model_loading_config={"model_id": name, "model_source": engine_source(meta, opts)},
        engine_kwargs=engine_kwargs,
        placement_group_config=placement,
        runtime_env={"env_vars": env},
        deployment_config=dict(opts.engine_deployment),
        log_engine_metrics=True,
        callback_config={"callback_class": ENGINE_CALLBACK},
        experimental_configs={"stream_batching_interval_ms": opts.stream_interval_ms},
    )
    return build_llm_deployment(
        config,
        name_prefix="LLMServer:",
        deployment_cls=server_cls or EngineServer,
        bind_kwargs=bind_kwargs,
    )


@serve.deployment(name="Classifier")
class ClassifierServer:
    """A sequence classifier (transformers), loaded at replica start; inference only."""

    def __init__(self, name: str, path: str, max_length: int) -> None:
        import torch
        from transformers import AutoTokenizer

        from bloomray.export.load import load_model

        self.name, self.max_length = name, max_length
        self.model = load_model(path).requires_grad_(False)
        if torch.cuda.is_available():
            self.model = self.model.to("cuda", torch.bfloat16)
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        labels = getattr(self.model.config, "id2label", None) or {}
        self.labels = {int(k): v for k, v in labels.items()}

    def _classify(self, texts: list[str]) -> dict[str, Any]:
        import torch

        enc = self.tok(
            texts,
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.model.device)
        with torch.inference_mode():  # in the thread that runs the forward
            probs = self.model(**enc).logits.float().softmax(-1).tolist()
        data = []
        for i, p in enumerate(probs):
            best = max(range(len(p)), key=p.__getitem__)
            data.append(
                {
                    "index": i,
                    "label": self.labels.get(best, str(best)),
                    "score": p[best],
                    "scores": {self.labels.get(j, str(j)): round(v, 6) for j, v in enumerate(p)},
                }
            )
        tokens = int(enc["attention_mask"].sum())
        return {"data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def classify(self, texts: list[str]) -> dict[str, Any]:
        return await asyncio.to_thread(self._classify, texts)

    async def check_health(self) -> None:
        await asyncio.to_thread(self._classify, ["ok"])


def classifier_deployment(name: str, path: str, opts: ServeOptions) -> serve.Application:
    options = {
        "name": f"Classifier:{name}",
        "ray_actor_options": {"num_cpus": 1},
        **opts.classifier_deployment,
    }
    return ClassifierServer.options(**options).bind(name, path, opts.max_context)
