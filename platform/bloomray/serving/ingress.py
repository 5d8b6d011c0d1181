"""The HTTP front door: auth, limits, admission and one error shape, around the engines.

:class:`BloomServer` is Ray Serve LLM's ``LLMServer`` with bloomray's routes: the app's first
causal LM runs its vLLM engine inside the deployment that answers HTTP, so a streamed token
crosses one Ray hop (replica to Serve's proxy), as in Ray Serve LLM's own direct streaming.
Every other model (more variants, classifiers) is reached through a streaming handle to its
own deployment (``LLMServer`` or ``ClassifierServer``); an app without a causal LM runs it
with no engine. The router knows nothing about generation: it checks a request (key, size,
fields, limits), admits it by the work it brings (prompts x n), and hands it to the engine. A
client that disconnects or a request past the timeout cancels the engine call, which aborts
the vLLM request and frees its place in the batch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, LLMServer

from bloomray.config import ConfigError
from bloomray.serving.auth import load_keys
from bloomray.serving.checks import RequestChecks
from bloomray.serving.http import UNAVAILABLE, api, unavailable
from bloomray.serving.metrics import ServeMetrics
from bloomray.serving.options import ServeOptions
from bloomray.serving.schema import (
    APIError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
)
from bloomray.serving.streaming import ChunkBatching

INGRESS_OPTIONS = {"name": "BloomIngress", "max_ongoing_requests": 1000, "max_queued_requests": -1}


class LocalStream:
    """The in-replica engine's output stream with a handle response's ``cancel()``."""

    _closing: set[asyncio.Task] = set()

    def __init__(self, gen: Any) -> None:
        self.gen = gen

    def __anext__(self) -> Any:
        return self.gen.__anext__()

    def cancel(self) -> None:
        # Closing the generator cancels Ray Serve LLM's reader task, and vLLM aborts the request.
        task = asyncio.ensure_future(self.gen.aclose())
        self._closing.add(task)
        task.add_done_callback(lambda t: self._closing.discard(t) or t.cancelled() or t.exception())


@serve.ingress(api)
class BloomServer(RequestChecks, ChunkBatching, LLMServer):
    """OpenAI-style routes over the in-replica engine and the other deployments (module docstring)."""

    # LLMServer's hook would replace these routes with vLLM's own app (its direct streaming).
    __serve_build_asgi_app__ = None

    async def __init__(
        self,
        llm_config: LLMConfig | None,
        engines: dict[str, DeploymentHandle],
        classifiers: dict[str, DeploymentHandle],
        models: dict[str, dict[str, Any]],
        options: dict[str, Any],
    ) -> None:
        self.keys = load_keys()
        if not self.keys:
            raise ConfigError("no API keys: set BLOOMRAY_API_KEYS_FILE (see README)")
        self.engines = {n: h.options(stream=True) for n, h in engines.items()}
        self.classifiers = classifiers
        self.models = models
        self.default = next(iter(models))
        self.opts = ServeOptions.from_args(options)
        self.inflight = 0
        self.metrics = ServeMetrics()
        # vLLM's request types (a heavy import): at replica start, never inside a request.
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        self.engine_chat, self.engine_completion = ChatCompletionRequest, CompletionRequest
        self.local = llm_config.model_id if llm_config is not None else None
        if llm_config is not None:
            await LLMServer.__init__(self, llm_config)  # starts the engine: weights load here
        else:  # no engine in this replica: LLMServer's health check and hooks pass, nothing runs
            self._llm_config, self.engine = None, None

    async def _open(self, name: str, method: str, engine_req: Any) -> Any:
        """The engine call for model ``name``: a stream with ``cancel()`` (this replica's own
        engine, or another deployment's by handle)."""
        if name == self.local:
            return LocalStream(await getattr(LLMServer, method)(self, engine_req, None))
        return getattr(self.engines[name], method).remote(engine_req, None)

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        handles = list(self.engines.values()) + list(self.classifiers.values())
        try:
            async with asyncio.timeout(10):
                await self.check_health()  # the in-replica engine (none: passes)
                for h in handles:
                    await h.options(stream=False).check_health.remote()
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            return JSONResponse({"status": "unhealthy", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(self.models)})

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        self._auth(request)
        data = [
            {"id": n, "object": "model", "owned_by": "bloomray", "task": m["task"]}
            for n, m in self.models.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    # Route methods are named route_*: chat() and completions() are LLMServer's engine calls.
    @api.post("/v1/completions")
    async def route_completions(self, request: Request) -> Any:
        return await self._generate(request, CompletionRequest, "completions", default_tokens=16)

    @api.post("/v1/chat/completions")
    async def route_chat(self, request: Request) -> Any:
        return await self._generate(request, ChatRequest, "chat", default_tokens=self.opts.max_tokens_limit)

    @api.post("/v1/classify")
    async def route_classify(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            self._auth(request)
            req: ClassifyRequest = await self._body(request, ClassifyRequest)
            name = self._model(req.model, "classification")
            texts = req.inputs()
            if len(texts) > self.opts.max_prompts:
                raise APIError(
                    400,
                    f"{len(texts)} inputs in one request; the limit is {self.opts.max_prompts}",
                    param="input",
                )
            with self._admit(len(texts)):
                response = self.classifiers[name].classify.remote(texts)
                try:
                    async with asyncio.timeout(self.opts.request_timeout_s):
                        out = await response
                except TimeoutError:
                    response.cancel()
                    raise self._timeout() from None
                except UNAVAILABLE as exc:
                    raise unavailable(exc) from None
        except APIError as exc:
            self.metrics.errors.inc(tags={"code": str(exc.status)})
            raise
        self.metrics.done("/v1/classify", start, 0)
        return JSONResponse({"object": "classification", "model": name, **out})

    # ------------------------------------------------------------------ generation

    async def _generate(self, request: Request, schema: type, method: str, default_tokens: int) -> Any:
        start = time.perf_counter()
        try:
            self._auth(request)
            req = await self._body(request, schema)
            name = self._model(req.model, "causal_lm")
            self._limits(req, default_tokens)
            fields = {"max_tokens": default_tokens, **req.sampling(), "model": name}
            if method == "chat":
                fields["messages"] = [m.model_dump(exclude_none=True) for m in req.messages]
                engine_req: Any = self.engine_chat(**fields)
            else:
                engine_req = self.engine_completion(**fields)
            units = len(req.prompts()) * req.n
            if req.stream:
                return await self._stream(name, method, engine_req, units, start)
            with self._admit(units):
                gen = await self._open(name, method, engine_req)
                try:
                    async with asyncio.timeout(self.opts.request_timeout_s):
                        first = await self._first(gen)
                except TimeoutError:
                    gen.cancel()
                    raise self._timeout() from None
                gen.cancel()  # done: the one response came (a no-op for a finished call)
            body = first.model_dump() if isinstance(first, BaseModel) else first
            self.metrics.done(f"/v1/{method}", start, (body.get("usage") or {}).get("completion_tokens", 0))
            return JSONResponse(body)
        except APIError as exc:
            self.metrics.errors.inc(tags={"code": str(exc.status)})
            raise

    async def _first(self, gen: Any) -> Any:
        """The first item of an engine stream; an engine ErrorResponse becomes an APIError."""
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine returned nothing", code="internal_error") from None
        except UNAVAILABLE as exc:
            raise unavailable(exc) from None
        item = first[0] if isinstance(first, list) and first else first
        err = getattr(item, "error", None)
        if err is not None and not isinstance(item, str):
            status = int(getattr(err, "code", 400) or 400)
            raise APIError(status, err.message, param=getattr(err, "param", None), code="engine_rejected")
        return first

    async def _stream(self, name: str, method: str, engine_req: Any, units: int, start: float) -> Any:
        admit = self._admit(units)
        admit.__enter__()
        gen = await self._open(name, method, engine_req)
        try:
            async with asyncio.timeout(self.opts.request_timeout_s):
                first = await self._first(gen)
        except BaseException as exc:
            gen.cancel()
            admit.__exit__(None, None, None)
            if isinstance(exc, TimeoutError):
                raise self._timeout() from None
            raise
        deadline = time.monotonic() + self.opts.request_timeout_s

        async def events() -> AsyncIterator[str]:
            self.metrics.ttft.observe((time.perf_counter() - start) * 1000)
            count = 0
            try:
                item: Any = first
                while True:
                    # The engine batches stream chunks (stream_interval_ms); one write per batch,
                    # since every write is a message from this replica to the HTTP proxy.
                    chunks = item if isinstance(item, list) else [item]
                    count += len(chunks)
                    yield "".join(
                        c if isinstance(c, str) else f"data: {c.model_dump_json()}\n\n" for c in chunks
                    )
                    try:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            item = await gen.__anext__()
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        yield f"data: {json.dumps(self._timeout().body())}\n\n"
                        yield "data: [DONE]\n\n"
                        break
                self.metrics.done(f"/v1/{method}:stream", start, count)
            finally:
                # Runs on completion, timeout, and client disconnect (Starlette cancels us).
                gen.cancel()
                admit.__exit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream")
