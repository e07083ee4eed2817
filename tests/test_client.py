"""The client SDK: against a live server with the real pipeline (sync and async), and its retry logic against
``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from facerecon_client import (
    AsyncFaceReconClient,
    FaceReconClient,
    ImageTooLarge,
    InvalidInput,
    MeshResult,
    NoFaceFound,
    NotAnImage,
    Overloaded,
    Reconstruction,
    RetryPolicy,
    ServiceError,
    SetReconstruction,
    TransportError,
)
from facerecon_client.__main__ import main as client_cli
from tests.conftest import EXAMPLES, need_shared

pytestmark = pytest.mark.timeout(300)

PHOTO = "000002.jpg"
SET_PHOTOS = ("Aaron_Peirsol_0001.jpg", "Aaron_Peirsol_0003.jpg", "Aaron_Peirsol_0004.jpg")


@pytest.fixture(scope="module")
def url(live_server: str) -> str:
    return live_server


@pytest.fixture(scope="module")
def n_vertices(url: str) -> int:
    with FaceReconClient(url) as client:
        info = client.models()
    assert info.face_model["name"] == "ict" and info.limits["max_set_images"] == 4
    return int(info.face_model["n_vertices"])


def obj_vertex_count(data: bytes) -> int:
    return sum(1 for line in data.splitlines() if line.startswith(b"v "))


# -- live server ----------------------------------------------------------------------------------------------
def test_sync_reconstruct_typed_result(url: str, n_vertices: int) -> None:
    with FaceReconClient(url, timeout=240) as client:
        assert client.health() is True and client.ready() is True
        result = client.reconstruct(EXAMPLES / PHOTO, include=("mesh", "overlay"))
    assert isinstance(result, Reconstruction)
    face = result.face
    assert result.face_count == 1 and face.index == 0
    layout = result.layout
    assert len(face.coefficients.id) == layout["id"] and len(face.coefficients.exp) == layout["exp"]
    assert len(face.coefficients.gamma) == 27 and len(face.coefficients.trans) == 3
    assert face.expressions is not None and len(face.expressions) == layout["exp"]
    assert len(face.landmarks68) == 68
    w, h = result.photo_size
    assert all(0 <= x < w and 0 <= y < h for x, y in face.landmarks68)
    assert abs(face.pose.yaw) < 60
    assert face.mesh is not None and face.mesh_format == "obj"
    assert obj_vertex_count(face.mesh) == n_vertices
    assert face.overlay is not None and face.overlay.startswith(b"\x89PNG")


def test_async_set_and_errors(url: str, n_vertices: int) -> None:
    paths = [need_shared("data", "faces-train", "lfw", name) for name in SET_PHOTOS]

    async def scenario() -> tuple[SetReconstruction, ServiceError, ServiceError]:
        async with AsyncFaceReconClient(url, timeout=240) as client:
            assert await client.ready()
            result = await client.reconstruct_set(paths)
            with pytest.raises(ServiceError) as not_image:
                await client.reconstruct(b"this is not a photo")
            with pytest.raises(ServiceError) as too_many:
                await client.reconstruct_set([paths[0]] * 5)
        return result, not_image.value, too_many.value

    result, not_image, too_many = asyncio.run(scenario())
    assert result.image_count == 3 and len(result.items) == 3
    assert len(result.identity.id) == result.layout["id"]
    assert all(len(item.landmarks68) == 68 for item in result.items)
    assert result.identity_mesh is not None and obj_vertex_count(result.identity_mesh) == n_vertices
    assert isinstance(not_image, NotAnImage) and isinstance(not_image, InvalidInput)
    assert not_image.code == "not_an_image" and not_image.status == 415
    assert too_many.code == "too_many_images" and too_many.status == 422 and too_many.details["limit"] == 4


def test_sync_errors_carry_the_service_code(url: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with FaceReconClient(url) as client:
        with pytest.raises(NotAnImage) as info:
            client.mesh(notes)
        assert info.value.code == "not_an_image" and info.value.message
        import numpy as np
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(buf, format="PNG")
        with pytest.raises(NoFaceFound) as info2:
            client.overlay(io.BytesIO(buf.getvalue()))
        assert info2.value.code == "no_face"


def test_cli_writes_the_mesh(url: str, tmp_path: Path, n_vertices: int, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mesh.obj"
    assert client_cli([url, str(EXAMPLES / PHOTO), "--out", str(out)]) == 0
    assert obj_vertex_count(out.read_bytes()) == n_vertices
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert client_cli([url, str(notes), "--out", str(tmp_path / "x.obj")]) == 1
    assert "not_an_image" in capsys.readouterr().err


def test_textured_meshes_sync_async_and_cli(url: str, tmp_path: Path, n_vertices: int) -> None:
    """``texture=photo|albedo`` from the SDK (issue #18 item 7: it existed in the API only)."""
    import trimesh
    from PIL import Image

    from facerecon_client import ValidationFailed

    with FaceReconClient(url, timeout=240) as client:
        glb = client.mesh(EXAMPLES / PHOTO, format="glb", texture="photo", refine=False)
        with pytest.raises(ValidationFailed) as info:
            client.mesh(EXAMPLES / PHOTO, format="ply", texture="photo")
    assert "texture" in info.value.message
    assert glb.media_type == "model/gltf-binary" and glb.texture == "photo" and not glb.is_bundle
    geom = next(iter(trimesh.load(io.BytesIO(glb.data), file_type="glb").geometry.values()))
    assert geom.visual.kind == "texture" and geom.visual.material.baseColorTexture is not None

    async def albedo_obj() -> MeshResult:
        async with AsyncFaceReconClient(url, timeout=240) as client:
            return await client.mesh(EXAMPLES / PHOTO, format="obj", texture="albedo", refine=False)

    bundle = asyncio.run(albedo_obj())
    assert bundle.is_bundle and bundle.texture == "albedo"
    files = bundle.files()
    assert set(files) == {"mesh.obj", "mesh.mtl", "texture.png"}
    assert Image.open(io.BytesIO(files["texture.png"])).size[0] >= 256

    out = tmp_path / "face.obj"
    assert client_cli([url, str(EXAMPLES / PHOTO), "--out", str(out), "--texture", "photo", "--no-refine"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"face.obj", "face.mtl", "face.png"}
    mesh = trimesh.load(out, process=False)
    assert mesh.visual.material.image is not None and len(mesh.faces) > 1000
    assert mesh.visual.material.image.size == Image.open(tmp_path / "face.png").size
    assert client_cli([url, str(EXAMPLES / PHOTO), "--out", str(tmp_path / "b.zip"), "--texture", "albedo",
                       "--no-refine"]) == 0
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        assert set(zf.namelist()) == {"mesh.obj", "mesh.mtl", "texture.png"}


def test_set_skips_a_faceless_photo_on_request(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    """``on_missing`` in the SDK and its CLI (issue #18 item 8)."""
    from PIL import Image

    paths = [need_shared("data", "faces-train", "lfw", name) for name in SET_PHOTOS[:2]]
    shoulders = tmp_path / "shoulders.jpg"  # the bottom of a real photo: no face
    Image.open(need_shared("data", "deep3d-examples", "000126.jpg")).crop((0, 310, 700, 873)).save(shoulders)
    photos = [paths[0], shoulders, paths[1]]
    with FaceReconClient(url, timeout=240) as client:
        with pytest.raises(NoFaceFound) as info:
            client.reconstruct_set(photos, include=())
        assert info.value.details["index"] == 1
        result = client.reconstruct_set(photos, include=(), on_missing="skip", refine=False)
        assert result.skipped == [1] and [it.index for it in result.items] == [0, 2] and result.image_count == 2
        mesh = client.identity_mesh(photos, format="ply", on_missing="skip", refine=False)
        assert mesh.skipped == [1] and mesh.data.startswith(b"ply")
    out = tmp_path / "identity.obj"
    assert client_cli([url, *map(str, photos), "--out", str(out), "--on-missing", "skip", "--no-refine"]) == 0
    assert f"skipped {shoulders}: no face found" in capsys.readouterr().err
    assert out.stat().st_size > 1000


def test_unreachable_service_is_a_transport_error() -> None:
    with FaceReconClient("http://127.0.0.1:9", retry=RetryPolicy(max_attempts=2, backoff=0.01)) as client, \
            pytest.raises(TransportError):
        client.health()


# -- retries (MockTransport) ----------------------------------------------------------------------------------
def _overloaded(retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"code": "overloaded", "message": "busy", "details": {}}}
    return httpx.Response(503, json=body, headers=headers)


def _mesh_ok() -> httpx.Response:
    return httpx.Response(200, content=b"v 0 0 0\n", headers={
        "content-type": "model/obj", "x-face-count": "1", "x-reconstruction-mode": "fit",
        "server-timing": "fit;dur=12.5, total;dur=20.0"})


def _script(*responses: httpx.Response) -> tuple[list[httpx.Request], httpx.MockTransport]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return seen, httpx.MockTransport(handler)


def test_retry_honours_retry_after_sync() -> None:
    seen, transport = _script(_overloaded("2"), _overloaded("1"), _mesh_ok())
    slept: list[float] = []
    with FaceReconClient("http://svc", transport=transport, sleep=slept.append) as client:
        result = client.mesh(b"\xff\xd8 photo")
    assert slept == [2.0, 1.0] and len(seen) == 3
    assert result.data == b"v 0 0 0\n" and result.mode == "fit" and result.server_timing["fit"] == 12.5
    # every attempt re-sent the whole photo
    assert all(b"\xff\xd8 photo" in r.content for r in seen)


def test_retry_honours_retry_after_async() -> None:
    seen, transport = _script(_overloaded("3"), _mesh_ok())
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def scenario() -> bytes:
        async with AsyncFaceReconClient("http://svc", transport=transport, sleep=sleep) as client:
            return (await client.mesh(b"photo", format="obj")).data

    assert asyncio.run(scenario()) == b"v 0 0 0\n"
    assert slept == [3.0] and len(seen) == 2


def test_retry_bounded_attempts_and_wait() -> None:
    # attempts exhausted: the last 503 is raised, typed, with its Retry-After
    seen, transport = _script(_overloaded("1"), _overloaded("1"), _overloaded("1"))
    slept: list[float] = []
    with FaceReconClient("http://svc", transport=transport, sleep=slept.append,
                         retry=RetryPolicy(max_attempts=3)) as client, pytest.raises(Overloaded) as info:
        client.mesh(b"photo")
    assert len(seen) == 3 and slept == [1.0, 1.0]
    assert info.value.retry_after == 1.0 and info.value.code == "overloaded"
    # a Retry-After beyond max_wait is not waited for
    seen, transport = _script(_overloaded("120"))
    slept = []
    with FaceReconClient("http://svc", transport=transport, sleep=slept.append,
                         retry=RetryPolicy(max_wait=30)) as client, pytest.raises(Overloaded) as info:
        client.mesh(b"photo")
    assert slept == [] and len(seen) == 1 and info.value.retry_after == 120.0
    # no Retry-After: exponential backoff
    seen, transport = _script(httpx.Response(429, text="slow down"), httpx.Response(503, text="<html>"), _mesh_ok())
    slept = []
    with FaceReconClient("http://svc", transport=transport, sleep=slept.append,
                         retry=RetryPolicy(backoff=0.25)) as client:
        client.mesh(b"photo")
    assert slept == [0.25, 0.5]


def test_client_errors_are_not_retried() -> None:
    body = {"error": {"code": "image_too_large", "message": "too big", "details": {"max_bytes": 10}}}
    seen, transport = _script(httpx.Response(413, json=body))
    with FaceReconClient("http://svc", transport=transport, sleep=lambda s: None) as client, \
            pytest.raises(ImageTooLarge) as info:
        client.reconstruct(b"photo")
    assert len(seen) == 1 and info.value.details == {"max_bytes": 10} and info.value.status == 413
    # the request carried the options as form fields
    sent = seen[0].content
    assert b'name="format"' in sent and b"json" in sent and b'name="image"' in sent


def test_connection_refused_is_retried() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"status": "ok"})

    slept: list[float] = []
    with FaceReconClient("http://svc", transport=httpx.MockTransport(handler), sleep=slept.append) as client:
        assert client.health() is True
    assert calls["n"] == 2 and slept == [0.5]


def test_typed_models_decode_embedded_files() -> None:
    import base64

    face = {
        "index": 0, "mode": "fit", "box": [0, 0, 10, 10], "score": 1.0,
        "coefficients": {"id": [0.1], "exp": [0.2], "tex": [0.3], "angle": [0, 0, 0], "gamma": [0.0] * 27,
                         "trans": [0, 0, 0]},
        "pose_degrees": {"pitch": 1, "yaw": 2, "roll": 3}, "landmarks68": [[1, 2]] * 68,
        "detected_landmarks68": [[1, 2]] * 68, "landmark_error_crop_px": 1.0,
        "alignment": {"w0": 10, "h0": 10, "sigma": 1, "tx": 0, "ty": 0, "w": 10, "h": 10, "left": 0, "up": 0,
                      "size": 224, "trans_params": [10, 10, 1, 0, 0]},
        "mesh": {"format": "glb", "media_type": "model/gltf-binary", "encoding": "base64",
                 "data": base64.b64encode(b"glTF").decode()},
        "a_field_from_a_newer_service": 1,
    }
    rec = Reconstruction.model_validate_json(json.dumps({
        "face_model": "ict", "layout": {"id": 1}, "photo_size": [10, 10], "face_count": 1, "faces": [face]}))
    assert rec.face.mesh == b"glTF" and rec.face.mesh_format == "glb" and rec.face.overlay is None
    assert rec.face.pose.roll == 3 and rec.face.landmarks68[0] == (1.0, 2.0)


def _literal_error_codes(package: Path) -> dict[str, int]:
    """``{code: status}`` of every ``error_response(<int>, "<code>", ...)`` / ``_reply(<int>, "<code>", ...)`` call
    in the package's sources."""
    import ast

    found: dict[str, int] = {}
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            status, code = node.args[:2]
            if (name in ("error_response", "_reply") and isinstance(status, ast.Constant)
                    and isinstance(code, ast.Constant) and isinstance(code.value, str)):
                found[code.value] = int(status.value)
    return found


def test_every_error_code_the_service_emits_has_its_class_in_the_client() -> None:
    """The contract between the service's error classes and the SDK: every ``code`` the service can answer with
    (its typed errors, the framework-level HTTP codes, the codes its middlewares and HTTP protocol write as literals,
    the catch-all ``internal``) maps to a dedicated client class
    with the same meaning (a 4xx is an InvalidInput, a 503 an Unavailable, a 504 a timeout, a 500 internal)."""
    import facerecon.api.errors as api_errors
    import facerecon.errors as engine_errors
    from facerecon_client import ERRORS_BY_CODE, InternalServiceError, InvalidInput, ServiceTimeout, Unavailable

    def subclasses(cls: type) -> set[type]:
        out = set()
        for sub in cls.__subclasses__():
            out |= {sub} | subclasses(sub)
        return out

    # the errors users can cause live in these two modules (architecture rule); a build tool's own error classes
    # (a model-file reader's, say) never reach an HTTP response
    service_modules = {engine_errors.__name__, api_errors.__name__}
    classes = {c for c in subclasses(engine_errors.FaceReconError) if c.__module__ in service_modules}
    emitted = {c.code: c.http_status for c in classes | {engine_errors.FaceReconError}}
    assert {"overloaded", "no_face", "export_not_supported"} <= set(emitted)
    emitted |= {code: status for status, code in api_errors.HTTP_CODES.items()}
    emitted |= {"internal": 500, "http_error": 500}
    # and the codes written as literals, ``error_response(status, "code", ...)`` (the app's middlewares) or
    # ``self._reply(status, "code", ...)`` (the HTTP protocol's own answers), anywhere in the API package
    literal = _literal_error_codes(Path(api_errors.__file__).parent)
    assert {"header_timeout", "invalid_host", "internal"} <= set(literal), literal
    emitted |= literal
    missing = sorted(set(emitted) - set(ERRORS_BY_CODE))
    assert not missing, f"client has no class for {missing}"
    for code, status in emitted.items():
        cls = ERRORS_BY_CODE[code]
        if status in (429, 503):
            assert issubclass(cls, Unavailable), code
        elif status == 504:
            assert issubclass(cls, ServiceTimeout), code
        elif 400 <= status < 500:
            assert issubclass(cls, InvalidInput), code
        else:
            assert issubclass(cls, InternalServiceError), code


def test_the_sdk_projects_the_mesh_with_the_photo_camera(url: str, n_vertices: int) -> None:
    """``Face.camera.project`` (plain Python) puts the OBJ's vertices where ``include=vertices`` says they are, and
    the model's landmark vertices on ``landmarks68``."""
    from facerecon.facemodel import FaceModel
    from tests.conftest import ICT_MODEL

    with FaceReconClient(url, timeout=240) as client:
        face = client.reconstruct(EXAMPLES / PHOTO, include=("mesh", "vertices"), refine=False).face
    assert face.camera is not None and face.vertices_photo is not None and face.mesh is not None
    verts = [tuple(float(t) for t in line.split()[1:4]) for line in face.mesh.decode().splitlines()
             if line.startswith("v ")]
    assert len(verts) == n_vertices == len(face.vertices_photo)
    lm_idx = FaceModel.from_file(ICT_MODEL).landmarks68.tolist()
    projected = face.camera.project([verts[i] for i in lm_idx])
    assert max(abs(p[0] - q[0]) + abs(p[1] - q[1]) for p, q in zip(projected, face.landmarks68, strict=True)) < 0.1
    some = face.camera.project(verts[::500])
    given = face.vertices_photo[::500]
    assert max(abs(p[0] - q[0]) + abs(p[1] - q[1]) for p, q in zip(some, given, strict=True)) < 0.1


def test_the_sdk_gets_the_depth_and_normal_maps(url: str, tmp_path: Path) -> None:
    """Sync and async: the per-face arrays (``include=depth,normals``: ``DenseMap.array()`` / ``metres()``) and the
    photo-sized PNGs (``map()``, the SDK's CLI ``--format depth``), which hold the same values; the depth at the
    projected landmark vertices is their camera depth."""
    import numpy as np
    from PIL import Image

    from facerecon.facemodel import FaceModel
    from tests.conftest import ICT_MODEL

    with FaceReconClient(url, timeout=240) as client:
        face = client.reconstruct(EXAMPLES / PHOTO, include=("mesh", "depth", "normals"), refine=False).face
        depth_png = client.map(EXAMPLES / PHOTO, "depth", refine=False)

    async def go() -> tuple[Any, Any]:
        async with AsyncFaceReconClient(url, timeout=240) as client:
            f = (await client.reconstruct(EXAMPLES / PHOTO, include=("depth",), refine=False)).face
            return f, await client.map(EXAMPLES / PHOTO, "normals", refine=False)

    async_face, normals_png = asyncio.run(go())
    assert face.depth is not None and face.normals is not None and face.camera is not None and face.mesh is not None
    assert async_face.depth is not None and async_face.normals is None
    d = face.depth.array()
    assert d.dtype == np.uint16 and d.shape == (face.depth.height, face.depth.width)
    assert np.array_equal(async_face.depth.array(), d)
    n = face.normals.array()
    assert n.dtype == np.float16 and n.shape == (*d.shape, 3)
    assert depth_png.depth_scale == 10000 == face.depth.scale
    with Image.open(io.BytesIO(depth_png.data)) as im:
        full = np.array(im).astype(np.int64)
    x0, y0 = face.depth.x0, face.depth.y0
    assert np.array_equal(full[y0:y0 + d.shape[0], x0:x0 + d.shape[1]], d)
    with Image.open(io.BytesIO(normals_png.data)) as im:
        rgb = np.array(im)[y0:y0 + d.shape[0], x0:x0 + d.shape[1]].astype(np.float64)
    on = d > 0
    assert np.abs(rgb[on] / 127.5 - 1 - n[on]).max() < 0.01
    verts = [tuple(float(t) for t in line.split()[1:4]) for line in face.mesh.decode().splitlines()
             if line.startswith("v ")]
    lm = FaceModel.from_file(ICT_MODEL).landmarks68.tolist()[17:]
    cam = face.camera
    metres = face.depth.metres()
    close = 0
    for i in lm:
        x, y = cam.project([verts[i]])[0]
        c = [sum(cam.rotation[r][j] * verts[i][j] for j in range(3)) + cam.translation[r] for r in range(3)]
        close += abs(metres[round(y) - y0, round(x) - x0] - c[2] * 0.1) < 0.002
    assert close >= 0.9 * len(lm)
    out = tmp_path / "depth.png"
    assert client_cli([url, str(EXAMPLES / PHOTO), "--out", str(out), "--format", "depth", "--no-refine"]) == 0
    assert out.read_bytes() == depth_png.data
    with pytest.raises(SystemExit):  # a set has no single map
        client_cli([url, str(EXAMPLES / PHOTO), str(EXAMPLES / PHOTO), "--out", str(out), "--format", "normals"])
