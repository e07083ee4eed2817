"""The service's and the batch's overlay PNGs go through the fast encoder (``facerecon.render.overlay.encode_png``:
every row with the ``up`` filter, zlib level 1), not Pillow at level 3 (about 88 ms for a photo-sized overlay)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.conftest import EXAMPLES

PHOTO = "000002.jpg"


def row_filters(png: bytes) -> set[int]:
    """The filter type byte of every row of an 8-bit RGB PNG."""
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(png):
        (n,), tag = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        body = png[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            assert body[8:10] == b"\x08\x02", "8-bit RGB"
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = width * 3 + 1
    assert len(raw) == stride * height
    return {raw[r * stride] for r in range(height)}


def test_the_encoder_signature() -> None:
    from facerecon.render.overlay import encode_png

    img = np.asarray(Image.open(EXAMPLES / PHOTO).convert("RGB"))
    assert row_filters(encode_png(img)) == {2}
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=3)
    assert row_filters(buf.getvalue()) != {2}, "Pillow filters adaptively: the check tells the two apart"


def test_api_overlays_use_the_fast_encoder(live_server: str) -> None:
    photo = (EXAMPLES / PHOTO).read_bytes()
    files = {"image": (PHOTO, photo, "image/jpeg")}
    png = httpx.post(f"{live_server}/v1/reconstruct", files=files, data={"format": "png", "refine": "false"},
                     timeout=120)
    assert png.status_code == 200, png.text
    assert row_filters(png.content) == {2}
    assert Image.open(io.BytesIO(png.content)).size == Image.open(EXAMPLES / PHOTO).size
    doc = httpx.post(f"{live_server}/v1/reconstruct", files=files,
                     data={"format": "json", "include": "overlay", "refine": "false"}, timeout=120)
    assert doc.status_code == 200, doc.text
    import base64

    assert row_filters(base64.b64decode(doc.json()["faces"][0]["overlay"]["data"])) == {2}


def test_batch_overlays_use_the_fast_encoder(reconstructor: Any, tmp_path: Path) -> None:
    from facerecon.batch.inputs import PhotoRef, WorkUnit
    from facerecon.batch.worker import UnitProcessor, WorkConfig

    out = tmp_path / "out"
    config = WorkConfig(out=str(out), run_id="png", refine=False, overlay=True)
    ref = PhotoRef(photo_id="p0", key=str(EXAMPLES / PHOTO), source=str(EXAMPLES / PHOTO), input_index=0)
    rows = UnitProcessor(config, reconstructor).process(WorkUnit(index=0, members=[ref]))
    assert [r["status"] for r in rows] == ["ok"], rows
    (overlay,) = out.glob("faces/*/overlay.png")
    assert row_filters(overlay.read_bytes()) == {2}
