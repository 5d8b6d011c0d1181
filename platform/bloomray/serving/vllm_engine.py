"""Ray Serve LLM's vLLM engine, with the model's worker in the engine core process on CPU.

On CPU, Ray Serve LLM always gives vLLM the ``mp`` executor: the model runs in a worker
process of its own, one more process (torch and vLLM imported again) per replica, and each
step crosses shared-memory queues that both sides busy-poll for a second after each message.
On a replica with few cores that polling takes CPU from the model's threads. ``vllm serve``
with one worker uses the ``uni`` executor (the worker inside the engine core), so that is what
this engine gives a one-worker CPU engine; GPU engines and multi-worker engines keep Ray's choice.

Deployments name it with ``RAYLLM_VLLM_ENGINE_CLS`` (``engines.ENGINE_CLS_ENV``), Ray Serve
LLM's own switch for the engine class.

:class:`LocalModelDir` is the deployments' Ray Serve LLM callback (``callback_config``): every
model bloomray serves is a local dir (checked before any deployment starts), so the engine
skips Ray Serve LLM's node initialization, a Ray task per node that only downloads hub or
bucket models and, for a local path, returns it unchanged. That task runs in a fresh worker
process that imports vLLM first: about 14 s of each replica's start on a 2-core box.
"""

from __future__ import annotations

import os
from typing import Any

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine


def one_process_executor(vllm_config: Any) -> bool:
    """Switches a one-worker engine on the ``mp`` executor to ``uni``; True if it did."""
    parallel = vllm_config.parallel_config
    if parallel.world_size != 1 or parallel.distributed_executor_backend != "mp":
        return False
    parallel.distributed_executor_backend = "uni"
    return True


class OneProcessVLLMEngine(VLLMEngine):
    """:class:`VLLMEngine` whose one-worker CPU engine runs its model in the engine core."""

    def _start_async_llm_engine(
        self, vllm_engine_args: Any, vllm_engine_config: Any, placement_group: Any
    ) -> Any:
        one_process_executor(vllm_engine_config)  # only CPU engines get "mp" from Ray Serve LLM
        return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)


class LocalModelDir(CallbackBase):
    """Ray Serve LLM callback of an engine whose model source is a local dir: no node init task."""

    async def on_before_node_init(self) -> None:
        if os.path.isdir(self.llm_config.get_engine_config().actual_hf_model_id):
            self.ctx.run_init_node = False
