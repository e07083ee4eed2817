"""Decoding without torch: the 68 landmarks and the posed, lit mesh of NumPy coefficients (the R-Net path,
``refine=False``), so that a JSON answer or a mesh export of that mode never imports torch.

The same maths as :class:`facerecon.decoder.FaceDecoder` and :mod:`facerecon.geometry` (reference.md sections 3-5),
written with NumPy in float32 over the face model's own arrays (:class:`~facerecon.facemodel.format.FaceModelData`,
shared with the torch model when both exist, never copied); the two agree to float32 rounding (the tests compare
them on the shipped model). :class:`DecodedFace` lives here so that the results module can name it without torch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from facerecon.coefficients import CoefficientArrays, CoefficientLayout, Coefficients
from facerecon.geometry import INIT_LIGHT, SH_CONSTANTS, Camera, project

if TYPE_CHECKING:
    from facerecon.facemodel.format import FaceModelData
    from facerecon.facemodel.model import FaceModel

__all__ = ["DecodedFace", "NumpyDecoder", "euler_to_rotation"]


@dataclass(frozen=True)
class DecodedFace:
    """A decoded batch; every field ``(B, ...)`` float32: torch tensors on the model's device
    (:class:`~facerecon.decoder.FaceDecoder`) or NumPy arrays (:meth:`NumpyDecoder.decode`).

    Attributes:
        shape: ``(B, N, 3)`` un-posed model-space vertices (identity + expression), dm.
        vertices_world: ``(B, N, 3)`` posed ``R v + t``, dm (what the OBJ export writes).
        vertices_cam: ``(B, N, 3)`` camera space ``(x, y, d)``, d = distance - z (what the renderer takes).
        normals: ``(B, N, 3)`` un-posed unit vertex normals.
        normals_world: ``(B, N, 3)`` rotated normals ``R n``.
        albedo: ``(B, N, 3)`` RGB about [0, 1].
        colors: ``(B, N, 3)`` SH-lit colour, unclamped.
        vertices_2d: ``(B, N, 2)`` crop pixels ``(u, v_up)``, y up.
        landmarks_2d: ``(B, 68, 2)`` crop pixels ``(u, v_up)``, y up.
        rotation: ``(B, 3, 3)``.
    """

    shape: Any
    vertices_world: Any
    vertices_cam: Any
    normals: Any
    normals_world: Any
    albedo: Any
    colors: Any
    vertices_2d: Any
    landmarks_2d: Any
    rotation: Any


def euler_to_rotation(angles: np.ndarray) -> np.ndarray:
    """``(B, 3)`` radians ``(θx, θy, θz)`` -> ``(B, 3, 3)`` ``R = Rz Ry Rx`` (as :func:`facerecon.geometry.
    euler_to_rotation`)."""
    a = np.asarray(angles)
    if a.ndim != 2 or a.shape[-1] != 3:
        raise ValueError(f"angles must be (B, 3), got {a.shape}")
    cx, cy, cz = np.cos(a).T
    sx, sy, sz = np.sin(a).T
    one, zero = np.ones_like(cx), np.zeros_like(cx)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def _normalize(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``v / max(|v|, eps)`` along the last axis (torch's ``F.normalize``)."""
    n = np.sqrt((v * v).sum(-1, keepdims=True))
    return v / np.maximum(n, np.float32(eps))


class NumpyDecoder:
    """Decode NumPy :class:`Coefficients` with a face model's arrays and the reference camera.

    Build it with :meth:`from_data` (the model file's arrays) or :meth:`from_model` (a loaded torch model's
    buffers, on the CPU). Thread-safe: read-only arrays, no state beyond them.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], layout: CoefficientLayout, camera: Camera | None = None
                 ) -> None:
        self.layout = layout
        self.camera = camera or Camera()
        n = int(arrays["mean_shape"].shape[0])
        self.n_vertices = n
        self.mean_shape = np.ascontiguousarray(arrays["mean_shape"], dtype=np.float32)
        self.mean_albedo = np.ascontiguousarray(arrays["mean_albedo"], dtype=np.float32)
        self.id_basis = np.ascontiguousarray(arrays["id_basis"], dtype=np.float32).reshape(-1, 3 * n)
        self.exp_basis = np.ascontiguousarray(arrays["exp_basis"], dtype=np.float32).reshape(-1, 3 * n)
        self.albedo_basis = np.ascontiguousarray(arrays["albedo_basis"], dtype=np.float32).reshape(-1, 3 * n)
        self.triangles = np.asarray(arrays["triangles"], dtype=np.int64)
        self.point_buf = np.asarray(arrays["point_buf"], dtype=np.int64)
        self.landmarks68 = np.asarray(arrays["landmarks68"], dtype=np.int64)
        # the mean shape and bases at the 68 landmark vertices, gathered once (a landmark decode is then a few
        # hundred multiply-adds)
        cols = (self.landmarks68[:, None] * 3 + np.arange(3)).reshape(-1)
        self._lm_mean = self.mean_shape[self.landmarks68]
        self._lm_id = np.ascontiguousarray(self.id_basis[:, cols])
        self._lm_exp = np.ascontiguousarray(self.exp_basis[:, cols])

    @classmethod
    def from_data(cls, data: FaceModelData, camera: Camera | None = None) -> NumpyDecoder:
        return cls(data.arrays, data.card.layout, camera)

    @classmethod
    def from_model(cls, model: FaceModel, camera: Camera | None = None) -> NumpyDecoder:
        names = ("mean_shape", "mean_albedo", "id_basis", "exp_basis", "albedo_basis", "triangles", "point_buf",
                 "landmarks68")
        return cls({k: getattr(model, k).detach().cpu().numpy() for k in names}, model.layout, camera)

    @functools.cached_property
    def landmark_basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The 68 landmark vertices' mean ``(68, 3)``, identity-then-expression basis ``(K, 68, 3)`` and the same
        basis as ``(68, 3, K)`` (K = K_id + K_exp), float64: what :mod:`facerecon.npfit` solves over, made once per
        decoder."""
        k = self.layout.id + self.layout.exp
        basis = np.concatenate([self._lm_id, self._lm_exp]).astype(np.float64).reshape(k, 68, 3)
        return self._lm_mean.astype(np.float64), basis, np.ascontiguousarray(basis.transpose(1, 2, 0))

    def _check(self, coeffs: Coefficients) -> CoefficientArrays:
        if coeffs.layout != self.layout:
            raise ValueError(f"coefficients have layout {coeffs.layout}, the face model {self.layout}")
        return coeffs.arrays()

    def _pose(self, shape: np.ndarray, c: CoefficientArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rotation, world, camera)`` of ``(B, M, 3)`` model-space points."""
        rot = euler_to_rotation(c.angle).astype(np.float32)
        world = shape @ rot.transpose(0, 2, 1) + c.trans[:, None, :]
        cam = np.concatenate([world[..., :2], np.float32(self.camera.distance) - world[..., 2:3]], axis=-1)
        return rot, world, cam

    def landmarks(self, coeffs: Coefficients) -> np.ndarray:
        """Only the 68 landmarks, ``(B, 68, 2)`` float32 crop pixels (y up), from the 68 landmark vertices (as
        :meth:`facerecon.decoder.FaceDecoder.landmarks`)."""
        c = self._check(coeffs)
        shape = self._lm_mean[None] + (c.id @ self._lm_id + c.exp @ self._lm_exp).reshape(-1, 68, 3)
        _, _, cam = self._pose(shape, c)
        return project(cam, self.camera.intrinsics).astype(np.float32)

    def decode(self, coeffs: Coefficients) -> DecodedFace:
        """The whole mesh (as :class:`facerecon.decoder.FaceDecoder`'s forward), NumPy float32."""
        c = self._check(coeffs)
        n = self.n_vertices
        shape = self.mean_shape[None] + (c.id @ self.id_basis + c.exp @ self.exp_basis).reshape(-1, n, 3)
        albedo = self.mean_albedo[None] + (c.tex @ self.albedo_basis).reshape(-1, n, 3)
        normals = self._vertex_normals(shape)
        rot, world, cam = self._pose(shape, c)
        normals_world = normals @ rot.transpose(0, 2, 1)
        colors = self._sh_shading(albedo, normals_world, c.gamma)
        verts2d = project(cam, self.camera.intrinsics).astype(np.float32)
        return DecodedFace(shape=shape, vertices_world=world, vertices_cam=cam, normals=normals,
                           normals_world=normals_world, albedo=albedo, colors=colors, vertices_2d=verts2d,
                           landmarks_2d=verts2d[:, self.landmarks68], rotation=rot)

    def _vertex_normals(self, v: np.ndarray) -> np.ndarray:
        """Normalised sum of the incident triangles' unit normals ``normalize((v_i - v_j) x (v_j - v_k))``."""
        t = self.triangles
        vi, vj, vk = v[:, t[:, 0]], v[:, t[:, 1]], v[:, t[:, 2]]
        fn = _normalize(np.cross(vi - vj, vj - vk))
        fn = np.concatenate([fn, np.zeros((fn.shape[0], 1, 3), fn.dtype)], axis=1)
        return _normalize(fn[:, self.point_buf].sum(axis=2))

    @staticmethod
    def _sh_shading(albedo: np.ndarray, normals: np.ndarray, gamma: np.ndarray) -> np.ndarray:
        a0c0, a1c1, a2c2 = SH_CONSTANTS
        nx, ny, nz = normals[..., 0], normals[..., 1], normals[..., 2]
        y = np.stack([np.full_like(nx, a0c0), -a1c1 * ny, a1c1 * nz, -a1c1 * nx, a2c2 * nx * ny,
                      -a2c2 * ny * nz, a2c2 / (2.0 * np.sqrt(3.0)) * (3.0 * nz**2 - 1.0), -a2c2 * nx * nz,
                      a2c2 / 2.0 * (nx**2 - ny**2)], axis=-1).astype(np.float32)  # (B, N, 9)
        g = gamma.reshape(-1, 3, 9).astype(np.float32)  # a copy
        g[:, :, 0] += np.float32(INIT_LIGHT)
        return albedo * (y @ g.transpose(0, 2, 1))
