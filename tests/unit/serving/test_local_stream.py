"""The in-replica engine stream: closing it must stop the engine's generator (vLLM aborts a
request when its generator is closed), after the first chunk, on a timeout, and when done."""

from __future__ import annotations

import asyncio

from ray.llm._internal.serve.utils.batcher import Batcher

from bloomray.serving.ingress import LocalStream


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
    # What LLMServer.completions returns for stream=true: its Batcher over the engine stream.
    return LocalStream(Batcher(_engine(state, **kw), interval_ms=20).stream())


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
