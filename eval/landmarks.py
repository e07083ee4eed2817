"""Landmark accuracy of reconstructions, per mode.

    python -m eval.landmarks DIR [DIR...] [--limit N] [--modes fit,rnet,rnet+lm,rnet+fit]

For every photo: the normalised mean error (NME, by the distance between the eye centres of the reference points)
between the reconstruction's reprojected 68 landmarks and reference landmarks: the detector's own 68 points, and
human annotations where the folder provides them (iBUG ``<stem>.pts`` beside the photo, or a ``landmarks_68.csv``
as in ``faces-train/ytf_68pt``). Also the start-vs-end landmark error of the fit (crop pixels). Modes: ``rnet``
(R-Net alone), ``fit`` (test-time fitting from the mean face), ``rnet+fit``; R-Net modes need an installed R-Net.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from facerecon.errors import FaceReconError
from facerecon.imaging import load_image
from facerecon.pipeline import Reconstructor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_pts(path: Path) -> np.ndarray | None:
    """An iBUG ``.pts`` file -> (68, 2) x right, y down (iBUG files are 1-based: subtract 1)."""
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    start = lines.index("{") + 1
    pts = np.array([[float(v) for v in ln.split()] for ln in lines[start : start + 68]])
    return pts - 1.0 if pts.shape == (68, 2) else None


def read_csv_landmarks(folder: Path) -> dict[str, np.ndarray]:
    """``landmarks_68.csv`` (image, x0, y0, ..., x67, y67) in the folder or up to two levels above, keyed by the
    ``image`` column (e.g. ``test/<file>``)."""
    for cand in (folder / "landmarks_68.csv", folder.parent / "landmarks_68.csv",
                 folder.parent.parent / "landmarks_68.csv"):
        if cand.is_file():
            with open(cand) as f:
                rows = list(csv.reader(f))
            out = {}
            for row in rows[1:]:
                out[row[0]] = np.asarray(row[1:137], float).reshape(68, 2)
            return out
    return {}


def nme(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean point error / distance between the eye centres (mean(36, 39), mean(42, 45)) of ``ref``."""
    iod = np.linalg.norm(ref[36:40:3].mean(0) - ref[42:46:3].mean(0))
    return float(np.linalg.norm(pred - ref, axis=1).mean() / max(iod, 1e-6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--limit", type=int, default=0, help="at most N photos per folder (0 = all)")
    ap.add_argument("--modes", default="", help="comma list of rnet, rnet+lm, fit, rnet+fit (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rec = Reconstructor()
    modes = [m for m in args.modes.split(",") if m] or (["rnet", "rnet+lm", "fit", "rnet+fit"] if rec.rnet else ["fit"])
    if rec.rnet is None and any(m.startswith("rnet") for m in modes):
        raise SystemExit("no R-Net is installed for this face model; use --modes fit")
    results: dict[str, dict[str, list[float]]] = {m: {"detector": [], "human": [], "start": [], "end": [],
                                                      "seconds": []} for m in modes}
    failures = 0
    baseline: list[float] = []
    for folder in args.dirs:
        photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if args.limit:
            photos = photos[: args.limit]
        table = read_csv_landmarks(folder)
        for p in photos:
            human = read_pts(p.with_suffix(".pts"))
            if human is None:
                key = f"{p.parent.name}/{p.name}"
                human = table.get(key, table.get(p.name))
            try:
                image = load_image(p)
                faces = rec.detect(image, "all")
                face = faces[0]
                if human is not None:  # the annotated face, not merely the largest
                    centre = human.mean(0)
                    face = min(faces, key=lambda f: float(np.linalg.norm(f.lm68.mean(0) - centre)))
                prepared = rec.prepare(image, face)
            except FaceReconError:
                failures += 1
                continue
            if human is not None:
                baseline.append(nme(face.lm68.astype(np.float64), human))
            for mode in modes:
                t0 = time.perf_counter()
                est = rec.estimate([prepared], mode=mode)  # type: ignore[arg-type]
                coeffs = est.coefficients
                if est.fit_landmark_error is not None:
                    results[mode]["start"].append(est.fit_landmark_error[0][0])
                    results[mode]["end"].append(est.fit_landmark_error[1][0])
                results[mode]["seconds"].append(time.perf_counter() - t0)
                with torch.no_grad():
                    lm = rec.decoder(coeffs).landmarks_2d[0].numpy().astype(np.float64)
                pred = prepared.alignment.to_photo(lm)
                results[mode]["detector"].append(nme(pred, face.lm68.astype(np.float64)))
                if human is not None:
                    results[mode]["human"].append(nme(pred, human))
    print(f"\nface model {rec.model.name}; {failures} photos without a usable face skipped")
    print(f"{'mode':<10}{'n':>5}{'NME det mean':>14}{'median':>9}{'n human':>9}{'NME human mean':>16}"
          f"{'median':>9}{'fit px start->end':>20}{'s/photo':>9}")
    for mode, r in results.items():
        if not r["detector"]:
            continue
        hm = f"{statistics.mean(r['human']):.4f}" if r["human"] else "-"
        hmed = f"{statistics.median(r['human']):.4f}" if r["human"] else "-"
        fitpx = f"{statistics.mean(r['start']):.2f}->{statistics.mean(r['end']):.2f}" if r["start"] else "-"
        print(f"{mode:<10}{len(r['detector']):>5}{statistics.mean(r['detector']):>14.4f}"
              f"{statistics.median(r['detector']):>9.4f}{len(r['human']):>9}{hm:>16}{hmed:>9}{fitpx:>20}"
              f"{statistics.median(r['seconds']):>9.2f}")
    if baseline:
        print(f"{'detector':<10}{'':>5}{'':>14}{'':>9}{len(baseline):>9}{statistics.mean(baseline):>16.4f}"
              f"{statistics.median(baseline):>9.4f}   (the detector's own 68 points vs the annotations)")


if __name__ == "__main__":
    main()
