"""Photometric error of reconstructions: the shaded reconstruction vs the photo, in the aligned 224 crop.

    python -m eval.photometric [DIR ...] [--limit N] [--modes fit,rnet,rnet+lm,rnet+fit]

For every photo (largest face): the reconstruction's lit colours rendered with the CPU/GPU renderer in the crop
camera, compared with the aligned crop inside the **visible skin region**: pixels covered by the face model's
photometric face region (``face_mask``, as the fit's loss uses) where the reference skin GMM gives P(skin) > 0.5.

Figures per photo and summarised per mode:

* ``MAE``: mean absolute error over the region's pixels and the three channels, 0-255 (the render clamped to [0, 1]
  as it is displayed);
* ``L2,1``: the reference's photometric loss (``facerecon.losses.photometric_loss``: per-pixel Euclidean RGB
  distance in [0, 1] units, weighted by the skin attention x face-region coverage, averaged over the weights), the
  quantity the fit minimises (unclamped colours, as in the fit). x255 it reads as an RGB distance in 0-255;
* ``region %``: the fraction of the crop in the region (a tiny region makes the error meaningless).

Default DIR: the shared example photos (``shared/data/deep3d-examples``). Modes: ``fit`` (test-time fitting from
the mean face), and with an installed R-Net ``rnet`` and ``rnet+fit``; the ``mean face`` row (zero coefficients:
mean shape and albedo under the default ambient light, placed by the alignment alone) is the baseline to beat.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from facerecon.coefficients import Coefficients
from facerecon.errors import FaceReconError
from facerecon.imaging import load_image
from facerecon.losses import photometric_loss
from facerecon.pipeline import PreparedFace, Reconstructor
from facerecon.skin import REFERENCE_GMM, skin_attention

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deep3d-examples"
SKIN_THRESHOLD = 0.5


def photometric_errors(rec: Reconstructor, coeffs: Coefficients, crop: np.ndarray) -> dict[str, float]:
    """``crop``: ``(224, 224, 3)`` uint8 aligned crop; returns MAE (0-255), L2,1 ([0, 1] units) and the region."""
    tris = rec.model.triangles
    with torch.no_grad():
        face = rec.decoder(coeffs)
        raster = rec.renderer.rasterize(face.vertices_cam, tris, rec.decoder.camera.intrinsics)
        render = rec.renderer.interpolate(face.colors, raster, tris).permute(0, 3, 1, 2)  # (1, 3, H, W)
        region = rec.model.face_mask.to(render.dtype)[None, :, None]
        covered = (rec.renderer.interpolate(region, raster, tris) > 0.5).permute(0, 3, 1, 2).to(render.dtype)
    covered = covered.cpu()
    render = render.cpu()
    prob = torch.from_numpy(REFERENCE_GMM.probability(crop))[None, None]
    photo = torch.tensor(crop).permute(2, 0, 1)[None].float() / 255.0
    skin = (prob > SKIN_THRESHOLD).to(render.dtype) * covered
    n = float(skin.sum())
    if n < 1:
        return {"mae": float("nan"), "l21": float("nan"), "region": 0.0}
    diff = (render.clamp(0, 1) - photo).abs() * 255.0
    mae = float((diff * skin).sum() / (3 * n))
    l21 = float(photometric_loss(render * covered, photo, skin_attention(prob) * skin))
    return {"mae": mae, "l21": l21, "region": n / skin[0, 0].numel()}


def coefficients_for(rec: Reconstructor, mode: str, prepared: PreparedFace) -> Coefficients:
    if mode == "mean face":  # the baseline: zero coefficients (mean shape and albedo, ambient light), aligned
        return Coefficients.zeros(rec.model.layout, 1, rec.device)
    return rec.estimate([prepared], mode=mode).coefficients  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", type=Path, default=[DEFAULT_DIR])
    ap.add_argument("--limit", type=int, default=0, help="at most N photos per folder (0 = all)")
    ap.add_argument("--modes", default="", help="comma list of rnet, rnet+lm, fit, rnet+fit (default: all)")
    ap.add_argument("--quiet", action="store_true", help="summary only, no per-photo lines")
    args = ap.parse_args()
    rec = Reconstructor()
    modes = [m for m in args.modes.split(",") if m] or (["rnet", "rnet+lm", "fit", "rnet+fit"] if rec.rnet else ["fit"])
    if rec.rnet is None and any(m.startswith("rnet") for m in modes):
        raise SystemExit("no R-Net is installed for this face model; use --modes fit")
    modes = ["mean face", *modes]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    skipped = 0
    if not args.quiet:
        print(f"{'photo':<28}{'mode':<11}{'MAE 0-255':>10}{'L2,1':>8}{'x255':>7}{'region %':>10}{'s':>7}")
    for folder in args.dirs:
        photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if args.limit:
            photos = photos[: args.limit]
        for p in photos:
            try:
                image = load_image(p)
                prepared = rec.prepare(image, rec.detect(image)[0])
                crop = prepared.crop
            except FaceReconError:
                skipped += 1
                continue
            for mode in modes:
                t0 = time.perf_counter()
                coeffs = coefficients_for(rec, mode, prepared)
                seconds = time.perf_counter() - t0
                e = photometric_errors(rec, coeffs, crop)
                e["seconds"] = seconds
                results[mode].append(e)
                if not args.quiet:
                    print(f"{p.name:<28}{mode:<11}{e['mae']:>10.2f}{e['l21']:>8.4f}{e['l21'] * 255:>7.1f}"
                          f"{100 * e['region']:>10.1f}{seconds:>7.2f}", flush=True)
    print(f"\nface model {rec.model.name}, renderer {rec.renderer.name}; {skipped} photos without a usable face "
          "skipped; region = visible face_mask x P(skin) > 0.5 in the 224 crop")
    print(f"{'mode':<11}{'n':>4}{'MAE mean':>10}{'median':>8}{'sd':>7}{'L2,1 mean':>11}{'median':>8}"
          f"{'x255':>7}{'region %':>10}{'s/photo':>9}")
    for mode, rows in results.items():
        rows = [r for r in rows if r["region"] > 0]
        if not rows:
            continue
        mae = [r["mae"] for r in rows]
        l21 = [r["l21"] for r in rows]
        sd = statistics.stdev(mae) if len(mae) > 1 else 0.0
        print(f"{mode:<11}{len(rows):>4}{statistics.mean(mae):>10.2f}{statistics.median(mae):>8.2f}{sd:>7.2f}"
              f"{statistics.mean(l21):>11.4f}{statistics.median(l21):>8.4f}{statistics.mean(l21) * 255:>7.1f}"
              f"{100 * statistics.mean(r['region'] for r in rows):>10.1f}"
              f"{statistics.median(r['seconds'] for r in rows):>9.2f}")


if __name__ == "__main__":
    main()
