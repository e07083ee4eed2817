"""Pure geometry of the reference pipeline: rotation, camera, projection, normals, SH lighting.

Every function here is plain torch over batched tensors (torch imported when one is first called, so the
camera types serve torch-free paths), imports no I/O, and follows the conventions of
Deep3DFaceRecon_pytorch (``../shared/docs/reference.md`` sections 1, 3.2, 4 and 5):

* model/world frame: right-handed, x to the viewer's right, y up, z towards the camera; decimetres.
* rotation: angles ``(pitch, yaw, roll) = (θx, θy, θz)`` in radians, ``R = Rz(θz) · Ry(θy) · Rx(θx)`` acting on
  column vectors, ``v' = R v + t``. Positive pitch turns the face down, positive yaw towards the image's right (the
  opposite sign of AFLW2000-3D / 300W-LP / BIWI's yaw), positive roll tilts it counter-clockwise as viewed.
* camera: at ``(0, 0, distance)`` looking along ``-z``; depth ``d = distance - z'``.
* crop frame: ``u = f x'/d + cx``, ``v_up = f y'/d + cy`` (y up), focal 1015 px, centre (112, 112), 224 x 224.
* shading: 3-band real SH with the reference's Lambertian constants, ``gamma`` channel-major (R 0:9, G 9:18,
  B 18:27) plus 0.8 on the first coefficient of every channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by the functions that use it: Camera and Intrinsics serve torch-free paths
    from torch import Tensor

__all__ = [
    "INIT_LIGHT",
    "SH_CONSTANTS",
    "Camera",
    "Intrinsics",
    "euler_to_rotation",
    "face_normals",
    "project",
    "sh_basis",
    "sh_shading",
    "to_camera",
    "transform",
    "vertex_normals",
]

#: Products a_l * c_l of the Lambertian SH convolution constants and the real SH normalisation
#: (reference.md section 5): a0c0 = sqrt(pi)/2, a1c1 = sqrt(pi), a2c2 = sqrt(15 pi / 8).
SH_CONSTANTS = (
    math.sqrt(math.pi) / 2.0,
    math.sqrt(math.pi),
    math.sqrt(15.0 * math.pi / 8.0),
)
#: Ambient initialisation added to the first SH coefficient of each channel (reference ``init_lit``).
INIT_LIGHT = 0.8


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of an image in a **y-up** continuous frame.

    A camera-space point ``(x, y, d)`` maps to ``u = fx * x / d + cx`` and ``v_up = fy * y / d + cy``.
    ``width`` x ``height`` pixels; the centre of pixel (column c, row r) sits at ``u = c + 0.5`` and
    ``v_up = height - (r + 0.5)`` (the rasteriser convention of reference.md section 1).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def scaled(self, factor: float) -> Intrinsics:
        """The same view rendered at ``factor`` times the resolution (pixel-centre exact)."""
        return Intrinsics(
            self.fx * factor,
            self.fy * factor,
            self.cx * factor,
            self.cy * factor,
            round(self.width * factor),
            round(self.height * factor),
        )


@dataclass(frozen=True)
class Camera:
    """The reference camera (reference.md section 4): focal 1015 px, centre 112, at z = 10 dm, 224 x 224.

    ``znear``/``zfar`` (5 and 15 dm) are the reference renderer's clip planes (section 9).
    """

    focal: float = 1015.0
    center: float = 112.0
    distance: float = 10.0
    size: int = 224
    znear: float = 5.0
    zfar: float = 15.0

    @property
    def intrinsics(self) -> Intrinsics:
        return Intrinsics(self.focal, self.focal, self.center, self.center, self.size, self.size)

    @property
    def fov_degrees(self) -> float:
        """Vertical field of view, ``2 atan(center / focal)`` = 12.5936 degrees for the reference."""
        return math.degrees(2.0 * math.atan(self.center / self.focal))


def euler_to_rotation(angles: Tensor) -> Tensor:
    """Rotation matrices ``R = Rz(θz) Ry(θy) Rx(θx)`` for column vectors.

    Args:
        angles: ``(B, 3)`` radians, ``(θx, θy, θz)`` = (pitch, yaw, roll).

    Returns:
        ``(B, 3, 3)``, same dtype/device; apply as ``v' = R @ v`` (or ``v @ R.T`` for row vectors).
    """
    import torch

    if angles.ndim != 2 or angles.shape[-1] != 3:
        raise ValueError(f"angles must be (B, 3), got {tuple(angles.shape)}")
    x, y, z = angles.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def transform(vertices: Tensor, rotation: Tensor, translation: Tensor) -> Tensor:
    """Rigid pose ``v' = R v + t``.

    Args:
        vertices: ``(B, N, 3)`` model space.
        rotation: ``(B, 3, 3)`` from :func:`euler_to_rotation`.
        translation: ``(B, 3)``.

    Returns:
        ``(B, N, 3)`` world space (a new tensor; the input is never modified).
    """
    return vertices @ rotation.transpose(1, 2) + translation[:, None, :]


def to_camera(world: Tensor, distance: float = 10.0) -> Tensor:
    """World to camera space ``(x, y, d)`` with depth ``d = distance - z`` (camera on +z looking at -z).

    Args:
        world: ``(B, N, 3)`` world space, decimetres.

    Returns:
        ``(B, N, 3)`` ``(x, y, d)``; a new tensor (the reference mutates in place, we do not).
    """
    import torch

    return torch.cat([world[..., :2], distance - world[..., 2:3]], dim=-1)


def project(camera_points: Tensor, intrinsics: Intrinsics) -> Tensor:
    """Perspective projection of camera-space points to the y-up image frame.

    Args:
        camera_points: ``(B, N, 3)`` ``(x, y, d)``, d > 0 (a tensor, or a NumPy array on the torch-free path).
        intrinsics: see :class:`Intrinsics`.

    Returns:
        ``(B, N, 2)`` ``(u, v_up)`` pixels, y up, of the input's type.
    """
    d = camera_points[..., 2:3]
    u = intrinsics.fx * camera_points[..., 0:1] / d + intrinsics.cx
    v = intrinsics.fy * camera_points[..., 1:2] / d + intrinsics.cy
    if isinstance(camera_points, np.ndarray):
        return np.concatenate([u, v], axis=-1)
    import torch

    return torch.cat([u, v], dim=-1)


def face_normals(vertices: Tensor, triangles: Tensor) -> Tensor:
    """Unit triangle normals ``normalize((v_i - v_j) x (v_j - v_k))`` (reference.md section 3.2).

    For counter-clockwise triangles seen from outside this points outward.

    Args:
        vertices: ``(B, N, 3)``.
        triangles: ``(F, 3)`` int64, 0-based.

    Returns:
        ``(B, F, 3)``; degenerate triangles give zero vectors.
    """
    import torch

    vi, vj, vk = (vertices[:, triangles[:, c]] for c in range(3))
    n = torch.linalg.cross(vi - vj, vj - vk, dim=-1)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12)


def vertex_normals(vertices: Tensor, triangles: Tensor, point_buf: Tensor) -> Tensor:
    """Per-vertex normals: the normalised sum of the unit normals of the incident triangles.

    Args:
        vertices: ``(B, N, 3)`` un-posed model-space vertices.
        triangles: ``(F, 3)`` int64.
        point_buf: ``(N, P)`` int64, the incident triangles of each vertex padded with ``F`` (which selects an
            appended zero normal, as in the reference).

    Returns:
        ``(B, N, 3)`` unit normals.
    """
    import torch

    fn = face_normals(vertices, triangles)
    fn = torch.cat([fn, fn.new_zeros(fn.shape[0], 1, 3)], dim=1)
    vn = fn[:, point_buf].sum(dim=2)
    return torch.nn.functional.normalize(vn, dim=-1, eps=1e-12)


def sh_basis(normals: Tensor) -> Tensor:
    """The 9 Lambertian-convolved real SH basis values Y1..Y9 of reference.md section 5.

    Args:
        normals: ``(B, N, 3)`` unit normals in world (posed) space.

    Returns:
        ``(B, N, 9)``.
    """
    import torch

    a0c0, a1c1, a2c2 = SH_CONSTANTS
    nx, ny, nz = normals.unbind(-1)
    return torch.stack(
        [
            torch.full_like(nx, a0c0),
            -a1c1 * ny,
            a1c1 * nz,
            -a1c1 * nx,
            a2c2 * nx * ny,
            -a2c2 * ny * nz,
            a2c2 / (2.0 * math.sqrt(3.0)) * (3.0 * nz**2 - 1.0),
            -a2c2 * nx * nz,
            a2c2 / 2.0 * (nx**2 - ny**2),
        ],
        dim=-1,
    )


def sh_shading(albedo: Tensor, normals: Tensor, gamma: Tensor, init_light: float = INIT_LIGHT) -> Tensor:
    """Lambertian SH shading ``C_ch = T_ch * sum_b (gamma_ch,b + 0.8 [b = 0]) Y_b(n)``.

    Args:
        albedo: ``(B, N, 3)`` RGB, about [0, 1].
        normals: ``(B, N, 3)`` unit normals in world (posed) space.
        gamma: ``(B, 27)`` channel-major SH coefficients (R 0:9, G 9:18, B 18:27).

    Returns:
        ``(B, N, 3)`` lit colour, **not** clamped (the reference clamps only on output).
    """
    import torch

    if gamma.shape[-1] != 27:
        raise ValueError(f"gamma must be (B, 27), got {tuple(gamma.shape)}")
    g = gamma.view(-1, 3, 9).clone()
    g[:, :, 0] = g[:, :, 0] + init_light
    y = sh_basis(normals)  # (B, N, 9)
    irradiance = torch.einsum("bnk,bck->bnc", y, g)
    return albedo * irradiance


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd test of ``points`` ``(M, 2)`` against the closed ``polygon`` ``(K, 2)`` (any consistent 2D frame) ->
    ``(M,)`` bool."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = polygon[:, 0][None], polygon[:, 1][None]
    x1, y1 = np.roll(polygon[:, 0], -1)[None], np.roll(polygon[:, 1], -1)[None]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return np.asarray(((crosses & (x < xi)).sum(axis=1) % 2) == 1)
