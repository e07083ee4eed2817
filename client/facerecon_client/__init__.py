"""Client SDK of the facerecon service."""

from facerecon_client.errors import FaceReconClientError, ServiceError, TransportError

__version__ = "0.1.0"
__all__ = ["FaceReconClientError", "ServiceError", "TransportError"]
