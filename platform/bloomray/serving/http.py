"""The FastAPI app of the ingress and its error handlers: one OpenAI-style error shape for
every status, unknown routes and backpressure included, and never a stack trace."""

from __future__ import annotations

import logging
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from starlette.exceptions import HTTPException

from bloomray.serving.schema import APIError, validation_error

log = logging.getLogger(__name__)
api = FastAPI(title="bloomray", docs_url=None, redoc_url=None, openapi_url=None)


def _json_error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _json_error(exc)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405) keep the one error shape.
    msg = f"{request.method} {request.url.path}: {exc.detail}"
    return _json_error(APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None))


@api.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _json_error(validation_error(exc))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The replica log gets the type and the stack, not the message: an exception's text can
    # quote a prompt or a completion. The client gets neither.
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unhandled %s on %s\n%s", type(exc).__name__, request.url.path, stack)
    return _json_error(APIError(500, "internal server error", code="internal_error"))


# A full downstream queue, a deployment being replaced, or a replica that died mid-request:
# the client may retry (503 + Retry-After), never a 500 or a trace.
UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, RayServeException, RayActorError)


def unavailable(exc: Exception) -> APIError:
    return APIError(
        503,
        f"model deployment unavailable ({type(exc).__name__}); retry shortly",
        code="unavailable",
        headers={"Retry-After": "1"},
    )
