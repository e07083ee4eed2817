"""One exception hierarchy: catch :class:`FaceReconClientError` for everything, or a subclass for one kind."""

from __future__ import annotations


class FaceReconClientError(Exception):
    """Base of every error the client raises."""


class TransportError(FaceReconClientError):
    """The service could not be reached, or the connection failed or timed out."""


class ServiceError(FaceReconClientError):
    """The service answered with an error: ``status`` (HTTP), ``code`` (machine-readable) and ``message``."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
