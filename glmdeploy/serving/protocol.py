"""The OpenAI-compatible request bodies the server accepts, and its OpenAI-shaped errors.

Bodies are validated strictly (pydantic, no coercion of strings to numbers, unknown fields
refused): every bad request gets `{"error": {"message", "type", "param", "code"}}` with a 4xx
status, which the `openai` client turns into the matching exception (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 503 InternalServerError).
Parameters that OpenAI defines but this server does not implement (tools, logprobs, n > 1, …) are
refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# OpenAI parameters this server does not implement: a request using one gets 400 naming it.
UNSUPPORTED = frozenset((
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
    "logit_bias", "top_logprobs", "best_of", "echo", "suffix", "audio", "modalities", "prediction",
    "reasoning_effort", "service_tier", "store", "metadata", "web_search_options",
))  # fmt: skip
MAX_STOP_STRINGS = 4  # as OpenAI
_OWN_ERRORS = {"unsupported": "unsupported_value", "stop": "invalid_value"}  # error type -> code


class ApiError(Exception):
    """An error answered as OpenAI does: status, message, type, param, code (and headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise PydanticCustomError(
                "unsupported", "n={n}: this server returns one choice per request; n must be 1",
                {"n": n},
            )  # fmt: skip
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0):
            message = "presence and frequency penalties are not supported (only 0)"
            raise PydanticCustomError("unsupported", message)
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > MAX_STOP_STRINGS or not all(items):
            raise PydanticCustomError(
                "stop", f"at most {MAX_STOP_STRINGS} stop strings, none of them empty"
            )
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def requested_tokens(self) -> tuple[str, int | None]:
        """The parameter that asked for new tokens, and how many (None: not asked)."""
        return "max_tokens", self.max_tokens


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported", "logprobs are not supported")
        return value

    def requested_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise PydanticCustomError(
                "unsupported", "one prompt per request (a string, or a list of one string)"
            )
        return prompt

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise PydanticCustomError("unsupported", "logprobs are not supported")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def validation_error(errors: list[Any]) -> ApiError:
    """The first of pydantic's/FastAPI's validation errors as OpenAI's 400 (one per response)."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request.")
    if kind == "model_attributes_type" or not loc:
        return ApiError(400, "the request body must be a JSON object")
    param = ".".join(p for p in loc if not _is_type_name(p))
    name = loc[0]
    if kind == "extra_forbidden":
        what = "is not supported by this server" if name in UNSUPPORTED else "is not a parameter"
        return ApiError(400, f"{name} {what}", param=name, code="unsupported_parameter")
    if kind == "missing":
        return ApiError(400, f"{param} is required", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid"))
    if kind in _OWN_ERRORS:  # raised by the validators above: the message says it all
        return ApiError(400, message, param=param, code=_OWN_ERRORS[kind])
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _is_type_name(part: str) -> bool:
    """Union members appear in pydantic's error locations (`stop.str`, `content.list[TextPart]`)."""
    return part in ("str", "int", "float", "bool") or not part.replace("_", "").isalnum()
