"""Which ``Host`` headers and which web origins the API answers (``settings.allowed_hosts``,
``settings.cors_origins``), with refusals in the API's JSON error shape.

* :class:`AllowedHostsMiddleware`: Starlette's ``TrustedHostMiddleware`` rule (an exact host, ``*.example.com``
  for its subdomains, ``*`` for any; the port is ignored), answering 400 ``invalid_host`` instead of plain text.
  Default ``*``: every host, as before (a deployment behind a proxy names its public host names).
* CORS (:class:`JsonCORSMiddleware`, Starlette's ``CORSMiddleware``): off unless ``cors_origins`` names origins
  (``*`` = any). Allowed: GET, POST and OPTIONS, the ``Accept``/``Content-Type`` request headers, and the result
  headers (``X-Face-Count``, ...) exposed to scripts. A refused preflight is 400 ``cors_rejected``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from facerecon.api.errors import error_response
from facerecon.config import Settings

__all__ = ["AllowedHostsMiddleware", "JsonCORSMiddleware", "install_host_checks"]

log = logging.getLogger("facerecon.api")

#: Response headers a browser script may read (the results' metadata).
EXPOSED_HEADERS = ["X-Face-Count", "X-Faces-Detected", "X-Faces-Limit", "X-Reconstruction-Mode", "X-Photo-Scale",
                   "X-Original-Size", "Server-Timing", "Retry-After", "Content-Disposition"]


class AllowedHostsMiddleware:
    """Refuse a request whose ``Host`` is not allowed: 400 ``invalid_host`` (pure ASGI)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allow_any = "*" in allowed_hosts
        self.exact = {h.lower() for h in allowed_hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:].lower() for h in allowed_hosts if h.startswith("*."))

    def allowed(self, host: str) -> bool:
        name = host.split(":")[0].lower() if not host.startswith("[") else host.split("]")[0] + "]"
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow_any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if self.allowed(host):
            await self.app(scope, receive, send)
            return
        log.info("refusing a request for host %r", host[:100])
        await error_response(400, "invalid_host", "this server does not answer for that Host header",
                             {"host": host[:100]})(scope, receive, send)


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware; a refused preflight is answered in the JSON error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode("utf-8", "replace")
        return error_response(400, "cors_rejected", f"CORS preflight refused: {reason}",
                              headers={k: v for k, v in response.headers.items()
                                       if k.lower() not in ("content-length", "content-type")})


def install_host_checks(app: FastAPI, settings: Settings) -> None:
    """CORS (when ``cors_origins`` is set), then the Host check outside it."""
    if settings.cors_origins:
        app.add_middleware(JsonCORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Accept", "Content-Type"],
                           expose_headers=EXPOSED_HEADERS, max_age=600)
    if "*" not in settings.allowed_hosts:
        app.add_middleware(AllowedHostsMiddleware, allowed_hosts=settings.allowed_hosts)
