"""The face model as a torch module: bases as buffers (as smplx does), topology and metadata alongside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from facerecon.coefficients import CoefficientLayout
from facerecon.facemodel.format import FaceModelCard, FaceModelData, load_face_model
from facerecon.landmarks import lm68_to_lm5


#: 0-based iBUG indices whose means/values give the reference's 5 points: eye (image left) = mean(36, 39),
#: eye (image right) = mean(42, 45), nose tip 30, mouth corners 48 and 54 (reference.md section 1).
class FaceModel(nn.Module):
    """A linear 3D morphable model ``S = S̄ + B_id·α + B_exp·β``, ``T = T̄ + B_tex·δ``.

    Buffers (float32 unless noted; N vertices, F triangles):
        mean_shape ``(N, 3)`` dm; id_basis ``(K_id, 3N)``; exp_basis ``(K_exp, 3N)``; mean_albedo ``(N, 3)``
        RGB [0, 1]; albedo_basis ``(K_tex, 3N)``; triangles ``(F, 3)`` int64; point_buf ``(N, P)`` int64 padded
        with F; landmarks68 ``(68,)`` int64; front_triangles ``(F2, 3)`` int64; skin_mask / face_mask ``(N,)`` bool.
    """

    mean_shape: Tensor
    id_basis: Tensor
    exp_basis: Tensor
    mean_albedo: Tensor
    albedo_basis: Tensor
    triangles: Tensor
    point_buf: Tensor
    landmarks68: Tensor
    front_triangles: Tensor
    skin_mask: Tensor
    face_mask: Tensor

    def __init__(self, data: FaceModelData) -> None:
        super().__init__()
        self.card: FaceModelCard = data.card
        self.layout: CoefficientLayout = data.card.layout
        n = data.card.n_vertices
        f32 = {k: torch.from_numpy(np.ascontiguousarray(data[k], dtype=np.float32))
               for k in ("mean_shape", "mean_albedo")}
        self.register_buffer("mean_shape", f32["mean_shape"])
        self.register_buffer("mean_albedo", f32["mean_albedo"])
        for key in ("id_basis", "exp_basis", "albedo_basis"):
            basis = np.ascontiguousarray(data[key], dtype=np.float32).reshape(-1, 3 * n)
            self.register_buffer(key, torch.from_numpy(basis))
        for key in ("triangles", "point_buf", "landmarks68", "front_triangles"):
            self.register_buffer(key, torch.from_numpy(data[key].astype(np.int64)))
        self.register_buffer("skin_mask", torch.from_numpy(data["skin_mask"].astype(bool)))
        self.register_buffer("face_mask", torch.from_numpy(data["face_mask"].astype(bool)))
        #: Arrays that no decoding step needs on the device (UVs, regions, standard landmarks) stay numpy.
        self.extras: dict[str, np.ndarray] = {
            k: np.asarray(data[k])
            for k in ("uv_coords", "uv_triangles", "vertex_region", "mirror_index", "standard_landmarks68")
            if data.get(k) is not None
        }

    @classmethod
    def from_file(cls, path: Path | str, device: torch.device | str = "cpu") -> FaceModel:
        return cls(load_face_model(Path(path))).to(device)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def n_vertices(self) -> int:
        return self.card.n_vertices

    @property
    def has_uvs(self) -> bool:
        return "uv_coords" in self.extras

    @property
    def standard_landmarks68(self) -> np.ndarray:
        """``(68, 3)`` float32 standard 3D landmarks (dm) used by the alignment."""
        return self.extras["standard_landmarks68"]

    @property
    def standard_lm5(self) -> np.ndarray:
        """``(5, 3)`` float32: the 5 standard 3D points of the reference alignment (section 6.2)."""
        return lm68_to_lm5(self.standard_landmarks68.astype(np.float64)).astype(np.float32)

    def subset_bases(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The mean shape and the identity / expression bases at the vertices ``idx (M,)``: ``(M, 3)``,
        ``(K_id, 3M)``, ``(K_exp, 3M)`` (gathering the bases' columns is most of what decoding a few vertices costs:
        callers keep the result)."""
        cols = (idx[:, None] * 3 + torch.arange(3, device=idx.device)).reshape(-1)
        return self.mean_shape[idx], self.id_basis[:, cols].contiguous(), self.exp_basis[:, cols].contiguous()

    def shape(self, id_coeff: Tensor, exp_coeff: Tensor) -> Tensor:
        """``(B, K_id)``, ``(B, K_exp)`` -> ``(B, N, 3)`` un-posed shape in decimetres."""
        offsets = id_coeff @ self.id_basis + exp_coeff @ self.exp_basis
        return self.mean_shape[None] + offsets.view(-1, self.n_vertices, 3)

    def albedo(self, tex_coeff: Tensor) -> Tensor:
        """``(B, K_tex)`` -> ``(B, N, 3)`` albedo, RGB about [0, 1], unclamped (as the reference)."""
        return self.mean_albedo[None] + (tex_coeff @ self.albedo_basis).view(-1, self.n_vertices, 3)
