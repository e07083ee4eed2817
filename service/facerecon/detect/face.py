"""The detection result every backend returns, the 68 -> 5 reduction and the choice of faces to reconstruct.

Coordinates: every point and box is in **photo pixels of the input array**: x = column (right), y = row (**down**),
integer values at pixel centres (the centre of the top-left pixel is (0, 0)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from facerecon.landmarks import LM5_FROM_68, lm68_to_lm5

__all__ = [
    "LM5_FROM_68",
    "MIN_LANDMARK_SCORE",
    "MIN_RELIABLE_SCORE",
    "DetectedFace",
    "Which",
    "as_rgb_uint8",
    "lm68_to_lm5",
    "make_face",
    "select_faces",
]

#: A face whose detection score is below this is reported but flagged unreliable (BlazeFace sigmoid score; the
#: detector keeps boxes from 0.5 as MediaPipe does). On the CFP / AFW / HELEN photos 95 % of true faces score
#: 0.66 or more (``python -m eval.detection``); small faces in group photos score 0.5-0.9.
MIN_RELIABLE_SCORE = 0.6
#: A face whose landmark (face-mesh presence) confidence is below this is flagged unreliable.
MIN_LANDMARK_SCORE = 0.5

Which = Literal["largest", "all"]


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detected face, in photo pixels (x right, y **down**, integer = pixel centre).

    Attributes:
        box: ``(x0, y0, x1, y1)`` float, the detector's box; ``x0, y0`` is the top-left and ``x1, y1`` the
            bottom-right pixel centre it includes, so its width is ``x1 - x0 + 1``. Boxes may extend past the
            photo border.
        score: detector confidence in [0, 1] (BlazeFace: sigmoid of its class logit; dlib: HOG margin).
        lm5: ``(5, 2) float32``: image-left eye centre, image-right eye centre, nose tip, image-left mouth
            corner, image-right mouth corner (the reference's 5 points, derived from ``lm68``).
        lm68: ``(68, 2) float32`` iBUG/Multi-PIE order, 0-based. From a 3D-aware face mesh, so on a turned face
            the hidden side is placed where it is (behind the nose), not on the visible contour.
        landmark_score: confidence of the landmarks in [0, 1] (the face mesh's face-presence output).
        lm68_depth: ``(68,) float32`` or None: relative depth of each landmark in photo pixels, **larger = nearer
            the camera** (the face mesh's z, sign flipped), zero-mean.
        pose: ``(pitch, yaw, roll)`` degrees estimated from the 3D landmarks, or None. Conventions as the
            reconstruction's angles (rotation of the head in a y-up camera frame, yaw positive when the head turns
            to the image's left... see :func:`facerecon.detect.facemesh.estimate_pose`).
        backend: which detector produced it.

    Arrays are read-only.
    """

    box: tuple[float, float, float, float]
    score: float
    lm5: np.ndarray
    lm68: np.ndarray
    landmark_score: float = 1.0
    lm68_depth: np.ndarray | None = None
    pose: tuple[float, float, float] | None = None
    backend: str = "blazeface+facemesh"

    @property
    def area(self) -> float:
        """Box area in photo pixels (inclusive box: ``(x1 - x0 + 1) * (y1 - y0 + 1)``)."""
        x0, y0, x1, y1 = self.box
        return max(x1 - x0 + 1.0, 0.0) * max(y1 - y0 + 1.0, 0.0)

    @property
    def reliable(self) -> bool:
        """Both the detection and its landmarks are confident enough to reconstruct as usual."""
        return self.score >= MIN_RELIABLE_SCORE and self.landmark_score >= MIN_LANDMARK_SCORE

    @property
    def warnings(self) -> list[str]:
        """Why the face is not :attr:`reliable` (empty when it is)."""
        out = []
        if self.score < MIN_RELIABLE_SCORE:
            out.append(f"low detection score {self.score:.2f} (< {MIN_RELIABLE_SCORE})")
        if self.landmark_score < MIN_LANDMARK_SCORE:
            out.append(f"low landmark confidence {self.landmark_score:.2f} (< {MIN_LANDMARK_SCORE})")
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: plain lists and floats, photo pixels, y down."""
        return {
            "box": [float(v) for v in self.box],
            "score": float(self.score),
            "landmark_score": float(self.landmark_score),
            "reliable": self.reliable,
            "warnings": self.warnings,
            "pose_estimate": None if self.pose is None else dict(zip(("pitch", "yaw", "roll"), self.pose, strict=True)),
            "lm5": self.lm5.tolist(),
            "lm68": self.lm68.tolist(),
        }


def select_faces(faces: list[DetectedFace], which: Which = "largest") -> list[DetectedFace]:
    """Pick the faces to reconstruct.

    Ranking: reliable faces (confident detection and landmarks) before unreliable ones, then by box area, so a
    large false box never wins over a confident real face; with no reliable face the largest unreliable one is
    returned (and carries its :attr:`DetectedFace.warnings`).

    Args:
        faces: detections, any order.
        which: ``"largest"`` (a list with the best face, or empty) or ``"all"`` (every face, best first).
    """
    ordered = sorted(faces, key=lambda f: (f.reliable, f.area), reverse=True)
    if which == "all":
        return ordered
    if which == "largest":
        return ordered[:1]
    raise ValueError(f"which must be 'largest' or 'all', got {which!r}")


def make_face(
    box: tuple[float, float, float, float],
    score: float,
    lm68: np.ndarray,
    **extra: Any,
) -> DetectedFace:
    """A :class:`DetectedFace` with read-only arrays and ``lm5`` derived from ``lm68``."""
    lm68 = np.ascontiguousarray(lm68, dtype=np.float32)
    lm5 = lm68_to_lm5(lm68).astype(np.float32)
    for arr in (lm68, lm5, extra.get("lm68_depth")):
        if arr is not None:
            arr.setflags(write=False)
    x0, y0, x1, y1 = (float(v) for v in box)
    return DetectedFace(box=(x0, y0, x1, y1), score=float(score), lm5=lm5, lm68=lm68, **extra)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grey, got {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"empty image {arr.shape}")
    return np.ascontiguousarray(arr)
