"""What the ingress checks before a request reaches an engine: key, body, model, limits, and
admission by the work a request brings (prompts x n), each failure an :class:`APIError`."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from bloomray.serving.auth import check_key
from bloomray.serving.metrics import ServeMetrics
from bloomray.serving.options import ServeOptions
from bloomray.serving.schema import APIError, ChatRequest, CompletionRequest, validation_error


class RequestChecks:
    """Mixed into the ingress, which sets these attributes at replica start."""

    keys: set[str]
    opts: ServeOptions
    models: dict[str, dict[str, Any]]
    default: str
    inflight: int
    metrics: ServeMetrics

    def _auth(self, request: Request) -> None:
        if not check_key(request.headers.get("authorization"), self.keys):
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    async def _body(self, request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.opts.max_body_bytes:
            raise self._too_large(int(declared))
        raw = await request.body()
        if len(raw) > self.opts.max_body_bytes:
            raise self._too_large(len(raw))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None

    def _too_large(self, size: int) -> APIError:
        return APIError(
            413,
            f"request body of {size} bytes is above this server's limit of {self.opts.max_body_bytes}",
            code="body_too_large",
        )

    def _model(self, name: str | None, task: str) -> str:
        name = name or self.default
        if name not in self.models:
            raise APIError(
                404,
                f"model {name!r} is not served; GET /v1/models lists {list(self.models)}",
                param="model",
                code="model_not_found",
            )
        if self.models[name]["task"] != task:
            hint = "POST /v1/classify" if task == "causal_lm" else "POST /v1/completions"
            what = "a classifier" if task == "causal_lm" else "a causal LM, not a classifier"
            raise APIError(
                400, f"model {name!r} is {what}: use {hint}", param="model", code="wrong_model_task"
            )
        return name

    def _limits(self, req: CompletionRequest | ChatRequest, default_tokens: int) -> None:
        prompts = len(req.prompts())
        if prompts > self.opts.max_prompts:
            raise APIError(
                400, f"{prompts} prompts in one request; the limit is {self.opts.max_prompts}", param="prompt"
            )
        if req.n > self.opts.max_n:
            raise APIError(400, f"n={req.n} is above this server's limit of {self.opts.max_n}", param="n")
        wanted = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_tokens
        if wanted > self.opts.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens={wanted} is above this server's limit of {self.opts.max_tokens_limit}",
                param="max_tokens",
                code="invalid_value",
            )

    @contextmanager
    def _admit(self, units: int):
        """Hold ``units`` of work (prompts x n) or answer 503 when the replica is full."""
        if self.inflight + units > self.opts.max_queue:
            raise APIError(
                503,
                f"server busy: {self.inflight} prompts in flight on this replica; retry shortly",
                "server_overloaded",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.inflight += units
        self.metrics.queue.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= units
            self.metrics.queue.set(self.inflight)

    def _timeout(self) -> APIError:
        return APIError(504, f"generation took longer than {self.opts.request_timeout_s}s", code="timeout")
