"""Detection and landmark accuracy at every pose: the default detector against dlib (the former default).

    python -m eval.detection [--limit N] [--no-dlib] [--json FILE]

Printed (every figure on real photos with independent, manual ground truth; nothing here is asserted):

1. **faces found** on CFP profiles (yaw ~75-90 degrees) and frontals, AFW/HELEN (all 1,537), the 25 deep3d
   examples, and **false faces** on 22 photos without any face (scikit-image's sample images: bricks, a cat,
   coffee, coins, text, a rocket, the Hubble deep field, ...) plus 4 face-free parts of the deep3d photos. A face
   counts as found when a returned face's box contains the centre of the annotated points.
2. **68-point NME** on the AFW + HELEN test photos (never used to derive the 468 -> 68 correspondence),
   normalised by sqrt(w h) of the annotated box, for 68 points and the inner 51 (300-W's jaw follows the visible
   contour, a 3D-aware mesh's does not), split by the yaw a template fit gives the annotation.
3. **CFP profiles, visible side**: the error of the 5 fiducials with a clear iBUG counterpart (outer and inner
   eye corner, nose tip, mouth corner, chin; :func:`facerecon.train.data.cfp_to_ibug`), normalised by sqrt(w h) of
   the 30 fiducials' box; and the yaw the detector's pose estimate gives them.
4. **alignment**: the share of CFP photos whose 30 fiducials (ear to chin on the visible side) all fall inside the
   224 crop, for the reference alignment and the turned-face alignment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from eval import facedata
from facerecon.detect import DetectedFace, FaceDetector

# CFP -> iBUG for the visible side: one definition, shared with training's profile targets
from facerecon.train.data import cfp_to_ibug

YAW_BINS = ((0, 15), (15, 30), (30, 45), (45, 90))

NO_FACE_SKIMAGE = (
    "brick.png", "cell.png", "chelsea.png", "chessboard_RGB.png", "clock_motion.png", "coffee.png", "coins.png",
    "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg",
    "text.png",
)
# face-free parts of the deep3d examples: (file, (left, top, right, bottom))
NO_FACE_CROPS = (
    ("000126.jpg", (0, 310, 700, 873)),
    ("015309.jpg", (0, 900, 900, 1354)),
    ("015316.jpg", (0, 750, 1131, 1080)),
    ("015270.jpg", (0, 560, 600, 857)),
)


def no_face_images() -> list[tuple[str, np.ndarray]]:
    """Photos without any face: scikit-image's bundled samples (where installed) and face-free crops."""
    out = []
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        for name in NO_FACE_SKIMAGE:
            if (data / name).is_file():
                out.append((name, np.asarray(Image.open(data / name).convert("RGB"))))
    for name, box in NO_FACE_CROPS:
        path = facedata.EXAMPLES / name
        if path.is_file():
            out.append((f"{name}{box}", np.asarray(Image.open(path).convert("RGB").crop(box))))
    return out


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def match(faces: list[DetectedFace], points: np.ndarray) -> DetectedFace | None:
    """The returned face whose box contains the annotation's centre (the best ranked if several)."""
    c = (points.min(0) + points.max(0)) / 2
    for f in faces:
        x0, y0, x1, y1 = f.box
        if x0 <= c[0] <= x1 and y0 <= c[1] <= y1:
            return f
    return None


def found_rate(detector, items: list[facedata.Annotated], desc: str) -> tuple[int, int, list]:
    hits, matched = 0, []
    for a in tqdm(items, desc=desc, leave=False):
        f = match(detector.detect(load(a.path)), a.points)
        hits += f is not None
        matched.append(f)
    return hits, len(items), matched


def nme_by_yaw(items: list[facedata.Annotated], faces: list, lm3d: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean NME (68 and inner 51) per yaw bin over the faces that were found."""
    rows: dict[str, list[tuple[float, float]]] = {f"{lo}-{hi}": [] for lo, hi in YAW_BINS}
    rows["all"] = []
    for a, f in zip(items, faces, strict=True):
        if f is None:
            continue
        err = np.linalg.norm(f.lm68 - a.points, axis=1) / a.box_norm
        yaw = abs(facedata.template_yaw(a.points, lm3d))
        for lo, hi in YAW_BINS:
            if lo <= yaw < hi:
                rows[f"{lo}-{hi}"].append((err.mean(), err[17:].mean()))
        rows["all"].append((err.mean(), err[17:].mean()))
    return {
        k: {"n": len(v), "nme68": float(np.mean([e[0] for e in v])) if v else float("nan"),
            "nme51": float(np.mean([e[1] for e in v])) if v else float("nan")}
        for k, v in rows.items()
    }


def cfp_visible_error(items: list[facedata.Annotated], faces: list) -> dict[str, float]:
    errs, yaws = [], []
    for a, f in zip(items, faces, strict=True):
        if f is None:
            continue
        table = cfp_to_ibug(a.points)
        src, dst = list(table), list(table.values())
        errs.append(np.linalg.norm(f.lm68[dst] - a.points[src], axis=1).mean() / a.box_norm)
        if f.pose is not None:
            yaws.append(abs(f.pose[1]))
    return {
        "n": len(errs),
        "nme5_mean": float(np.mean(errs)) if errs else float("nan"),
        "nme5_median": float(np.median(errs)) if errs else float("nan"),
        "yaw_abs_mean": float(np.mean(yaws)) if yaws else float("nan"),
        "yaw_abs_median": float(np.median(yaws)) if yaws else float("nan"),
    }


def crop_coverage(items: list[facedata.Annotated], faces: list, lm3d5: np.ndarray) -> dict[str, float]:
    """Share of photos whose annotated points all fall inside the 224 crop (2 px margin): the reference
    alignment vs the one recentred for turned faces (:func:`facerecon.align.turned_alignment`)."""
    from facerecon.align import fit_alignment, turned_alignment

    ref, turned, reliable = [], [], []
    for a, f in zip(items, faces, strict=True):
        if f is None or f.pose is None:
            continue
        h, w = Image.open(a.path).size[::-1]
        al = fit_alignment(f.lm5, lm3d5, w, h)
        for out, alignment in ((ref, al), (turned, turned_alignment(al, f.lm68, f.pose[1]))):
            c = alignment.photo_to_crop_pixels(a.points)
            out.append(bool(((c >= 2) & (c <= 221)).all()))
        reliable.append(f.reliable)
    rel = np.array(reliable, bool)
    t = np.array(turned, bool)

    def share(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    return {"n": len(ref), "reference": share(np.array(ref, bool)), "turned": share(t),
            "n_reliable": int(rel.sum()), "turned_reliable": share(t[rel]), "turned_unreliable": share(t[~rel])}


def evaluate(limit: int | None, with_dlib: bool) -> dict:
    from facerecon.align import standard_lm5
    from facerecon.facemodel import FaceModel

    lm3d = FaceModel.from_file(Path(__file__).resolve().parents[1] / "models/ict/facemodel.npz").standard_landmarks68
    detectors: dict[str, object] = {"facemesh": FaceDetector()}
    if with_dlib:
        from facerecon.detect import DlibDetector

        detectors["dlib"] = DlibDetector()
    profiles = facedata.every(facedata.cfp("profile"), limit)
    frontals = facedata.every(facedata.cfp("frontal"), limit)
    afw_helen = facedata.every(facedata.afw_helen(), limit)
    val = [a for a in afw_helen if a.subset != "helen_trainset"]
    examples = sorted(p for p in facedata.EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    negatives = no_face_images()
    report: dict = {}
    for name, det in detectors.items():
        r: dict = {}
        t0 = time.perf_counter()
        hits, n, prof_faces = found_rate(det, profiles, f"{name} CFP profiles")
        r["cfp_profile_found"] = (hits, n)
        hits, n, front_faces = found_rate(det, frontals, f"{name} CFP frontals")
        r["cfp_frontal_found"] = (hits, n)
        if name == "facemesh":
            lm3d5 = standard_lm5(lm3d)
            r["crop_coverage_profile"] = crop_coverage(profiles, prof_faces, lm3d5)
            r["crop_coverage_frontal"] = crop_coverage(frontals, front_faces, lm3d5)
        hits, n, ah_faces = found_rate(det, afw_helen, f"{name} AFW/HELEN")
        r["afw_helen_found"] = (hits, n)
        r["examples_found"] = (sum(bool(det.detect(load(p))) for p in examples), len(examples))
        false = [(nm, len(det.detect(img))) for nm, img in negatives]
        r["no_face_images"] = len(negatives)
        r["false_faces"] = sum(k for _, k in false)
        r["false_faces_where"] = [nm for nm, k in false if k]
        val_faces = [f for a, f in zip(afw_helen, ah_faces, strict=True) if a.subset != "helen_trainset"]
        r["afw_helen_test_nme"] = nme_by_yaw(val, val_faces, lm3d)
        r["cfp_profile_visible"] = cfp_visible_error(profiles, prof_faces)
        scores = [f.score for f in ah_faces + prof_faces if f is not None]
        r["true_face_scores_p5"] = float(np.percentile(scores, 5)) if scores else float("nan")
        r["seconds"] = time.perf_counter() - t0
        report[name] = r
    return report


def print_report(report: dict) -> None:
    names = list(report)
    print("\n## Faces found")
    print("| set | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, label in (("cfp_profile_found", "CFP profiles (yaw ~75-90)"), ("cfp_frontal_found", "CFP frontals"),
                       ("afw_helen_found", "AFW + HELEN"), ("examples_found", "deep3d examples")):
        cells = [f"{r[key][0]}/{r[key][1]} ({100 * r[key][0] / max(r[key][1], 1):.1f} %)" for r in report.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{r['false_faces']} on {r['no_face_images']} photos {r['false_faces_where'] or ''}"
             for r in report.values()]
    print("| false faces, no-face photos | " + " | ".join(cells) + " |")
    print("\n## 68-point NME on AFW + HELEN test (sqrt box area), by |yaw| of the annotation: 68 / inner 51 (n)")
    print("| yaw | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for b in [f"{lo}-{hi}" for lo, hi in YAW_BINS] + ["all"]:
        cells = []
        for r in report.values():
            v = r["afw_helen_test_nme"][b]
            cells.append(f"{100 * v['nme68']:.2f} / {100 * v['nme51']:.2f} % ({v['n']})")
        print(f"| {b} | " + " | ".join(cells) + " |")
    print("\n## CFP profiles, visible side (5 points, sqrt box area), and estimated |yaw|")
    for name, r in report.items():
        v = r["cfp_profile_visible"]
        print(f"- {name}: n={v['n']}, NME mean {100 * v['nme5_mean']:.2f} %, median {100 * v['nme5_median']:.2f} %; "
              f"|yaw| mean {v['yaw_abs_mean']:.1f} deg, median {v['yaw_abs_median']:.1f}")
    r = report.get("facemesh", {})
    if "crop_coverage_profile" in r:
        print("\n## CFP: photos with all 30 fiducials inside the 224 crop (reference / turned-face alignment)")
        for view in ("profile", "frontal"):
            v = r[f"crop_coverage_{view}"]
            print(f"- {view}s (n={v['n']}): {100 * v['reference']:.1f} % / {100 * v['turned']:.1f} % (faces flagged "
                  f"reliable, n={v['n_reliable']}: {100 * v['turned_reliable']:.1f} %; the others "
                  f"{100 * v['turned_unreliable']:.1f} %)")
    for name, r in report.items():
        print(f"- {name}: 5th percentile of true-face detection scores {r['true_face_scores_p5']:.3f}; "
              f"{r['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="evenly spaced subset of each set (default: all)")
    ap.add_argument("--no-dlib", action="store_true", help="skip the dlib comparison")
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    args = ap.parse_args(argv)
    report = evaluate(args.limit, not args.no_dlib)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
