"""Preprocessing benchmark: decode, detect (+ 68 landmarks), align, per photo, on CPU.

Runs over the reference example photos (``../shared/data/deep3d-examples``) and prints median and p90
milliseconds per photo for each stage. With ``--compare`` it also runs the detector variants on the same photos
and prints their 5-point accuracy against the reference's own detections (NME = mean point error / distance
between the two reference eye points) and their time.

    .venv/bin/python bench/bench_preprocess.py [--examples DIR] [--repeat 3] [--compare]

Timings depend on the machine and on what else runs on it: repeat and read the median. dlib (dlib-bin) is
single-threaded here (no BLAS), so the figures are one core's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = REPO.parent / "shared" / "data" / "deep3d-examples"
DEFAULT_LM3D = REPO.parent / "shared" / "assets" / "bfm-aux" / "similarity_Lm3D_all.mat"

# reference.md section 6.2 (used when similarity_Lm3D_all.mat is absent)
STANDARD_LM5 = np.array(
    [
        [-0.311487, 0.290361, 0.133780],
        [0.309799, 0.289720, 0.131795],
        [0.003253, -0.046179, 0.552442],
        [-0.252169, -0.381339, 0.224057],
        [0.248466, -0.381282, 0.222358],
    ],
    dtype=np.float32,
)


def _stats(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"median {np.median(a):7.1f} ms   p90 {np.percentile(a, 90):7.1f} ms   (n={a.size})"


def _nme(lm5: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(lm5 - ref, axis=1).mean() / np.linalg.norm(ref[0] - ref[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the photos (default 3)")
    parser.add_argument("--compare", action="store_true", help="also compare detector variants (NME, time)")
    args = parser.parse_args(argv)

    from facerecon.align import align_face, standard_lm5
    from facerecon.detect import FaceDetector
    from facerecon.imaging import decode_image

    photos = sorted(p for p in args.examples.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        print(f"no photos in {args.examples}", file=sys.stderr)
        return 2
    if DEFAULT_LM3D.is_file():
        from scipy.io import loadmat

        lm3d5 = standard_lm5(loadmat(str(DEFAULT_LM3D))["lm"])
    else:
        lm3d5 = STANDARD_LM5
    blobs = {p.name: p.read_bytes() for p in photos}
    limits = {"max_bytes": 50 * 1024 * 1024, "max_pixels": 50_000_000}

    t0 = time.perf_counter()
    detector = FaceDetector()
    load_s = time.perf_counter() - t0
    decode_image(blobs[photos[0].name], **limits)  # warm-up
    detector.detect(decode_image(blobs[photos[0].name], **limits))

    dec_ms: list[float] = []
    det_ms: list[float] = []
    ali_ms: list[float] = []
    tot_ms: list[float] = []
    missed: set[str] = set()
    for _ in range(args.repeat):
        for p in photos:
            t = time.perf_counter()
            img = decode_image(blobs[p.name], **limits)
            t1 = time.perf_counter()
            faces = detector.detect(img)
            t2 = time.perf_counter()
            if not faces:
                missed.add(p.name)
                continue
            align_face(img, faces[0].lm5, lm3d5)
            t3 = time.perf_counter()
            dec_ms.append((t1 - t) * 1e3)
            det_ms.append((t2 - t1) * 1e3)
            ali_ms.append((t3 - t2) * 1e3)
            tot_ms.append((t3 - t) * 1e3)

    print(f"photos: {len(photos)} from {args.examples}, {args.repeat} passes, {os.cpu_count()} CPUs visible")
    print(f"detector model load: {load_s * 1e3:.0f} ms (once per process)")
    print(f"decode              {_stats(dec_ms)}")
    print(f"detect + 68 points  {_stats(det_ms)}")
    print(f"align (crop 224)    {_stats(ali_ms)}")
    print(f"total               {_stats(tot_ms)}")
    if missed:
        print(f"no face found in: {', '.join(sorted(missed))}")

    if args.compare:
        refs = {}
        for p in photos:
            det_file = args.examples / "detections" / (p.stem + ".txt")
            if det_file.is_file():
                refs[p.name] = np.loadtxt(det_file).reshape(5, 2)
        images = {name: decode_image(blobs[name], **limits) for name in refs}
        variants = {
            "HOG up0, max_side 1024 (default)": detector,
            "HOG up0, full resolution": FaceDetector(max_side=1 << 30),
            "HOG up1, full resolution": FaceDetector(max_side=1 << 30, upsample=1),
        }
        print(f"\ndetector comparison on {len(refs)} photos (5-point NME vs the reference detections)")
        for label, det in variants.items():
            nmes, times = [], []
            found = 0
            for rep in range(args.repeat):
                for name, img in images.items():
                    t = time.perf_counter()
                    faces = det.detect(img)
                    times.append((time.perf_counter() - t) * 1e3)
                    if faces and rep == 0:
                        found += 1
                        nmes.append(_nme(faces[0].lm5, refs[name]))
            print(
                f"  {label:34s} found {found}/{len(refs)}  NME mean {np.mean(nmes):.4f} "
                f"median {np.median(nmes):.4f} max {np.max(nmes):.4f}  time {_stats(times)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
