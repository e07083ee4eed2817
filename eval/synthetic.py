"""Synthetic round trip: known coefficients -> rendered photo -> the pipeline's reconstruction -> 3D error in mm.

    python -m eval.synthetic [--n 20] [--seed 0] [--size 320] [--modes fit,rnet,rnet+lm,rnet+fit]

Each sample draws random coefficients of the served face model: identity ~ N(0, 0.9^2) and albedo
~ N(0, 0.5^2) per coefficient, sparse expression weights (each on with p = 0.1, weight U[0, 0.6]), pose uniform
within pitch +-20, yaw +-30, roll +-15 degrees, a small translation, and light from the front and above with random
jitter. The face is rendered with the CPU renderer (the drawn region: face, eyes, inner mouth) over a random smooth
background at ``--size`` pixels, then reconstructed by the **whole pipeline** from those pixels alone (detect ->
align -> R-Net and/or fit): ``fit`` always, ``rnet``, ``rnet+lm`` and ``rnet+fit`` when an R-Net is installed.

Error (NoW / REALY style, on the face region ``face_mask``, vertex to vertex since the topology is shared): the
reconstructed and the true **un-posed** shapes are aligned by Procrustes, rigid (rotation + translation) and
similarity (+ scale), and the per-vertex Euclidean distances are reported in millimetres (model units are
decimetres: x100). Two shapes are scored: ``shape`` (identity + expression, what the photo shows) and
``neutral`` (identity only, zero expression: what NoW scores). ``median / mean / std`` are over every face-region
vertex of every sample (NoW's statistics); ``per-face`` is the mean of each sample's mean. The ``mean face``
row scores the model's mean shape against the truth: what a reconstruction must beat.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from facerecon.coefficients import Coefficients
from facerecon.errors import FaceReconError
from facerecon.geometry import Intrinsics
from facerecon.pipeline import Reconstructor
from facerecon.render.overlay import overlay_on_photo

MM_PER_MODEL_UNIT = 100.0  # decimetres -> millimetres


def sample_coefficients(rec: Reconstructor, gen: torch.Generator) -> Coefficients:
    lay = rec.model.layout

    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def ru(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    idc = rn(1, lay.id) * 0.9
    tex = rn(1, lay.tex) * 0.5
    exp = (ru(1, lay.exp) < 0.1).float() * ru(1, lay.exp) * 0.6
    angle = (ru(1, 3) * 2 - 1) * torch.tensor([20.0, 30.0, 15.0]) * (math.pi / 180.0)
    gamma = torch.zeros(1, 3, 9)
    gamma[:, :, 2] = 0.3  # SH band 1: light from above and the front (as the service's warm-up face)
    gamma[:, :, 3] = 0.3
    gamma = gamma + rn(1, 1, 9) * 0.08 + rn(1, 3, 9) * 0.02
    trans = torch.cat([rn(1, 2) * 0.05, rn(1, 1) * 0.2], dim=1)
    return Coefficients(idc, exp, tex, angle, gamma.reshape(1, 27), trans).to(rec.device)


def random_background(size: int, rng: np.random.Generator) -> np.ndarray:
    x = np.linspace(0, 1, size, dtype=np.float32)
    c0, cx, cy = rng.uniform(20, 200, 3), rng.uniform(-60, 60, 3), rng.uniform(-60, 60, 3)
    img = c0 + cx * x[None, :, None] + cy * x[:, None, None] + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def render_photo(rec: Reconstructor, coeffs: Coefficients, size: int, rng: np.random.Generator) -> np.ndarray:
    with torch.no_grad():
        decoded = rec.decoder(coeffs)
    f = rec.decoder.camera.focal * size / rec.decoder.camera.size * 0.6
    intrinsics = Intrinsics(f, f, size / 2, size / 2, size, size)
    return overlay_on_photo(random_background(size, rng), decoded.vertices_cam, rec.overlay_triangles,
                            decoded.colors.clamp(0, 1), intrinsics, renderer=rec.renderer)


def procrustes(src: np.ndarray, dst: np.ndarray, scale: bool) -> np.ndarray:
    """``src`` (M, 3) moved onto ``dst`` by the least-squares rotation + translation (+ uniform scale)."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, s, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, 1.0, d])
    rot = u @ fix @ vt
    k = (s * np.diag(fix)).sum() / (a**2).sum() if scale else 1.0
    return k * a @ rot + md


def vertex_errors_mm(pred: np.ndarray, true: np.ndarray, scale: bool) -> np.ndarray:
    return np.linalg.norm(procrustes(pred, true, scale) - true, axis=1) * MM_PER_MODEL_UNIT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=320, help="rendered photo size, pixels")
    ap.add_argument("--modes", default="", help="comma list of rnet, rnet+lm, fit, rnet+fit (default: what is "
                                                "available)")
    args = ap.parse_args()
    rec = Reconstructor()
    modes = [m for m in args.modes.split(",") if m] or (["rnet", "rnet+lm", "fit", "rnet+fit"] if rec.rnet
                                                        else ["fit"])
    if rec.rnet is None and any(m.startswith("rnet") for m in modes):
        raise SystemExit("no R-Net is installed for this face model; use --modes fit")
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    mask = rec.model.face_mask.cpu().numpy()
    zero_exp = torch.zeros(1, rec.model.layout.exp, device=rec.device)
    mean_face = rec.model.mean_shape.cpu().numpy()[mask]
    rows = ["mean face", *modes]
    # errors[row][shape kind][rigid|similarity] -> list of per-sample arrays of per-vertex mm
    errors = {r: {k: {"rigid": [], "similarity": []} for k in ("shape", "neutral")} for r in rows}
    failures = {m: 0 for m in modes}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad():
        for _ in range(args.n):
            c = sample_coefficients(rec, gen)
            photo = render_photo(rec, c, args.size, rng)
            truth = {"shape": rec.model.shape(c.id, c.exp)[0].cpu().numpy()[mask],
                     "neutral": rec.model.shape(c.id, zero_exp)[0].cpu().numpy()[mask]}
            for kind, true in truth.items():
                for how in ("rigid", "similarity"):
                    errors["mean face"][kind][how].append(vertex_errors_mm(mean_face, true, how == "similarity"))
            for mode in modes:
                t0 = time.perf_counter()
                try:
                    # the public stages; ``fit`` starts from the mean face, even with an R-Net installed
                    prepared = rec.prepare(photo, rec.detect(photo)[0])
                    with torch.enable_grad():
                        r = rec.finish(prepared, rec.estimate([prepared], mode=mode))  # type: ignore[arg-type]
                except FaceReconError:
                    failures[mode] += 1
                    continue
                seconds[mode].append(time.perf_counter() - t0)
                got = r.coefficients
                pred = {"shape": r.decoded.shape[0].cpu().numpy()[mask],
                        "neutral": rec.model.shape(got.id, zero_exp)[0].cpu().numpy()[mask]}
                for kind in truth:
                    for how in ("rigid", "similarity"):
                        errors[mode][kind][how].append(vertex_errors_mm(pred[kind], truth[kind], how == "similarity"))
    print(f"\nface model {rec.model.name}; {args.n} synthetic photos ({args.size} px, seed {args.seed}); "
          f"{int(mask.sum())} face-region vertices; errors in mm after Procrustes")
    for m in modes:
        med = statistics.median(seconds[m]) if seconds[m] else float("nan")
        print(f"  {m}: {args.n - failures[m]} reconstructed, {failures[m]} failed (no face found); {med:.2f} s/photo")
    print(f"\n{'row':<11}{'shape':<9}{'align':<12}{'n':>4}{'median':>8}{'mean':>8}{'std':>8}{'per-face':>10}"
          f"{'p90 face':>10}")
    for row in rows:
        for kind in ("shape", "neutral"):
            for how in ("rigid", "similarity"):
                per = errors[row][kind][how]
                if not per:
                    continue
                allv = np.concatenate(per)
                face_means = [float(e.mean()) for e in per]
                print(f"{row:<11}{kind:<9}{how:<12}{len(per):>4}{np.median(allv):>8.2f}{allv.mean():>8.2f}"
                      f"{allv.std():>8.2f}{statistics.mean(face_means):>10.2f}{np.percentile(face_means, 90):>10.2f}")


if __name__ == "__main__":
    main()
