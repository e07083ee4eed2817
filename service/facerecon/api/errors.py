"""One error shape for the whole HTTP API, and the one place that maps errors onto it.

Every error response, whatever raised it, is::

    {"error": {"code": "no_face", "message": "no face found in the photo", "details": {}}}

with the HTTP status of the error and, for the retryable 503s, a ``Retry-After`` header (whole seconds).

Mapping (in :func:`install_error_handlers`):

* :class:`facerecon.errors.FaceReconError` (the engine's typed errors and the service's own below): its ``code``,
  ``http_status``, ``message`` and ``details``. :class:`~facerecon.errors.InputError` subclasses are the caller's
  fault (4xx, logged at INFO); the rest are logged with a traceback.
* FastAPI's ``RequestValidationError``, and :class:`RequestValidationFailed` (what the app raises when the form
  options fail their pydantic model): 422 ``validation_error`` with pydantic's error list (no input values
  echoed) in ``details.errors``. A pydantic ``ValidationError`` anywhere else is a bug (500), not bad input.
* Starlette's ``HTTPException`` (unknown route, wrong method, ...): its status, a code from :data:`HTTP_CODES`.
* Anything else is a bug: 500 ``internal`` with a generic message, the traceback logged once with the request line
  (:class:`InternalErrorMiddleware`). Bad input never ends here: every input check raises a typed error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facerecon.errors import FaceReconError, InputError

__all__ = [
    "HTTP_CODES",
    "Cancelled",
    "ClientDisconnected",
    "InternalErrorMiddleware",
    "MalformedRequest",
    "NotAcceptable",
    "NotReady",
    "Overloaded",
    "RequestTimedOut",
    "RequestValidationFailed",
    "ShuttingDown",
    "Unavailable",
    "UnsupportedMediaType",
    "UploadTimedOut",
    "error_response",
    "install_error_handlers",
    "validation_details",
]

log = logging.getLogger("facerecon.api")


# -- the service's own typed errors (the engine's live in facerecon.errors) --------------------------------------
class Unavailable(FaceReconError):
    """The service cannot take the request now; retry after ``retry_after`` seconds."""

    code = "unavailable"
    http_status = 503

    def __init__(self, message: str, *, retry_after: float = 1.0, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after = max(1, math.ceil(retry_after))


class Overloaded(Unavailable):
    """Every inference worker is busy and the wait queue is full."""

    code = "overloaded"


class ShuttingDown(Unavailable):
    """The server is shutting down (SIGTERM): no new work, and work still waiting when the grace period ends."""

    code = "shutting_down"


class NotReady(Unavailable):
    """The models are still loading or warming up (or failed to; ``details.reason`` says which)."""

    code = "not_ready"


class RequestTimedOut(FaceReconError):
    """The request waited and computed longer than ``settings.request_timeout_s``."""

    code = "timeout"
    http_status = 504


class Cancelled(FaceReconError):
    """A job stopped at a stage boundary because nobody waits for it any more (raised on the worker thread; the
    request itself answers with why: a timeout, a client gone, a shutdown)."""

    code = "cancelled"
    http_status = 503


class ClientDisconnected(InputError):
    """The client closed the connection before its answer was ready (nobody reads this; counted in the metrics
    as status 499, the nginx convention)."""

    code = "client_closed_request"
    http_status = 499


class UploadTimedOut(InputError):
    """The client did not finish sending its upload within the request deadline."""

    code = "upload_timeout"
    http_status = 408


class MalformedRequest(InputError):
    """A body that does not parse as ``multipart/form-data``."""

    code = "malformed_request"
    http_status = 400


class UnsupportedMediaType(InputError):
    """The request body is not ``multipart/form-data`` (the photo must be a file part)."""

    code = "unsupported_media_type"
    http_status = 415


class NotAcceptable(InputError):
    """The ``Accept`` header names no output the endpoint can produce."""

    code = "not_acceptable"
    http_status = 406


class RequestValidationFailed(InputError):
    """A missing, unknown or ill-typed form field (``details.errors`` lists them, pydantic style)."""

    code = "validation_error"
    http_status = 422


#: Codes for plain HTTP errors raised by the framework itself.
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "upload_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


# -- the shape ----------------------------------------------------------------------------------------------------
def error_response(
    status: int,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one error shape (see the module docstring)."""
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(dict(details or {}))}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def validation_details(errors: list[Any]) -> dict[str, Any]:
    """pydantic/FastAPI error entries without the caller's input values (they may be large or binary)."""
    out = []
    for e in errors:
        entry = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        out.append(entry)
    return {"errors": out}


def _face_recon_error_response(exc: FaceReconError) -> JSONResponse:
    headers = {}
    if isinstance(exc, Unavailable):
        headers["Retry-After"] = str(exc.retry_after)
    return error_response(exc.http_status, exc.code, exc.message, exc.details, headers=headers)


async def _on_face_recon_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FaceReconError)
    if isinstance(exc, NotReady):  # probes poll /readyz while the models load: not worth a warning each time
        log.debug("%s %s -> 503 not_ready: %s", request.method, request.url.path, exc.message)
    elif isinstance(exc, InputError):
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.http_status, exc.code, exc.message)
    elif isinstance(exc, Unavailable | RequestTimedOut):
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.http_status, exc.code, exc.message)
    else:
        log.error("%s %s -> %d %s", request.method, request.url.path, exc.http_status, exc.code, exc_info=exc)
    return _face_recon_error_response(exc)


async def _on_request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(list(exc.errors()))
    log.info("%s %s -> 422 validation_error: %s", request.method, request.url.path, details["errors"])
    return error_response(422, "validation_error", "the request's fields are invalid", details)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping on ``app`` and wrap it in :class:`InternalErrorMiddleware` (bugs -> 500 ``internal``)."""
    app.add_exception_handler(FaceReconError, _on_face_recon_error)
    app.add_exception_handler(RequestValidationError, _on_request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_middleware(InternalErrorMiddleware)


class InternalErrorMiddleware:
    """Turns an unhandled exception into 500 ``internal`` (the JSON shape), logging its traceback once.

    Sits inside Starlette's ``ServerErrorMiddleware`` and handles the exception itself, so the traceback is logged
    here, with the request line, and not a second time by the server. If the response had already started, the
    exception is re-raised (the connection is then cut, nothing else can be sent).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            log.error("%s %s -> 500 internal (unhandled %s)", scope.get("method"), scope.get("path"),
                      type(exc).__name__, exc_info=exc)
            if started:
                raise
            response = error_response(500, "internal", "internal server error (logged on the server)")
            await response(scope, receive, send)
