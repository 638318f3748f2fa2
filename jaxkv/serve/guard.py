"""What the server checks before the app reads a request, and how it closes idle connections.

`Guard` is plain ASGI middleware (it never buffers a response, so streaming is untouched). In order:
the Host header against the allowed names (a browser page on another site can reach a loopback server by
DNS rebinding, but it cannot send a Host header of 127.0.0.1), the API key on /v1 (compared in constant
time), and the body size: a Content-Length past the limit is refused before one byte is read, and a body
sent in chunks is counted as it arrives. Refusals are OpenAI error bodies.

`IdleTimeoutH11` closes a connection that has no request under way for `timeout_keep_alive` seconds:
uvicorn times out only an idle keep-alive connection after a response, not one that never sends a
request or drips its headers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxkv.serve.schema import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """'[::1]:8000' -> '::1', 'LocalHost.:80' -> 'localhost'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


class Guard:
    def __init__(self, app, *, max_body_bytes: int, api_key: str | None = None,
                 allowed_hosts: tuple[str, ...] | None = None, on_reject: Callable[[str], None] = lambda code: None):
        """allowed_hosts None (or containing '*') allows any Host; on_reject(code) counts refusals."""
        self.app, self.max_body_bytes, self.on_reject = app, max_body_bytes, on_reject
        self.key = f"Bearer {api_key}".encode() if api_key else None
        any_host = allowed_hosts is None or "*" in allowed_hosts
        self.allowed = None if any_host else {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), value)
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed is not None and host_name(host) not in self.allowed:
            return await self._refuse(scope, receive, send, ApiError(
                400, f"the Host header {host!r} is not one this server answers to (see --allowed-hosts)",
                code="invalid_host"))
        if self.key is not None and scope["path"].startswith("/v1") and \
                not secrets.compare_digest(headers.get(b"authorization", b""), self.key):
            return await self._refuse(scope, receive, send, ApiError(
                401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        length = headers.get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body_bytes):
            return await self._refuse(scope, receive, send, self._too_large() if length.strip().isdigit() else
                                      ApiError(400, "the Content-Length header is not a number", code="invalid_header"))
        return await self.app(scope, self._counted(receive), send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
                        code="request_too_large")

    def _counted(self, receive):
        """receive, raising a 413 HTTPException (which the app answers) once the body passes the limit: a
        chunked body has no Content-Length."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(413, self._too_large().message)
            return message

        return counted

    async def _refuse(self, scope, receive, send, error: ApiError) -> None:
        self.on_reject(error.code)
        await error.response()(scope, receive, send)


class IdleTimeoutH11(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._idle = None
        self._arm_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_idle()

    def connection_lost(self, exc) -> None:
        if self._idle is not None:
            self._idle.cancel()
        super().connection_lost(exc)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.timeout_keep_alive, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.timeout_keep_alive_handler()
