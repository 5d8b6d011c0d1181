"""Request bodies (OpenAI-compatible fields, checked ranges) and the one error shape.

Every field that reaches the engine is range-checked here, so no value of one request can
make the engine fail the requests batched with it: out-of-range values are a 400 naming the
field. Unknown fields are a 400 too (a typo must not be silently ignored).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4
MAX_LOGPROBS = 5
MAX_SEED = 2**63 - 1


class _Sampling(BaseModel):
    """Sampling fields shared by completions and chat (OpenAI names and ranges)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # None: 16 for completions, the server limit for chat
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM extension, used by benchmarks that need a fixed output length.
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def sampling(self) -> dict[str, Any]:
        """The fields the engine request takes, unset ones left to its defaults."""
        return self.model_dump(exclude_none=True, exclude={"model"})


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo=true is not supported")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions`` (text messages; the model's own chat template)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str]:
        return [self.messages[-1].content]

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if out.pop("max_completion_tokens", None) is not None:  # the newer OpenAI name wins
            out["max_tokens"] = self.max_completion_tokens
        return out


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: labels with scores for each input."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not isinstance(t, str) or not t.strip() for t in items):
            raise ValueError("input must be a non-empty string or a non-empty list of non-empty strings")
        return v

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
    504: "timeout",
}


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(exc: Any) -> APIError:
    """A 400 naming the first invalid field of a pydantic ValidationError."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if p != "body"]
    # Union members add their type name to the location (e.g. prompt.str); keep field names.
    param = ".".join(p for p in loc if not p.startswith(("str", "list[", "int", "function"))) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f"unrecognized request argument: {param}"
    elif err["type"] == "missing":
        msg = f"missing required argument: {param}"
    elif param:
        msg = f"{param}: {msg}"
    return APIError(400, msg, param=param, code="invalid_value")
