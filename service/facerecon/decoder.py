"""Coefficients -> decoded face: shape, albedo, normals, pose, camera projection and SH shading.

Batched, float32, on whatever device the :class:`~facerecon.facemodel.FaceModel` lives (CPU or CUDA). Follows the
reference exactly (reference.md sections 3-5); the same code serves every face model, because the layout comes
from the model's card. :class:`~facerecon.npdecode.NumpyDecoder` is the same maths without torch (the R-Net path).
"""

from __future__ import annotations

from torch import Tensor, nn

from facerecon import geometry
from facerecon.coefficients import Coefficients
from facerecon.facemodel.model import FaceModel
from facerecon.geometry import Camera
from facerecon.npdecode import DecodedFace

__all__ = ["DecodedFace", "FaceDecoder"]


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
            cached = (key, m.subset_bases(m.landmarks68))
            self._lm_cache = cached
        return cached[1]

    def landmarks(self, coeffs: Coefficients) -> Tensor:
        """Only the 68 landmarks, ``(B, 68, 2)`` crop pixels (y up), decoding just the 68 landmark vertices (cheap;
        for landmark-only fitting and training). Equals ``forward(coeffs).landmarks_2d``."""
        return self.project_subset(coeffs, self._landmark_bases())

    def project_subset(self, coeffs: Coefficients, bases: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``(B, M, 2)`` crop pixels (y up) of the M vertices whose ``bases`` (:meth:`FaceModel.subset_bases`) are
        given, posed and projected as :meth:`forward` does."""
        mean, id_b, exp_b = bases
        shape = mean[None] + (coeffs.id @ id_b + coeffs.exp @ exp_b).view(-1, mean.shape[0], 3)
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
