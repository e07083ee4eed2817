"""Dense face-mesh supervision of real photos: the face mesh's 468 points as 2D targets of face-model vertices.

The 68 landmarks say little about the cheeks, the forehead or the nose's sides; the detector's face mesh places 468
points there (MediaPipe, Apache-2.0; :mod:`facerecon.detect.facemesh`). Which vertex of the face model each point
marks is derived once, from geometry alone (``python -m eval.derive_mesh468``), and ships beside the face model
(``models/<name>/mesh468.json``: :data:`MESH_FILE`).

* :func:`crop_mesh_targets`: the mesh run again on each training crop (its region of interest from the crop's 68
  landmarks, then MediaPipe's second pass from its own points): ``points (N, 468, 2)`` crop px, y up, and weights
  ``(N, 468)``: the mesh's face score, times 0 for points without a vertex, times a fade by the mesh's own yaw
  estimate (:data:`YAW_FADE_DEG`: past it the mesh guesses the hidden side, :mod:`facerecon.detect.facemesh`).
  Cached per real set.
* :class:`MeshTerm`: the vertices' bases gathered once; :meth:`MeshTerm.loss` the weighted mean squared distance
  (crop px^2) between the projected vertices and the targets, each row's vertices mirrored where the augmentation
  flipped its crop (the face model's ``mirror_index``).

Shapes: ``B`` rows, ``P = 468`` points.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder

__all__ = ["MESH_FILE", "YAW_FADE_DEG", "MeshTargets", "MeshTerm", "crop_mesh_targets", "load_correspondence"]

log = logging.getLogger(__name__)

#: The correspondence file beside a face model's ``facemodel.npz``.
MESH_FILE = "mesh468.json"
#: The mesh's targets fade out between these yaws (degrees, the mesh's own estimate): beyond ~40 degrees its points
#: on the far side are guesses (on CFP profiles it reads about 48 degrees for faces turned 75-90).
YAW_FADE_DEG = (25.0, 40.0)
_CROP = 224
_VERSION = 1


def load_correspondence(face_model_npz: Path) -> np.ndarray:
    """``(468,)`` int64: the face-model vertex each mesh point marks (-1: none), from :data:`MESH_FILE` beside
    ``face_model_npz``."""
    path = Path(face_model_npz).parent / MESH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: derive it with python -m eval.derive_mesh468 --write")
    v = np.asarray(json.loads(path.read_text())["vertices"], np.int64)
    if v.shape != (468,):
        raise ValueError(f"{path}: expected 468 vertices, got {v.shape}")
    return v


@dataclass
class MeshTargets:
    """``points (N, 468, 2)`` float32 crop px, y up; ``weight (N, 468)`` float32; ``yaw (N,)`` the mesh's degrees;
    ``vertices (468,)`` the correspondence they were made for (:func:`load_correspondence`)."""

    points: np.ndarray
    weight: np.ndarray
    yaw: np.ndarray
    vertices: np.ndarray


def _roi_from_landmarks(lm68_yup: np.ndarray) -> Any:
    """The face mesh's first region of interest in a crop from its 68 landmarks (y up): as from a detection, the
    points' box centre and 1.5 x its longer side (MediaPipe's scale), levelled on the eye centres."""
    from facerecon.detect.facemesh import ROI_SCALE, Roi

    p = np.stack([lm68_yup[:, 0], (_CROP - 1) - lm68_yup[:, 1]], axis=1) + 0.5  # y down, continuous
    lo, hi = p.min(0), p.max(0)
    eyes = np.stack([p[36:42].mean(0), p[42:48].mean(0)])
    angle = float(np.arctan2(eyes[1, 1] - eyes[0, 1], eyes[1, 0] - eyes[0, 0]))
    return Roi(float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2), float((hi - lo).max() * ROI_SCALE), angle)


def yaw_fade(yaw_deg: np.ndarray) -> np.ndarray:
    """``(N,)`` weights: 1 up to :data:`YAW_FADE_DEG` [0], 0 from [1] on, linear between."""
    lo, hi = YAW_FADE_DEG
    return np.clip((hi - np.abs(np.nan_to_num(yaw_deg, nan=90.0))) / (hi - lo), 0.0, 1.0).astype(np.float32)


def crop_mesh_targets(images: np.ndarray, lm68: np.ndarray, correspondence: np.ndarray, cache: Path | None = None,
                      *, batch: int = 64, progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None
                      ) -> MeshTargets:
    """The face mesh's points on each aligned crop (module docstring).

    Args:
        images: ``(N, 224, 224, 3)`` uint8 crops; lm68: ``(N, 68, 2)`` their landmarks, crop px, y up.
        correspondence: ``(468,)`` from :func:`load_correspondence` (points without a vertex get weight 0).
        cache: a folder; the result is kept there under a hash of the crops' landmarks and the version.
    """
    from facerecon.detect.facemesh import FaceMesh, Roi, estimate_pose

    key = hashlib.sha1(np.ascontiguousarray(lm68, np.float32).tobytes() + bytes([_VERSION])).hexdigest()[:16]
    path = None if cache is None else Path(cache) / f"mesh468_{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as z:
            pts, scores, yaw = z["points"], z["scores"], z["yaw"]
    else:
        mesh = FaceMesh(device="cpu")
        n = len(images)
        pts = np.zeros((n, 468, 2), np.float32)
        scores = np.zeros(n, np.float32)
        yaw = np.zeros(n, np.float32)
        starts: Iterable[int] = range(0, n, batch)
        for s in progress(starts) if progress else starts:
            sl = slice(s, min(s + batch, n))
            pils = [Image.fromarray(c) for c in images[sl]]
            first, _ = mesh.landmarks(pils, [_roi_from_landmarks(lm) for lm in lm68[sl]])
            p3, sc = mesh.landmarks(pils, [Roi.from_points(p) for p in first])  # MediaPipe's second pass
            pts[sl] = np.stack([p3[..., 0] - 0.5, (_CROP - 1) - (p3[..., 1] - 0.5)], axis=-1)  # centres, y up
            scores[sl] = sc
            yaw[sl] = [estimate_pose(p)[1] for p in p3]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, points=pts, scores=scores, yaw=yaw)
            log.info("face mesh on %d training crops, cached at %s", n, path)
    weight = scores[:, None] * yaw_fade(yaw)[:, None] * (correspondence >= 0)[None, :].astype(np.float32)
    return MeshTargets(pts.astype(np.float32), weight.astype(np.float32), yaw.astype(np.float32), correspondence)


class MeshTerm:
    """The dense face-mesh term over a face model's vertices (module docstring).

    Args:
        decoder: the training decoder (its camera projects into the crop).
        correspondence: ``(468,)`` vertex per mesh point (-1: none).
    """

    def __init__(self, decoder: FaceDecoder, correspondence: np.ndarray) -> None:
        m = decoder.model
        self.decoder = decoder
        valid = correspondence >= 0
        v = torch.from_numpy(np.where(valid, correspondence, 0)).to(m.mean_shape.device)
        mirror = torch.from_numpy(np.asarray(m.extras["mirror_index"], np.int64)).to(v.device)
        self.valid = torch.from_numpy(valid.astype(np.float32)).to(v.device)
        self._bases = [m.subset_bases(idx) for idx in (v, mirror[v])]  # as marked, and mirrored (flipped crops)

    def project(self, coeffs: Coefficients, flipped: Tensor | None = None) -> Tensor:
        """``(B, 468, 2)`` crop px, y up: the marked vertices (mirrored in the rows ``flipped (B,)`` bool)."""
        if flipped is None:
            return self.decoder.project_subset(coeffs, self._bases[0])
        marked, mirrored = (self.decoder.project_subset(coeffs, b) for b in self._bases)
        return torch.where(flipped[:, None, None], mirrored, marked)

    def loss(self, coeffs: Coefficients, target: Tensor, weight: Tensor, flipped: Tensor | None = None) -> Tensor:
        """``(1 / (468 B)) sum_b sum_p w_bp |q_bp - t_bp|^2`` (crop px^2), the landmark term's form over the mesh
        points; ``target (B, 468, 2)`` crop px y up, ``weight (B, 468)``."""
        q = self.project(coeffs, flipped)
        return (((q - target) ** 2).sum(-1) * weight * self.valid).sum() / (q.shape[0] * q.shape[1])
