"""An OpenAI-compatible HTTP server over the serving engine (FastAPI + uvicorn).

Endpoints: POST /v1/completions and /v1/chat/completions (stream or not), GET /v1/models,
/health, /metrics (Prometheus text) and /openapi.json. Bad input gets a 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` and never disturbs other requests. A client that
goes away (mid-stream or while waiting for a non-streamed answer) has its request aborted, which
frees its KV pages.

What one request may cost is bounded (`Limits`): the body (413, checked by `guard.Guard` with the Host
header and the optional API key), the prompt's characters before it is tokenized (off the event loop),
chat messages, stop strings, the queue (429 with Retry-After) and a deadline (408).

`create_app(llm, ...)` builds the app (for tests or embedding); `serve(model, host, port, ...)` loads
a model and runs uvicorn (`jaxkv serve`). Request bodies and the mapping of errors to answers live in
`schema`, the events and logprobs of a response in `events`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import secrets
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxkv.errors import DeadlineExceeded, InvalidRequest, JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.serve.async_engine import AsyncEngine, EngineShutdownError, EngineStepError, RequestStream
from jaxkv.serve.guard import LOOPBACK_HOSTS, Guard, IdleTimeoutH11
from jaxkv.serve.metrics import prometheus_text
from jaxkv.serve.requests import Limits
from jaxkv.serve.events import Generation, chat_events, completion_events
from jaxkv.serve.schema import (AsciiJSONResponse, ApiError, ChatCompletionRequest, CompletionRequest, api_error,
                                validation_error)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- helpers -------------------------------------------------------------------------------------
async def _wait_disconnect(http: Request) -> None:
    while True:
        message = await http.receive()
        if message.get("type") == "http.disconnect":
            return


class _Server:
    def __init__(self, llm, engine: AsyncEngine, model_name: str, capacity: int, limits: Limits):
        self.llm, self.engine, self.model_name, self.limits = llm, engine, model_name, limits
        self.eos_ids = frozenset(llm.tokenizer.eos_ids)
        self.capacity = capacity  # tokens one request may hold in the page pool
        self.max_prompt_chars = limits.prompt_chars(engine.engine.max_prompt)
        self.started = int(time.time())
        self.rejected: collections.Counter[str] = collections.Counter()  # 4xx answers by error code

    async def encode(self, text: str, param: str) -> list[int]:
        """Token ids of a completion prompt, after its length in characters is checked; off the event loop."""
        self.check_chars(len(text), param)
        return await asyncio.to_thread(self.llm.encode, text)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of chat messages through the chat template (off the event loop: both cost time)."""
        if len(messages) > self.limits.max_messages:
            raise ApiError(400, f"at most {self.limits.max_messages} messages per request, got {len(messages)}",
                           "messages", "array_above_max_length")
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        tokenizer = self.llm.tokenizer

        def run():
            return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)

        try:
            return await asyncio.to_thread(run)
        except JaxkvError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None

    def check_chars(self, n: int, param: str) -> None:
        if n > self.max_prompt_chars:
            raise ApiError(400, f"the prompt has {n} characters; this server takes at most {self.max_prompt_chars}",
                           param, "string_above_max_length")

    def check_common(self, body) -> None:
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

    def make_request(self, prompt_ids: list[int], body, max_tokens: int | None, default_max: int | None,
                     logprobs: bool, prefix: str, prompt_param: str):
        """The engine's Request for a body; its values are validated where every request is, in `engine.add`."""
        from jaxkv.serve.engine import Request

        if max_tokens is None:  # as much as fits (the engine refuses a prompt that leaves no room)
            room = min(self.engine.max_context, self.llm.config.max_seq_len, self.capacity) - len(prompt_ids)
            max_tokens = max(1, room if default_max is None else min(default_max, room))
        top_k = 0 if body.top_k in (None, -1) else body.top_k
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        try:
            sampling = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                                      top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p, seed=seed)
        except InvalidRequest as e:
            raise api_error(e, prompt_param) from None
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return Request(prompt_ids=list(prompt_ids), sampling=sampling, max_tokens=max_tokens, stop=stop,
                       logprobs=logprobs, ignore_eos=body.ignore_eos, request_id=f"{prefix}-{uuid.uuid4().hex}",
                       num_speculative_tokens=body.num_speculative_tokens)

    async def submit(self, request, prompt_param: str) -> RequestStream:
        try:
            return await self.engine.submit(request)
        except (JaxkvError, EngineShutdownError) as e:
            raise api_error(e, prompt_param) from None

    async def collect(self, stream: RequestStream, gen: Generation, http: Request) -> bool:
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
            consumer.result()  # an engine failure or the deadline raises here
        except (EngineStepError, EngineShutdownError, DeadlineExceeded) as e:
            raise api_error(e) from None
        return True

    def streaming_response(self, events: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
        # The background abort covers a client that leaves before the body iterator even starts.
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(stream.abort))


def create_app(llm, *, model_name: str | None = None, max_batch: int = 8, page_size: int | None = None,
               num_pages: int | None = None, kv_dtype: str | None = None, prefill_chunk: int = 64,
               prefill_budget: int | None = None, prefix_caching: bool = True, max_context: int | None = None,
               limits: Limits | None = None, api_key: str | None = None,
               allowed_hosts: tuple[str, ...] | None = None, warmup: bool = True, engine=None,
               window_pages: bool = True) -> FastAPI:
    """The FastAPI app serving `llm` (a `jaxkv.load` result) under `model_name`, behind `guard.Guard`.

    Builds an `Engine` with the given options (or uses `engine`; max_context caps a request's prompt +
    completion below the model's context), compiles it ahead of the first request when `warmup`, and
    runs it on a background thread that stops with the app. `limits` bounds each request's cost;
    `api_key` (if set) is required on /v1; `allowed_hosts` (None: any) are the Host names answered.
    window_pages=False gives window layers full tables, and so the prefix cache (see `Engine`). page_size and
    kv_dtype default to the llm's.
    """
    limits = limits or Limits()
    if engine is None:
        from jaxkv.serve.engine import Engine

        extra = {} if max_context is None else {"max_context": max_context}
        engine = Engine(llm, max_batch=max_batch, page_size=page_size or llm.page_size, num_pages=num_pages,
                        kv_dtype=kv_dtype or llm.kv_dtype,
                        prefill_chunk=prefill_chunk, prefill_budget=prefill_budget, prefix_caching=prefix_caching,
                        limits=limits, window_pages=window_pages, eviction=llm.eviction,
                        speculative=llm.speculative, **extra)
    if warmup and hasattr(engine, "warmup"):
        engine.warmup()
    start = engine.metrics()
    capacity = int(start.get("kv_pages_total", 0)) * getattr(engine, "page_size", page_size) or engine.max_context
    server = _Server(llm, AsyncEngine(engine), model_name or llm.config.name, capacity, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.engine.shutdown)

    app = FastAPI(title="jaxkv", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=AsciiJSONResponse)
    app.state.server = server
    app.state.engine = server.engine

    def answer(error: ApiError):
        if error.status < 500 and error.status != 408:  # (408: a request that ran out of time, not a refusal)
            server.rejected[error.code or "invalid_request"] += 1
        return error.response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return answer(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return answer(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return answer(api_error(exc))

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
        request = server.make_request(await server.encode(prompt, "prompt"), body, body.max_tokens,
                                      DEFAULT_COMPLETION_TOKENS, want_logprobs, "cmpl", "prompt")
        return await _respond(server, request, "prompt", body, http, completion_events, "text_completion",
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
        ids = await server.encode_chat(messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        want_logprobs = bool(body.logprobs)
        request = server.make_request(ids, body, max_tokens, None, want_logprobs, "chatcmpl", "messages")
        return await _respond(server, request, "messages", body, http, chat_events, "chat.completion",
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
            return AsciiJSONResponse({"status": "error", "detail": "the engine is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(await server.engine.ametrics(), server.rejected),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, api_key=api_key, allowed_hosts=allowed_hosts,
                       on_reject=lambda code: server.rejected.update([code]))
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxkv")
    except PackageNotFoundError:
        return "0"


async def _respond(server: _Server, request, prompt_param: str, body, http: Request, events, kind: str, choice_of):
    """Submit, then stream events (stream=true) or collect the whole completion into one response body."""
    stream = await server.submit(request, prompt_param)
    gen = Generation(server.llm.tokenizer, server.eos_ids, request.request_id, request.logprobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return server.streaming_response(events(server.model_name, stream, gen, include_usage), stream)
    if not await server.collect(stream, gen, http):
        return Response(status_code=499)
    return {"id": gen.request_id, "object": kind, "created": gen.created, "model": server.model_name,
            "system_fingerprint": None, "choices": [choice_of(gen)], "usage": gen.usage}


def _model_card(server: _Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.started, "owned_by": "jaxkv",
            "max_model_len": server.engine.max_context}


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


def access(host: str, api_key: str | None, allowed_hosts: tuple[str, ...] | None):
    """(api key, allowed Host names, a warning or None) for a server bound to `host`: the key defaults to
    $JAXKV_API_KEY, the names to the loopback ones on a loopback address (else any)."""
    api_key = api_key or os.environ.get("JAXKV_API_KEY") or None
    loopback = _is_loopback(host)
    if allowed_hosts is None and loopback:
        allowed_hosts = LOOPBACK_HOSTS
    warning = None if api_key or loopback else (
        f"jaxkv: warning: serving on {host} without an API key: anyone who can reach this machine can use it "
        f"(set --api-key or JAXKV_API_KEY)")
    return api_key, allowed_hosts, warning


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(model: str = "smollm2-135m", host: str = "127.0.0.1", port: int = 8000, *, dtype: str | None = None,
          kv_dtype: str | None = None, page_size: int | None = None, num_pages: int | None = None, max_batch: int = 8,
          prefill_chunk: int = 64, prefill_budget: int | None = None, prefix_caching: bool = True,
          max_context: int | None = None, streaming_window: int | None = None, sinks: int = 4, mesh: str | None = None,
          model_name: str | None = None, log_level: str = "info", limits: Limits | None = None,
          api_key: str | None = None, allowed_hosts: tuple[str, ...] | None = None,
          timeout_keep_alive: int = 5, kv_rotate: bool = False, window_pages: bool = True,
          kv_budget: int | None = None, eviction: str | None = None, eviction_window: int | None = None,
          eviction_sinks: int = 0, kv_recent: int | None = None, speculative: str | None = None) -> None:
    """Load `model` and serve it over HTTP until interrupted (the `jaxkv serve` command); `mesh` as in
    `jaxkv.load`. api_key defaults to $JAXKV_API_KEY; allowed_hosts to the loopback names when `host` is a
    loopback address (else any). A connection with no request under way for timeout_keep_alive s is closed."""
    import uvicorn

    import jaxkv

    if max_batch < 1:
        raise JaxkvError(f"max_batch must be at least 1, got {max_batch}")
    if num_pages is not None and num_pages < 1:
        raise JaxkvError(f"num_pages must be at least 1, got {num_pages}")
    if timeout_keep_alive < 1:
        raise JaxkvError(f"timeout_keep_alive must be at least 1 second, got {timeout_keep_alive}")
    api_key, allowed_hosts, warning = access(host, api_key, allowed_hosts)
    sock = _listen(host, port)  # before loading: a busy port fails at once
    try:
        llm = jaxkv.load(model, dtype=dtype, kv_dtype=kv_dtype, page_size=page_size,
                         streaming_window=streaming_window, sinks=sinks, mesh=mesh, kv_rotate=kv_rotate,
                         kv_budget=kv_budget, eviction=eviction, eviction_window=eviction_window,
                         eviction_sinks=eviction_sinks, kv_recent=kv_recent, speculative=speculative)
        if model_name is None:
            model_name = model if not os.path.exists(os.path.expanduser(model)) else (
                llm.config.name if llm.config.name != "custom" else os.path.basename(os.path.normpath(model)))
        app = create_app(llm, model_name=model_name, max_batch=max_batch, num_pages=num_pages,
                         prefill_chunk=prefill_chunk, prefill_budget=prefill_budget,
                         prefix_caching=prefix_caching, max_context=max_context, limits=limits, api_key=api_key,
                         allowed_hosts=allowed_hosts, window_pages=window_pages)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, http=IdleTimeoutH11,
                                timeout_keep_alive=timeout_keep_alive)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        host_shown, port_shown = sock.getsockname()[:2]
        print(f"jaxkv: serving {model_name} at http://{host_shown}:{port_shown}/v1 (max_batch {max_batch}, "
              f"page_size {page_size}, context {app.state.engine.max_context}"
              f"{'; /v1 needs the API key' if api_key else ''})", file=sys.stderr, flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
