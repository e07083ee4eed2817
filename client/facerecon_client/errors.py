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
        │   └── ValidationFailed       422 validation_error
        ├── Unavailable                503: try again after ``retry_after`` seconds
        │   ├── Overloaded             503 overloaded
        │   └── NotReady               503 not_ready
        ├── ServiceTimeout             504 timeout
        └── InternalServiceError       500 internal
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


class Unavailable(ServiceError):
    """503: the service cannot take the request now; ``retry_after`` says when to try again."""


class Overloaded(Unavailable):
    """503 ``overloaded``: every worker busy and the queue full."""


class NotReady(Unavailable):
    """503 ``not_ready``: the service is loading its models."""


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
    "validation_error": ValidationFailed,
    "overloaded": Overloaded,
    "not_ready": NotReady,
    "timeout": ServiceTimeout,
    "internal": InternalServiceError,
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
