"""Depth and normal maps in the photo's frame (#18 item 10): the PNG encodings, the composite of several faces, and
the maps the API answers checked against expectations computed here from the JSON camera and the OBJ with plain
numpy (depth at the projected vertices, normals of the mesh), the PNGs decoding to the JSON's arrays, the CLI's
files."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from facerecon.render.maps import (
    DEPTH_SCALE,
    FaceMaps,
    composite,
    depth_png,
    depth_to_uint16,
    encode_png16,
    intrinsics_from_k,
    normals_png,
)
from tests.conftest import EXAMPLES, ICT_MODEL

pytestmark = pytest.mark.timeout(300)

PHOTO = "000002.jpg"
METRES_PER_UNIT = {"decimetre": 0.1}


# -- encodings, no models --------------------------------------------------------------------------------------------
def test_the_16_bit_png_decodes_to_the_same_values() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)
    img[0, 0], img[-1, -1], img[5] = 0, 65535, 256  # extremes, and a row whose bytes differ from the one above
    png = encode_png16(img, text={"Description": "test"})
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode.startswith("I") and im.size == (53, 37)
        assert im.info["Description"] == "test"
        back = np.array(im).astype(np.int64)
    assert np.array_equal(back, img.astype(np.int64))


def test_depth_and_normals_encodings_and_composite() -> None:
    """Two overlapping faces: the nearer wins; depth 1.0 dm -> 1000 (0.1 mm units), 0 stays 0; normals decode."""
    n_a = np.zeros((2, 3, 3), np.float32)
    n_a[..., 2] = 1.0
    n_b = np.zeros((2, 2, 3), np.float32)
    n_b[..., 0] = -1.0
    a = FaceMaps(1, 1, np.full((2, 3), 10.0, np.float32), n_a, (6, 4))
    b = FaceMaps(3, 2, np.full((2, 2), 9.0, np.float32), n_b, (6, 4))
    b.depth[1, 1] = 0.0  # no surface there
    both = composite([a, b], (6, 4))
    assert both.depth.shape == (4, 6)
    assert both.depth[1, 1] == 10.0 and both.depth[2, 3] == 9.0 and both.depth[2, 4] == 9.0
    assert both.depth[3, 4] == 0.0 and both.depth[0].max() == 0.0
    assert both.normals[2, 3, 0] == -1.0 and both.normals[1, 1, 2] == 1.0
    assert np.array_equal(depth_to_uint16(np.array([0.0, 10.0, 9.00004]), 0.1), [0, 10000, 9000])
    with Image.open(io.BytesIO(depth_png(both, 0.1))) as im:
        d = np.array(im).astype(np.int64)
        assert "metres" in im.info["Description"]
    assert d[2, 3] == round(9.0 * 0.1 * DEPTH_SCALE) and d[1, 1] == 10000 and d[0, 0] == 0
    with Image.open(io.BytesIO(normals_png(both))) as im:
        rgb = np.array(im)
        assert im.mode == "RGB" and "127.5" in im.info["Description"]
    assert tuple(rgb[2, 3]) == (0, 128, 128) and tuple(rgb[1, 1]) == (128, 128, 255) and tuple(rgb[0, 0]) == (0, 0, 0)


def test_the_renderer_intrinsics_put_a_point_where_k_does() -> None:
    """The renderer's y-up intrinsics from an OpenCV K: a camera point lands on the same pixel both ways."""
    k = np.array([[800.0, 0, 310.2], [0, 790.0, 240.7], [0, 0, 1]])
    intr = intrinsics_from_k(k, 640, 480)
    x, y, d = 0.3, -0.2, 9.5  # the renderer's camera frame (y up); OpenCV's is (x, -y, d)
    p = k @ np.array([x, -y, d])
    col, row = p[0] / p[2], p[1] / p[2]
    u, v_up = intr.fx * x / d + intr.cx, intr.fy * y / d + intr.cy
    assert abs((u - 0.5) - col) < 1e-9 and abs((480 - v_up - 0.5) - row) < 1e-9


# -- the live service ------------------------------------------------------------------------------------------------
def _decode(m: dict[str, Any]) -> np.ndarray:
    dtype = {"uint16": "<u2", "float16": "<f2"}[m["dtype"]]
    return np.frombuffer(base64.b64decode(m["data"]), dtype=dtype).reshape(m["shape"])


def _mesh_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Vertex normals by numpy: the normalised sum of the unit normals of the incident triangles."""
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    fn /= np.linalg.norm(fn, axis=1, keepdims=True) + 1e-30
    vn = np.zeros_like(v)
    for c in range(3):
        np.add.at(vn, f[:, c], fn)
    return vn / (np.linalg.norm(vn, axis=1, keepdims=True) + 1e-30)


def _angle_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


@pytest.fixture(scope="module")
def answer(live_server: str) -> dict[str, Any]:
    photo = (EXAMPLES / PHOTO).read_bytes()
    r = httpx.post(f"{live_server}/v1/reconstruct", files={"image": (PHOTO, photo, "image/jpeg")},
                   data={"format": "json", "include": "mesh,depth,normals", "refine": "false"}, timeout=240)
    assert r.status_code == 200, r.text
    pngs = {}
    for kind in ("depth", "normals"):
        p = httpx.post(f"{live_server}/v1/reconstruct", files={"image": (PHOTO, photo, "image/jpeg")},
                       data={"format": kind, "refine": "false"}, timeout=240)
        assert p.status_code == 200 and p.headers["content-type"] == "image/png", p.text
        pngs[kind] = p
    return {"json": r.json(), "png": pngs}


@pytest.fixture(scope="module")
def geometry(answer: dict[str, Any]) -> dict[str, Any]:
    """The posed mesh from the OBJ and its projection by the JSON camera, computed here with numpy."""
    import trimesh

    face = answer["json"]["faces"][0]
    mesh = trimesh.load(io.BytesIO(base64.b64decode(face["mesh"]["data"])), file_type="obj", process=False)
    v = np.asarray(mesh.vertices, np.float64)
    f = np.asarray(mesh.faces, np.int64)
    cam = face["camera"]
    k, rot, t = np.array(cam["intrinsics"]), np.array(cam["rotation"]), np.array(cam["translation"])
    p_cam = v @ rot.T + t
    p = p_cam @ k.T
    uv = p[:, :2] / p[:, 2:3]
    mpu = METRES_PER_UNIT[face["units"]["model"]]
    return {"face": face, "v": v, "f": f, "uv": uv, "depth_m": p_cam[:, 2] * mpu, "normals": _mesh_normals(v, f),
            "size": (cam["width"], cam["height"])}


def _full(m: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    arr = _decode(m)
    out = np.zeros((size[1], size[0], *arr.shape[2:]), arr.dtype)
    out[m["y0"]:m["y0"] + m["height"], m["x0"]:m["x0"] + m["width"]] = arr
    return out


def _at(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    px = np.rint(uv).astype(np.int64)
    px[:, 0] = px[:, 0].clip(0, image.shape[1] - 1)
    px[:, 1] = px[:, 1].clip(0, image.shape[0] - 1)
    return image[px[:, 1], px[:, 0]]


def test_the_depth_at_the_projected_vertices_is_their_camera_depth(geometry: dict[str, Any]) -> None:
    """At the pixel where the JSON camera puts a landmark vertex of the OBJ, the depth map holds that vertex's
    camera depth (within a millimetre for the visible ones: some jaw-line points lie behind the cheek and the
    inner-lip points on the mouth's edge), and over the whole mesh the map is never far behind a vertex."""
    from facerecon.facemodel import FaceModel

    face, size = geometry["face"], geometry["size"]
    dmap = face["depth"]
    assert dmap["dtype"] == "uint16" and dmap["scale"] == DEPTH_SCALE and dmap["shape"] == [dmap["height"],
                                                                                          dmap["width"]]
    depth = _full(dmap, size).astype(np.float64) / dmap["scale"]
    lm = FaceModel.from_file(ICT_MODEL).landmarks68.numpy()
    err_mm = (_at(depth, geometry["uv"][lm]) - geometry["depth_m"][lm]) * 1000.0
    assert np.median(np.abs(err_mm)) < 0.5, err_mm
    assert (np.abs(err_mm) < 2.0).mean() >= 0.8, err_mm
    inner = np.abs(err_mm[17:])  # brows, nose, eyes, mouth: their own surface is the nearest
    assert (inner < 2.0).mean() >= 0.9, inner
    # every vertex of the drawn region (the overlay's triangles): the nearest surface is never much behind it (a
    # pixel centre's offset on a steep slope), and it is on that surface for a good part of them (the rest hidden)
    from facerecon.pipeline import _overlay_triangles

    drawn = np.unique(_overlay_triangles(FaceModel.from_file(ICT_MODEL)).numpy())
    got = _at(depth, geometry["uv"][drawn])
    assert (got > 0).mean() > 0.97
    diff_mm = (got - geometry["depth_m"][drawn]) * 1000.0
    assert (diff_mm > 5.0).mean() < 0.03, np.percentile(diff_mm, [1, 50, 90, 99])
    assert (np.abs(diff_mm) < 1.0).mean() > 0.4, np.percentile(diff_mm, [1, 50, 90, 99])
    assert 0.8 < depth[depth > 0].min() and depth.max() < 1.5  # metres: the reference camera is 1 m away


def test_the_normals_are_the_mesh_normals(geometry: dict[str, Any]) -> None:
    """At the visible vertices (the depth map holds their depth) the normal map is the mesh's vertex normal,
    computed here from the OBJ's triangles, in the OBJ's own axes (x right, y up, z towards the camera)."""
    face, size = geometry["face"], geometry["size"]
    normals = _full(face["normals"], size).astype(np.float64)
    depth = _full(face["depth"], size).astype(np.float64) / DEPTH_SCALE
    assert face["normals"]["dtype"] == "float16" and face["normals"]["shape"][2] == 3
    length = np.linalg.norm(normals, axis=-1)
    assert np.abs(length[depth > 0] - 1.0).max() < 2e-3 and length[depth == 0].max() == 0.0
    uv, dm = geometry["uv"], geometry["depth_m"]
    visible = np.abs(_at(depth, uv) - dm) < 0.0002  # within 0.2 mm of the vertex
    assert visible.sum() > 3000
    ang = _angle_degrees(_at(normals, uv[visible]), geometry["normals"][visible])
    assert np.median(ang) < 2.0 and np.percentile(ang, 75) < 4.0, np.percentile(ang, [50, 75, 90])
    facing = normals[depth > 0][:, 2]
    assert np.median(facing) > 0.6  # a face turned to the camera: z towards the camera


def test_the_pngs_decode_to_the_json_arrays(answer: dict[str, Any], geometry: dict[str, Any]) -> None:
    face, size = geometry["face"], geometry["size"]
    depth_r, normals_r = answer["png"]["depth"], answer["png"]["normals"]
    assert float(depth_r.headers["x-depth-scale"]) == DEPTH_SCALE
    with Image.open(io.BytesIO(depth_r.content)) as im:
        assert im.size == size and im.mode.startswith("I") and "value / 10000" in im.info["Description"]
        d = np.array(im).astype(np.int64)
    assert np.array_equal(d, _full(face["depth"], size).astype(np.int64))
    with Image.open(io.BytesIO(normals_r.content)) as im:
        assert im.size == size and im.mode == "RGB"
        rgb = np.array(im).astype(np.float64)
    n_json = _full(face["normals"], size).astype(np.float64)
    on = d > 0
    assert np.abs(rgb[on] / 127.5 - 1.0 - n_json[on]).max() < 1.0 / 127.5 + 2e-3
    assert rgb[~on].max() == 0


def test_the_cli_writes_the_maps(tmp_path: Path, geometry: dict[str, Any]) -> None:
    """``--maps``: depth.png and normals.png beside overlay.png, at the photo's size, matching the camera of the
    coefficients.json they come with."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "facerecon.cli", "reconstruct", str(EXAMPLES / PHOTO), "--out",
                          str(out), "--maps", "--no-refine"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    folder = out / Path(PHOTO).stem
    doc = json.loads((folder / "coefficients.json").read_text())
    with Image.open(folder / "depth.png") as im:
        assert im.size == tuple(doc["photo_size"]) and im.mode.startswith("I")
        d = np.array(im).astype(np.float64) / DEPTH_SCALE
    with Image.open(folder / "normals.png") as im:
        assert im.size == tuple(doc["photo_size"]) and im.mode == "RGB"
    k, rot, t = (np.array(doc["camera"][key]) for key in ("intrinsics", "rotation", "translation"))
    p_cam = geometry["v"] @ rot.T + t  # the API's OBJ: the same photo and mode, so the same mesh
    p = p_cam @ k.T
    from facerecon.facemodel import FaceModel

    lm = FaceModel.from_file(ICT_MODEL).landmarks68.numpy()[17:]
    err_mm = (_at(d, p[lm, :2] / p[lm, 2:3]) - p_cam[lm, 2] * 0.1) * 1000.0
    assert (np.abs(err_mm) < 2.0).mean() >= 0.9, err_mm


def test_the_openapi_documents_the_maps(live_server: str) -> None:
    spec = httpx.get(f"{live_server}/openapi.json", timeout=10).json()
    dense = spec["components"]["schemas"]["DenseMap"]
    assert {"x0", "y0", "shape", "dtype", "scale", "data"} <= set(dense["properties"])
    form = spec["paths"]["/v1/reconstruct"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"depth", "normals"} <= set(form["properties"]["format"]["enum"])
    assert {"depth", "normals"} <= set(form["properties"]["include"]["items"]["enum"])
