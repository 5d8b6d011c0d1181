"""How an engine replica batches a streamed response: the first chunk at once, then at most
one message every ``stream_interval_ms``.

Every message a replica yields crosses to Serve's HTTP proxy (or to the ingress) as a Ray
stream item, and on a box whose cores the engine also computes on, that per-message work is
what Serve costs. Ray Serve LLM batches the engine's chunks on a fixed clock that starts with
the request (``stream_batching_interval_ms``, 50 ms by default), so a longer interval also
delays the first token by up to one tick. :class:`ChunkBatching` keeps the interval for the
rest of the stream but sends the first chunk as soon as the engine has it.

Measured (benchmarks/serve_throughput.py's model, 2 cores, 16 streams, probe of 96 requests):
interval 50 ms: 239 / 241 tokens/s (the replica and Serve's proxy 10.1 / 9.6 CPU-s for the
6,144 tokens); 100 ms: 271 / 256 (6.7 / 7.9 CPU-s); 200 ms: 285.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from ray.serve.llm import LLMServer

T = TypeVar("T")


async def first_then_every(gen: AsyncIterator[T], interval_ms: float | None) -> AsyncGenerator[list[T], None]:
    """Lists of ``gen``'s items: the first item alone as soon as it comes, then whatever came in
    each ``interval_ms``; ``0`` (or None) yields every item on its own. ``gen``'s exception is
    raised after the items before it; closing this generator stops reading ``gen``."""
    if not interval_ms:
        async for item in gen:
            yield [item]
        return
    queue: list[T] = []
    arrived, done = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        try:
            async for item in gen:
                queue.append(item)
                arrived.set()
        finally:
            done.set()
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        await arrived.wait()  # the first chunk is not held for a tick
        while True:
            finished = done.is_set()  # nothing is added after this is set
            if queue:
                items = queue[:]
                queue.clear()
                yield items
            if finished:
                break
            try:
                await asyncio.wait_for(done.wait(), interval_ms / 1000)
            except TimeoutError:
                pass
        reader.result()  # the engine's error, after what came before it
    finally:
        if not reader.done():
            reader.cancel()  # a client that left: stop reading, so the engine aborts the request


class ChunkBatching:
    """Mixin for an ``LLMServer``: :func:`first_then_every` instead of Ray Serve LLM's clocked
    batcher, at the deployment's ``stream_batching_interval_ms``."""

    def _batch_output_stream(self, generator: AsyncIterator[Any]) -> AsyncGenerator[list[Any], None]:
        return first_then_every(generator, self._get_batch_interval_ms())  # type: ignore[attr-defined]


class EngineServer(ChunkBatching, LLMServer):
    """The deployment of an engine that is not the HTTP ingress (a second variant)."""
