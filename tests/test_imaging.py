"""Tests of facerecon.imaging: formats, EXIF orientation, modes, limits and hostile input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from facerecon.errors import ImageDecodeError, ImageTooLarge, UnsupportedImageType
from facerecon.imaging import decode_image, load_image, to_rgb8

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EXAMPLES = SHARED / "data" / "deep3d-examples"

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 25_000_000}


def _decode(data: bytes, **kw: int) -> np.ndarray:
    return decode_image(data, **{**LIMITS, **kw})


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _test_rgb(w: int = 64, h: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) % 256], axis=2).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes | None) -> bytes:
    """A PNG written by hand (Pillow cannot write 48-bit RGB; and to fake huge headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(raw_rows if raw_rows is not None else b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize(
    ("fmt", "params", "lossless"),
    [
        ("PNG", {}, True),
        ("BMP", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("TIFF", {}, True),
        ("PPM", {}, True),
        ("JPEG", {"quality": 95}, False),
        ("WEBP", {"quality": 90}, False),
    ],
)
def test_round_trip(fmt: str, params: dict[str, object], lossless: bool) -> None:
    rgb = _test_rgb()
    out = _decode(_encode(Image.fromarray(rgb), fmt, **params))
    assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    if lossless:
        assert np.array_equal(out, rgb)
    else:
        assert np.abs(out.astype(int) - rgb).mean() < 4.0


def test_gif_first_frame() -> None:
    frames = [Image.fromarray(np.full((20, 30, 3), c, np.uint8)) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = _decode(buf.getvalue())
    assert out.shape == (20, 30, 3)
    assert tuple(out[5, 5]) == (255, 0, 0)


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"reference example photos not found at {EXAMPLES}")
def test_load_image_matches_pillow_on_the_examples() -> None:
    for name in ("000002.jpg", "vd006.png"):
        out = load_image(EXAMPLES / name)
        assert np.array_equal(out, np.asarray(Image.open(EXAMPLES / name).convert("RGB")))


# ----------------------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_6_rotates() -> None:
    """Orientation 6 = the stored image must be turned 90 degrees clockwise for display."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = (255, 0, 0)  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = _decode(data)
    assert out.shape == (60, 40, 3)  # width and height swapped
    # after a clockwise quarter turn the stored top-left sits at the top-right
    assert out[3, 36, 0] > 200 and out[3, 36, 1] < 60
    assert out[3, 3, 0] < 60


def test_no_exif_orientation_leaves_pixels() -> None:
    rgb = _test_rgb()
    exif = Image.Exif()
    exif[0x0112] = 1
    assert np.array_equal(_decode(_encode(Image.fromarray(rgb), "PNG", exif=exif.tobytes())), rgb)


# ----------------------------------------------------------------------------------------------------------
# modes


def test_grayscale_to_rgb() -> None:
    grey = _test_rgb()[:, :, 0]
    out = _decode(_encode(Image.fromarray(grey, mode="L"), "PNG"))
    assert out.shape == (*grey.shape, 3)
    assert all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_one_bit_to_rgb() -> None:
    bits = Image.fromarray((_test_rgb()[:, :, 0] > 128).astype(np.uint8) * 255).convert("1")
    out = _decode(_encode(bits, "PNG"))
    assert set(np.unique(out)) <= {0, 255}


def test_rgba_composited_on_white() -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :6, 3] = 255  # left half opaque red-ish, right half fully transparent (black underneath)
    rgba[:, 6:, 3] = 0
    rgba[0, 0, 3] = 128  # half transparent
    out = _decode(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert tuple(out[5, 2]) == (200, 0, 0)
    assert tuple(out[5, 9]) == (255, 255, 255)
    assert abs(int(out[0, 0, 0]) - 227) <= 1 and abs(int(out[0, 0, 1]) - 127) <= 1


def test_la_and_palette_transparency_on_white() -> None:
    la = Image.fromarray(np.dstack([np.full((8, 8), 50, np.uint8), np.zeros((8, 8), np.uint8)]), mode="LA")
    assert np.all(_decode(_encode(la, "PNG")) == 255)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50])
    pal.putpixel((0, 0), 2)
    data = _encode(pal, "PNG", transparency=1)  # palette entry 1 is transparent
    out = _decode(data)
    assert np.all(out[1:] == 255) and tuple(out[0, 0]) == (200, 100, 50)
    plain = _decode(_encode(pal, "PNG"))  # no transparency: plain palette colours
    assert tuple(plain[3, 3]) == (10, 20, 30) and tuple(plain[0, 0]) == (200, 100, 50)


def test_cmyk_jpeg_to_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = _decode(_encode(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 16, 3)
    assert out[8, 8, 0] > 200 and out[8, 8, 1] < 60 and out[8, 8, 2] < 60


def test_16bit_grey_png_to_8bit() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(3, axis=0)
    data = _encode(Image.fromarray(values), "PNG")
    out = _decode(data)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(out[..., 0], out[..., 2])


def test_16bit_big_endian_and_int_modes() -> None:
    values = np.array([[0, 514, 65535]], dtype=">u2")
    im = Image.frombytes("I;16B", (3, 1), values.tobytes())
    assert to_rgb8(im)[0, :, 1].tolist() == [0, 2, 255]
    as_i = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert to_rgb8(as_i)[0, :, 0].tolist() == [0, 255]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert to_rgb8(as_f)[0, :, 0].tolist() == [0, 128, 255]


def test_48bit_rgb_png_to_8bit() -> None:
    px = [(0xFFFF, 0x8000, 0x0000), (0x0100, 0x00FF, 0x7F80)]
    row = b"\x00" + b"".join(struct.pack(">HHH", *p) for p in px)
    out = _decode(_png(2, 1, 16, 2, row))
    assert out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [255, 128, 0]
    assert out[0, 1].tolist() == [1, 0, 127]  # the high byte of each 16-bit sample


# ----------------------------------------------------------------------------------------------------------
# hostile and broken input


def test_truncated_jpeg_is_an_error() -> None:
    data = _encode(Image.fromarray(_test_rgb(200, 150)), "JPEG", quality=90)
    for cut in (len(data) // 2, len(data) - 10):
        with pytest.raises(ImageDecodeError):
            _decode(data[:cut])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_an_error() -> None:
    data = _encode(Image.fromarray(_test_rgb(200, 150)), "PNG")
    with pytest.raises(ImageDecodeError):
        _decode(data[: len(data) // 2])


def test_truncated_load_flag_is_forced_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _encode(Image.fromarray(_test_rgb(200, 150)), "JPEG")
    with pytest.raises(ImageDecodeError):
        _decode(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data_is_an_error() -> None:
    data = bytearray(_encode(Image.fromarray(_test_rgb()), "PNG"))
    data[60:80] = b"\xff" * 20  # inside the compressed IDAT stream
    with pytest.raises(ImageDecodeError):
        _decode(bytes(data))


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(5000),
        b"hello, this is not an image\n" * 10,
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        b"\x00",
    ],
)
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(UnsupportedImageType):
        _decode(data)


def test_zero_bytes() -> None:
    with pytest.raises(UnsupportedImageType):
        _decode(b"")


def test_format_pillow_reads_but_we_do_not_accept() -> None:
    ico = _encode(Image.fromarray(_test_rgb(32, 32)), "ICO")
    with pytest.raises(UnsupportedImageType):
        _decode(ico)


def test_byte_limit() -> None:
    data = _encode(Image.fromarray(_test_rgb()), "PNG")
    with pytest.raises(ImageTooLarge):
        _decode(data, max_bytes=len(data) - 1)
    assert _decode(data, max_bytes=len(data)).shape == (48, 64, 3)


@pytest.mark.parametrize(("max_pixels", "pillow_guard"), [(25_000_000, True), (60_000_000, True), (99_999_999, False)])
def test_declared_100_megapixels_rejected_before_decoding(
    max_pixels: int, pillow_guard: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 300-byte PNG whose header says 10000 x 10000: rejected from the header, pixels never decoded.
    25 MP: Pillow's guard raises (over twice its limit); 60 MP: Pillow's warning, escalated to an error;
    without Pillow's guard (MAX_IMAGE_PIXELS = None): our own header check."""
    data = _png(10_000, 10_000, 8, 2, None)
    if not pillow_guard:
        monkeypatch.setattr("facerecon.imaging._configure_pillow_guard", lambda max_pixels: None)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert len(data) < 400
    loads: list[object] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        loads.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_bytes=1_000_000, max_pixels=max_pixels)
    assert loads == []


def test_pixel_limit_exact_boundary() -> None:
    data = _encode(Image.fromarray(_test_rgb(64, 48)), "PNG")
    assert _decode(data, max_pixels=64 * 48).shape == (48, 64, 3)
    with pytest.raises(ImageTooLarge):
        _decode(data, max_pixels=64 * 48 - 1)


def test_load_image_byte_limit(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    p.write_bytes(_encode(Image.fromarray(_test_rgb()), "PNG"))
    assert load_image(p).shape == (48, 64, 3)
    with pytest.raises(ImageTooLarge):
        load_image(p, max_bytes=10)


def test_corrupt_exif_is_ignored() -> None:
    rgb = _test_rgb()
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff")
    out = _decode(data)
    assert out.shape == rgb.shape


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_mangled_files_only_raise_typed_errors(fmt: str) -> None:
    """Random byte flips, cuts and splices: the result is an image or one of our typed errors, never a raw
    Pillow/codec exception."""
    good = _encode(Image.fromarray(_test_rgb(40, 30)), fmt)
    rng = np.random.default_rng(sum(fmt.encode()))
    for _ in range(40):
        data = bytearray(good)
        kind = rng.integers(3)
        if kind == 0:
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(256))
        elif kind == 1:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            a = int(rng.integers(0, len(data)))
            data[a:a] = rng.bytes(int(rng.integers(1, 64)))
        try:
            out = _decode(bytes(data))
        except (ImageDecodeError, UnsupportedImageType, ImageTooLarge):
            continue
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


# ----------------------------------------------------------------------------------------------------------
# a valid signature over a broken header (issue #18 item 8), downscaling at decode time (issue #19)


def test_jpeg_with_broken_tables_is_corrupt_not_unsupported() -> None:
    """A JPEG whose quantisation table is garbage: Pillow cannot even identify it, but the bytes start as a JPEG,
    so it is a corrupt image (400), not "not an image" (415)."""
    data = bytearray(_encode(Image.fromarray(_test_rgb(80, 60)), "JPEG"))
    at = data.find(b"\xff\xdb")
    data[at + 4:at + 40] = b"\xff" * 36
    with pytest.raises(ImageDecodeError):
        _decode(bytes(data))
    png = _encode(Image.fromarray(_test_rgb()), "PNG")
    with pytest.raises(ImageDecodeError):  # a PNG signature over a mangled IHDR
        _decode(png[:12] + b"\x00" * 20 + png[32:])


def test_downscaled_at_decode_time_with_the_original_size() -> None:
    from facerecon.imaging import decode_photo

    rgb = _test_rgb(640, 480)
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        photo = decode_photo(_encode(Image.fromarray(rgb), fmt), **LIMITS, max_decoded_pixels=100_000)
        h, w = photo.image.shape[:2]
        assert w * h <= 100_000 and photo.original_size == (640, 480), fmt
        assert (w, h) == (320, 240), fmt  # the smallest integer factor that fits: 2
        assert photo.scale == 0.5
        ref = np.asarray(Image.fromarray(rgb).reduce(2), np.float32)
        assert np.abs(photo.image.astype(np.float32) - ref).mean() < 8, fmt  # the same picture, smaller
    small = decode_photo(_encode(Image.fromarray(rgb), "PNG"), **LIMITS, max_decoded_pixels=640 * 480)
    assert small.image.shape == (480, 640, 3) and small.scale == 1.0


def test_large_jpeg_is_never_decoded_at_full_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """libjpeg decodes at 1/8 scale (``draft``): the full-size image is never allocated."""
    from facerecon.imaging import decode_photo, probe_image

    data = _encode(Image.fromarray(np.zeros((4000, 6000, 3), np.uint8)), "JPEG", quality=50)
    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    photo = decode_photo(data, **LIMITS, max_decoded_pixels=1_000_000)
    assert set(sizes) == {(1500, 1000)}  # drafted to 1/4 before any pixel was decoded
    assert photo.image.shape == (800, 1200, 3) and photo.original_size == (6000, 4000)
    probe = probe_image(data, **LIMITS, max_decoded_pixels=1_000_000)
    assert probe.scale_factor == 5 and probe.decoded_size == (1200, 800)
    assert probe.decode_bytes < 4 * 6000 * 4000 // 3  # the drafted image, not 24 MP at 4 bytes
    assert probe_image(data, **LIMITS).decode_bytes > 4 * 6000 * 4000  # undrafted: the full size


def test_downscale_keeps_exif_orientation_and_reports_the_upright_size() -> None:
    from facerecon.imaging import decode_photo

    rgb = _test_rgb(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    full = decode_photo(data, **LIMITS)
    small = decode_photo(data, **LIMITS, max_decoded_pixels=20_000)
    assert full.image.shape == (400, 200, 3) and full.original_size == (200, 400)
    assert small.original_size == (200, 400) and small.image.shape == (200, 100, 3)


@pytest.mark.parametrize("mode", ["1", "P", "I;16", "RGBA", "LA"])
def test_downscale_every_mode(mode: str) -> None:
    from facerecon.imaging import decode_photo

    im = Image.fromarray(_test_rgb(300, 200)).convert("L").convert(mode)
    fmt = "TIFF" if mode == "I;16" else "PNG"
    photo = decode_photo(_encode(im, fmt), **LIMITS, max_decoded_pixels=10_000)
    assert photo.image.dtype == np.uint8 and photo.image.shape == (67, 100, 3) and photo.original_size == (300, 200)
