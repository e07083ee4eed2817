"""Client SDK of the facerecon service: ``FaceReconClient`` (sync) and ``AsyncFaceReconClient`` (asyncio), typed
results, one exception hierarchy. Only ``httpx`` and ``pydantic`` are needed (never torch)."""

from facerecon_client.client import AsyncFaceReconClient, FaceReconClient, ImageInput, RetryPolicy
from facerecon_client.errors import (
    CorruptImage,
    FaceReconClientError,
    ImageTooLarge,
    InternalServiceError,
    InvalidInput,
    NoFaceFound,
    NotAnImage,
    NotReady,
    Overloaded,
    ServiceError,
    ServiceTimeout,
    TooManyImages,
    TransportError,
    Unavailable,
    ValidationFailed,
)
from facerecon_client.models import (
    Coefficients,
    Face,
    ImageResult,
    MeshResult,
    ModelInfo,
    Pose,
    Reconstruction,
    SetItem,
    SetReconstruction,
)

__version__ = "0.1.0"
__all__ = [
    "AsyncFaceReconClient",
    "Coefficients",
    "CorruptImage",
    "Face",
    "FaceReconClient",
    "FaceReconClientError",
    "ImageInput",
    "ImageResult",
    "ImageTooLarge",
    "InternalServiceError",
    "InvalidInput",
    "MeshResult",
    "ModelInfo",
    "NoFaceFound",
    "NotAnImage",
    "NotReady",
    "Overloaded",
    "Pose",
    "Reconstruction",
    "RetryPolicy",
    "ServiceError",
    "ServiceTimeout",
    "SetItem",
    "SetReconstruction",
    "TooManyImages",
    "TransportError",
    "Unavailable",
    "ValidationFailed",
]
