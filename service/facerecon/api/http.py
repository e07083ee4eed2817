"""The HTTP server under the app: uvicorn, with what its settings alone do not give (imported only to serve).

* :class:`GuardedHttpToolsProtocol` (uvicorn's httptools protocol, subclassed):

  - **a header timeout** (``settings.timeout_headers_s``): a connection must deliver a request's complete headers
    within it, counted from the connection's start or the request's first byte; else it is answered 408
    ``header_timeout`` and closed (uvicorn has no such timeout: a client that opens a connection and sends nothing,
    or trickles its headers, would hold it for ever). Idle keep-alive connections are closed by uvicorn's own
    ``timeout_keep_alive`` (``settings.timeout_keep_alive_s``);
  - **a connection cap** (``settings.max_connections``): a connection past it is answered 503 ``overloaded`` with
    ``Retry-After`` and closed at once (uvicorn's ``limit_concurrency`` answers plain text and counts requests);
  - **malformed HTTP** (what the parser rejects before there is a request for the app) is answered 400
    ``bad_request`` in the API's JSON error shape instead of uvicorn's plain text.

* :class:`Server` (``uvicorn.Server``): tells the app the moment shutdown starts (:meth:`ServiceState
  .begin_shutdown`), so that it stops admitting and, when ``settings.graceful_timeout_s`` ends, answers what is
  still waiting or running with the JSON 503 ``shutting_down``; uvicorn's own graceful timeout is set a few seconds
  later (:data:`GRACE_MARGIN_S`) and only cancels what the app failed to answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from facerecon.config import Settings

__all__ = ["GRACE_MARGIN_S", "GuardedHttpToolsProtocol", "Server", "guarded_protocol"]

log = logging.getLogger("facerecon.api.http")

#: uvicorn's graceful timeout is the app's plus this: the app answers first; uvicorn's cancellation is a backstop.
GRACE_MARGIN_S = 5.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a connection cap and JSON for malformed HTTP."""

    timeout_headers_s: float = 10.0
    max_connections: int = 256

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("refusing a connection: %d open, the limit is %d", len(self.connections) - 1,
                        self.max_connections)
            self._reply(503, "overloaded", f"too many open connections (limit {self.max_connections})",
                        retry_after=1)
            return
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._reply(400, "bad_request", f"malformed HTTP request: {msg}")

    # -- internals --------------------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.timeout_headers_s, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request whose headers arrived is still being answered (a pipelined one waits for it)
        log.info("closing a connection that sent no complete request headers within %.0f s", self.timeout_headers_s)
        self._reply(408, "header_timeout",
                    f"the request's headers did not arrive within {self.timeout_headers_s:g} s")

    def _reply(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        """Write one JSON error response (the API's shape) and close the connection."""
        body = json.dumps({"error": {"code": code, "message": message, "details": {}}}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        if retry_after is not None:
            head.append(b"retry-after: %d\r\n" % retry_after)
        head.extend([b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n", b"\r\n", body])
        self._cancel_header_timer()
        self.transport.write(b"".join(head))
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """:class:`GuardedHttpToolsProtocol` with ``settings``' header timeout and connection cap."""
    return type("FaceReconHttpProtocol", (GuardedHttpToolsProtocol,), {
        "timeout_headers_s": settings.timeout_headers_s, "max_connections": settings.max_connections})


class Server(uvicorn.Server):
    """``uvicorn.Server`` that calls ``on_shutdown`` (on the event loop) when shutdown begins."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._on_shutdown is not None:
            try:
                self._on_shutdown()
            except Exception:
                log.exception("the app's shutdown hook failed")
        await super().shutdown(sockets)
