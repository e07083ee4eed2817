"""Preprocessing benchmark: detection + 68 landmarks per photo, by photo size and threads, against dlib.

The 25 reference example photos (``../shared/data/deep3d-examples``, one face each) are resized so that their
longer side is 450, 640 and 1024 px; each detector runs over them ``--repeat`` times and the median and p90
milliseconds per photo are printed, with the ratio to dlib's HOG + 68-point predictor (the former default) in the
same run. ``largest`` is the pipeline's default call (it may skip the small-face passes once a confident face is
found); ``all`` always runs every pass the photo's size calls for. Then decode and align, for the whole default
preprocessing path.

    .venv/bin/python bench/bench_preprocess.py [--examples DIR] [--repeat 3] [--no-dlib]

Timings depend on the machine and on what else runs on it: read the median. dlib-bin is single-threaded here.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = REPO.parent / "shared" / "data" / "deep3d-examples"
SIZES = (450, 640, 1024)


def _times(fn, images: list[np.ndarray], repeat: int) -> np.ndarray:
    fn(images[0])  # warm-up
    out = []
    for _ in range(repeat):
        for img in images:
            t = time.perf_counter()
            fn(img)
            out.append((time.perf_counter() - t) * 1e3)
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the photos (default 3)")
    parser.add_argument("--no-dlib", action="store_true", help="skip the dlib comparison")
    args = parser.parse_args(argv)

    from facerecon.align import align_face
    from facerecon.detect import FaceDetector
    from facerecon.facemodel import FaceModel
    from facerecon.imaging import decode_image

    paths = sorted(p for p in args.examples.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        print(f"no photos in {args.examples}", file=sys.stderr)
        return 2
    originals = [Image.open(p).convert("RGB") for p in paths]
    by_size = {}
    for side in SIZES:
        imgs = []
        for im in originals:
            k = side / max(im.size)
            imgs.append(np.asarray(im.resize((round(im.width * k), round(im.height * k)), Image.BILINEAR)))
        by_size[side] = imgs

    t0 = time.perf_counter()
    detectors = {f"facemesh, {n} thread{'s' if n > 1 else ''}": FaceDetector(intra_op_threads=n) for n in (1, 2)}
    load_s = time.perf_counter() - t0
    if not args.no_dlib:
        from facerecon.detect import DlibDetector

        detectors["dlib HOG + 68 (former default)"] = DlibDetector()

    print(f"photos: {len(paths)} from {args.examples}, {args.repeat} passes, {os.cpu_count()} CPUs visible; "
          f"default detector load {load_s * 1e3:.0f} ms for two instances")
    print("\n| detector | call | " + " | ".join(f"{s} px median / p90 ms" for s in SIZES) + " |")
    print("|---|---|" + "---|" * len(SIZES))
    medians: dict[tuple[str, str, int], float] = {}
    for label, det in detectors.items():
        calls = ("largest", "all") if label.startswith("facemesh") else ("all",)
        for call in calls:
            cells = []
            for side in SIZES:
                fn = (lambda img, d=det, c=call: d.detect(img, c)) if label.startswith("facemesh") else det.detect
                t = _times(fn, by_size[side], args.repeat)
                medians[(label, call, side)] = float(np.median(t))
                cells.append(f"{np.median(t):.1f} / {np.percentile(t, 90):.1f}")
            print(f"| {label} | {call} | " + " | ".join(cells) + " |")
    dlib_label = next((k for k in detectors if k.startswith("dlib")), None)
    if dlib_label:
        print("\nratio to dlib (median, 1 thread, `largest`): " + ", ".join(
            f"{s} px {medians[('facemesh, 1 thread', 'largest', s)] / medians[(dlib_label, 'all', s)]:.2f}"
            for s in SIZES))

    # the whole preprocessing path at 640 px: JPEG bytes -> image -> faces -> aligned crop
    lm3d5 = FaceModel.from_file(REPO / "models" / "ict" / "facemodel.npz").standard_lm5
    det = detectors["facemesh, 1 thread"]
    blobs = []
    for img in by_size[640]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=92)
        blobs.append(buf.getvalue())
    limits = {"max_bytes": 50 * 1024 * 1024, "max_pixels": 50_000_000}
    stages: dict[str, list[float]] = {"decode": [], "detect": [], "align": [], "total": []}
    for _ in range(args.repeat):
        for blob in blobs:
            t = time.perf_counter()
            img = decode_image(blob, **limits)
            t1 = time.perf_counter()
            face = det.detect(img, "largest")[0]
            t2 = time.perf_counter()
            align_face(img, face.lm5, lm3d5, lm68_photo=face.lm68, yaw_degrees=face.pose[1] if face.pose else None)
            t3 = time.perf_counter()
            for k, v in zip(stages, (t1 - t, t2 - t1, t3 - t2, t3 - t), strict=True):
                stages[k].append(v * 1e3)
    print("\nJPEG (640 px) -> aligned 224 crop, 1 thread: " + ", ".join(
        f"{k} {np.median(v):.1f} ms" for k, v in stages.items()) + " (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
