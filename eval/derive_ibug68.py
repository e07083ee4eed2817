"""Derive the face mesh's 468 -> 68 iBUG correspondence from manual annotations, and check it on held-out faces.

    python -m eval.derive_ibug68 [--write]

Fit (:func:`derive_ibug68_map`): the mesh points the shipped detector gives on the 870
HELEN training photos against their manual 300-W 68 points; each iBUG point becomes a convex combination of at
most 4 mesh points. Check: the AFW + HELEN test photos (667 faces, not used in the fit). ``--write`` replaces
``facerecon/assets/mediapipe/mesh_to_ibug68.json``. Measured when the shipped map was made: train NME 2.88 % (68)
/ 2.12 % (inner 51), held-out 3.09 % / 2.19 % (normalised by sqrt of the annotation box area).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image
from tqdm import tqdm

from eval import facedata
from facerecon.detect.blazeface import ASSETS
from facerecon.detect.detector import FaceDetector
from facerecon.detect.facemesh import MAP_FILE


def derive_ibug68_map(
    mesh: np.ndarray, truth: np.ndarray, norm: np.ndarray, *, candidates: int = 12, k: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Fit the 468 -> 68 correspondence to annotated photos.

    For every iBUG point, the ``candidates`` mesh points nearest to it on average (after normalising each face by
    ``norm``) are tried; non-negative least squares with the weights summing to one (a heavily weighted sum row)
    gives a convex combination; the ``k`` largest weights are kept and refitted.

    Args:
        mesh: ``(F, 468, 2)`` mesh points of F faces (photo px).
        truth: ``(F, 68, 2)`` annotated points (same frame).
        norm: ``(F,)`` a size per face (e.g. sqrt of the annotation box area), so each face counts equally.

    Returns:
        ``indices (68, k)``, ``weights (68, k)``.
    """
    from scipy.optimize import nnls

    mesh = mesh / norm[:, None, None]
    truth = truth / norm[:, None, None]
    idx_out = np.zeros((68, k), np.int64)
    w_out = np.zeros((68, k), np.float32)

    def solve(cols: np.ndarray, j: int) -> np.ndarray:
        a = mesh[:, cols, :].transpose(0, 2, 1).reshape(-1, len(cols))  # (F*2, C)
        b = truth[:, j, :].reshape(-1)
        big = 1e3
        a = np.vstack([a, big * np.ones((1, len(cols)))])
        b = np.concatenate([b, [big]])
        w, _ = nnls(a, b)
        return w / max(w.sum(), 1e-12)

    for j in range(68):
        dist = np.linalg.norm(mesh - truth[:, j : j + 1, :], axis=2).mean(axis=0)
        cols = np.argsort(dist)[:candidates]
        w = solve(cols, j)
        top = np.argsort(-w)[:k]
        cols = cols[top]
        w = solve(cols, j)
        order = np.argsort(-w)
        idx_out[j], w_out[j] = cols[order], w[order]
    return idx_out, w_out


def nearest_meshes(detector: FaceDetector, items: list[facedata.Annotated]
                   ) -> list[tuple[facedata.Annotated, np.ndarray]]:
    """Each annotated face with the 3D mesh points ``(468, 3)`` (continuous photo px, z smaller = nearer) of the
    detection nearest it; faces without a detection are left out."""
    out = []
    for a in tqdm(items, desc="face mesh", leave=False):
        img = Image.open(a.path).convert("RGB")
        det = detector.boxes(img)
        if len(det) == 0:
            continue
        pts, _ = detector.mesh_points(img, det)
        centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2 - 0.5
        out.append((a, pts[int(np.argmin(np.linalg.norm(centres - a.points.mean(0), axis=1)))]))
    return out


def mesh_points(detector: FaceDetector, items: list[facedata.Annotated]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mesh points (pixel-centre convention) of the detection nearest each annotation, with truths and norms."""
    found = nearest_meshes(detector, items)
    return (np.array([p[:, :2] - 0.5 for _, p in found]), np.array([a.points for a, _ in found]),
            np.array([a.box_norm for a, _ in found]))


def nme(mesh: np.ndarray, truth: np.ndarray, norm: np.ndarray, idx: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    pred = (mesh[:, idx, :] * w[None, :, :, None]).sum(2)
    e = np.linalg.norm(pred - truth, axis=2) / norm[:, None]
    return float(e.mean()), float(e[:, 17:].mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the map into the package's assets")
    args = ap.parse_args(argv)
    det = FaceDetector()
    m, t, n = mesh_points(det, facedata.afw_helen(("helen_trainset",)))
    idx, w = derive_ibug68_map(m, t, n)
    mv, tv, nv = mesh_points(det, facedata.afw_helen(("afw", "helen_testset")))
    print(f"fit on {len(m)} HELEN train faces: NME 68 {100 * nme(m, t, n, idx, w)[0]:.2f} %, "
          f"inner 51 {100 * nme(m, t, n, idx, w)[1]:.2f} %")
    a68, a51 = nme(mv, tv, nv, idx, w)
    print(f"held out, {len(mv)} AFW + HELEN test faces: NME 68 {100 * a68:.2f} %, inner 51 {100 * a51:.2f} %")
    if args.write:
        data = {"indices": idx.tolist(), "weights": [[round(float(x), 6) for x in r] for r in w]}
        (ASSETS / MAP_FILE).write_text(json.dumps(data) + "\n")
        print(f"wrote {ASSETS / MAP_FILE}")


if __name__ == "__main__":
    main()
