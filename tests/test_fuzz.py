"""Property/fuzz tests of the upload path (issue #8), with hypothesis, against a real uvicorn server on 127.0.0.1.

The app is the real one (``create_app``) with the real :class:`~facerecon.pipeline.Reconstructor` and a short fit
(so a corrupted photo that still decodes is reconstructed cheaply); everything before the fit (multipart
streaming, byte limits, the decode path of :func:`facerecon.imaging.decode_image`, detection, alignment) is
what production runs. Properties:

* junk (random bytes, zero bytes, truncated or bit-flipped photos, headers declaring huge sizes, wrong field
  names, wrong content types) is answered with a 4xx in the one JSON error shape, never a 5xx and never a hang
  (every request has a client-side timeout);
* a well-formed header declaring more than ``max_image_pixels`` is a 413 ``image_too_large``, decided from the
  header (PNG IHDR, JPEG SOF, BMP info header, GIF screen and image descriptors);
* a corrupted photo that still decodes may be reconstructed (200): the bytes decide, not the file name or the
  declared content type.

Bounded: 80 examples per property, well under a minute on two shared cores.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from facerecon.api.app import create_app
from facerecon.api.server import serve_in_thread
from facerecon.config import Settings
from tests.conftest import EXAMPLES, need_shared
from tests.server_utils import wait_ready

pytestmark = pytest.mark.timeout(300)

MAX_PIXELS = 4_000_000
MAX_UPLOAD = 512 * 1024
CLIENT_TIMEOUT = 30.0  # a hang fails the test instead of blocking it
IMAGE_TYPES = ["image/jpeg", "image/png", "image/gif", "image/bmp", "image/webp", "image/tiff"]
OTHER_TYPES = ["text/plain", "application/octet-stream", "application/json", "video/mp4", "", "image/x-nonsense"]
ERROR_CODES_4XX = {"not_an_image", "corrupt_image", "image_too_large", "no_face", "validation_error",
                   "unsupported_media_type", "malformed_request"}
FUZZ = settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _cheap_reconstructor() -> Any:
    from facerecon.fit import FitConfig
    from facerecon.pipeline import Reconstructor

    return Reconstructor(fit_config=FitConfig(landmark_steps=3, photo_steps=0))


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    s = Settings(workers=1, queue_size=4, max_upload_bytes=MAX_UPLOAD, max_image_pixels=MAX_PIXELS,
                 request_timeout_s=60.0, graceful_timeout_s=5.0)
    with serve_in_thread(create_app(s, _cheap_reconstructor), s) as server:
        wait_ready(server.url, 120)
        yield server.url


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    """A real photo, downscaled so a bit-flipped copy that still decodes is cheap to reconstruct."""
    need_shared("data", "deep3d-examples", "000002.jpg")
    im = Image.open(EXAMPLES / "000002.jpg").convert("RGB")
    im.thumbnail((240, 240))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def png(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="PNG")
    return buf.getvalue()


def post(client: httpx.Client, data: bytes, *, ctype: str = "image/jpeg", field: str = "image",
         filename: str = "p.jpg", path: str = "/v1/reconstruct") -> httpx.Response:
    return client.post(path, files={field: (filename, data, ctype)})


def assert_error(r: httpx.Response, *statuses: int) -> dict[str, Any]:
    """A 4xx (one of ``statuses`` when given) in the one JSON error shape."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] in ERROR_CODES_4XX, body
    return body["error"]


def assert_ok_or_error(r: httpx.Response) -> None:
    if r.status_code == 200:
        assert r.headers["content-type"].startswith("model/obj") and b"\nv " in r.content
    else:
        assert_error(r)


# -- headers that declare a size --------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(w: int, h: int, body: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(body)) + _chunk(b"IEND", b"")


def jpeg_declaring(w: int, h: int, body: bytes = b"") -> bytes:
    soi, app0 = b"\xff\xd8", b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return soi + app0 + sof + body + b"\xff\xd9"


def bmp_declaring(w: int, h: int, body: bytes = b"") -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(body), 0, 0, 54) + info + body


def gif_declaring(w: int, h: int, body: bytes = b"") -> bytes:
    screen = struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + body + b"\x3b"


HEADERS = {"png": png_declaring, "jpeg": jpeg_declaring, "bmp": bmp_declaring, "gif": gif_declaring}
MAX_SIDE = {"png": 2**31 - 1, "jpeg": 65535, "bmp": 2**31 - 1, "gif": 65535}


# -- properties ---------------------------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(min_size=0, max_size=4096), ctype=st.sampled_from(IMAGE_TYPES + OTHER_TYPES),
       path=st.sampled_from(["/v1/reconstruct", "/v1/reconstruct/set"]))
def test_random_bytes_are_a_4xx(client: httpx.Client, data: bytes, ctype: str, path: str) -> None:
    field = "image" if path == "/v1/reconstruct" else "images"
    assert_error(post(client, data, ctype=ctype, field=field, path=path))


@pytest.mark.parametrize("ctype", ["image/jpeg", "image/png", "text/plain", ""])
@pytest.mark.parametrize("path", ["/v1/reconstruct", "/v1/reconstruct/set"])
def test_zero_byte_file(client: httpx.Client, ctype: str, path: str) -> None:
    field = "image" if path == "/v1/reconstruct" else "images"
    err = assert_error(post(client, b"", ctype=ctype, field=field, path=path))
    assert err["code"] in {"not_an_image", "validation_error"}


@FUZZ
@given(kind=st.sampled_from(sorted(HEADERS)), w=st.integers(1, 2**31 - 1), h=st.integers(1, 2**31 - 1),
       body=st.binary(max_size=64))
def test_huge_declared_dimensions(client: httpx.Client, kind: str, w: int, h: int, body: bytes) -> None:
    w, h = min(w, MAX_SIDE[kind]), min(h, MAX_SIDE[kind])
    r = post(client, HEADERS[kind](w, h, body), filename=f"bomb.{kind}")
    err = assert_error(r)
    # Decided from the header, before any pixel is decoded, when the header is well formed: PNG and BMP put the
    # junk in pixel data; a JPEG or GIF with junk after its header may not be identified at all (a 415 then).
    if w * h > MAX_PIXELS and (not body or kind in ("png", "bmp")):
        assert r.status_code == 413 and err["code"] == "image_too_large", (kind, w, h, err)


@pytest.mark.parametrize("kind", sorted(HEADERS))
@pytest.mark.parametrize("size", [(MAX_SIDE["gif"], MAX_SIDE["gif"]), (100, MAX_SIDE["gif"]), (20_000, 20_000),
                                  (2001, 2000)])
def test_declared_pixel_bomb_is_a_413(client: httpx.Client, kind: str, size: tuple[int, int]) -> None:
    w, h = size
    assert w * h > MAX_PIXELS
    err = assert_error(post(client, HEADERS[kind](w, h), filename=f"bomb.{kind}"), 413)
    assert err["code"] == "image_too_large"


@FUZZ
@given(data=st.data())
def test_truncated_photo(client: httpx.Client, jpeg: bytes, png: bytes, data: st.DataObject) -> None:
    photo, ctype = data.draw(st.sampled_from([(jpeg, "image/jpeg"), (png, "image/png")]))
    cut = data.draw(st.integers(0, len(photo) - 1))
    assert_ok_or_error(post(client, photo[:cut], ctype=ctype))


@FUZZ
@given(data=st.data())
def test_corrupted_photo(client: httpx.Client, jpeg: bytes, png: bytes, data: st.DataObject) -> None:
    photo, ctype = data.draw(st.sampled_from([(jpeg, "image/jpeg"), (png, "image/png")]))
    buf = bytearray(photo)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(1, 255)), min_size=1,
                               max_size=16))
    for pos, mask in flips:
        buf[pos] ^= mask
    assert_ok_or_error(post(client, bytes(buf), ctype=ctype))


@FUZZ
@given(field=st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='"\\;'),
                     min_size=1, max_size=20).filter(lambda s: s not in ("image", "images")),
       path=st.sampled_from(["/v1/reconstruct", "/v1/reconstruct/set"]))
def test_wrong_field_name(client: httpx.Client, png: bytes, field: str, path: str) -> None:
    err = assert_error(post(client, png, ctype="image/png", field=field, path=path), 422)
    assert err["code"] == "validation_error"


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(ctype=st.sampled_from(OTHER_TYPES), filename=st.sampled_from(["notes.txt", "a", "p.jpg", "x.exe"]))
def test_wrong_content_type(client: httpx.Client, png: bytes, ctype: str, filename: str) -> None:
    # Text under any declared type: a 415; a real photo under a wrong declared type: the bytes decide.
    assert_error(post(client, b"just some text\n" * 10, ctype=ctype, filename=filename), 415)
    assert_ok_or_error(post(client, png, ctype=ctype, filename=filename))


def test_body_not_multipart(client: httpx.Client, png: bytes) -> None:
    for headers, content in [({"content-type": "image/png"}, png), ({"content-type": "application/json"}, b"{}"),
                             ({"content-type": "multipart/form-data"}, b"--x\r\n"),  # no boundary
                             ({"content-type": "multipart/form-data; boundary=x"}, b"--x\r\ngarbage"),
                             ({}, b"")]:
        r = client.post("/v1/reconstruct", content=content, headers=headers)
        assert_error(r)


def test_a_real_photo_still_works(client: httpx.Client, jpeg: bytes) -> None:
    """The control: the fuzzed path reconstructs an intact photo (so the 4xx above are not a broken server)."""
    r = post(client, jpeg)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"].startswith("model/obj") and b"\nv " in r.content
