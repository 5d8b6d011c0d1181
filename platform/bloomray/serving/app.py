"""The Ray Serve application: an OpenAI-style HTTP API over bloomray models.

Nothing runs at import: :func:`build_app` returns a bound Serve application that
``serve run``/``serve deploy`` (via ``serve/app.py``) or ``bloomray serve`` start.
"""

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from bloomray.serving.auth import check_key, load_keys
from bloomray.serving.engine import GenParams
from bloomray.serving.metrics import ServeMetrics
from bloomray.serving.models import Served, default_loader, make_served, resolve_loader, task_of_dir
from bloomray.serving.schema import APIError, ClassifyRequest, CompletionRequest, validation_error

log = logging.getLogger(__name__)
api = FastAPI(title="bloomray", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace to the client; the replica log has it.
    log.exception("unhandled error")
    return JSONResponse(APIError(500, "internal server error", "server_error").body(), status_code=500)


@serve.deployment(name="BloomServer")
@serve.ingress(api)
class BloomServer:
    """Completions (batched), streaming, classification, model list, health."""

    def __init__(
        self,
        models: dict[str, str],
        quantize: str = "none",
        loader: str | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        max_queue: int = 32,
        request_timeout_s: float = 30.0,
        max_context: int = 2048,
        max_tokens_limit: int = 512,
    ) -> None:
        if not models:
            raise ValueError("no models to serve: give models={name: model_dir}")
        self.keys = load_keys()
        if not self.keys:
            raise RuntimeError("no API keys: set BLOOMRAY_API_KEYS or BLOOMRAY_API_KEYS_FILE (see README)")
        self.paths = dict(models)
        self.default = next(iter(self.paths))
        self.quantize = quantize
        self.custom_loader = resolve_loader(loader)
        self.max_queue, self.timeout = max_queue, request_timeout_s
        self.max_context, self.max_tokens_limit = max_context, max_tokens_limit
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.inflight = 0
        self.metrics = ServeMetrics()

    # ------------------------------------------------------------------ models

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> Served:
        path = self.paths[model_id]
        load = self.custom_loader or (lambda p: default_loader(p, self.quantize))
        model, tok = await asyncio.to_thread(load, path)
        return make_served(model_id, model, tok)

    async def _served(self, name: str | None) -> Served:
        name = name or self.default
        if name not in self.paths:
            raise APIError(
                404,
                f"model {name!r} is not served; GET /v1/models lists {list(self.paths)}",
                param="model",
                code="model_not_found",
            )
        return await self.get_model(name)

    async def check_health(self) -> None:
        """Serve's replica health check: the default model must answer a one-token probe."""
        served = await self._served(None)
        ids = torch.tensor([[served.tokenizer.eos_token_id or 0]])
        await asyncio.to_thread(lambda: served.model(input_ids=ids))

    # ------------------------------------------------------------------ plumbing

    def _auth(self, request: Request) -> None:
        if not check_key(request.headers.get("authorization"), self.keys):
            raise APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def _body(self, request: Request, schema: type) -> Any:
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def _admit(self) -> None:
        if self.inflight >= self.max_queue:
            raise APIError(
                503,
                f"server busy: {self.inflight} requests queued on this replica; retry shortly",
                "server_overloaded",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    # ------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.check_health(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            return JSONResponse({"status": "unhealthy", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(self.paths)})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._auth(request)
        data = [
            {"id": n, "object": "model", "owned_by": "bloomray", "task": task_of_dir(p)}
            for n, p in self.paths.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        start = time.perf_counter()
        try:
            self._auth(request)
            req: CompletionRequest = await self._body(request, CompletionRequest)
            served = await self._served(req.model)
            if served.engine is None:
                raise APIError(
                    400, f"model {served.name!r} is a classifier: use POST /v1/classify", param="model"
                )
            params = self._params(req, served)
            self._admit()
            if req.stream:
                if len(params) != 1:
                    raise APIError(400, "stream=true takes a single prompt", param="prompt")
                return StreamingResponse(
                    self._stream(served, params[0], start), media_type="text/event-stream"
                )
            self.inflight += 1
            self.metrics.queue.set(self.inflight)
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(self._batched(served.name, p) for p in params)), timeout=self.timeout
                )
            except asyncio.TimeoutError:
                raise APIError(
                    504, f"generation took longer than {self.timeout}s", "timeout", code="timeout"
                ) from None
            finally:
                self.inflight -= 1
                self.metrics.queue.set(self.inflight)
            body = self._completion_body(served.name, results)
            self.metrics.done("/v1/completions", start, body["usage"]["completion_tokens"])
            return JSONResponse(body)
        except APIError as exc:
            self.metrics.errors.inc(tags={"code": str(exc.status)})
            raise

    def _params(self, req: CompletionRequest, served: Served) -> list[GenParams]:
        if req.max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={req.max_tokens} is above this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )
        out = []
        for prompt in req.prompts():
            n = served.engine.count_tokens(prompt)
            if n + req.max_tokens > self.max_context:
                raise APIError(
                    400,
                    f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the context of "
                    f"{self.max_context} tokens",
                    param="prompt",
                    code="context_length_exceeded",
                )
            out.append(GenParams(prompt, req.max_tokens, req.temperature, req.top_p, req.stops(), req.seed))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, names: list[str], params: list[GenParams]) -> list[Any]:
        self.metrics.batch.observe(len(params))
        groups: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(names):
            groups[name].append(i)
        results: list[Any] = [None] * len(params)
        for name, idx in groups.items():
            served = await self.get_model(name)
            outs = await asyncio.to_thread(served.engine.generate, [params[i] for i in idx])
            for i, r in zip(idx, outs, strict=True):
                results[i] = r
        return results

    def _completion_body(self, name: str, results: list[Any]) -> dict[str, Any]:
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _stream(self, served: Served, params: GenParams, start: float):
        """Server-sent events: one chunk per text delta, then ``data: [DONE]``."""
        self.inflight += 1
        cid, created, first, count = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), True, 0
        it = served.engine.stream(params)
        try:
            while True:
                delta = await asyncio.to_thread(next, it, None)
                if delta is None:
                    break
                if first:
                    self.metrics.ttft.observe((time.perf_counter() - start) * 1000)
                    first = False
                count += 1
                chunk = {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": served.name,
                    "choices": [{"index": 0, "text": delta, "finish_reason": None, "logprobs": None}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            end = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": served.name,
                "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}],
            }
            yield f"data: {json.dumps(end)}\n\n"
            yield "data: [DONE]\n\n"
            self.metrics.done("/v1/completions:stream", start, count)
        finally:
            self.inflight -= 1

    @api.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        self._auth(request)
        req: ClassifyRequest = await self._body(request, ClassifyRequest)
        served = await self._served(req.model)
        if served.task != "classification":
            raise APIError(
                400,
                f"model {served.name!r} is a causal LM, not a classifier: use POST /v1/completions "
                "or serve a model fine-tuned with task=classification",
                param="model",
                code="not_a_classifier",
            )
        texts = req.inputs()
        enc = served.tokenizer(
            texts,
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_context,
            return_tensors="pt",
        )
        with torch.no_grad():
            probs = (await asyncio.to_thread(lambda: served.model(**enc).logits.float().softmax(-1))).tolist()
        data = []
        for i, p in enumerate(probs):
            best = max(range(len(p)), key=p.__getitem__)
            labels = {served.id2label.get(j, str(j)): round(v, 6) for j, v in enumerate(p)}
            data.append(
                {
                    "index": i,
                    "label": served.id2label.get(best, str(best)),
                    "score": p[best],
                    "scores": labels,
                }
            )
        tokens = int(enc["attention_mask"].sum())
        self.metrics.done("/v1/classify", start, 0)
        return JSONResponse(
            {
                "object": "classification",
                "model": served.name,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: ``serve run serve.app:build_app models='{...}'`` or a config file.

    Args (from the config's ``args`` or the CLI): ``models`` ({name: dir}) or ``model_dir``,
    and optionally quantize, loader, max_batch_size, batch_wait_timeout_s, max_queue,
    request_timeout_s, max_context, max_tokens_limit.
    """
    args = dict(args)
    models = args.pop("models", None)
    if isinstance(models, str):
        models = json.loads(models)
    if models is None and "model_dir" in args:
        models = {"default": args.pop("model_dir")}
    return BloomServer.bind(models=models or {}, **args)
