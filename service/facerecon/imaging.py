"""Safe decoding of the photos users send.

:func:`decode_image` turns untrusted bytes into an ``(H, W, 3) uint8`` RGB array (row-major, row 0 at the top,
i.e. **y down**, integer coordinates = pixel centres, the photo frame of ``reference.md`` section 1), or
raises one of the typed errors of :mod:`facerecon.errors`; no Pillow exception escapes.

What it does, in order:

1. **Byte limit**: more than ``max_bytes`` bytes -> :class:`~facerecon.errors.ImageTooLarge`; zero bytes ->
   :class:`~facerecon.errors.UnsupportedImageType`.
2. **Format**: only the formats in :data:`SUPPORTED_FORMATS` are tried (JPEG incl. MPO, PNG, WebP, BMP, TIFF,
   GIF, PPM/PGM); anything else (or random bytes) -> :class:`~facerecon.errors.UnsupportedImageType`.
3. **Pixel limit before decoding** (decompression bombs): ``Image.open`` only parses the header; its declared
   ``width * height`` is checked against ``max_pixels`` before any pixel is decoded. Pillow's own guard
   (``Image.MAX_IMAGE_PIXELS``) is set to the same limit and its ``DecompressionBombWarning`` is escalated
   to an error while we decode, so both layers agree; both end as :class:`~facerecon.errors.ImageTooLarge`.
4. **Full decode** with ``.load()``; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept ``False`` so a truncated
   file is an error (:class:`~facerecon.errors.ImageDecodeError`), never silently grey-filled. Multi-frame
   files (GIF, TIFF, animated WebP/PNG, MPO) give their first frame.
5. **EXIF orientation** is applied (``ImageOps.exif_transpose``), so phone photos come out upright. The
   reference pipeline does *not* do this (reference.md section 16, pitfall 8); for photos without an
   orientation tag (all reference examples) the result is identical. A corrupt EXIF block is logged and
   ignored (the pixels are fine).
6. **Mode conversion to 8-bit RGB**:

   * ``RGB``: unchanged. ``L``, ``1``, ``P`` (no transparency), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``:
     Pillow's ``convert("RGB")``.
   * Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency key, ``RGBa``, ``La``): **composited over
     white** (the colour hidden under transparent pixels is arbitrary, often black, and a dark halo around a
     cut-out portrait would bias the skin/albedo estimate more than a white one).
   * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and ``I`` (32-bit int, as Pillow may open 16-bit
     PNG/TIFF): read as 0..65535, scaled to 0..255 by ``round(v / 257)`` and replicated to three channels.
     ``F`` (float): values in [0, 1] are scaled by 255, otherwise clipped to [0, 255].
   * 48/64-bit RGB(A) PNG and TIFF: Pillow itself keeps the high byte of each sample when opening them as
     ``RGB``/``RGBA`` (a 16 -> 8-bit reduction), then the rules above apply.

   ICC profiles are not applied (the pixel values are used as if sRGB, as in the reference).

Thread safety: :func:`decode_image` may be called from several threads. It touches two process-wide Pillow
settings: ``Image.MAX_IMAGE_PIXELS`` (set to ``max_pixels``; callers should use one limit per process) and the
warnings filter (``warnings.catch_warnings`` is not thread-safe on Python 3.11: a race can at worst leave the
"DecompressionBombWarning is an error" filter installed or drop it; the explicit header check of step 3 does
not depend on either).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from facerecon.errors import ImageDecodeError, ImageTooLarge, UnsupportedImageType

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "decode_image",
    "load_image",
    "to_rgb8",
]

logger = logging.getLogger(__name__)

#: Pillow format names accepted by :func:`decode_image` (``Image.open(..., formats=...)``). "JPEG" also opens
#: multi-picture phone JPEGs (Pillow reports them as MPO); PPM covers PBM/PGM/PPM.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")

#: Defaults for :func:`load_image` (the CLI); the service passes its own limits from the settings.
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000

_WHITE = (255, 255, 255)


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode untrusted image bytes to an upright 8-bit RGB array.

    Args:
        data: the encoded file (JPEG, PNG, WebP, BMP, TIFF, GIF, PPM; see :data:`SUPPORTED_FORMATS`).
        max_bytes: largest accepted ``len(data)``.
        max_pixels: largest accepted ``width * height``, checked on the declared header size before decoding.

    Returns:
        ``(H, W, 3) uint8`` RGB, C-contiguous, writable; row 0 is the top of the (EXIF-rotated) photo, so
        image coordinates are x = column (right), y = row (**down**), integers at pixel centres.

    Raises:
        ImageTooLarge: more than ``max_bytes`` bytes or more than ``max_pixels`` pixels (also Pillow's
            decompression-bomb error/warning, and a ``MemoryError`` while decoding).
        UnsupportedImageType: empty input, or bytes that are not an image of a supported format.
        ImageDecodeError: a recognised image that is truncated or corrupt.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    n_bytes = len(data)
    if n_bytes == 0:
        raise UnsupportedImageType("empty upload: zero bytes", n_bytes=0)
    if n_bytes > max_bytes:
        raise ImageTooLarge(
            f"image is {n_bytes} bytes, the limit is {max_bytes}", n_bytes=n_bytes, max_bytes=max_bytes
        )
    _configure_pillow_guard(max_pixels)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(bytes(data)), formats=_available_formats())
            except UnidentifiedImageError as exc:
                raise UnsupportedImageType(
                    "not an image of a supported format", supported=list(SUPPORTED_FORMATS)
                ) from exc
            with im:
                _check_pixels(im.size, max_pixels)
                fmt = im.format
                im.load()  # decode every pixel now: truncation and corruption surface here
                _check_pixels(im.size, max_pixels)  # a few plugins settle the size at load time
                im = _apply_exif_orientation(im)
                arr = to_rgb8(im)
    except (ImageTooLarge, UnsupportedImageType, ImageDecodeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image has too many pixels (limit {max_pixels})", max_pixels=max_pixels) from exc
    except MemoryError as exc:
        raise ImageTooLarge("not enough memory to decode the image", max_pixels=max_pixels) from exc
    except Exception as exc:  # any Pillow/codec failure on a recognised header: corrupt or truncated
        raise ImageDecodeError(f"corrupt or truncated image: {exc}", reason=type(exc).__name__) from exc
    logger.debug("decoded %s image %dx%d from %d bytes", fmt, arr.shape[1], arr.shape[0], n_bytes)
    return arr


def load_image(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a photo from disk and decode it with :func:`decode_image` (same output, same errors).

    The byte limit is checked on the file size before reading. ``FileNotFoundError``/``OSError`` from the file
    system propagate unchanged.
    """
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise ImageTooLarge(f"{p.name} is {size} bytes, the limit is {max_bytes}", n_bytes=size)
    return decode_image(p.read_bytes(), max_bytes=max_bytes, max_pixels=max_pixels)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to ``(H, W, 3) uint8`` RGB (rules: module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_grey_to_rgb8(im)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _high_depth_grey_to_rgb8(im: Image.Image) -> np.ndarray:
    """``I;16*``/``I`` (0..65535) and ``F`` images to 8-bit RGB, replicating the grey channel."""
    grey = np.asarray(im).astype(np.float64)  # numpy honours I;16B's byte order; float64 is native
    if im.mode == "F":
        grey = np.nan_to_num(grey, nan=0.0, posinf=255.0, neginf=0.0)
        scaled = grey * 255.0 if grey.size and float(grey.max()) <= 1.0 else grey
    else:
        scaled = grey / 257.0
    g8 = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(g8[:, :, None], 3, axis=2)


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block must not fail an otherwise good photo
        logger.warning("ignoring unreadable EXIF orientation", exc_info=True)
        return im
    return im if out is None else out


def _available_formats() -> tuple[str, ...]:
    """:data:`SUPPORTED_FORMATS` that this Pillow build can open (a build without libwebp has no WEBP)."""
    Image.init()
    return tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image declares an empty size {w}x{h}", width=w, height=h)
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"image is {w}x{h} = {w * h} pixels, the limit is {max_pixels}",
            width=w,
            height=h,
            max_pixels=max_pixels,
        )


def _configure_pillow_guard(max_pixels: int) -> None:
    """Align Pillow's process-wide decompression-bomb guard with ``max_pixels``; truncation stays fatal."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_pixels != Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it to False (truncated = error)")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
