"""Geometry against independent computations: scipy's rotations and spherical harmonics, numpy projection,
trimesh's normals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial.transform import Rotation
from scipy.special import sph_harm_y

from facerecon import geometry
from facerecon.geometry import Camera


def test_rotation_matches_scipy_extrinsic_xyz() -> None:
    # R = Rz(θz) Ry(θy) Rx(θx) on column vectors is scipy's extrinsic "xyz" Euler sequence.
    rng = np.random.default_rng(0)
    angles = rng.uniform(-math.pi, math.pi, size=(16, 3))
    ours = geometry.euler_to_rotation(torch.tensor(angles)).numpy()
    theirs = Rotation.from_euler("xyz", angles).as_matrix()
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_rotation_small_yaw_turns_nose_to_viewer_right() -> None:
    # Positive yaw (about +y) moves a point on +z (the nose) towards +x (the viewer's right).
    r = geometry.euler_to_rotation(torch.tensor([[0.0, 0.3, 0.0]]))
    nose = r[0] @ torch.tensor([0.0, 0.0, 1.0])
    assert nose[0] > 0.29 and abs(float(nose[1])) < 1e-7


def test_projection_matches_intrinsic_matrix() -> None:
    cam = Camera()
    rng = np.random.default_rng(1)
    world = rng.normal(0, 0.5, size=(2, 50, 3))
    k = np.array([[1015.0, 0, 112.0], [0, 1015.0, 112.0], [0, 0, 1.0]])
    camera_pts = np.concatenate([world[..., :2], 10.0 - world[..., 2:]], -1)
    hom = camera_pts @ k.T
    expected = hom[..., :2] / hom[..., 2:]
    ours = geometry.project(geometry.to_camera(torch.tensor(world), 10.0), cam.intrinsics).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert cam.fov_degrees == pytest.approx(12.5936, abs=1e-4)


def test_to_camera_does_not_mutate() -> None:
    world = torch.randn(1, 5, 3)
    before = world.clone()
    cam = geometry.to_camera(world)
    assert torch.equal(world, before)
    assert torch.allclose(cam[..., 2], 10.0 - world[..., 2])


def _real_sh_scipy(normals: np.ndarray) -> np.ndarray:
    """Real SH (l <= 2) from scipy's complex ones, with the Condon-Shortley phase kept, in the reference's
    order (1; y, z, x; xy, yz, 3z^2-1, xz, x^2-y^2)."""
    x, y, z = normals.T
    theta = np.arccos(np.clip(z, -1, 1))
    phi = np.arctan2(y, x)

    def real(deg: int, m: int) -> np.ndarray:
        c = sph_harm_y(deg, abs(m), theta, phi)
        if m > 0:
            return math.sqrt(2) * c.real
        if m < 0:
            return math.sqrt(2) * c.imag
        return c.real

    order = [(0, 0), (1, -1), (1, 0), (1, 1), (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]
    return np.stack([real(deg, m) for deg, m in order], axis=-1)


def test_sh_basis_is_lambertian_times_scipy_real_sh() -> None:
    rng = np.random.default_rng(2)
    n = rng.normal(size=(200, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    ours = geometry.sh_basis(torch.tensor(n)[None]).numpy()[0]
    # The reference's band factors a_l (reference.md section 5): pi, 2 pi / sqrt(3), 2 pi / sqrt(8). (These are
    # not Ramamoorthi & Hanrahan's 2 pi / 3 and pi / 4; the official weights were trained with them.)
    a = [math.pi] + [2 * math.pi / math.sqrt(3)] * 3 + [2 * math.pi / math.sqrt(8)] * 5
    expected = _real_sh_scipy(n) * np.asarray(a)
    np.testing.assert_allclose(ours, expected, atol=1e-10)


def test_sh_constants_and_ambient() -> None:
    a0c0, a1c1, a2c2 = geometry.SH_CONSTANTS
    assert (a0c0, a1c1, a2c2) == pytest.approx((0.886227, 1.772454, 2.427032), abs=1e-6)
    albedo = torch.rand(1, 10, 3)
    normals = torch.nn.functional.normalize(torch.randn(1, 10, 3), dim=-1)
    lit = geometry.sh_shading(albedo, normals, torch.zeros(1, 27))
    torch.testing.assert_close(lit, albedo * 0.8 * a0c0)  # γ = 0: ambient 0.708982


def test_sh_shading_channel_major() -> None:
    normals = torch.tensor([[[0.0, 0.0, 1.0]]])
    gamma = torch.zeros(1, 27)
    gamma[0, 9 + 2] = 1.0  # green channel, z band
    lit = geometry.sh_shading(torch.ones(1, 1, 3), normals, gamma)
    a0c0, a1c1, _ = geometry.SH_CONSTANTS
    torch.testing.assert_close(lit[0, 0], torch.tensor([0.8 * a0c0, 0.8 * a0c0 + a1c1, 0.8 * a0c0]))


def test_vertex_normals_of_a_sphere_point_outward() -> None:
    from facerecon.facemodel.format import build_point_buf

    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = torch.tensor(sphere.vertices)[None]
    f = torch.tensor(sphere.faces, dtype=torch.int64)
    pb = torch.tensor(build_point_buf(sphere.faces, len(sphere.vertices)), dtype=torch.int64)
    n = geometry.vertex_normals(v, f, pb)[0].numpy()
    radial = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    assert (np.sum(n * radial, axis=1) > 0.999).all()
    assert (np.sum(n * sphere.vertex_normals, axis=1) > 0.999).all()
    fn = geometry.face_normals(v, f)[0].numpy()
    np.testing.assert_allclose(fn, sphere.face_normals, atol=1e-9)


def test_point_buf_matches_brute_force() -> None:
    from facerecon.facemodel.format import build_point_buf

    box = trimesh.creation.box()
    pb = build_point_buf(box.faces, len(box.vertices))
    for v in range(len(box.vertices)):
        incident = set(np.nonzero((box.faces == v).any(axis=1))[0])
        assert set(pb[v][pb[v] < len(box.faces)].tolist()) == incident
