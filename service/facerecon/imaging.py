"""Safe decoding of the photos users send.

:func:`decode_image` turns untrusted bytes into an ``(H, W, 3) uint8`` RGB array (row-major, row 0 at the top,
i.e. **y down**, integer coordinates = pixel centres, the photo frame of ``reference.md`` section 1), or
raises one of the typed errors of :mod:`facerecon.errors`; no Pillow exception escapes.

What it does, in order:

1. **Byte limit**: more than ``max_bytes`` bytes -> :class:`~facerecon.errors.ImageTooLarge`; zero bytes ->
   :class:`~facerecon.errors.UnsupportedImageType`.
2. **Format**: only the formats in :data:`SUPPORTED_FORMATS` are tried (JPEG incl. MPO, PNG, WebP, BMP, TIFF,
   GIF, PPM/PGM); anything else (or random bytes) -> :class:`~facerecon.errors.UnsupportedImageType`. Bytes that
   start with one of those formats' signatures but whose header Pillow cannot parse (a JPEG with broken tables)
   are a corrupt image (:class:`~facerecon.errors.ImageDecodeError`), not "not an image".
3. **Pixel limit before decoding** (decompression bombs): ``Image.open`` only parses the header; its declared
   ``width * height`` is checked against ``max_pixels`` before any pixel is decoded. Pillow's own guard
   (``Image.MAX_IMAGE_PIXELS``) is set to the same limit and its ``DecompressionBombWarning`` is escalated
   to an error while we decode, so both layers agree; both end as :class:`~facerecon.errors.ImageTooLarge`.
4. **Downscaling at decode time** (``max_decoded_pixels``, optional): a photo over that many pixels is decoded
   at a reduced size, by the smallest integer factor that fits. JPEG is decoded reduced by libjpeg itself
   (``Image.draft``: 1/2, 1/4 or 1/8 scale, so a large JPEG never exists at full size in memory), then
   ``Image.reduce`` for the rest; other formats are decoded in full, reduced at once and the full-size copy
   dropped. :func:`probe_image` tells, from the header alone, how large the decode will be
   (:attr:`ImageProbe.decode_bytes`), so a caller can bound the memory of decodes in flight.
5. **Full decode** with ``.load()``; ``ImageFile.LOAD_TRUNCATED_IMAGES`` is kept ``False`` so a truncated
   file is an error (:class:`~facerecon.errors.ImageDecodeError`), never silently grey-filled. Multi-frame
   files (GIF, TIFF, animated WebP/PNG, MPO) give their first frame.
6. **EXIF orientation** is applied (the transposes of ``ImageOps.exif_transpose``, read from the opened file, so
   they apply to a downscaled decode too), so phone photos come out upright. The
   reference pipeline does *not* do this (reference.md section 16, pitfall 8); for photos without an
   orientation tag (all reference examples) the result is identical. A corrupt EXIF block is logged and
   ignored (the pixels are fine).
7. **Mode conversion to 8-bit RGB**:

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

Size: over 400 lines, a fifth of them this docstring: the decoding policy is one ordered procedure over untrusted
bytes, and the header probe (:func:`probe_image`) and the decode share its limits, its downscaling rule and its
typed errors, so every check a photo passes is read in one file.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from facerecon.errors import ImageDecodeError, ImageTooLarge, UnsupportedImageType

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "DecodedPhoto",
    "ImageProbe",
    "decode_image",
    "decode_photo",
    "load_image",
    "probe_image",
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

#: The first bytes of each supported format: a file that starts so but does not parse is corrupt, not "not an image".
_SIGNATURES: tuple[tuple[int, bytes], ...] = (
    (0, b"\xff\xd8\xff"),  # JPEG (SOI + the next marker)
    (0, b"\x89PNG\r\n\x1a\n"),
    (0, b"GIF87a"), (0, b"GIF89a"),
    (0, b"II*\x00"), (0, b"MM\x00*"),  # TIFF
    (8, b"WEBP"),  # after RIFF + length
    (0, b"BM"),
)
#: Bytes per pixel of Pillow's in-memory storage by mode (RGB is stored in 4 bytes, as RGBX).
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Modes ``Image.reduce`` does not take (and ``P``): converted strip by strip to these before reducing.
_REDUCE_VIA = {"1": "L", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
#: Pixels of one strip converted at a time (4 MB at 4 bytes a pixel).
_STRIP_PIXELS = 1 << 20


@dataclass(frozen=True)
class ImageProbe:
    """What an image's header says, before any pixel is decoded (:func:`probe_image`)."""

    format: str
    width: int
    height: int
    mode: str
    #: the factor the decode will reduce by (1 = full size) under the probe's ``max_decoded_pixels``
    scale_factor: int
    #: an upper estimate of the bytes the decode allocates at its peak (Pillow's full-size or drafted image, a
    #: converted strip when the mode needs one, the reduced image and the returned array)
    decode_bytes: int

    @property
    def decoded_size(self) -> tuple[int, int]:
        f = self.scale_factor
        return -(-self.width // f), -(-self.height // f)


@dataclass(frozen=True)
class DecodedPhoto:
    """A decoded photo (:func:`decode_photo`): the pixels and the size the file declared."""

    image: np.ndarray
    #: (width, height) of the photo as stored in the file, after EXIF rotation
    original_size: tuple[int, int]

    @property
    def scale(self) -> float:
        """Decoded pixels per original pixel (1.0 when the photo was not downscaled)."""
        return float(self.image.shape[1]) / float(self.original_size[0])


def _reduction(width: int, height: int, max_decoded_pixels: int | None) -> int:
    """The smallest integer factor ``f`` with ``ceil(w / f) * ceil(h / f) <= max_decoded_pixels``."""
    if max_decoded_pixels is None or width * height <= max_decoded_pixels:
        return 1
    f = max(1, math.floor(math.sqrt(width * height / max_decoded_pixels)))
    while -(-width // f) * -(-height // f) > max_decoded_pixels:
        f += 1
    return f


def _jpeg_draft_scale(factor: int) -> int:
    """The libjpeg scale (1, 2, 4, 8) ``Image.draft`` picks for an overall reduction by ``factor``."""
    scale = 1
    while scale * 2 <= min(factor, 8):
        scale *= 2
    return scale


def _estimate(fmt: str, width: int, height: int, mode: str, factor: int) -> int:
    first = _jpeg_draft_scale(factor) if fmt in ("JPEG", "MPO") else 1
    full = -(-width // first) * -(-height // first)
    per_px = _STORAGE_BYTES.get(mode, 4)
    converted = 8 * _STRIP_PIXELS if factor > 1 else 0
    out = -(-width // factor) * -(-height // factor)
    # the decoded (or drafted) image, a converted strip, the reduced image (4 B/px), the RGB array and a conversion
    return full * per_px + converted + out * (4 + 3 + 4)


def probe_image(data: bytes, *, max_bytes: int, max_pixels: int, max_decoded_pixels: int | None = None
                ) -> ImageProbe:
    """Parse only the header of untrusted image bytes: format, size, mode and what decoding them will cost.

    Raises the same typed errors as :func:`decode_image` for what the header alone shows (too many bytes or
    pixels, not an image, a corrupt header).
    """
    _check_bytes(data, max_bytes)
    _configure_pillow_guard(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(data) as im:
                _check_pixels(im.size, max_pixels)
                w, h = im.size
                fmt, mode = str(im.format), im.mode
    except (ImageTooLarge, UnsupportedImageType, ImageDecodeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image has too many pixels (limit {max_pixels})", max_pixels=max_pixels) from exc
    except Exception as exc:
        raise ImageDecodeError(f"corrupt image header: {exc}", reason=type(exc).__name__) from exc
    factor = _reduction(w, h, max_decoded_pixels)
    return ImageProbe(format=fmt, width=w, height=h, mode=mode, scale_factor=factor,
                      decode_bytes=_estimate(fmt, w, h, mode, factor))


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, max_decoded_pixels: int | None = None
                 ) -> np.ndarray:
    """Decode untrusted image bytes to an upright 8-bit RGB array.

    Args:
        data: the encoded file (JPEG, PNG, WebP, BMP, TIFF, GIF, PPM; see :data:`SUPPORTED_FORMATS`).
        max_bytes: largest accepted ``len(data)``.
        max_pixels: largest accepted ``width * height``, checked on the declared header size before decoding.
        max_decoded_pixels: decode a larger photo downscaled by the smallest integer factor that fits (None:
            always full size; :func:`decode_photo` also returns the original size).

    Returns:
        ``(H, W, 3) uint8`` RGB, C-contiguous, writable; row 0 is the top of the (EXIF-rotated) photo, so
        image coordinates are x = column (right), y = row (**down**), integers at pixel centres.

    Raises:
        ImageTooLarge: more than ``max_bytes`` bytes or more than ``max_pixels`` pixels (also Pillow's
            decompression-bomb error/warning, and a ``MemoryError`` while decoding).
        UnsupportedImageType: empty input, or bytes that are not an image of a supported format.
        ImageDecodeError: a recognised image that is truncated or corrupt.
    """
    return decode_photo(data, max_bytes=max_bytes, max_pixels=max_pixels,
                        max_decoded_pixels=max_decoded_pixels).image


def decode_photo(data: bytes, *, max_bytes: int, max_pixels: int, max_decoded_pixels: int | None = None
                 ) -> DecodedPhoto:
    """:func:`decode_image`, also returning the photo's original (EXIF-rotated) size."""
    n_bytes = _check_bytes(data, max_bytes)
    _configure_pillow_guard(max_pixels)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(data) as opened:
                _check_pixels(opened.size, max_pixels)
                fmt = opened.format
                w0, h0 = opened.size
                factor = _reduction(w0, h0, max_decoded_pixels)
                if factor > 1 and fmt in ("JPEG", "MPO"):
                    # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly (the full-size image never exists)
                    opened.draft(None, (-(-w0 // factor), -(-h0 // factor)))
                opened.load()  # decode every pixel now: truncation and corruption surface here
                _check_pixels(opened.size, max_pixels)  # a few plugins settle the size at load time
                im = _reduce_to(opened, -(-w0 // factor), -(-h0 // factor)) if factor > 1 else opened
                orientation = _orientation(opened)
                im = _transpose(im, orientation)
                arr = to_rgb8(im)
    except (ImageTooLarge, UnsupportedImageType, ImageDecodeError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image has too many pixels (limit {max_pixels})", max_pixels=max_pixels) from exc
    except MemoryError as exc:
        raise ImageTooLarge("not enough memory to decode the image", max_pixels=max_pixels) from exc
    except Exception as exc:  # any Pillow/codec failure on a recognised header: corrupt or truncated
        raise ImageDecodeError(f"corrupt or truncated image: {exc}", reason=type(exc).__name__) from exc
    size = (h0, w0) if orientation in _SWAPS_AXES else (w0, h0)
    logger.debug("decoded %s image %dx%d (of %dx%d) from %d bytes", fmt, arr.shape[1], arr.shape[0], *size, n_bytes)
    return DecodedPhoto(image=arr, original_size=size)


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
    if im.mode == "F":
        grey = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scaled = grey * 255.0 if grey.size and float(grey.max()) <= 1.0 else grey
        g8 = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    else:  # round(v / 257) in integers (never a tie: 2v = 257 (2k + 1) has no integer v), a quarter of the memory
        grey = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # numpy honours I;16B's byte order
        grey *= 2
        grey += 257
        grey //= 514
        g8 = grey.astype(np.uint8)
    return np.repeat(g8[:, :, None], 3, axis=2)


#: EXIF orientation -> the transpose that makes the photo upright (as ``ImageOps.exif_transpose``).
_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
_SWAPS_AXES = frozenset((5, 6, 7, 8))


def _orientation(source: Image.Image) -> int:
    """The EXIF orientation tag of the opened file (1 when absent or unreadable)."""
    try:
        value = source.getexif().get(0x0112, 1)
        return int(value) if int(value) in _TRANSPOSES else 1
    except Exception:  # a malformed EXIF block must not fail an otherwise good photo
        logger.warning("ignoring unreadable EXIF orientation", exc_info=True)
        return 1


def _transpose(im: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSES.get(orientation)
    return im if method is None else im.transpose(method)


def _reduce_to(im: Image.Image, width: int, height: int) -> Image.Image:
    """``im`` reduced to ``width x height`` (box filter); the larger image is freed by the caller.

    An integer factor is applied strip by strip (crop, convert when ``reduce`` does not take the mode -- palette,
    1-bit, 16-bit --, reduce, paste), so no full-size copy is made (``reduce`` itself would premultiply a full-size
    RGBA copy); a JPEG drafted to a libjpeg scale is box-resized to the exact size."""
    if im.size == (width, height):
        return im
    factor = -(-im.width // width)
    if -(-im.width // factor) != width or -(-im.height // factor) != height:
        return im.resize((width, height), Image.Resampling.BOX)
    target = ("RGBA" if "transparency" in im.info else "RGB") if im.mode == "P" else _REDUCE_VIA.get(im.mode, im.mode)
    out = Image.new(target, (width, height))
    rows = factor * max(1, _STRIP_PIXELS // max(1, im.width * factor))  # whole output rows per strip
    for y in range(0, im.height, rows):
        strip = im.crop((0, y, im.width, min(im.height, y + rows)))
        if strip.mode != target:
            strip = strip.convert(target)
        out.paste(strip.reduce(factor), (0, y // factor))
    return out


def _check_bytes(data: bytes, max_bytes: int) -> int:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    n_bytes = len(data)
    if n_bytes == 0:
        raise UnsupportedImageType("empty upload: zero bytes", n_bytes=0)
    if n_bytes > max_bytes:
        raise ImageTooLarge(
            f"image is {n_bytes} bytes, the limit is {max_bytes}", n_bytes=n_bytes, max_bytes=max_bytes
        )
    return n_bytes


def _open(data: bytes) -> Image.Image:
    """``Image.open`` over the accepted formats; bytes with a known signature that do not parse are corrupt."""
    try:
        return Image.open(io.BytesIO(data), formats=_available_formats())
    except UnidentifiedImageError as exc:
        head = bytes(data[:16])
        if any(head[at:at + len(sig)] == sig for at, sig in _SIGNATURES) or _looks_like_ppm(head):
            raise ImageDecodeError("corrupt image: the file starts as an image but its header does not parse",
                                   reason="header") from exc
        raise UnsupportedImageType("not an image of a supported format", supported=list(SUPPORTED_FORMATS)) from exc


def _looks_like_ppm(head: bytes) -> bool:
    return len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n"


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
