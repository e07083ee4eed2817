"""One exception hierarchy: catch :class:`FaceReconClientError` for everything, or a subclass for one kind.

::

    FaceReconClientError
    ├── TransportError                 the service could not be reached / the connection failed or timed out
    └── ServiceError                   the service answered with an error (status, code, message, details)
        ├── InvalidInput               4xx: the request or the photo is at fault; retrying will not help
        │   ├── CorruptImage           400 corrupt_image
        │   ├── NotAnImage             415 not_an_image
        │   ├── ImageTooLarge          413 image_too_large
        │   ├── NoFaceFound            422 no_face
        │   ├── TooManyImages          422 too_many_images
        │   ├── ExportNotSupported     422 export_not_supported
        │   ├── ValidationFailed       422 validation_error
        │   ├── MalformedRequest       400 malformed_request, bad_request, bad_input
        │   ├── UnsupportedMediaType   415 unsupported_media_type
        │   ├── NotAcceptable          406 not_acceptable
        │   ├── UploadTimeout          408 upload_timeout
        │   ├── RequestTooLarge        413 request_too_large
        │   ├── NotFound               404 not_found, 405 method_not_allowed
        │   └── AccessDenied           401 unauthorized, 403 forbidden
        ├── Unavailable                503 unavailable, 429 too_many_requests: try again after ``retry_after``
        │   ├── Overloaded             503 overloaded
        │   └── NotReady               503 not_ready
        ├── ServiceTimeout             504 timeout
        └── InternalServiceError       500 internal, model_file, error, http_error

Every code the service can answer has its class here (``tests/test_client.py`` checks it against the service's
error classes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class FaceReconClientError(Exception):
    """Base of every error the client raises."""


class TransportError(FaceReconClientError):
    """The service could not be reached, or the connection failed or timed out."""


class ServiceError(FaceReconClientError):
    """The service answered with an error: ``status`` (HTTP), ``code`` (machine-readable), ``message``,
    ``details`` (code-specific facts) and, for 429/503, ``retry_after`` (seconds)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.details: dict[str, Any] = dict(details or {})


class InvalidInput(ServiceError):
    """A 4xx: the request or the photo is at fault."""


class CorruptImage(InvalidInput):
    """400 ``corrupt_image``: a truncated or broken image file."""


class NotAnImage(InvalidInput):
    """415 ``not_an_image``: not an image of a supported format."""


class ImageTooLarge(InvalidInput):
    """413 ``image_too_large``: too many bytes or pixels (``details`` gives the limit)."""


class NoFaceFound(InvalidInput):
    """422 ``no_face``: the photo holds no detectable face (``details.index`` in a set)."""


class TooManyImages(InvalidInput):
    """422 ``too_many_images``: more photos in a set than the service accepts."""


class ValidationFailed(InvalidInput):
    """422 ``validation_error``: a missing, unknown or invalid field (``details.errors``)."""


class ExportNotSupported(InvalidInput):
    """422 ``export_not_supported``: an output this face model or format cannot give (a texture without UVs)."""


class MalformedRequest(InvalidInput):
    """400 ``malformed_request`` / ``bad_request`` / ``bad_input``: the HTTP request itself is broken."""


class UnsupportedMediaType(InvalidInput):
    """415 ``unsupported_media_type``: the request body is not multipart/form-data."""


class NotAcceptable(InvalidInput):
    """406 ``not_acceptable``: no output format matches the ``Accept`` header."""


class UploadTimeout(InvalidInput):
    """408 ``upload_timeout`` / ``header_timeout``: the upload (or the request's headers) was too slow."""


class ClientClosedRequest(InvalidInput):
    """499 ``client_closed_request``: the service saw the client hang up (recorded in its metrics; a client that
    waits for its answer never receives it)."""


class RequestTooLarge(InvalidInput):
    """413 ``request_too_large``: the request body is over the limit."""


class NotFound(InvalidInput):
    """404 ``not_found`` / 405 ``method_not_allowed``: no such endpoint (or not with this method)."""


class AccessDenied(InvalidInput):
    """401 ``unauthorized`` / 403 ``forbidden``; 400 ``invalid_host`` (the ``Host`` header is not one the service
    answers for) or ``cors_rejected`` (a browser origin it does not allow)."""


class Unavailable(ServiceError):
    """503: the service cannot take the request now; ``retry_after`` says when to try again."""


class Overloaded(Unavailable):
    """503 ``overloaded``: every worker busy and the queue full."""


class NotReady(Unavailable):
    """503 ``not_ready``: the service is loading its models."""


class ShuttingDown(Unavailable):
    """503 ``shutting_down``: the service is stopping (a restart or another replica will answer the retry);
    ``cancelled``: the request's work was stopped on the service's side."""


class ServiceTimeout(ServiceError):
    """504 ``timeout``: the request took longer than the service's deadline."""


class InternalServiceError(ServiceError):
    """500 ``internal``: a bug on the service side (its log has the traceback)."""


ERRORS_BY_CODE: dict[str, type[ServiceError]] = {
    "corrupt_image": CorruptImage,
    "not_an_image": NotAnImage,
    "image_too_large": ImageTooLarge,
    "no_face": NoFaceFound,
    "too_many_images": TooManyImages,
    "export_not_supported": ExportNotSupported,
    "validation_error": ValidationFailed,
    "malformed_request": MalformedRequest,
    "bad_request": MalformedRequest,
    "bad_input": MalformedRequest,
    "unsupported_media_type": UnsupportedMediaType,
    "not_acceptable": NotAcceptable,
    "upload_timeout": UploadTimeout,
    "header_timeout": UploadTimeout,
    "client_closed_request": ClientClosedRequest,
    "invalid_host": AccessDenied,
    "cors_rejected": AccessDenied,
    "request_too_large": RequestTooLarge,
    "not_found": NotFound,
    "method_not_allowed": NotFound,
    "unauthorized": AccessDenied,
    "forbidden": AccessDenied,
    "unavailable": Unavailable,
    "too_many_requests": Unavailable,
    "overloaded": Overloaded,
    "not_ready": NotReady,
    "shutting_down": ShuttingDown,
    "cancelled": ShuttingDown,
    "timeout": ServiceTimeout,
    "internal": InternalServiceError,
    "model_file": InternalServiceError,
    "error": InternalServiceError,
    "http_error": InternalServiceError,
}


def error_from_response(status: int, body: bytes, retry_after: float | None = None) -> ServiceError:
    """The typed error for an error response (the service's JSON shape, or anything a proxy may send)."""
    code, message, details = f"http_{status}", "", {}
    try:
        payload = json.loads(body)
        err = payload["error"]
        code, message = str(err["code"]), str(err.get("message", ""))
        details = dict(err.get("details") or {})
    except (ValueError, KeyError, TypeError):
        message = body[:300].decode("utf-8", "replace").strip() or f"HTTP {status}"
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        cls = InvalidInput if 400 <= status < 500 and status != 429 else Unavailable if status in (429, 503) \
            else ServiceError
    return cls(status, code, message, retry_after=retry_after, details=details)
