"""Derive which vertex of a face model each of the face mesh's 468 points marks, for the dense face-mesh term.

    python -m eval.derive_mesh468 [--face-model ict] [--max-yaw 15] [--max-distance-mm 4] [--write]

Geometry only (no network of ours is involved, so the correspondence carries none of its errors):

1. the shipped detector's 468 mesh points, in 3D (x, y photo px, z the mesh's relative depth in the same scale),
   on the HELEN training photos whose manual 68 points say the face is within ``--max-yaw`` degrees of frontal;
2. each face's points turned into the face model's frame (y up, z towards the camera) by the similarity
   (Umeyama 1991: rotation, scale, translation) that best maps its inner 51 iBUG points (the mesh's 68 by the
   shipped 468 -> 68 map, :func:`facerecon.detect.facemesh.mesh_to_ibug68`) onto the model's 68 landmark vertices
   of the mean shape;
3. the median over the faces of each aligned point: the mesh's canonical face in the model's frame;
4. for each of the 468 points, the nearest vertex of the model's face region (``face_mask``) of the mean shape;
   points farther than ``--max-distance-mm`` from it (the mesh's hairline and the inner lip rim where the model's
   surface is elsewhere) get no vertex (-1).

``--write`` stores ``mesh468.json`` beside the face model (``models/<name>/``): the vertex per point, its distance,
and how it was made. :mod:`facerecon.train.mesh` reads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from eval import facedata
from eval.derive_ibug68 import nearest_meshes
from facerecon.detect.detector import FaceDetector
from facerecon.detect.facemesh import mesh_to_ibug68
from facerecon.export import metres_per_unit
from facerecon.facemodel import FaceModel
from facerecon.facemodel.registry import resolve
from facerecon.train.mesh import MESH_FILE

INNER51 = facedata.INNER51


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Umeyama's least-squares similarity ``dst ~ s R src + t`` of ``(N, 3)`` point sets: ``(s, R (3, 3), t (3,))``,
    ``R`` a proper rotation."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, 1.0, d])
    rot = u @ fix @ vt
    s = float((sig * np.diag(fix)).sum() / (a ** 2).sum(1).mean())
    return s, rot, mu_d - s * rot @ mu_s


def canonical_mesh(points: np.ndarray, target68: np.ndarray) -> np.ndarray:
    """``(F, 468, 3)`` mesh points (photo px, y down, z smaller = nearer) -> ``(468, 3)`` the median of the faces'
    points, each face moved into the model frame by its inner-51 similarity to ``target68 (68, 3)``."""
    aligned = []
    for p in points:
        q = np.stack([p[:, 0], -p[:, 1], -p[:, 2]], axis=1).astype(np.float64)  # y up, z towards the camera
        s, rot, t = similarity(mesh_to_ibug68(q)[INNER51], target68[INNER51])
        aligned.append(s * q @ rot.T + t)
    return np.median(np.stack(aligned), axis=0)


def nearest_vertices(canonical: np.ndarray, vertices: np.ndarray, candidates: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """For each canonical point, the nearest of ``vertices[candidates]``: ``(indices (468,), distances (468,))`` in
    the vertices' units."""
    d = np.linalg.norm(canonical[:, None, :] - vertices[candidates][None, :, :], axis=-1)
    j = d.argmin(1)
    return candidates[j], d[np.arange(len(canonical)), j]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--face-model", default="ict")
    ap.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    ap.add_argument("--max-yaw", type=float, default=15.0)
    ap.add_argument("--max-distance-mm", type=float, default=4.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    npz = resolve(args.models_dir, args.face_model)
    model = FaceModel.from_file(npz)
    mean = model.mean_shape.numpy().astype(np.float64)
    lm3d = model.standard_landmarks68.astype(np.float64)
    items = [a for a in facedata.afw_helen(("helen_trainset",))
             if abs(facedata.template_yaw(a.points, lm3d)) <= args.max_yaw]
    pts = np.asarray([p for _, p in nearest_meshes(FaceDetector(), items)])
    canon = canonical_mesh(pts, mean[model.landmarks68.numpy()])
    mm = 1000.0 * metres_per_unit(model.card.units)
    idx, dist = nearest_vertices(canon, mean, np.flatnonzero(model.face_mask.numpy()))
    dist_mm = dist * mm
    keep = dist_mm <= args.max_distance_mm
    print(f"{len(pts)} HELEN training faces within {args.max_yaw:g} deg of frontal; nearest face-region vertex: "
          f"median {np.median(dist_mm):.2f} mm, 90th percentile {np.percentile(dist_mm, 90):.2f} mm; "
          f"{int(keep.sum())} of 468 points within {args.max_distance_mm:g} mm")
    if args.write:
        out = npz.parent / MESH_FILE
        out.write_text(json.dumps({
            "vertices": [int(v) if k else -1 for v, k in zip(idx, keep, strict=True)],
            "distance_mm": [round(float(v), 2) for v in dist_mm],
            "faces": len(pts), "max_yaw_deg": args.max_yaw, "max_distance_mm": args.max_distance_mm,
            "derived_by": "python -m eval.derive_mesh468 --write",
        }) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
