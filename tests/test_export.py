"""Exports read back by trimesh give the same vertices, faces and colours; the OBJ text is what ``np.savetxt``
writes; GLB is in metres; the untextured OBJ keeps its vertex colours in trimesh."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest

from facerecon import textfmt
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.export import MeshData, export_mesh, file_units, load_mesh, to_glb, to_obj
from tests.conftest import ICT_MODEL, need_shared


@pytest.fixture(scope="module")
def mesh(ict_model, ict_decoder) -> MeshData:
    import torch

    torch.manual_seed(3)
    v = torch.randn(1, ict_model.layout.total) * 0.2
    out = ict_decoder(Coefficients.from_vector(v, ict_model.layout))
    return MeshData(out.vertices_world[0].numpy(), ict_model.triangles.numpy(), out.colors[0].numpy(),
                    normals=out.normals_world[0].numpy(), units=ict_model.card.units)


def _colors(back) -> np.ndarray:
    assert back.visual.kind == "vertex", "trimesh read no vertex colours"
    return np.asarray(back.visual.vertex_colors)[:, :3]


def _savetxt(fmt: str, arr: np.ndarray) -> str:
    buf = io.StringIO()
    np.savetxt(buf, arr, fmt=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["obj", "ply", "glb"])
def test_round_trip(mesh: MeshData, fmt: str) -> None:
    back = load_mesh(export_mesh(mesh, fmt), fmt)  # type: ignore[arg-type]
    assert back.vertices.shape == mesh.vertices.shape
    scale = 0.1 if fmt == "glb" else 1.0  # decimetres -> metres
    np.testing.assert_allclose(back.vertices, mesh.vertices * scale, atol=1e-6 if fmt == "obj" else 1e-7)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_array_equal(_colors(back), mesh.colors_uint8())


def test_obj_text_is_savetxt_text(mesh: MeshData, ict_model) -> None:
    """The whole-array formatter writes exactly what ``np.savetxt`` (Python's ``%``) writes, with and without UVs."""
    c8 = mesh.colors_uint8()
    v = np.hstack([mesh.vertices.astype(np.float64), c8.astype(np.float64) / 255.0])
    head = "# facerecon reconstruction; units: decimetres; y up, z towards the camera\n"
    expected = head + _savetxt("v %.6f %.6f %.6f %.6f %.6f %.6f", v) + _savetxt("f %d %d %d", mesh.faces + 1)
    assert to_obj(mesh).decode() == expected
    uvs, uv_faces = ict_model.extras["uv_coords"], ict_model.extras["uv_triangles"]
    with_uv = MeshData(mesh.vertices, mesh.faces, mesh.colors, uvs, uv_faces)
    corners = np.stack([mesh.faces + 1, uv_faces + 1], axis=-1).reshape(-1, 6)
    expected_uv = (head + _savetxt("v %.6f %.6f %.6f %.6f %.6f %.6f", v) + _savetxt("vt %.6f %.6f", uvs)
                   + _savetxt("f %d/%d %d/%d %d/%d", corners))
    assert to_obj(with_uv).decode() == expected_uv
    assert to_obj(with_uv).decode() == expected_uv  # the cached face block is the same text


def test_formatter_matches_python_on_hard_values() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.normal(size=2000).astype(np.float32) * 10.0 ** rng.integers(-7, 8, 2000),
        np.array([0.0, -0.0, 5e-7, -5e-7, 1.5e-6, 2.5e-6, 0.9999995, -0.9999995, 999.9999995, 123456789.0], np.float32),
    ]).astype(np.float64)
    got = textfmt.rows([b"x", textfmt.fixed6(x, lead=b" ")], len(x)).decode()
    assert got == "".join(f"x {value:.6f}\n" for value in x)
    ints = np.concatenate([np.arange(0, 2100), rng.integers(0, 10**9, 500), [999, 1000, 999999, 1000000]])
    got = textfmt.rows([b"i", textfmt.integer(ints, lead=b" "), textfmt.integer(ints[::-1], lead=b"/")],
                       len(ints)).decode()
    assert got == "".join(f"i {a}/{b}\n" for a, b in zip(ints, ints[::-1], strict=True))
    with pytest.raises(ValueError):
        textfmt.fixed6(np.array([np.nan]))


def test_obj_with_non_finite_vertices_still_writes() -> None:
    v = np.array([[np.nan, 0.0, 1.0], [np.inf, 2.0, 3.0], [0.0, 0.0, 0.0]])
    text = to_obj(MeshData(v, np.array([[0, 1, 2]]))).decode()
    assert "v nan 0.000000 1.000000\nv inf 2.000000 3.000000\n" in text


def test_obj_with_uvs(ict_model, mesh: MeshData) -> None:
    uv = MeshData(mesh.vertices, mesh.faces, mesh.colors, ict_model.extras["uv_coords"],
                  ict_model.extras["uv_triangles"])
    text = to_obj(uv).decode()
    assert text.count("\nvt ") == len(ict_model.extras["uv_coords"])
    first_face = next(line for line in text.splitlines() if line.startswith("f "))
    assert "/" in first_face
    back = load_mesh(text.encode(), "obj")
    # trimesh splits vertices along UV seams; geometry per corner must be unchanged.
    assert len(back.faces) == len(mesh.faces)
    np.testing.assert_allclose(back.vertices[back.faces], mesh.vertices[mesh.faces], atol=1e-6)


def test_glb_is_in_metres(ict_model, mesh: MeshData) -> None:
    """A head is 0.2-0.4 m tall in the GLB (glTF's unit is the metre); its height is the model's own vertices'
    height (read from the npz, in the card's unit) converted to metres."""
    data = np.load(ICT_MODEL)
    card = json.loads(bytes(data["card_json"]).decode())
    assert card["units"] == "decimetre"
    mean_height_m = float(np.ptp(data["mean_shape"][:, 1])) * 0.1
    assert 0.2 < mean_height_m < 0.4
    zero = Coefficients.zeros(ict_model.layout)
    neutral = FaceDecoder(ict_model)(zero)
    glb = to_glb(MeshData(neutral.vertices_world[0].detach().numpy(), ict_model.triangles.numpy(),
                          units=ict_model.card.units))
    back = load_mesh(glb, "glb")
    height = float(np.ptp(back.vertices[:, 1]))
    assert 0.2 < height < 0.4
    assert height == pytest.approx(mean_height_m, rel=1e-4)
    # the file says so, and the accessor bounds are the metre positions
    doc = json.loads(glb[20:20 + struct.unpack("<I", glb[12:16])[0]])
    assert doc["asset"]["extras"]["units"] == "metre"
    pos = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    np.testing.assert_allclose(pos["max"], back.vertices.max(axis=0), rtol=1e-6)
    assert file_units("decimetre") == {"obj": "decimetre", "ply": "decimetre", "glb": "metre"}


def test_glb_carries_normals(mesh: MeshData) -> None:
    glb = to_glb(mesh)
    doc = json.loads(glb[20:20 + struct.unpack("<I", glb[12:16])[0]])
    prim = doc["meshes"][0]["primitives"][0]
    assert {"POSITION", "NORMAL", "COLOR_0"} <= set(prim["attributes"])
    acc = doc["accessors"][prim["attributes"]["NORMAL"]]
    view = doc["bufferViews"][acc["bufferView"]]
    start = 20 + struct.unpack("<I", glb[12:16])[0] + 8 + view["byteOffset"]
    raw = np.frombuffer(glb[start:start + view["byteLength"]], "<f4").reshape(-1, 3)
    n = mesh.normals / np.linalg.norm(mesh.normals, axis=1, keepdims=True)
    np.testing.assert_allclose(raw, n, atol=1e-6)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="vertices"):
        MeshData(np.zeros((3, 2)), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="colors"):
        MeshData(np.zeros((3, 3)), np.zeros((1, 3), int), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="unit"):
        MeshData(np.zeros((3, 3)), np.zeros((1, 3), int), units="furlong")


def test_the_engine_exports_colours_trimesh_reads_and_says_its_units(reconstructor) -> None:
    """Through the pipeline on a real photo: the untextured OBJ has no UVs (ICT's UDIM layout made trimesh drop
    the colours) and trimesh finds the vertex colours; the GLB is a head-sized mesh in metres; the JSON names the
    units of every format."""
    from facerecon.imaging import load_image

    image = load_image(need_shared("data", "deep3d-examples", "000002.jpg"))
    rec = reconstructor.reconstruct(image, refine=False)[0]
    files = reconstructor.export_files(image, rec, "obj")
    text = files["mesh.obj"]
    assert b"\nvt " not in text and b"units: decimetres" in text
    back = load_mesh(text, "obj")
    assert back.visual.kind == "vertex"
    colors = np.asarray(back.visual.vertex_colors)[:, :3]
    lit = (np.clip(rec.decoded.colors[0].numpy(), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(colors, lit)
    assert colors.std() > 5, "the colours are a face's, not one flat value"
    world_dm = rec.decoded.vertices_world[0].numpy()
    glb = load_mesh(reconstructor.export(rec, "glb"), "glb")
    assert glb.visual.kind == "vertex"
    np.testing.assert_allclose(glb.vertices, world_dm * 0.1, atol=1e-6)
    assert 0.2 < float(np.ptp(glb.vertices[:, 1])) < 0.4
    doc = reconstructor.to_json(rec)
    assert doc["units"] == {"model": "decimetre", "obj": "decimetre", "ply": "decimetre", "glb": "metre"}
