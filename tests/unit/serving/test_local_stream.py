"""The in-replica engine stream: closing it must stop the engine's generator (vLLM aborts a
request when its generator is closed), after the first chunk, on a timeout, and when done; and
the replicas' chunk batching (the first chunk at once, then one message per interval)."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest
from ray.serve.llm import LLMServer

from bloomray.serving.ingress import BloomServer, LocalStream
from bloomray.serving.streaming import ChunkBatching, EngineServer, first_then_every


def _engine(state: dict, tokens: int | None = None, pause: bool = False):
    """An engine-like generator: one chunk per 5 ms (none at all while ``pause``)."""

    async def gen():
        try:
            i = 0
            while tokens is None or i < tokens:
                await asyncio.sleep(3600 if pause else 0.005)
                state["made"] = i = i + 1
                yield f"data: {i}\n\n"
        finally:
            state["closed"] = True

    return gen()


def _batched(state: dict, **kw) -> LocalStream:
    # What the engine replica's completions return for stream=true: its batches of engine chunks.
    return LocalStream(first_then_every(_engine(state, **kw), interval_ms=20))


def test_cancel_after_the_first_chunk_stops_the_engine_generator():
    async def go():
        state: dict = {}
        stream = _batched(state)
        first = await stream.__anext__()
        stream.cancel()
        await asyncio.sleep(0.2)
        made = state["made"]
        await asyncio.sleep(0.2)
        return first, state, made

    first, state, made = asyncio.run(go())
    assert first and first[0] == "data: 1\n\n"
    assert state.get("closed") is True
    assert state["made"] == made, "the engine kept generating after cancel()"


def test_a_timed_out_first_chunk_then_cancel_closes_the_paused_engine():
    async def go():
        state: dict = {}
        stream = _batched(state, pause=True)
        try:
            async with asyncio.timeout(0.1):
                await stream.__anext__()
        except TimeoutError:
            stream.cancel()
        await asyncio.sleep(0.1)
        return state

    state = asyncio.run(go())
    assert state.get("closed") is True and "made" not in state


def test_cancel_of_a_finished_stream_is_harmless():
    async def go():
        state: dict = {}
        stream = _batched(state, tokens=3)
        seen = []
        while True:
            try:
                seen.extend(await stream.__anext__())
            except StopAsyncIteration:
                break
        stream.cancel()
        await asyncio.sleep(0.05)
        return seen, state, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    seen, state, pending = asyncio.run(go())
    assert seen == ["data: 1\n\n", "data: 2\n\n", "data: 3\n\n"]
    assert state.get("closed") is True and not pending


async def _timed(gen, interval_ms):
    start, out = time.perf_counter(), []
    async for batch in first_then_every(gen, interval_ms):
        out.append((time.perf_counter() - start, batch))
    return out


def _spaced(n: int, gap_s: float, first_after_s: float = 0.0, error: Exception | None = None):
    async def gen():
        await asyncio.sleep(first_after_s)
        for i in range(n):
            if i:
                await asyncio.sleep(gap_s)
            yield i
        if error is not None:
            raise error

    return gen()


def test_first_chunk_goes_at_once_then_one_message_per_interval():
    """Ray Serve LLM's batcher would hold the first token until its first 300 ms tick."""
    out = asyncio.run(_timed(_spaced(12, 0.02, first_after_s=0.03), 300))
    assert out[0][1] == [0] and out[0][0] < 0.2, out[0]
    assert [i for _, batch in out for i in batch] == list(range(12)), "every chunk, in order"
    assert 2 <= len(out) <= 3, [b for _, b in out]  # 11 chunks over ~0.22 s: one or two more messages


def test_interval_zero_sends_every_chunk_alone():
    out = asyncio.run(_timed(_spaced(4, 0.001), 0))
    assert [b for _, b in out] == [[0], [1], [2], [3]]


def test_the_engines_error_comes_after_its_chunks():
    async def go():
        seen = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for batch in first_then_every(_spaced(3, 0.001, error=RuntimeError("engine died")), 50):
                seen.extend(batch)
        return seen

    assert asyncio.run(go()) == [0, 1, 2]


def test_every_engine_deployment_batches_with_the_replacement_hook():
    """Ray Serve LLM calls _batch_output_stream for stream=true (the hook the mixin replaces);
    the HTTP ingress and the other engines' deployments both carry it."""
    assert "self._batch_output_stream(" in inspect.getsource(LLMServer._run_request)
    for cls in (BloomServer, EngineServer):  # the mixin's, not LLMServer's (MRO order matters)
        assert cls._batch_output_stream is ChunkBatching._batch_output_stream, cls.__mro__
