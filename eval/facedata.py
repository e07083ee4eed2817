"""Readers for the annotated face photos in ``../shared/data/faces-train`` used by the detection evaluation,
the 468 -> 68 derivation and the detector tests.

* AFW / HELEN (``afw_helen``): manual 300-W 68 points, iBUG order, 0-based pixel centres in the crop.
* CFP (``cfp``): 30 manual one-side fiducials per photo (frontal and profile views of the same people). The
  dataset gives no iBUG correspondence; the one used here (:data:`CFP_TO_IBUG`) was checked on overlays of the
  points on frontal and profile photos (``python -m eval.detection --show-cfp``), see its comment.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
FACES = SHARED / "data" / "faces-train"
AFW_HELEN = FACES / "afw_helen"
CFP = FACES / "cfp"
EXAMPLES = SHARED / "data" / "deep3d-examples"

INNER51 = np.arange(17, 68)


@dataclass(frozen=True)
class Annotated:
    path: Path
    subset: str
    points: np.ndarray  # (P, 2) x right, y down, 0-based pixel centres

    @property
    def box_norm(self) -> float:
        """sqrt(w h) of the annotation's bounding box (the 300-W / AFLW2000 normaliser used here)."""
        lo, hi = self.points.min(0), self.points.max(0)
        return float(math.sqrt(max((hi - lo).prod(), 1e-6)))


def afw_helen(subsets: tuple[str, ...] = ("afw", "helen_testset", "helen_trainset")) -> list[Annotated]:
    """AFW / HELEN faces of the given subsets (``afw``, ``helen_testset``: validation; ``helen_trainset``)."""
    out = []
    with open(AFW_HELEN / "landmarks_68.csv") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        subset = row[0].split("/")[0]
        if subset in subsets:
            pts = np.asarray(row[1:137], float).reshape(68, 2)
            out.append(Annotated(AFW_HELEN / "images" / row[0], subset, pts))
    return out


def cfp(view: str = "profile") -> list[Annotated]:
    """CFP photos of one view (``profile`` or ``frontal``) with their 30 fiducials."""
    out = []
    with open(CFP / "fiducials_30.csv") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        if row[2] == view:
            pts = np.asarray(row[3:63], float).reshape(30, 2)
            out.append(Annotated(CFP / row[0], view, pts))
    return out


def every(items: list[Annotated], n: int | None) -> list[Annotated]:
    """A fixed, evenly spaced subset of ``n`` items (all when ``n`` is None)."""
    if n is None or n >= len(items):
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def template_yaw(points68: np.ndarray, lm3d: np.ndarray) -> float:
    """Yaw in degrees of 68 annotated points, from an orthographic fit to a 3D 68-point template (``lm3d``, y
    up): the affine camera's rows are orthonormalised and the rotation's yaw returned (sign as the
    reconstruction's: positive = the face turns towards the image's right). Used to split the errors by pose;
    300-W's visible jaw contour biases it a little on turned faces, so only the inner 51 points are used."""
    x = points68[INNER51].astype(np.float64)
    xy = np.stack([x[:, 0], -x[:, 1]], 1)
    X = lm3d[INNER51].astype(np.float64)
    A = np.hstack([X, np.ones((len(X), 1))])
    k, *_ = np.linalg.lstsq(A, xy, rcond=None)
    r1, r2 = k[:3, 0], k[:3, 1]
    r1 /= np.linalg.norm(r1)
    r2 -= r1 * (r1 @ r2)
    r2 /= np.linalg.norm(r2)
    r3 = np.cross(r1, r2)
    return float(math.degrees(math.asin(max(-1.0, min(1.0, r3[0])))))
