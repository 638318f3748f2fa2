"""An asyncio front for the synchronous `Engine`: one background thread owns the engine.

`Engine` is not thread-safe, so exactly one thread, started here, calls its add / abort / step.
Everything else talks to that thread through a command queue:

- `submit(request)` (a coroutine) queues an "add"; the engine thread runs `engine.add` and hands
  back either the request's output stream or the exception (`JaxkvError` for bad input), so a
  validation error reaches the caller before any output and nothing is half-added.
- Outputs travel from the engine thread to the request's `asyncio.Queue` through
  `loop.call_soon_threadsafe`.
- A consumer that stops reading (client disconnect: `CancelledError` / `GeneratorExit`, an explicit
  `aclose()`, or the stream being garbage collected) queues an "abort", and the engine frees
  the request's pages.
- When there is no work the thread sleeps on a `threading.Event` (no busy spin); every command
  sets it.
- An output that ends a request with an error (the engine isolated a failing request, or its
  deadline passed) raises that error in the request's stream alone.
- An exception escaping `engine.step()` (a bug outside the device calls, which the engine
  isolates itself) fails the requests in flight with `EngineStepError`, aborts them in the
  engine, and the loop keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from jaxkv.serve.engine import EngineStepError

log = logging.getLogger("jaxkv.serve")


class EngineShutdownError(RuntimeError):
    """The engine was shut down before the request finished, or a request came after shutdown."""


class RequestStream:
    """The outputs of one request, as an async iterator; ends after the finished output.

    Leaving early (`abort()`, `aclose()`, or dropping the stream) aborts the request in the engine.
    """

    def __init__(self, owner: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self._owner = owner
        self.request_id = request_id
        self._queue = queue
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def abort(self) -> None:
        """Cancel the request unless it already finished (idempotent, callable from any thread)."""
        if not self._done:
            self._done = True
            self._owner._post(("abort", self.request_id))

    async def aclose(self) -> None:
        self.abort()

    def __del__(self):
        with contextlib.suppress(Exception):  # also at interpreter shutdown
            self.abort()


class AsyncEngine:
    """Runs `engine` on a background thread; `generate`/`submit` from any asyncio loop."""

    def __init__(self, engine, name: str = "jaxkv-engine"):
        self.engine = engine
        self._commands: collections.deque = collections.deque()  # append/popleft are thread-safe
        self._wake = threading.Event()
        # request_id -> (loop, queue); touched only by the engine thread.
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._step_errors = 0
        self._metrics = dict(engine.metrics())
        self._metrics_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- the caller's side (any thread / event loop) ------------------------------------------
    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    async def submit(self, request) -> RequestStream:
        """Add `request` on the engine thread; raise its validation error here, or return its stream."""
        if not self.alive:
            raise EngineShutdownError("the engine is shut down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()
        self._post(("add", request, loop, queue, added))
        try:
            request_id = await added
        except asyncio.CancelledError:
            # The add may still happen: commands run in order, so this abort follows it.
            self._post(("abort", request.request_id))
            raise
        return RequestStream(self, request_id, queue)

    async def generate(self, request) -> AsyncIterator[Any]:
        """Yield the request's RequestOutputs until the finished one.

        A validation error (JaxkvError) is raised at the first iteration, before any output.
        Stopping early (break, aclose, cancellation) aborts the request.
        """
        stream = await self.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def metrics(self, timeout: float = 0.5) -> dict:
        """The engine's metrics (plus `step_errors`), read on the engine thread.

        If that thread is busy for longer than `timeout` (a step compiling, say), the snapshot
        taken after its last iteration is returned instead. Do not call from the event loop's
        thread with a long timeout: use `ametrics`.
        """
        future = concurrent.futures.Future()
        if self._thread.is_alive():
            self._post(("metrics", future))
            with contextlib.suppress(concurrent.futures.TimeoutError):
                return self._with_errors(future.result(timeout))
        return self.snapshot()

    async def ametrics(self, timeout: float = 0.5) -> dict:
        """`metrics` without blocking the event loop."""
        future = concurrent.futures.Future()
        if self._thread.is_alive():
            self._post(("metrics", future))
            with contextlib.suppress(asyncio.TimeoutError):
                return self._with_errors(await asyncio.wait_for(asyncio.wrap_future(future), timeout))
        return self.snapshot()

    def snapshot(self) -> dict:
        """The metrics as of the engine thread's last iteration (no waiting)."""
        with self._metrics_lock:
            return self._with_errors(dict(self._metrics))

    def _with_errors(self, metrics: dict) -> dict:
        metrics["step_errors"] = self._step_errors
        return metrics

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; requests still in flight fail with EngineShutdownError."""
        if self._thread.is_alive():
            self._post(("stop",))
            self._thread.join(timeout)
        self._closed = True

    def _post(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    # --- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.clear()  # before draining: a command posted after the drain re-sets it
            try:
                if not self._drain():
                    break
                if self.engine.has_work():
                    self._step()
                    continue
            except Exception:  # a bug of ours or the engine's outside step(): log it, keep serving
                log.exception("engine loop error")
            self._refresh_metrics()
            self._wake.wait()
        self._closed = True
        self._fail_all(EngineShutdownError("the engine was shut down"))
        self._refresh_metrics()

    def _drain(self) -> bool:
        """Run the queued commands; False once told to stop."""
        while self._commands:
            command = self._commands.popleft()
            kind = command[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._abort(command[1])
            elif kind == "metrics":
                self._refresh_metrics()
                future = command[1]
                if future.set_running_or_notify_cancel():
                    with self._metrics_lock:
                        future.set_result(dict(self._metrics))
        return True

    def _add(self, request, loop, queue, added) -> None:
        if added.cancelled():  # the caller left before its request reached the engine
            return
        try:
            self.engine.add(request)
        except Exception as e:  # JaxkvError for bad input; anything else reaches the caller too
            _call(loop, _resolve, added, None, e)
            return
        self._streams[request.request_id] = (loop, queue)
        if not _call(loop, _resolve, added, request.request_id, None):
            self._abort(request.request_id)
        self._refresh_metrics()

    def _abort(self, request_id) -> None:
        self._streams.pop(request_id, None)
        try:
            self.engine.abort(request_id)
        except Exception as e:  # unknown or already finished: nothing to free
            log.debug("abort %s: %s", request_id, e)
        self._refresh_metrics()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._step_errors += 1
            log.exception("engine step failed; failing %d request(s) in flight", len(self._streams))
            error = EngineStepError(f"the engine failed while running this request: {type(e).__name__}: {e}")
            ids = list(self._streams)
            self._fail_all(error)
            for request_id in ids:
                with contextlib.suppress(Exception):
                    self.engine.abort(request_id)
            if not ids:  # nothing to fail, yet step() raises: do not spin on it
                self._wake.wait(1.0)
            self._refresh_metrics()
            return
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:  # aborted by its consumer, or its output came after an abort
                continue
            if out.finished:
                del self._streams[out.request_id]
            error = getattr(out, "error", None)
            if not _call(target[0], target[1].put_nowait, out if error is None else error) and not out.finished:
                self._abort(out.request_id)  # its event loop is gone
        self._refresh_metrics()

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for loop, queue in streams.values():
            _call(loop, queue.put_nowait, error)

    def _refresh_metrics(self) -> None:
        try:
            snapshot = dict(self.engine.metrics())
        except Exception:
            log.exception("engine.metrics() failed")
            return
        with self._metrics_lock:
            self._metrics = snapshot


def _resolve(future: asyncio.Future, value, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Run fn(*args) on `loop`; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False
