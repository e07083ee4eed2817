"""The HTTP service, end to end: a real uvicorn server on 127.0.0.1 with the real pipeline and real photos, plus
small servers over a stand-in reconstructor for what needs control of timing (readiness, overload, timeouts,
graceful shutdown, a bug)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from facerecon.api.app import create_app
from facerecon.api.server import RunningServer, serve_in_thread
from facerecon.api.workers import InferencePool
from facerecon.config import Settings
from facerecon.errors import NoFaceFound
from tests.conftest import EXAMPLES, LIVE_MAX_SET, LIVE_MAX_UPLOAD, need_shared

pytestmark = pytest.mark.timeout(300)

PHOTO = "000002.jpg"
SET_PHOTOS = ("Aaron_Peirsol_0001.jpg", "Aaron_Peirsol_0003.jpg", "Aaron_Peirsol_0004.jpg")
MAX_UPLOAD = LIVE_MAX_UPLOAD  # small, so the 413 tests send little
MAX_SET = LIVE_MAX_SET


# -- helpers ----------------------------------------------------------------------------------------------------------
def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def gradient_png(w: int = 256, h: int = 192) -> bytes:
    """A smooth gradient: an image, but no face."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    img = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2)
    return png_bytes(img.astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` (valid signature, IHDR with its CRC, an empty IDAT and IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", binascii.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def metric_samples(text: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for s in metric_samples(text):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def wait_ready(url: str, timeout: float) -> None:
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout, 0.2)


# -- the stand-in reconstructor ----------------------------------------------------------------------------------------
class FakeReconstructor:
    """Instant, gated or failing answers, no models: what the app sees of the engine."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.fail: Exception | None = None
        self.calls = 0
        self.faces = 2  # detected with faces=all
        self.reconstructed: list[int] = []  # faces per reconstruct call

    def _work(self) -> None:
        self.calls += 1
        assert self.gate.wait(60), "test gate never opened"
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail

    def reconstruct(self, image: np.ndarray, *, which: str = "largest", refine: bool | None = None,
                    faces: list[Any] | None = None, checkpoint: Any = None) -> list[Any]:
        if checkpoint is not None:
            checkpoint("estimate")
        self._work()
        if checkpoint is not None:
            checkpoint("finish")
        self.reconstructed.append(len(faces) if faces is not None else 1)
        return [SimpleNamespace(mode="fake", timings={"fit": 1.0}, face=SimpleNamespace(score=1.0))
                for _ in range(len(faces) if faces is not None else 1)]

    def detect(self, image: np.ndarray, which: str = "largest") -> list[Any]:
        return [object() for _ in range(self.faces if which == "all" else 1)]

    def export(self, rec: Any, fmt: str) -> bytes:
        return f"mesh {fmt}\n".encode()

    def export_files(self, image: np.ndarray, rec: Any, fmt: str, texture: str = "none") -> dict[str, bytes]:
        return {f"mesh.{fmt}": self.export(rec, fmt)}

    def overlay(self, image: np.ndarray, rec: Any) -> np.ndarray:
        return image

    def maps(self, rec: Any) -> Any:
        raise NotImplementedError

    def map_pngs(self, recs: Any, kinds: Any = ("depth", "normals")) -> dict[str, bytes]:
        return {k: SMALL_PNG for k in kinds}

    def reconstruct_set(self, images: Any, *, refine: bool | None = None, checkpoint: Any = None,
                        on_missing: str = "fail") -> Any:
        raise NoFaceFound("the fake sees no faces in sets")

    def identity_mesh(self, rec: Any) -> Any:
        raise NotImplementedError

    def to_json(self, rec: Any) -> dict[str, Any]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"face_model": {"name": "fake"}, "device": "cpu", "renderer": "none", "default_mode": "fake"}


SMALL_PNG = png_bytes(np.full((32, 48, 3), 127, np.uint8))


@contextmanager
def fake_server(reconstructor: Any, **overrides: Any) -> Iterator[RunningServer]:
    settings = Settings(**{"warmup": False, "workers": 1, "queue_size": 2, "graceful_timeout_s": 5.0,
                           **overrides})
    with serve_in_thread(create_app(settings, reconstructor), settings) as server:
        yield server


def post_image(url: str, data: bytes = SMALL_PNG, timeout: float = 60.0, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/reconstruct", files={"image": ("p.png", data, "image/png")}, data=fields,
                      timeout=timeout)


# -- the real server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(live_server: str) -> str:
    return live_server


@pytest.fixture(scope="module")
def photo() -> bytes:
    return (EXAMPLES / PHOTO).read_bytes()


@pytest.fixture(scope="module")
def photo_size(photo: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(photo)).size


@pytest.fixture(scope="module")
def model_info(live: str) -> dict[str, Any]:
    r = httpx.get(f"{live}/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def obj_response(live: str, photo: bytes) -> httpx.Response:
    t0 = time.perf_counter()
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": (PHOTO, photo, "image/jpeg")}, timeout=240)
    logging.getLogger(__name__).info("one OBJ reconstruct request: %.2f s", time.perf_counter() - t0)
    return r


def test_healthz_and_readyz(live: str) -> None:
    assert httpx.get(f"{live}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{live}/readyz").json()
    assert ready["ready"] is True and ready["face_model"] == "ict"
    assert ready["warmup_ms"] > 0  # the warm-up inference ran before readiness


def test_models(model_info: dict[str, Any]) -> None:
    assert model_info["face_model"]["name"] == "ict"
    assert model_info["device"] == "cpu"
    assert model_info["default_mode"] in ("fit", "rnet", "rnet+lm", "rnet+fit")
    assert "rnet" in model_info and "cnet" in model_info  # null when not installed
    assert model_info["limits"]["max_set_images"] == MAX_SET


def test_reconstruct_obj(obj_response: httpx.Response, model_info: dict[str, Any]) -> None:
    import trimesh

    r = obj_response
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("model/obj")
    assert r.headers["x-face-count"] == "1"
    assert r.headers["x-reconstruction-mode"] in ("fit", "rnet", "rnet+lm", "rnet+fit")
    stages = {item.split(";")[0].strip() for item in r.headers["server-timing"].split(",")}
    assert {"read", "image", "queue", "detect", "export", "total"} <= stages
    mesh = trimesh.load(io.BytesIO(r.content), file_type="obj", process=False, force="mesh", maintain_order=True)
    assert len(mesh.vertices) == model_info["face_model"]["n_vertices"]
    assert len(mesh.faces) == model_info["face_model"]["n_triangles"]


def test_reconstruct_json(live: str, photo: bytes, photo_size: tuple[int, int], model_info: dict[str, Any]) -> None:
    import trimesh

    r = httpx.post(f"{live}/v1/reconstruct", files={"image": (PHOTO, photo, "image/jpeg")},
                   data={"include": "mesh,overlay"}, headers={"Accept": "application/json"}, timeout=240)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    w, h = photo_size
    assert body["photo_size"] == [w, h] and body["face_count"] == 1 and len(body["faces"]) == 1
    face = body["faces"][0]
    lm = np.array(face["landmarks68"])
    assert lm.shape == (68, 2)
    assert (lm[:, 0] >= 0).all() and (lm[:, 0] < w).all() and (lm[:, 1] >= 0).all() and (lm[:, 1] < h).all()
    # the reprojected landmarks sit near the detected ones
    assert np.linalg.norm(lm - np.array(face["detected_landmarks68"]), axis=1).mean() < 15
    layout = body["layout"]
    for group, values in face["coefficients"].items():
        assert len(values) == layout[group], group
    assert set(face["expressions"]) == set(model_info["face_model"]["expression_names"])
    assert set(face["pose_degrees"]) == {"pitch", "yaw", "roll"}
    assert abs(face["pose_degrees"]["yaw"]) < 60
    det = face["detection"]  # the detector's confidences and its own pose estimate travel with every face
    assert det["reliable"] is True and det["warnings"] == []
    assert 0.6 <= det["score"] <= 1 and 0.5 <= det["landmark_score"] <= 1
    assert abs(det["pose_estimate"]["yaw"] - face["pose_degrees"]["yaw"]) < 15
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert face["alignment"]["w0"] == w and face["alignment"]["h0"] == h
    assert {"detect", "fit"} <= set(face["timings_ms"]) or {"detect", "rnet"} <= set(face["timings_ms"])
    mesh_bytes = base64.b64decode(face["mesh"]["data"])
    mesh = trimesh.load(io.BytesIO(mesh_bytes), file_type="obj", process=False, force="mesh", maintain_order=True)
    assert len(mesh.vertices) == model_info["face_model"]["n_vertices"]
    overlay = Image.open(io.BytesIO(base64.b64decode(face["overlay"]["data"])))
    assert overlay.format == "PNG" and overlay.size == (w, h)


def test_reconstruct_png(live: str, photo: bytes, photo_size: tuple[int, int]) -> None:
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": (PHOTO, photo, "image/jpeg")},
                   data={"format": "png"}, timeout=240)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(r.content))
    assert out.format == "PNG" and out.size == photo_size
    # the face was drawn: the overlay differs from the photo inside the face box
    original = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB")).astype(int)
    assert np.abs(np.asarray(out.convert("RGB")).astype(int) - original).mean() > 1.0


def test_reconstruct_set(live: str, model_info: dict[str, Any]) -> None:
    import trimesh

    paths = [need_shared("data", "faces-train", "lfw", name) for name in SET_PHOTOS]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = httpx.post(f"{live}/v1/reconstruct/set", files=files, timeout=240)
    assert r.status_code == 200, r.text
    assert r.headers["x-face-count"] == "3"
    body = r.json()
    layout = body["layout"]
    assert body["image_count"] == 3 and len(body["items"]) == 3
    assert len(body["identity"]["id"]) == layout["id"] and len(body["identity"]["tex"]) == layout["tex"]
    for i, item in enumerate(body["items"]):
        assert item["index"] == i
        assert len(item["landmarks68"]) == 68
        assert len(item["expression"]) == layout["exp"] and len(item["lighting"]) == 27
        assert set(item["pose_degrees"]) == {"pitch", "yaw", "roll"}
        lm = np.array(item["landmarks68"])
        assert (lm >= -5).all() and (lm <= 155).all()  # LFW crops are 150 x 150 (a chin may touch the edge)
    mesh = body["identity_mesh"]
    assert mesh["format"] == "obj" and mesh["media_type"] == "model/obj"
    parsed = trimesh.load(io.BytesIO(base64.b64decode(mesh["data"])), file_type="obj", process=False, force="mesh",
                          maintain_order=True)
    assert len(parsed.vertices) == model_info["face_model"]["n_vertices"]


def test_reconstruct_set_skips_a_faceless_photo_on_request(live: str) -> None:
    """``on_missing=skip`` (issue #18 item 8): a set with one face-less photo used to fail whole, with no way to skip
    it. The default still answers 422 naming the photo; ``skip`` reports its position in JSON and in a header."""
    from PIL import Image

    lfw = [need_shared("data", "faces-train", "lfw", name).read_bytes() for name in SET_PHOTOS[:2]]
    shoulders = need_shared("data", "deep3d-examples", "000126.jpg")  # its bottom: shoulders, no face
    buf = io.BytesIO()
    Image.open(shoulders).convert("RGB").crop((0, 310, 700, 873)).save(buf, format="JPEG", quality=92)
    files = [("images", ("a.jpg", lfw[0], "image/jpeg")), ("images", ("none.jpg", buf.getvalue(), "image/jpeg")),
             ("images", ("b.jpg", lfw[1], "image/jpeg"))]
    failed = httpx.post(f"{live}/v1/reconstruct/set", files=files, timeout=240)
    assert failed.status_code == 422 and error_of(failed)["code"] == "no_face"
    assert error_of(failed)["details"]["index"] == 1
    r = httpx.post(f"{live}/v1/reconstruct/set", files=files, data={"on_missing": "skip", "include": ""},
                   timeout=240)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["skipped"] == [1] and body["image_count"] == 2 and [it["index"] for it in body["items"]] == [0, 2]
    assert r.headers["x-skipped-photos"] == "1" and r.headers["x-face-count"] == "2"
    mesh = httpx.post(f"{live}/v1/reconstruct/set", files=files, data={"on_missing": "skip", "format": "ply"},
                      timeout=240)
    assert mesh.status_code == 200 and mesh.headers["x-skipped-photos"] == "1"
    bad = httpx.post(f"{live}/v1/reconstruct/set", files=files, data={"on_missing": "ignore"}, timeout=30)
    assert bad.status_code == 422 and error_of(bad)["code"] == "validation_error"


# -- input errors, provoked for real -----------------------------------------------------------------------------------
def test_not_an_image(live: str) -> None:
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": ("notes.txt", b"just some text\n", "text/plain")})
    assert r.status_code == 415
    assert error_of(r)["code"] == "not_an_image"


def test_truncated_jpeg(live: str, photo: bytes) -> None:
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": ("cut.jpg", photo[: len(photo) // 2], "image/jpeg")})
    assert r.status_code == 400
    assert error_of(r)["code"] == "corrupt_image"


def test_pixel_bomb(live: str) -> None:
    bomb = png_header_only(10000, 10000)
    assert len(bomb) < 100
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413
    assert error_of(r)["code"] == "image_too_large"


def test_no_face(live: str) -> None:
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": ("gradient.png", gradient_png(), "image/png")},
                   timeout=60)
    assert r.status_code == 422
    assert error_of(r)["code"] == "no_face"


def test_too_many_images(live: str) -> None:
    files = [("images", (f"p{i}.png", SMALL_PNG, "image/png")) for i in range(MAX_SET + 1)]
    r = httpx.post(f"{live}/v1/reconstruct/set", files=files)
    assert r.status_code == 422
    err = error_of(r)
    assert err["code"] == "too_many_images" and err["details"]["limit"] == MAX_SET


def test_oversize_upload_stream(live: str) -> None:
    """A file over the per-file limit whose request still passes the Content-Length check: stopped mid-stream."""
    big = b"\xff\xd8\xff" + bytes(MAX_UPLOAD + 10_000)
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": ("big.jpg", big, "image/jpeg")}, timeout=30)
    assert r.status_code == 413
    err = error_of(r)
    assert err["code"] == "image_too_large" and err["details"]["check"] == "upload stream"


def test_oversize_upload_content_length(live: str) -> None:
    big = bytes(3 * MAX_UPLOAD)
    r = httpx.post(f"{live}/v1/reconstruct", files={"image": ("big.jpg", big, "image/jpeg")}, timeout=30)
    assert r.status_code == 413
    err = error_of(r)
    assert err["code"] == "image_too_large" and err["details"]["check"] == "content-length"


def test_request_shape_errors(live: str, photo: bytes) -> None:
    # not multipart
    r = httpx.post(f"{live}/v1/reconstruct", json={"image": "x"})
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    # no image field
    r = httpx.post(f"{live}/v1/reconstruct", files={"other": ("a.png", SMALL_PNG, "image/png")})
    assert r.status_code == 422 and error_of(r)["code"] == "validation_error"
    r = httpx.post(f"{live}/v1/reconstruct", data={"format": "obj"}, files={"x": ("", b"", "text/plain")})
    assert r.status_code == 422
    # a bad option and an unknown one
    r = post_image(live, photo, format="stl")
    assert r.status_code == 422
    assert error_of(r)["details"]["errors"][0]["loc"] == ["form", "format"]
    r = post_image(live, photo, colour="blue")
    assert r.status_code == 422 and error_of(r)["code"] == "validation_error"
    # two photos on the single-photo endpoint
    two = [("image", ("a.png", SMALL_PNG, "image/png")), ("image", ("b.png", SMALL_PNG, "image/png"))]
    r = httpx.post(f"{live}/v1/reconstruct", files=two)
    assert r.status_code == 422 and error_of(r)["code"] == "validation_error"
    # unknown route, wrong method: same shape
    assert error_of(httpx.get(f"{live}/v1/nothing"))["code"] == "not_found"
    assert error_of(httpx.get(f"{live}/v1/reconstruct"))["code"] == "method_not_allowed"


def test_metrics_count_requests(live: str, obj_response: httpx.Response) -> None:
    assert obj_response.status_code == 200
    before = httpx.get(f"{live}/metrics").text
    for _ in range(2):
        httpx.post(f"{live}/v1/reconstruct", files={"image": ("t.txt", b"text", "text/plain")})
    httpx.get(f"{live}/healthz")
    r = httpx.get(f"{live}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text
    name = "facerecon_http_requests_total"
    assert metric_value(after, name, endpoint="/v1/reconstruct", method="POST", status="415") - \
        metric_value(before, name, endpoint="/v1/reconstruct", method="POST", status="415") == 2
    assert metric_value(after, name, endpoint="/healthz", status="200") - \
        metric_value(before, name, endpoint="/healthz", status="200") == 1
    assert metric_value(after, name, endpoint="/v1/reconstruct", method="POST", status="200") >= 1
    # per-stage and per-endpoint latency histograms, gauges, model info
    assert metric_value(after, "facerecon_stage_duration_seconds_count", stage="detect") >= 1
    assert metric_value(after, "facerecon_stage_duration_seconds_count", stage="queue") >= 1
    assert metric_value(after, "facerecon_http_request_duration_seconds_count", endpoint="/v1/reconstruct") >= 3
    assert metric_value(after, "facerecon_ready") == 1
    assert metric_value(after, "facerecon_inference_queue_depth") == 0
    assert metric_value(after, "facerecon_http_requests_in_flight") >= 1  # this scrape itself
    assert metric_value(after, "facerecon_model_info", face_model="ict", device="cpu") == 1


def test_openapi_documents_the_api(live: str) -> None:
    spec = httpx.get(f"{live}/openapi.json").json()
    post = spec["paths"]["/v1/reconstruct"]["post"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary"
    assert {"format", "faces", "refine", "include"} <= set(form["properties"])
    assert {"model/obj", "model/gltf-binary", "image/png", "application/json"} <= set(
        post["responses"]["200"]["content"])
    assert {"400", "413", "415", "422", "503"} <= set(post["responses"])
    assert "ReconstructResponse" in spec["components"]["schemas"]
    assert "SetResponse" in spec["components"]["schemas"]
    assert "/v1/reconstruct/set" in spec["paths"] and "/v1/models" in spec["paths"]


# -- controlled timing: a stand-in reconstructor -----------------------------------------------------------------------
def test_not_ready_until_loaded() -> None:
    release = threading.Event()

    def factory() -> FakeReconstructor:
        assert release.wait(60)
        return FakeReconstructor()

    with fake_server(factory) as srv:
        r = httpx.get(f"{srv.url}/readyz")
        assert r.status_code == 503
        assert error_of(r)["code"] == "not_ready" and int(r.headers["retry-after"]) >= 1
        r = post_image(srv.url)
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready"
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        release.set()
        wait_ready(srv.url, timeout=10)
        assert post_image(srv.url).status_code == 200


def test_overload_rejects_at_once_and_probes_stay_responsive() -> None:
    fake = FakeReconstructor()
    fake.gate.clear()
    with fake_server(fake, workers=1, queue_size=1) as srv, ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(post_image, srv.url) for _ in range(2)]  # one runs, one waits

        def gauges() -> tuple[float, float]:
            text = httpx.get(f"{srv.url}/metrics").text
            return metric_value(text, "facerecon_inference_active"), metric_value(
                text, "facerecon_inference_queue_depth")

        wait_until(lambda: gauges() == (1.0, 1.0))
        t0 = time.perf_counter()
        assert httpx.get(f"{srv.url}/healthz", timeout=2).status_code == 200
        r = post_image(srv.url, timeout=5)
        elapsed = time.perf_counter() - t0
        assert r.status_code == 503
        assert error_of(r)["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        assert elapsed < 5.0  # rejected at once, not queued
        fake.gate.set()
        assert [f.result(timeout=30).status_code for f in pending] == [200, 200]
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric_value(text, "facerecon_http_requests_total", endpoint="/v1/reconstruct", status="503") == 1


def test_request_timeout_is_a_504() -> None:
    fake = FakeReconstructor()
    fake.gate.clear()  # the job never finishes on its own
    with fake_server(fake, request_timeout_s=0.5) as srv:
        t0 = time.perf_counter()
        r = post_image(srv.url, timeout=20)
        elapsed = time.perf_counter() - t0
        fake.gate.set()
        assert r.status_code == 504 and error_of(r)["code"] == "timeout"
        assert elapsed < 10


def test_bug_is_a_500_with_logged_traceback(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeReconstructor()
    fake.fail = RuntimeError("secret internals")
    with caplog.at_level(logging.ERROR, logger="facerecon.api"), fake_server(fake) as srv:
        r = post_image(srv.url)
    assert r.status_code == 500
    err = error_of(r)
    assert err["code"] == "internal" and "secret" not in err["message"]
    assert any(rec.exc_info and rec.levelno == logging.ERROR for rec in caplog.records)


def test_an_export_the_model_cannot_give_is_a_422() -> None:
    """``texture=photo`` on a face model without UVs: the pipeline's typed ExportNotSupported reaches the client as
    the 422 error shape (it used to be a 500)."""
    from facerecon.errors import ExportNotSupported

    class NoUvs(FakeReconstructor):
        def export_files(self, image: np.ndarray, rec: Any, fmt: str, texture: str = "none") -> dict[str, bytes]:
            if texture != "none":
                raise ExportNotSupported("the face model 'bfm' has no UVs", field="texture")
            return super().export_files(image, rec, fmt, texture)

    with fake_server(NoUvs()) as srv:
        r = httpx.post(f"{srv.url}/v1/reconstruct", files={"image": ("p.png", SMALL_PNG, "image/png")},
                       data={"texture": "photo", "format": "glb"})
        assert r.status_code == 422, r.text
        err = error_of(r)
        assert err["code"] == "export_not_supported" and "UVs" in err["message"]
        assert err["details"]["field"] == "texture"


def test_output_negotiation() -> None:
    fake = FakeReconstructor()
    with fake_server(fake) as srv:
        def ask(accept: str | None = None, **fields: str) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/reconstruct", files={"image": ("p.png", SMALL_PNG, "image/png")},
                              data=fields, headers={"Accept": accept} if accept else {})

        r = ask()
        assert r.content == b"mesh obj\n" and r.headers["content-type"].startswith("model/obj")
        assert ask("model/gltf-binary").content == b"mesh glb\n"
        assert ask("application/ply;q=0.5, model/gltf-binary;q=0.9").content == b"mesh glb\n"
        assert ask("text/html, */*;q=0.8").content == b"mesh obj\n"
        assert ask("model/gltf-binary", format="ply").content == b"mesh ply\n"  # the field wins
        r = ask("image/png")
        assert r.headers["content-type"] == "image/png" and Image.open(io.BytesIO(r.content)).size == (48, 32)
        r = ask("text/html")
        assert r.status_code == 406 and error_of(r)["code"] == "not_acceptable"
        r = ask(faces="all")
        assert r.headers["x-faces-detected"] == "2" and r.headers["x-face-count"] == "1"


def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    fake = FakeReconstructor()
    fake.delay = 1.5
    with fake_server(fake) as srv, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_image, srv.url)
        wait_until(lambda: fake.calls == 1)
        srv.server.should_exit = True  # what SIGTERM does
        r = pending.result(timeout=30)
        assert r.status_code == 200 and r.content == b"mesh obj\n"
        srv.thread.join(15)
        assert not srv.thread.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/healthz", timeout=2)


def test_pool_rejects_when_full_and_skips_timed_out_jobs() -> None:
    from facerecon.api.errors import Overloaded, RequestTimedOut

    async def scenario() -> None:
        pool = InferencePool(1, 1)
        gate = threading.Event()
        ran: list[str] = []
        try:
            running = asyncio.ensure_future(pool.run(lambda: gate.wait(10)))
            await asyncio.sleep(0.05)
            with pytest.raises(RequestTimedOut):
                await pool.run(lambda: ran.append("late"), timeout=0.05)  # waits in the queue, times out
            assert pool.waiting == 0  # dropped from the queue, its slot freed
            queued = asyncio.ensure_future(pool.run(lambda: ran.append("queued")))
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as info:
                pool.submit(lambda: None)
            assert info.value.retry_after >= 1
            gate.set()
            await running
            await queued
            assert ran == ["queued"]  # the timed-out job never ran
        finally:
            pool.close(5)

    asyncio.run(scenario())


def test_the_photo_camera_and_the_projected_vertices(live: str, photo: bytes, photo_size: tuple[int, int]) -> None:
    """Every face carries a pinhole camera (OpenCV convention) that maps the posed mesh onto the photo: applied with
    plain numpy to the OBJ's vertices it lands the model's 68 landmark vertices on the JSON's ``landmarks68``;
    ``include=vertices`` gives every vertex projected the same way; sets do not take ``vertices``."""
    import trimesh

    from facerecon.facemodel import FaceModel
    from tests.conftest import ICT_MODEL

    r = httpx.post(f"{live}/v1/reconstruct", files={"image": (PHOTO, photo, "image/jpeg")},
                   data={"format": "json", "include": "mesh,vertices", "refine": "false"}, timeout=240)
    assert r.status_code == 200, r.text
    face = r.json()["faces"][0]
    cam = face["camera"]
    k, rot, t = np.array(cam["intrinsics"]), np.array(cam["rotation"]), np.array(cam["translation"])
    assert (cam["width"], cam["height"]) == photo_size
    mesh = trimesh.load(io.BytesIO(base64.b64decode(face["mesh"]["data"])), file_type="obj", process=False)
    v = np.asarray(mesh.vertices, np.float64)
    p = (v @ rot.T + t) @ k.T
    uv = p[:, :2] / p[:, 2:3]
    lm_idx = FaceModel.from_file(ICT_MODEL).landmarks68.numpy()
    lm = np.array(face["landmarks68"])
    assert np.abs(uv[lm_idx] - lm).max() < 0.05  # the OBJ stores 6 decimals
    verts = np.array(face["vertices_photo"])
    assert verts.shape == (len(v), 3)
    assert np.abs(verts[:, :2] - uv).max() < 0.05 and np.abs(verts[:, 2] - p[:, 2]).max() < 1e-3
    bad = httpx.post(f"{live}/v1/reconstruct/set", files=[("images", (PHOTO, photo, "image/jpeg"))] * 2,
                     data={"include": "vertices"}, timeout=60)
    assert bad.status_code == 422, bad.text
