"""Exports read back by trimesh give the same vertices, faces and colours."""

from __future__ import annotations

import numpy as np
import pytest

from facerecon.coefficients import Coefficients
from facerecon.export import MeshData, export_mesh, load_mesh, to_obj


@pytest.fixture(scope="module")
def mesh(ict_model, ict_decoder) -> MeshData:
    import torch

    torch.manual_seed(3)
    v = torch.randn(1, ict_model.layout.total) * 0.2
    out = ict_decoder(Coefficients.from_vector(v, ict_model.layout))
    return MeshData(out.vertices_world[0].numpy(), ict_model.triangles.numpy(), out.colors[0].numpy())


@pytest.mark.parametrize("fmt", ["obj", "ply", "glb"])
def test_round_trip(mesh: MeshData, fmt: str) -> None:
    back = load_mesh(export_mesh(mesh, fmt), fmt)  # type: ignore[arg-type]
    assert back.vertices.shape == mesh.vertices.shape
    np.testing.assert_allclose(back.vertices, mesh.vertices, atol=1e-6 if fmt == "obj" else 1e-7)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    colors = np.asarray(back.visual.vertex_colors)[:, :3]
    np.testing.assert_array_equal(colors, mesh.colors_uint8())


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


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="vertices"):
        MeshData(np.zeros((3, 2)), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="colors"):
        MeshData(np.zeros((3, 3)), np.zeros((1, 3), int), np.zeros((2, 3)))
