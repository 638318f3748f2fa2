"""An OpenAI-compatible HTTP server over the serving engine (FastAPI + uvicorn).

Endpoints: POST /v1/completions and /v1/chat/completions (stream or not), GET /v1/models,
/health and /metrics (Prometheus text). Bad input gets a 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` and never disturbs other requests. A client that
goes away (mid-stream or while waiting for a non-streamed answer) has its request aborted, which
frees its KV pages.

`create_app(llm, ...)` builds the app (for tests or embedding); `serve(model, host, port, ...)` loads
a model and runs uvicorn (`jaxkv serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.serve.async_engine import AsyncEngine, EngineShutdownError, EngineStepError, RequestStream

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- request bodies ----------------------------------------------------------------------------
class _Body(BaseModel):
    # Unknown fields are errors (a typo must not silently change nothing); types are strict
    # ("5" is not an integer, true is not a number).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension: 0 (or -1) is off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, unused
    ignore_eos: bool = False  # extension (as vLLM's): generate exactly max_tokens, e.g. for benchmarks


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | bool | None = None  # the chosen tokens' logprobs; no alternatives (top_logprobs null)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted, unused by chat templates


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
    metadata: dict[str, str] | None = None  # accepted, unused
    service_tier: str | None = None  # accepted, unused
    safety_identifier: str | None = None  # accepted, unused
    prompt_cache_key: str | None = None  # accepted, unused (prefix caching is automatic)


# --- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


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


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
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
        return ApiError(400, f"the request body must be a JSON object ({first.get('msg', '')})",
                        code="invalid_type")
    messages = list(dict.fromkeys(e.get("msg", "") for e in errors if _param_path(e.get("loc", ())) == param))
    return ApiError(400, f"invalid value for {param!r}: {'; or '.join(messages)}", param, "invalid_type")


def _guess_param(message: str, prompt_param: str) -> str | None:
    for name in ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop"):
        if name in message:
            return name
    return prompt_param if "prompt" in message else None


# --- helpers -------------------------------------------------------------------------------------
def _byte_decoder():
    from jaxkv.tokenizer import _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}


class _TokenText:
    """A token's own bytes and display string (as OpenAI's logprobs show them), cached per id."""

    _BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        try:
            decoder = json.loads(tokenizer.hf.to_str()).get("decoder") or {}
        except Exception:  # noqa: BLE001 - an exotic tokenizer: fall back to decoding one token
            decoder = {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or ()}
        self.byte_level = "ByteLevel" in kinds
        self.metaspace = "Metaspace" in kinds or any(
            d.get("type") == "Replace" and "▁" in json.dumps(d) for d in decoder.get("decoders") or ())
        self.inverse = _byte_decoder() if self.byte_level else {}
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        if token_id not in self._cache:
            self._cache[token_id] = self._bytes(token_id)
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.hf.id_to_token(int(token_id))
        if piece is None:
            return b""
        if self.byte_level and all(c in self.inverse for c in piece):
            return bytes(self.inverse[c] for c in piece)
        match = self._BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if self.metaspace:
            return piece.replace("▁", " ").encode()
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="backslashreplace")


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _wait_disconnect(http: Request) -> None:
    while True:
        message = await http.receive()
        if message.get("type") == "http.disconnect":
            return


class _Generation:
    """One request's bookkeeping while it streams or is collected."""

    def __init__(self, server: _Server, request_id: str, logprobs: bool):
        self.server, self.request_id, self.want_logprobs = server, request_id, logprobs
        self.created = int(time.time())
        self.text = ""
        self.ids: list[int] = []  # generated ids with logprobs reported (EOS left out)
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def add(self, out) -> tuple[list[int], list[float]]:
        """Record an output; return the ids and logprobs it adds to the reported tokens."""
        ids, lps = list(out.token_ids), list(out.logprobs or [0.0] * len(out.token_ids))
        if out.finished and out.finish_reason == "stop" and ids and ids[-1] in self.server.eos_ids:
            ids, lps = ids[:-1], lps[:-1]  # the end-of-text token is not part of the text
        self.text += out.text
        self.ids += ids
        self.logprobs += lps
        if out.finished:
            self.finish_reason = out.finish_reason
        self.usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}
        return ids, lps

    def completion_logprobs(self, ids: list[int], lps: list[float]) -> dict:
        """OpenAI's completions logprobs for `ids`, the last len(ids) of self.ids."""
        start = len(self.ids) - len(ids)
        decode = self.server.llm.tokenizer.decode
        offsets = [min(len(decode(self.ids[:i])), len(self.text)) for i in range(start, len(self.ids))]
        return {"tokens": [self.server.token_text.text(i) for i in ids], "token_logprobs": lps,
                "top_logprobs": None, "text_offset": offsets}

    def chat_logprobs(self, ids: list[int], lps: list[float]) -> dict:
        tt = self.server.token_text
        return {"content": [{"token": tt.text(i), "logprob": lp, "bytes": list(tt.bytes(i)), "top_logprobs": []}
                            for i, lp in zip(ids, lps)]}


# --- the app -----------------------------------------------------------------------------------
class _Server:
    def __init__(self, llm, engine: AsyncEngine, model_name: str, capacity: int):
        self.llm, self.engine, self.model_name = llm, engine, model_name
        self.eos_ids = frozenset(llm.tokenizer.eos_ids)
        self.capacity = capacity  # tokens one request may hold in the page pool
        self.token_text = _TokenText(llm.tokenizer)
        self.started = int(time.time())

    async def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of a prompt (chat: already templated); long texts off the event loop."""
        def run():
            return self.llm.tokenizer.encode(text, add_special_tokens=False) if chat else self.llm.encode(text)

        return run() if len(text) < 20_000 else await asyncio.to_thread(run)

    def check_common(self, body: _Sampling) -> None:
        if body.model is not None and body.model != self.model_name:
            raise ApiError(404, f"The model '{body.model}' does not exist (this server serves "
                                f"'{self.model_name}')", "model", "model_not_found")
        if body.n is not None and body.n != 1:
            raise ApiError(400, "only n=1 is supported", "n", "unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported (only 0)", name, "unsupported_value")
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias", "unsupported_value")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")

    def make_request(self, prompt_ids: list[int], body: _Sampling, max_tokens: int | None, default_max: int | None,
                     logprobs: bool, prefix: str, prompt_param: str):
        from jaxkv.serve.engine import Request

        n = len(prompt_ids)
        context = self.engine.max_context
        if n == 0:
            raise ApiError(400, "the prompt is empty (it tokenized to zero tokens)", prompt_param, "invalid_value")
        if n >= context:
            raise ApiError(400, f"the prompt has {n} tokens; this model's context is {context} tokens, "
                                f"prompt and completion together", prompt_param, "context_length_exceeded")
        if max_tokens is None:
            room = min(context, self.llm.config.max_seq_len, self.capacity) - n
            max_tokens = max(1, room if default_max is None else min(default_max, room))
        elif max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens",
                           "integer_below_min_value")
        elif n + max_tokens > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {n} and max_tokens "
                                f"asks for {max_tokens} more", "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", "stop", "invalid_value")
        top_k = body.top_k if body.top_k is not None else 0
        if top_k == -1:
            top_k = 0
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        try:
            sampling = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                      top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p, seed=seed)
        except JaxkvError as e:
            raise ApiError(400, str(e), _guess_param(str(e), prompt_param), "invalid_value") from None
        extra = {"ignore_eos": True} if body.ignore_eos else {}
        return Request(prompt_ids=list(prompt_ids), sampling=sampling, max_tokens=max_tokens, stop=tuple(stop),
                       logprobs=logprobs, request_id=f"{prefix}-{uuid.uuid4().hex}", **extra)

    async def submit(self, request, prompt_param: str) -> RequestStream:
        try:
            return await self.engine.submit(request)
        except JaxkvError as e:
            raise ApiError(400, str(e), _guess_param(str(e), prompt_param), "invalid_value") from None
        except EngineShutdownError as e:
            raise ApiError(503, str(e), type_="server_error", code="unavailable") from None

    async def collect(self, stream: RequestStream, gen: _Generation, http: Request) -> bool:
        """Read the whole stream into gen; False if the client went away first (the request is aborted)."""
        async def consume():
            async for out in stream:
                gen.add(out)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_disconnect(http))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not consumer.done():
                consumer.cancel()
            stream.abort()
        if consumer.cancelled():
            return False
        try:
            consumer.result()  # an engine failure raises here
        except EngineStepError as e:
            raise ApiError(500, str(e), type_="server_error", code="engine_error") from None
        except EngineShutdownError as e:
            raise ApiError(503, str(e), type_="server_error", code="unavailable") from None
        return True

    def streaming_response(self, events: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
        # The background abort covers a client that leaves before the body iterator even starts.
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(stream.abort))


def _server_error(e: BaseException) -> dict:
    return ApiError(500, str(e) or type(e).__name__, type_="server_error", code="internal_error").body()


def create_app(llm, *, model_name: str | None = None, max_batch: int = 8, page_size: int = 16,
               num_pages: int | None = None, kv_dtype: str | None = None, prefill_chunk: int = 64,
               prefill_budget: int | None = None, prefix_caching: bool = True, max_context: int | None = None,
               warmup: bool = True, engine=None) -> FastAPI:
    """The FastAPI app serving `llm` (a `jaxkv.load` result) under `model_name`.

    Builds an `Engine` with the given options (or uses `engine`; max_context caps a request's prompt +
    completion below the model's context), compiles it ahead of the first request when `warmup`, and
    runs it on a background thread that stops with the app.
    """
    if engine is None:
        from jaxkv.serve.engine import Engine

        extra = {} if max_context is None else {"max_context": max_context}
        engine = Engine(llm, max_batch=max_batch, page_size=page_size, num_pages=num_pages, kv_dtype=kv_dtype,
                        prefill_chunk=prefill_chunk, prefill_budget=prefill_budget, prefix_caching=prefix_caching,
                        **extra)
    if warmup and hasattr(engine, "warmup"):
        engine.warmup()
    start = engine.metrics()
    capacity = int(start.get("kv_pages_total", 0)) * getattr(engine, "page_size", page_size) or engine.max_context
    server = _Server(llm, AsyncEngine(engine), model_name or llm.config.name, capacity)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.shutdown)

    app = FastAPI(title="jaxkv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.engine = server.engine

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return JSONResponse(_server_error(exc), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        server.check_common(body)
        if body.echo:
            raise ApiError(400, "echo is not supported", "echo", "unsupported_value")
        if body.best_of not in (None, 1):
            raise ApiError(400, "only best_of=1 is supported", "best_of", "unsupported_value")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", "suffix", "unsupported_value")
        if isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool) and not 0 <= body.logprobs <= 20:
            raise ApiError(400, f"logprobs must be between 0 and 20, got {body.logprobs}", "logprobs", "invalid_value")
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request: got a list of {len(prompt)}", "prompt",
                               "unsupported_value")
            prompt = prompt[0]
        want_logprobs = body.logprobs is not None and body.logprobs is not False
        request = server.make_request(await server.encode(prompt), body, body.max_tokens, DEFAULT_COMPLETION_TOKENS,
                                      want_logprobs, "cmpl", "prompt")
        return await _respond(server, request, "prompt", body, http, _completion_events, "text_completion",
                              lambda gen: {"index": 0, "text": gen.text, "finish_reason": gen.finish_reason,
                                           "logprobs": gen.completion_logprobs(gen.ids, gen.logprobs)
                                           if want_logprobs else None})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        server.check_common(body)
        if body.top_logprobs:
            raise ApiError(400, "top_logprobs > 0 is not supported (the chosen tokens' logprobs are)",
                           "top_logprobs", "unsupported_value")
        if body.tools:
            raise ApiError(400, "tools are not supported", "tools", "unsupported_value")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree: give one", "max_tokens",
                           "invalid_value")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            prompt = llm.tokenizer.apply_chat_template(messages)
        except JaxkvError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        ids = await server.encode(prompt, chat=True)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        want_logprobs = bool(body.logprobs)
        request = server.make_request(ids, body, max_tokens, None, want_logprobs, "chatcmpl", "messages")
        return await _respond(server, request, "messages", body, http, _chat_events, "chat.completion",
                              lambda gen: {"index": 0, "message": {"role": "assistant", "content": gen.text},
                                           "finish_reason": gen.finish_reason,
                                           "logprobs": gen.chat_logprobs(gen.ids, gen.logprobs)
                                           if want_logprobs else None})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != server.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return _model_card(server)

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return JSONResponse({"status": "error", "detail": "the engine is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(await server.engine.ametrics()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _respond(server: _Server, request, prompt_param: str, body, http: Request, events, kind: str, choice_of):
    """Submit, then stream events (stream=true) or collect the whole completion into one response body."""
    stream = await server.submit(request, prompt_param)
    gen = _Generation(server, request.request_id, request.logprobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return server.streaming_response(events(server, stream, gen, include_usage), stream)
    if not await server.collect(stream, gen, http):
        return Response(status_code=499)
    return {"id": gen.request_id, "object": kind, "created": gen.created, "model": server.model_name,
            "system_fingerprint": None, "choices": [choice_of(gen)], "usage": gen.usage}


def _model_card(server: _Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.started, "owned_by": "jaxkv",
            "max_model_len": server.engine.max_context}


async def _events(server: _Server, stream: RequestStream, gen: _Generation, include_usage: bool, kind: str,
                  choices_of, opening: tuple = ()) -> AsyncIterator[str]:
    """Server-sent events for both endpoints: `opening` chunks, then `choices_of(out, ids, logprobs)`'s chunks per
    engine output, the usage chunk when asked, errors in-band once the stream has begun, and [DONE]."""
    def chunk(choices: list, usage=None) -> str:
        out = {"id": gen.request_id, "object": kind, "created": gen.created, "model": server.model_name,
               "system_fingerprint": None, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return _sse(out)

    try:
        for choices in opening:
            yield chunk(choices)
        async for out in stream:
            ids, lps = gen.add(out)
            for choices in choices_of(out, ids, lps):
                yield chunk(choices)
        if include_usage:
            yield chunk([], gen.usage)
    except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band
        yield _sse(_server_error(e))
    finally:
        stream.abort()
    yield _sse("[DONE]")


def _completion_events(server: _Server, stream: RequestStream, gen: _Generation,
                       include_usage: bool) -> AsyncIterator[str]:
    def choices_of(out, ids, lps):
        if out.text or out.finished or (gen.want_logprobs and ids):
            lp = gen.completion_logprobs(ids, lps) if gen.want_logprobs else None
            yield [{"index": 0, "text": out.text, "logprobs": lp,
                    "finish_reason": out.finish_reason if out.finished else None}]

    return _events(server, stream, gen, include_usage, "text_completion", choices_of)


def _chat_events(server: _Server, stream: RequestStream, gen: _Generation,
                 include_usage: bool) -> AsyncIterator[str]:
    def choices_of(out, ids, lps):
        if out.text or (gen.want_logprobs and ids):
            lp = gen.chat_logprobs(ids, lps) if gen.want_logprobs else None
            yield [{"index": 0, "delta": {"content": out.text}, "logprobs": lp, "finish_reason": None}]
        if out.finished:
            yield [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}]

    opening = ([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],)
    return _events(server, stream, gen, include_usage, "chat.completion.chunk", choices_of, opening)


# --- Prometheus ----------------------------------------------------------------------------------
_PROMETHEUS = [
    # (metric, engine key, type, help)
    ("jaxkv_requests_running", "running", "gauge", "Requests holding a decode slot."),
    ("jaxkv_requests_waiting", "waiting", "gauge", "Requests queued for a slot or for KV pages."),
    ("jaxkv_kv_pages_used", "kv_pages_used", "gauge", "KV cache pages referenced by requests."),
    ("jaxkv_kv_pages_free", "kv_pages_free", "gauge", "KV cache pages free (including idle prefix-cache pages)."),
    ("jaxkv_kv_pages_total", "kv_pages_total", "gauge", "KV cache pages in the pool."),
    ("jaxkv_prefix_cache_hit_rate", "prefix_cache_hit_rate", "gauge",
     "Fraction of prompt tokens served from the prefix cache."),
    ("jaxkv_tokens_per_second", "tokens_per_s", "gauge", "Generated tokens per second over the last seconds."),
    ("jaxkv_prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens of admitted requests."),
    ("jaxkv_generation_tokens_total", "generation_tokens_total", "counter", "Tokens generated."),
    ("jaxkv_compilations_total", "compilations", "counter", "XLA compilations by the engine."),
    ("jaxkv_engine_step_errors_total", "step_errors", "counter", "Engine steps that raised."),
]


def prometheus_text(metrics: dict) -> str:
    lines = []
    for name, key, kind, help_text in _PROMETHEUS:
        if key not in metrics:
            continue
        value = float(metrics[key])
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name} {int(value) if value.is_integer() else repr(value)}"]
    return "\n".join(lines) + "\n"


# --- running it ----------------------------------------------------------------------------------
def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise JaxkvError(f"port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise JaxkvError(f"cannot resolve host {host!r}: {e}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise JaxkvError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model: str = "smollm2-135m", host: str = "127.0.0.1", port: int = 8000, *, dtype: str | None = None,
          kv_dtype: str | None = None, page_size: int = 16, num_pages: int | None = None, max_batch: int = 8,
          prefill_chunk: int = 64, prefill_budget: int | None = None, prefix_caching: bool = True,
          max_context: int | None = None, streaming_window: int | None = None, sinks: int = 4, mesh: str | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Load `model` and serve it over HTTP until interrupted (the `jaxkv serve` command); `mesh` as in
    `jaxkv.load`."""
    import uvicorn

    import jaxkv

    if max_batch < 1:
        raise JaxkvError(f"max_batch must be at least 1, got {max_batch}")
    if num_pages is not None and num_pages < 1:
        raise JaxkvError(f"num_pages must be at least 1, got {num_pages}")
    sock = _listen(host, port)  # before loading: a busy port fails at once
    try:
        llm = jaxkv.load(model, dtype=dtype, kv_dtype=kv_dtype, page_size=page_size,
                         streaming_window=streaming_window, sinks=sinks, mesh=mesh)
        if model_name is None:
            model_name = model if not os.path.exists(os.path.expanduser(model)) else (
                llm.config.name if llm.config.name != "custom" else os.path.basename(os.path.normpath(model)))
        app = create_app(llm, model_name=model_name, max_batch=max_batch, page_size=page_size, num_pages=num_pages,
                         kv_dtype=kv_dtype, prefill_chunk=prefill_chunk, prefill_budget=prefill_budget,
                         prefix_caching=prefix_caching, max_context=max_context)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        host_shown, port_shown = sock.getsockname()[:2]
        print(f"jaxkv: serving {model_name} at http://{host_shown}:{port_shown}/v1 (max_batch {max_batch}, "
              f"page_size {page_size}, context {app.state.engine.max_context})", file=sys.stderr, flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
