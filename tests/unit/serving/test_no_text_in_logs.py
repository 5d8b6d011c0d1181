"""Request logs and metrics never carry prompt or completion text: the 500 handler's log line
(run, no Ray), and every log/print call, metric tag and vLLM's request logging (read from the
source of ``bloomray/serving``, since the rest needs a Ray cluster and an engine)."""

from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

from starlette.requests import Request

from bloomray.serving import http

SERVING = Path(http.__file__).resolve().parent
SECRET = "my card is 4111 1111 1111 1111, reply to jane@example.com"
# Names that hold request or response text in serving/ (bodies, prompts, messages, chunks).
TEXT_NAMES = {
    "body", "raw", "req", "engine_req", "prompt", "prompts", "messages", "text", "texts", "content",
    "completion", "choices", "chunk", "chunks", "item", "first", "data",
}  # fmt: skip
LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node


def _is_log_call(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id == "print"
    return (
        isinstance(f, ast.Attribute)
        and f.attr in LOG_METHODS
        and isinstance(f.value, ast.Name)
        and (f.value.id in {"log", "logger", "logging", "warnings"})
    )


def test_the_500_handler_logs_the_stack_but_never_the_message(caplog):
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
    try:
        raise ValueError(SECRET)
    except ValueError as exc:
        error = exc
    with caplog.at_level(logging.DEBUG, logger="bloomray.serving.http"):
        response = asyncio.run(http._unexpected(Request(scope), error))
    assert response.status_code == 500 and b"jane" not in response.body
    (record,) = [r for r in caplog.records if r.name == "bloomray.serving.http"]
    logged = record.getMessage() + (record.exc_text or "")
    assert "ValueError" in logged and "/v1/completions" in logged and "test_no_text_in_logs.py" in logged
    assert "jane" not in logged and "4111" not in logged and record.exc_info is None


def test_no_log_or_print_call_in_serving_takes_request_text():
    offenders = []
    for path in sorted(SERVING.glob("*.py")):
        for call in filter(_is_log_call, _calls(path)):
            args = [*call.args, *(k.value for k in call.keywords)]
            names = {n.id for a in args for n in ast.walk(a) if isinstance(n, ast.Name)}
            attrs = {n.attr for a in args for n in ast.walk(a) if isinstance(n, ast.Attribute)}
            if (names | attrs) & TEXT_NAMES or any(k.arg == "exc_info" for k in call.keywords):
                offenders.append(f"{path.name}:{call.lineno}")
            if isinstance(call.func, ast.Attribute) and call.func.attr == "exception":
                offenders.append(f"{path.name}:{call.lineno} (log.exception logs the message)")
    assert not offenders, f"log calls that may write request text: {offenders}"


def test_metric_tags_are_route_and_status_code_only():
    tags = set()
    for call in _calls(SERVING / "metrics.py"):
        for k in call.keywords:
            if k.arg == "tag_keys":
                tags |= set(ast.literal_eval(k.value))
    assert tags == {"route", "code"}
    for path in sorted(SERVING.glob("*.py")):  # every tags={...} value is a route or a status code
        for call in _calls(path):
            for k in call.keywords:
                if k.arg == "tags" and isinstance(k.value, ast.Dict):
                    assert {ast.literal_eval(key) for key in k.value.keys} <= {"route", "code"}


def test_vllm_request_logging_is_pinned_off():
    module = ast.parse((SERVING / "engines.py").read_text())
    pinned = [
        v.value
        for d in ast.walk(module)
        if isinstance(d, ast.Dict)
        for k, v in zip(d.keys, d.values, strict=True)
        if isinstance(k, ast.Constant) and k.value == "enable_log_requests" and isinstance(v, ast.Constant)
    ]
    assert pinned == [False]  # in llm_deployment's engine_kwargs
