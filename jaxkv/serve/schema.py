"""The HTTP API's request bodies (pydantic, strict) and OpenAI's error body, shared by the server and its guard.

Bodies check types, shapes and sizes of free text; the values that depend on the model (ranges, lengths in
tokens, stop strings) are checked once, by the engine (`jaxkv.serve.requests.validate`). Every string must be
encodable as UTF-8: a JSON escape like "\\ud800" (a lone surrogate) is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from jaxkv.errors import DeadlineExceeded, InvalidRequest, JaxkvError, QueueFull, check_text
from jaxkv.serve.async_engine import EngineShutdownError, EngineStepError


def _encodable(text: str) -> str:
    try:
        return check_text(text, "the text")
    except InvalidRequest as e:
        raise PydanticCustomError("invalid_encoding", str(e)) from None


Text = Annotated[str, AfterValidator(_encodable)]


def _short(n: int):
    return Annotated[str, StringConstraints(max_length=n), AfterValidator(_encodable)]


# --- request bodies ----------------------------------------------------------------------------
class _Body(BaseModel):
    # Unknown fields are errors (a typo must not silently change nothing); types are strict
    # ("5" is not an integer, true is not a number).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: _short(1024) | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension: 0 (or -1) is off
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[Text, float] | None = None
    user: _short(1024) | None = None  # accepted, unused
    ignore_eos: bool = False  # extension (as vLLM's): generate exactly max_tokens, e.g. for benchmarks
    # extension: tokens proposed per step for this request, up to the server's --speculative K (0: none)
    num_speculative_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text]
    logprobs: int | bool | None = None  # the chosen tokens' logprobs; no alternatives (top_logprobs null)
    echo: bool | None = None
    best_of: int | None = None
    suffix: Text | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: _short(256) | None = None  # accepted, unused by chat templates


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None  # accepted, unused (no tools)
    store: bool | None = None  # accepted, unused
    # accepted, unused; OpenAI's own limits: 16 pairs, keys of 64 characters, values of 512
    metadata: Annotated[dict[_short(64), _short(512)], Field(max_length=16)] | None = None
    service_tier: _short(64) | None = None  # accepted, unused
    safety_identifier: _short(1024) | None = None  # accepted, unused
    prompt_cache_key: _short(1024) | None = None  # accepted, unused (prefix caching is automatic)


# --- errors ------------------------------------------------------------------------------------
class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote a client's text, lone surrogates included."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}
_CODES = {"invalid_encoding": "invalid_encoding", "string_unicode": "invalid_encoding",
          "string_too_long": "string_above_max_length",
          "too_long": "array_above_max_length"}  # pydantic's error type -> OpenAI's code


def _param_path(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content' (union member tags dropped)."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or not part.isidentifier():
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first of pydantic's errors as OpenAI's 400, naming the field."""
    errors = list(exc.errors())
    if not errors:
        return ApiError(400, "invalid request body")
    first = next((e for e in errors if e.get("type") in _CODES), errors[0])  # the telling one, else the first
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('msg', '')})", code="invalid_json")
    param = _param_path(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first.get("type") == "missing":
        if param is None:
            return ApiError(400, "the request needs a JSON object body", code="missing_body")
        return ApiError(400, f"missing required parameter: {param}", param, "missing_required_parameter")
    if param is None:
        if first.get("type") == "string_unicode":  # e.g. a lone surrogate in a field's name
            return ApiError(400, "the request body holds text that is not valid Unicode (a lone surrogate)",
                            code="invalid_encoding")
        return ApiError(400, f"the request body must be a JSON object ({first.get('msg', '')})",
                        code="invalid_type")
    same = [e for e in errors if _param_path(e.get("loc", ())) == param]
    telling = [e for e in same if e.get("type") in _CODES] or same  # (not the other union members' complaints)
    code = _CODES.get(telling[0].get("type"), "invalid_type")
    messages = list(dict.fromkeys(e.get("msg", "") for e in telling))
    return ApiError(400, f"invalid value for {param!r}: {'; or '.join(messages)}", param, code)


def api_error(e: BaseException, prompt_param: str = "prompt") -> ApiError:
    """The HTTP answer to an exception from the engine: 4xx for what the client can change, 5xx for ours."""
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e), prompt_param if e.param == "prompt" else e.param, e.code)
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, DeadlineExceeded):
        return ApiError(408, str(e), code="request_timeout")
    if isinstance(e, JaxkvError):
        return ApiError(400, str(e), code="invalid_value")
    if isinstance(e, EngineShutdownError):
        return ApiError(503, str(e), type_="server_error", code="unavailable")
    if isinstance(e, EngineStepError):
        return ApiError(500, str(e), type_="server_error", code="engine_error")
    return ApiError(500, str(e) or type(e).__name__, type_="server_error", code="internal_error")
