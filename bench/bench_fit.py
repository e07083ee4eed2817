"""The test-time fit (``refine=true``) per photo: time, photometric and landmark error, schedules side by side.

    python bench/bench_fit.py [--examples DIR] [--limit N] [--threads 1] [--configs default,former,...]

Every photo of ``--examples`` (default: the 25 shared example photos) is prepared once (detection, alignment,
R-Net, skin map; not timed), then fitted from R-Net's prediction with each schedule in turn, photo by photo, so
that every schedule sees the same machine load. Per schedule: the fit's median and p90 milliseconds (the pipeline's
own ``fit`` stage timer: :meth:`facerecon.pipeline.Reconstructor.estimate`), its ratio to the former schedule's
median in the same run and to issue #20's 250 ms target, the photometric error in the visible skin region
(``eval.photometric``: mean abs 0-255 and the L2,1 loss x 255) and the reprojected landmarks' NME against the
detector's (``eval.landmarks``). Schedules:

* ``former``: the fit as it was (60 landmark + 30 photometric Adam steps through autograd and the renderer at
  224 px, light and albedo by Adam, no early stop);
* ``default``: :class:`facerecon.fit.FitConfig` ``()``;
* ``autograd``: the default schedule through autograd and the renderer (the engine a GPU renderer gets);
* ``landmarks``: the landmark stage alone (``photo_steps=0``);
* ``rnet``: R-Net alone, no fit (the errors to beat).

The load average is printed before and after: the machine is shared, so only the ratios of one run compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # eval/
DEFAULT_EXAMPLES = REPO.parent / "shared" / "data" / "deep3d-examples"
TARGET_MS = 250.0


def schedules() -> dict[str, object]:
    from facerecon.fit import FitConfig

    return {
        "former": FitConfig(landmark_steps=60, landmark_steps_from_mean=60, photo_steps=30, photo_size=224,
                            appearance_every=0, lr_pose=0.01, lr_shape=0.05, lr_light=0.05, lr_albedo=0.05,
                            stall_steps=0, engine="autograd"),
        "default": FitConfig(),
        "autograd": FitConfig(engine="autograd"),
        "landmarks": FitConfig(photo_steps=0),
        "rnet": None,
    }


def _field_value(default: object, text: str) -> object:
    """``text`` as the type of a FitConfig field's ``default`` (``bool("0")`` would be True)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    return type(default)(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES)
    ap.add_argument("--limit", type=int, default=0, help="at most N photos (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the service's default is 1)")
    ap.add_argument("--configs", default="rnet,former,default,autograd,landmarks",
                    help="comma list of " + ", ".join(schedules()) + "; NAME@FIELD=VALUE+... changes FitConfig fields")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from eval.landmarks import nme
    from eval.photometric import photometric_errors
    from facerecon.errors import FaceReconError
    from facerecon.imaging import load_image
    from facerecon.pipeline import Reconstructor
    from facerecon.skin import REFERENCE_GMM

    known = schedules()
    names = [c for c in args.configs.split(",") if c]
    for name in names:  # "default@photo_steps=20+appearance_damping=0.3": a schedule with fields changed
        base, _, changes = name.partition("@")
        if changes and known.get(base) is not None:
            pairs = (c.split("=") for c in changes.split("+"))
            fields = {k: _field_value(getattr(known[base], k), v) for k, v in pairs}
            known[name] = dataclasses.replace(known[base], **fields)  # type: ignore[arg-type]
    unknown = [c for c in names if c not in known]
    if unknown:
        raise SystemExit(f"unknown schedules {unknown}; pick from {list(known)}")
    rec = Reconstructor()
    if rec.rnet is None:
        raise SystemExit("needs an installed R-Net (the fit starts from its prediction)")
    photos = sorted(p for p in args.examples.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    photos = photos[: args.limit] if args.limit else photos
    prepared = []
    for p in photos:
        try:
            image = load_image(p)
            face = rec.detect(image)[0]
            prep = rec.prepare(image, face)
        except (FaceReconError, IndexError):
            continue
        prep.skin = REFERENCE_GMM.probability(prep.crop)
        prepared.append((prep, face))
    if not prepared:
        raise SystemExit(f"no usable photos in {args.examples}")
    for name in names:  # warm-up: numba's kernels, torch's first calls
        if known[name] is not None:
            rec.estimate([prepared[0][0]], mode="rnet+fit", fit_config=known[name])  # type: ignore[arg-type]

    load_start = os.getloadavg()
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for prep, face in prepared:
        for name in names:
            cfg = known[name]
            if cfg is None:
                est, ms = rec.estimate([prep], mode="rnet"), 0.0
            else:
                est = rec.estimate([prep], mode="rnet+fit", fit_config=cfg)  # type: ignore[arg-type]
                ms = est.timings["fit"]
            coeffs = est.coefficients
            e = photometric_errors(rec, coeffs, prep.crop)
            with torch.no_grad():
                lm = rec.decoder.landmarks(coeffs.to(rec.device) if coeffs.is_numpy else coeffs)
            e["nme"] = nme(prep.alignment.to_photo(lm[0].cpu().numpy().astype(np.float64)),
                           face.lm68.astype(np.float64))
            e["ms"] = ms
            rows[name].append(e)
    load_end = os.getloadavg()

    former = statistics.median(r["ms"] for r in rows["former"]) if "former" in rows else None
    print(f"{len(prepared)} photos of {args.examples}; torch threads {args.threads}; renderer {rec.renderer.name}; "
          f"load average {load_start[0]:.2f} / {load_start[1]:.2f} before, {load_end[0]:.2f} / {load_end[1]:.2f} "
          f"after (1 / 5 min) on {os.cpu_count()} CPUs")
    print(f"{'schedule':<11}{'fit ms median':>14}{'p90':>7}{'x former':>9}{'x 250 ms':>9}{'MAE 0-255':>10}"
          f"{'L2,1 x255':>10}{'NME det':>9}")
    for name, rs in rows.items():
        ms = [r["ms"] for r in rs]
        med = statistics.median(ms)
        timing = (f"{med:>14.1f}{float(np.percentile(ms, 90)):>7.0f}"
                  f"{(med / former if former else float('nan')):>9.3f}{med / TARGET_MS:>9.2f}")
        if known[name] is None:
            timing = f"{'-':>14}{'-':>7}{'-':>9}{'-':>9}"
        print(f"{name:<11}{timing}{statistics.mean(r['mae'] for r in rs):>10.2f}"
              f"{statistics.mean(r['l21'] for r in rs) * 255:>10.2f}{statistics.mean(r['nme'] for r in rs):>9.4f}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
