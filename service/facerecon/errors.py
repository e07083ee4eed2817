"""Typed errors. Errors a user can cause carry a machine-readable ``code`` and the HTTP status the API maps them
to (the mapping lives here and only here); start-up errors (a missing or corrupt model file) are not HTTP errors.
"""

from __future__ import annotations


class FaceReconError(Exception):
    """Base of every error this package raises on purpose."""

    code: str = "error"
    http_status: int = 500

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InputError(FaceReconError):
    """Bad input from a caller: always a 4xx."""

    code = "bad_input"
    http_status = 400


class ImageDecodeError(InputError):
    """Bytes that claim to be an image but cannot be decoded (corrupt or truncated)."""

    code = "corrupt_image"
    http_status = 400


class UnsupportedImageType(InputError):
    """Bytes that are not an image of a supported format."""

    code = "not_an_image"
    http_status = 415


class ImageTooLarge(InputError):
    """Too many bytes or too many pixels (decompression-bomb guard)."""

    code = "image_too_large"
    http_status = 413


class NoFaceFound(InputError):
    """The photo decoded fine but holds no detectable face."""

    code = "no_face"
    http_status = 422


class TooManyImages(InputError):
    """An image set larger than the configured limit."""

    code = "too_many_images"
    http_status = 422


class ExportNotSupported(InputError):
    """An output the request asks for that this face model or format cannot give (a texture on a model without
    UVs, a texture in PLY)."""

    code = "export_not_supported"
    http_status = 422


class ModelFileError(FaceReconError):
    """A face-model or network file that is missing, truncated, malformed or fails its checksum."""

    code = "model_file"
    http_status = 500
