"""Typed serving options: the ``args`` of the Serve config, checked before anything starts."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from bloomray.config import ConfigError


@dataclass(frozen=True)
class ServeOptions:
    """What the ingress enforces and how each engine deployment is started.

    Limits are per request or per ingress replica; ``max_queue`` counts work (prompts x n),
    not HTTP requests.
    """

    # engine dtype (auto: vLLM picks from the model, but float32 on x86 CPUs without AVX-512,
    # where bf16 is emulated; float32 for exact comparisons)
    dtype: str = "auto"
    quantize: str = "none"  # w8a8: serve an int8 (compressed-tensors) copy, written once next to the model
    device: str = "auto"  # auto: GPU when the Ray cluster has GPUs, else CPU
    max_context: int = 2048  # prompt + completion tokens (vLLM max_model_len)
    max_tokens_limit: int = 512  # largest max_tokens a request may ask for
    max_queue: int = 64  # prompts x n in flight per ingress replica before 503
    max_prompts: int = 16  # prompts in one completions / classify request
    max_n: int = 4  # completions per prompt
    max_body_bytes: int = 1 << 20  # 413 above this
    request_timeout_s: float = 60.0  # 504 (and the generation stops) past this
    cpus_per_engine: int = 2  # CPU engines: logical CPUs and OpenMP threads (cores 0..n-1)
    kv_cache_gib: float = 1.0  # CPU engines: KV cache size
    max_num_seqs: int = 64  # sequences one engine batches at once
    # streams: the first chunk at once, then at most one message per this many ms (0: one per
    # engine output); each message costs Serve's proxy and the replica CPU (serving/streaming.py)
    stream_interval_ms: float = 100.0
    engine_deployment: dict[str, Any] = field(default_factory=dict)  # Serve options, every engine
    classifier_deployment: dict[str, Any] = field(default_factory=dict)  # Serve options, classifiers

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeOptions:
        """Build from a Serve config's ``args`` (minus ``models``); unknown keys are named.

        Raises:
            ConfigError: an unknown key (with the closest known one) or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in args:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
                raise ConfigError(f"serve args: unknown key {key!r}{hint}")
        opts = cls(**args)
        if opts.max_tokens_limit >= opts.max_context:
            raise ConfigError(
                f"serve args: max_tokens_limit ({opts.max_tokens_limit}) must be below max_context "
                f"({opts.max_context}) so a prompt fits"
            )
        if opts.quantize not in ("none", "w8a8"):
            raise ConfigError(f"serve args: quantize must be none or w8a8, not {opts.quantize!r}")
        if opts.device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"serve args: device must be auto, cpu or gpu, not {opts.device!r}")
        if opts.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(
                f"serve args: dtype must be auto, bfloat16, float16 or float32, not {opts.dtype!r}"
            )
        if opts.stream_interval_ms < 0:
            raise ConfigError(
                f"serve args: stream_interval_ms must be >= 0 (0 sends every engine output), "
                f"not {opts.stream_interval_ms}"
            )
        for name in (
            "max_queue",
            "max_prompts",
            "max_n",
            "max_body_bytes",
            "cpus_per_engine",
            "max_num_seqs",
        ):
            if getattr(opts, name) < 1:
                raise ConfigError(f"serve args: {name} must be >= 1")
        return opts
