"""Coefficients -> decoded face: shape, albedo, normals, pose, camera projection and SH shading.

Batched, float32, on whatever device the :class:`~facerecon.facemodel.FaceModel` lives (CPU or CUDA). Follows the
reference exactly (reference.md sections 3-5); the same code serves every face model, because the layout comes
from the model's card.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from facerecon import geometry
from facerecon.coefficients import Coefficients
from facerecon.facemodel.model import FaceModel
from facerecon.geometry import Camera


@dataclass(frozen=True)
class DecodedFace:
    """A decoded batch; every tensor ``(B, ...)`` float32 on the model's device.

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

    shape: Tensor
    vertices_world: Tensor
    vertices_cam: Tensor
    normals: Tensor
    normals_world: Tensor
    albedo: Tensor
    colors: Tensor
    vertices_2d: Tensor
    landmarks_2d: Tensor
    rotation: Tensor


class FaceDecoder(nn.Module):
    """Decode :class:`Coefficients` with a face model and the reference camera."""

    def __init__(self, model: FaceModel, camera: Camera | None = None) -> None:
        super().__init__()
        self.model = model
        self.camera = camera or Camera()

    def _landmark_bases(self) -> tuple[Tensor, Tensor, Tensor]:
        """The mean shape and the identity / expression bases at the 68 landmark vertices (gathered once per model
        buffer: gathering 204 columns of the bases is most of what a landmark decode costs)."""
        m = self.model
        key = (m.id_basis.data_ptr(), m.exp_basis.data_ptr(), m.mean_shape.data_ptr(), str(m.id_basis.device))
        cached = getattr(self, "_lm_cache", None)
        if cached is None or cached[0] != key:
            lm = m.landmarks68
            cols = (lm[:, None] * 3 + torch.arange(3, device=lm.device)).reshape(-1)
            cached = (key, (m.mean_shape[lm], m.id_basis[:, cols].contiguous(), m.exp_basis[:, cols].contiguous()))
            self._lm_cache = cached
        return cached[1]

    def landmarks(self, coeffs: Coefficients) -> Tensor:
        """Only the 68 landmarks, ``(B, 68, 2)`` crop pixels (y up), decoding just the 68 landmark vertices (cheap;
        for landmark-only fitting and training). Equals ``forward(coeffs).landmarks_2d``."""
        mean_lm, id_lm, exp_lm = self._landmark_bases()
        offsets = coeffs.id @ id_lm + coeffs.exp @ exp_lm
        shape = mean_lm[None] + offsets.view(-1, 68, 3)
        rot = geometry.euler_to_rotation(coeffs.angle)
        cam = geometry.to_camera(geometry.transform(shape, rot, coeffs.trans), self.camera.distance)
        return geometry.project(cam, self.camera.intrinsics)

    def forward(self, coeffs: Coefficients) -> DecodedFace:
        if coeffs.layout != self.model.layout:
            raise ValueError(f"coefficients have layout {coeffs.layout}, the face model {self.model.layout}")
        m = self.model
        shape = m.shape(coeffs.id, coeffs.exp)
        albedo = m.albedo(coeffs.tex)
        normals = geometry.vertex_normals(shape, m.triangles, m.point_buf)
        rotation = geometry.euler_to_rotation(coeffs.angle)
        world = geometry.transform(shape, rotation, coeffs.trans)
        normals_world = normals @ rotation.transpose(1, 2)
        colors = geometry.sh_shading(albedo, normals_world, coeffs.gamma)
        cam = geometry.to_camera(world, self.camera.distance)
        verts2d = geometry.project(cam, self.camera.intrinsics)
        return DecodedFace(
            shape=shape,
            vertices_world=world,
            vertices_cam=cam,
            normals=normals,
            normals_world=normals_world,
            albedo=albedo,
            colors=colors,
            vertices_2d=verts2d,
            landmarks_2d=verts2d[:, m.landmarks68],
            rotation=rotation,
        )
