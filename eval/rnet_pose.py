"""R-Net at every pose: landmark, profile and pose accuracy of the reconstruction modes on held-out photos.

    python -m eval.rnet_pose [--models-dir DIR] [--modes rnet,rnet2,rnet+lm,rnet+fit] [--limit N] [--fit-limit N]
                             [--json FILE]

Every figure goes through the pipeline's public stages (detect -> prepare -> estimate -> finish), i.e. what the
service returns, on photos that no shipped network was trained on (:func:`facerecon.train.data.is_validation_photo`):

1. **68-point NME** of the reconstruction's reprojected landmarks on AFW + HELEN test (manual 300-W points),
   normalised by sqrt(w h) of the annotated box, 68 points and the inner 51, split by the annotation's yaw
   (:func:`eval.facedata.template_yaw`), as ``eval.detection`` reports the detector's own points;
2. **CFP profiles** of the held-out CFP people (yaw ~75-90 degrees): faces reconstructed, the error of the 5
   visible-side fiducials with an iBUG counterpart, and the reconstruction's |yaw| (the truth is "about 80-90");
3. **held-out synthetic renders** (true coefficients known, yaw up to 90 degrees): pose error, 68-point error,
   shape error of the face region against the mean face's.

Modes: ``rnet`` (one forward pass), ``rnet2`` (two passes: predict, re-align the crop from the predicted
landmarks and pose, predict again), ``rnet+fit`` (R-Net then the test-time fit; slow, so on ``--fit-limit``
photos), ``fit``. ``--models-dir`` points at another models folder (e.g. a candidate R-Net beside a copy of
the face model) to compare it with the shipped one. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval import facedata
from eval.detection import YAW_BINS
from facerecon.config import Settings
from facerecon.detect.face import make_face
from facerecon.errors import FaceReconError
from facerecon.fit import FitConfig
from facerecon.pipeline import Reconstructor
from facerecon.results import PreparedFace
from facerecon.train.data import cfp_to_ibug, is_validation_person


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def pick_face(rec: Reconstructor, image: np.ndarray, points: np.ndarray) -> Any:
    """The detected face whose box holds the annotation's centre (None when there is none)."""
    try:
        faces = rec.detect(image, "all")
    except FaceReconError:
        return None
    c = points.mean(0)
    inside = [f for f in faces if f.box[0] <= c[0] <= f.box[2] and f.box[1] <= c[1] <= f.box[3]]
    return inside[0] if inside else None


def reconstructable(rec: Reconstructor, items: list[facedata.Annotated], modes: list[str], fit_limit: int,
                    desc: str) -> Iterator[tuple[facedata.Annotated, np.ndarray, PreparedFace, list[str]]]:
    """Each annotated photo whose annotated face is detected and aligned: ``(item, image, prepared, modes to run
    on it)``; the fitting modes run on an evenly spaced ``fit_limit`` of the items."""
    fit_every = max(1, math.ceil(len(items) / max(fit_limit, 1)))
    for k, a in enumerate(tqdm(items, desc=desc, mininterval=10)):
        image = load(a.path)
        face = pick_face(rec, image, a.points)
        if face is None:
            continue
        try:
            prepared = rec.prepare(image, face)
        except FaceReconError:
            continue
        yield a, image, prepared, [m for m in modes if "fit" not in m or k % fit_every == 0]


def realign(rec: Reconstructor, image: np.ndarray, prepared: PreparedFace, lm_photo: np.ndarray,
            yaw_deg: float) -> PreparedFace:
    """A second crop made by the reference alignment from the reconstruction's own 68 landmarks and yaw."""
    face = make_face(tuple(prepared.face.box), prepared.face.score, lm_photo.astype(np.float32),
                     backend="rnet", pose=(0.0, yaw_deg, 0.0))
    return rec.prepare(image, face)


def run_mode(rec: Reconstructor, image: np.ndarray, prepared: PreparedFace, mode: str) -> tuple[np.ndarray, Any]:
    """Landmarks in photo px and the coefficients of one mode."""
    base = "rnet" if mode == "rnet2" else mode
    est = rec.estimate([prepared], mode=base)  # type: ignore[arg-type]
    r = rec.finish(prepared, est)
    if mode == "rnet2":
        yaw = math.degrees(float(r.coefficients.angle[0, 1]))
        p2 = realign(rec, image, prepared, r.landmarks_photo, yaw)
        r = rec.finish(p2, rec.estimate([p2], mode="rnet"))
    return r.landmarks_photo, r.coefficients


def afw_helen(rec: Reconstructor, modes: list[str], limit: int | None, fit_limit: int) -> dict[str, Any]:
    items = facedata.every(facedata.afw_helen(("afw", "helen_testset")), limit)
    lm3d = rec.model.standard_landmarks68
    rows: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    done = 0
    for a, image, prepared, chosen in reconstructable(rec, items, modes, fit_limit, "afw+helen test"):
        done += 1
        yaw = abs(facedata.template_yaw(a.points, lm3d))
        for m in chosen:
            t0 = time.perf_counter()
            lm, _ = run_mode(rec, image, prepared, m)
            times[m].append((time.perf_counter() - t0) * 1000.0)
            err = np.linalg.norm(lm - a.points, axis=1) / a.box_norm
            rows[m].append((yaw, float(err.mean()), float(err[17:].mean())))
    out: dict[str, Any] = {"n": len(items), "missed": len(items) - done}
    for m, v in rows.items():
        arr = np.asarray(v).reshape(-1, 3)
        table = {}
        for lo, hi in (*YAW_BINS, (0, 91)):
            sel = arr[(arr[:, 0] >= lo) & (arr[:, 0] < hi)]
            key = "all" if (lo, hi) == (0, 91) else f"{lo}-{hi}"
            table[key] = {"n": len(sel), "nme68": float(sel[:, 1].mean()) if len(sel) else float("nan"),
                          "nme51": float(sel[:, 2].mean()) if len(sel) else float("nan")}
        table["ms_median"] = float(np.median(times[m])) if times[m] else float("nan")  # type: ignore[assignment]
        out[m] = table
    return out


def cfp_profiles(rec: Reconstructor, modes: list[str], limit: int | None, fit_limit: int) -> dict[str, Any]:
    items = [a for a in facedata.cfp("profile") if is_validation_person(f"cfp{a.path.parent.parent.name}")]
    items = facedata.every(items, limit)
    res: dict[str, dict[str, list[float]]] = {m: {"err": [], "yaw": []} for m in modes}
    found = 0
    for a, image, prepared, chosen in reconstructable(rec, items, modes, fit_limit, "cfp profiles"):
        found += 1
        table = cfp_to_ibug(a.points)
        src, dst = list(table), list(table.values())
        for m in chosen:
            lm, c = run_mode(rec, image, prepared, m)
            res[m]["err"].append(float(np.linalg.norm(lm[dst] - a.points[src], axis=1).mean() / a.box_norm))
            res[m]["yaw"].append(abs(math.degrees(float(c.angle[0, 1]))))
    out: dict[str, Any] = {"n": len(items), "reconstructed": found}
    for m, r in res.items():
        e, y = np.asarray(r["err"]), np.asarray(r["yaw"])
        out[m] = {"n": len(e), "nme5_mean": float(e.mean()) if len(e) else float("nan"),
                  "nme5_median": float(np.median(e)) if len(e) else float("nan"),
                  "yaw_abs_mean": float(y.mean()) if len(y) else float("nan"),
                  "yaw_share_70_100": float(((y >= 70) & (y <= 100)).mean()) if len(y) else float("nan")}
    return out


def synthetic(rec: Reconstructor, n: int, seed: int = 4242) -> dict[str, Any]:
    """R-Net alone on held-out synthetic renders over random backgrounds (yaw up to 90 degrees)."""
    from facerecon.coefficients import Coefficients
    from facerecon.train import data as D

    cfg = D.SyntheticConfig(yaw_deg=90.0)
    pool = D.render_synthetic(rec.decoder, rec.renderer, n, seed, cfg=cfg)
    rng = np.random.default_rng(seed)
    img = D.composite(pool.foreground, pool.mask, D.random_backgrounds(n, rng), rng)
    x = img.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    assert rec.rnet is not None
    vec = np.concatenate([rec.rnet.run(x[i: i + 16])["coeffs"] for i in range(0, n, 16)])
    layout = rec.model.layout
    pc = Coefficients.from_vector(torch.from_numpy(vec), layout)
    tc = Coefficients.from_vector(torch.from_numpy(pool.coeffs), layout)
    with torch.no_grad():
        pf, tf = rec.decoder(pc), rec.decoder(tc)
        z = torch.zeros_like(tc.id)
        mf = rec.decoder(Coefficients(z, torch.zeros_like(tc.exp), torch.zeros_like(tc.tex), tc.angle, tc.gamma,
                                      tc.trans))
    ang = torch.rad2deg((pc.angle - tc.angle).abs())
    lm = (pf.landmarks_2d - tf.landmarks_2d).norm(dim=-1).mean(-1)
    true_yaw = torch.rad2deg(tc.angle[:, 1].abs())

    front = rec.model.face_mask.nonzero().flatten()

    def shape_err(a: Any, b: Any) -> float:
        """Mean vertex distance over the face region after a rigid (Kabsch) alignment, in the model's units."""
        va, vb = a.vertices_cam[:, front], b.vertices_cam[:, front]
        va, vb = va - va.mean(1, keepdim=True), vb - vb.mean(1, keepdim=True)
        u, _, vt = torch.linalg.svd(va.transpose(1, 2) @ vb)
        d = torch.sign(torch.linalg.det(u @ vt))
        fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
        rot = u @ fix @ vt
        return float((va @ rot - vb).norm(dim=-1).mean())

    out: dict[str, Any] = {"n": n, "pose_err_deg_mean": float(ang.mean()),
                           "pitch_yaw_roll_err_deg": [float(v) for v in ang.mean(0)],
                           "lm_err_px": float(lm.mean())}
    for lo, hi in ((0, 45), (45, 91)):
        sel = (true_yaw >= lo) & (true_yaw < hi)
        out[f"yaw_{lo}-{hi}"] = {"n": int(sel.sum()), "pose_err_deg": float(ang[sel].mean()),
                                 "lm_err_px": float(lm[sel].mean())}
    out["shape_err_model_units"] = {"rnet": shape_err(pf, tf), "mean_face": shape_err(mf, tf)}
    return out


def evaluate(models_dir: Path | None, modes: list[str], limit: int | None, fit_limit: int, syn: int,
             fit_steps: tuple[int, int] | None = None) -> dict[str, Any]:
    settings = Settings(models_dir=models_dir) if models_dir else Settings()
    torch.set_num_threads(1)
    fit_config = FitConfig(landmark_steps=fit_steps[0], photo_steps=fit_steps[1]) if fit_steps else None
    rec = Reconstructor(settings, fit_config=fit_config)
    t0 = time.perf_counter()
    card = (rec.info()["rnet"] or {}).get("card") or {}
    report: dict[str, Any] = {"models_dir": str(settings.models_dir), "rnet": card.get("description"),
                              "modes": modes, "fit_steps": [rec.fit_config.landmark_steps, rec.fit_config.photo_steps]}
    report["afw_helen_test"] = afw_helen(rec, modes, limit, fit_limit)
    report["cfp_profiles_heldout"] = cfp_profiles(rec, modes, limit, fit_limit)
    if syn and rec.rnet is not None:
        report["synthetic"] = synthetic(rec, syn)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def print_report(r: dict[str, Any]) -> None:
    print(f"\nR-Net: {r['rnet']}  ({r['models_dir']}); fit steps (landmark, photometric) {r['fit_steps']}")
    a = r["afw_helen_test"]
    print(f"AFW + HELEN test: {a['n']} faces ({a['missed']} not found); NME 68 / inner 51, % of sqrt(box area)")
    bins = [f"{lo}-{hi}" for lo, hi in YAW_BINS] + ["all"]
    print(f"{'mode':<10}" + "".join(f"{b:>16}" for b in bins) + f"{'ms/face':>9}")
    for m in r["modes"]:
        print(f"{m:<10}" + "".join(
            f"{100 * a[m][b]['nme68']:>7.2f}/{100 * a[m][b]['nme51']:<4.2f}({a[m][b]['n']:>3})" for b in bins)
            + f"{a[m]['ms_median']:>9.1f}")
    c = r["cfp_profiles_heldout"]
    print(f"CFP profiles of held-out people: {c['reconstructed']}/{c['n']} reconstructed")
    for m in r["modes"]:
        v = c[m]
        print(f"  {m:<10} visible-side NME mean {100 * v['nme5_mean']:.2f} % median {100 * v['nme5_median']:.2f} %"
              f", |yaw| mean {v['yaw_abs_mean']:.1f} deg, share in 70-100 deg {100 * v['yaw_share_70_100']:.0f} %"
              f" (n={v['n']})")
    if "synthetic" in r:
        s = r["synthetic"]
        print(f"synthetic (R-Net alone, {s['n']}, yaw to 90): pose error {s['pose_err_deg_mean']:.2f} deg "
              f"(p/y/r {', '.join(f'{v:.2f}' for v in s['pitch_yaw_roll_err_deg'])}), landmarks "
              f"{s['lm_err_px']:.2f} px; |yaw|<45 {s['yaw_0-45']['pose_err_deg']:.2f} deg, >=45 "
              f"{s['yaw_45-91']['pose_err_deg']:.2f} deg; shape error R-Net "
              f"{s['shape_err_model_units']['rnet']:.4f} vs mean face {s['shape_err_model_units']['mean_face']:.4f}")
    print(f"({r['seconds']} s)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--modes", default="rnet,rnet2,rnet+fit")
    ap.add_argument("--limit", type=int, default=None, help="at most N photos per set (evenly spaced)")
    ap.add_argument("--fit-limit", type=int, default=60, help="photos per set for the fitting modes")
    ap.add_argument("--synthetic", type=int, default=200)
    ap.add_argument("--fit-steps", default="", help="landmark,photometric steps of the fit (default: the pipeline's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    steps = tuple(int(v) for v in args.fit_steps.split(",")) if args.fit_steps else None
    report = evaluate(args.models_dir, [m for m in args.modes.split(",") if m], args.limit, args.fit_limit,
                      args.synthetic, steps)  # type: ignore[arg-type]
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
