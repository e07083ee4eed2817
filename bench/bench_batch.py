"""Throughput of ``facerecon batch`` on this machine: local with 1 and 2 workers, Ray with 2 actors, and the engine's
per-photo overhead against the bare pipeline.

    python bench/bench_batch.py [--examples DIR] [--repeat 1] [--no-refine] [--format obj] [--no-ray]

The photos (the example photos, ``--repeat`` copies under distinct paths, so every copy is a new photo) are
reconstructed by:

* **bare**: one Reconstructor in this process, read + decode + reconstruct + export + ``to_json`` per photo, no
  files written (what a photo costs without any engine);
* **local x1 / local x2**: ``run_batch`` with the process pool at 1 and 2 workers;
* **ray x2**: ``run_batch`` on a local Ray with 2 CPUs and 2 actors.

Figures: **wall** (the whole run: start-up, model loading in every worker, the table), **photos/s end-to-end**
(photos / wall), **photos/s steady** (the photos finished after the first worker call returned / the time from then
to the last, read from the table's ``finished_at``: the rate once the models are loaded), the worker-side per-photo time
(median / p90 of ``timings_ms.total``), the **scaling ratio** (steady photos/s over local x1's) and the
**overhead per photo** (steady seconds per photo of local x1 minus the bare pipeline's mean: the process hop, the
table row and writing the face folder). Nothing is asserted; on a 2-core machine shared with other work, read
the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = REPO.parent / "shared" / "data" / "deep3d-examples"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def bare(photos: list[Path], refine: bool, fmt: str) -> dict[str, Any]:
    from facerecon.config import get_settings
    from facerecon.errors import FaceReconError
    from facerecon.imaging import decode_image
    from facerecon.pipeline import Reconstructor

    s = get_settings()
    rec = Reconstructor(s)
    warm = decode_image(photos[0].read_bytes(), max_bytes=s.max_upload_bytes, max_pixels=s.max_image_pixels)
    rec.export(rec.reconstruct(warm, refine=refine)[0], fmt)  # numba JIT, first-call allocations
    times = []
    t_all = time.perf_counter()
    for p in photos:
        t0 = time.perf_counter()
        try:
            image = decode_image(p.read_bytes(), max_bytes=s.max_upload_bytes, max_pixels=s.max_image_pixels)
            for face in rec.reconstruct(image, refine=refine):
                rec.export(face, fmt)  # type: ignore[arg-type]
                rec.to_json(face)
        except FaceReconError:
            pass
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    return {"wall": wall, "per_photo": times, "steady": len(photos) / wall}


def engine(photos_dir: Path, out: Path, refine: bool, fmt: str, engine_name: str, workers: int) -> dict[str, Any]:
    from facerecon.batch import BatchOptions, run_batch
    from facerecon.batch.storage import Store
    from facerecon.batch.table import read_results

    opts = BatchOptions(out=str(out), engine=engine_name, workers=workers, refine=refine, format=fmt,  # type: ignore[arg-type]
                        progress=False)
    t0 = time.perf_counter()
    summary = run_batch([str(photos_dir)], opts)
    wall = time.perf_counter() - t0
    rows = read_results(Store(str(out)), "parquet")
    finished: dict[str, float] = {}
    totals: dict[str, float] = {}
    for r in rows:
        t = r["finished_at"].timestamp()
        finished[r["photo_id"]] = max(finished.get(r["photo_id"], t), t)
        totals[r["photo_id"]] = float(r["timings_ms"].get("total", float("nan"))) / 1000.0
    # Photos finish in batches (one worker call): the rate is the photos finished after the first call returned,
    # over the time from then to the last.
    ends = sorted(finished.values())
    later = sum(1 for t in ends if t > ends[0])
    steady = later / (ends[-1] - ends[0]) if later else float("nan")
    return {"wall": wall, "per_photo": list(totals.values()), "steady": steady, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES)
    ap.add_argument("--repeat", type=int, default=1, help="copies of the photo set (distinct paths)")
    ap.add_argument("--no-refine", action="store_true", help="R-Net only (no test-time fitting)")
    ap.add_argument("--format", choices=["obj", "ply", "glb"], default="obj")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    args = ap.parse_args()
    refine = not args.no_refine
    originals = sorted(p for p in args.examples.glob("*") if p.suffix.lower() in {".jpg", ".png"})
    if not originals:
        raise SystemExit(f"no photos in {args.examples}")

    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        photos_dir = work / "photos"
        photos = []
        for k in range(args.repeat):
            (photos_dir / f"copy{k}").mkdir(parents=True)
            for p in originals:
                dst = photos_dir / f"copy{k}" / p.name
                shutil.copyfile(p, dst)
                photos.append(dst)
        print(f"{len(photos)} photos, refine {refine}, format {args.format}")
        results: dict[str, dict[str, Any]] = {"bare": bare(photos, refine, args.format)}
        configs = [("local x1", "local", 1), ("local x2", "local", 2)]
        if not args.no_ray:
            try:
                import ray.data  # noqa: F401

                configs.append(("ray x2", "ray", 2))
            except ImportError:
                print("ray not installed: skipping the Ray engine (pip install 'facerecon[batch]')")
        for i, (name, eng, n) in enumerate(configs):
            results[name] = engine(photos_dir, work / f"out{i}", refine, args.format, eng, n)
            print(f"  {name}: done in {results[name]['wall']:.1f} s", flush=True)

        base = results["local x1"]["steady"]
        print(f"\n{'engine':<10} {'wall s':>8} {'photos/s e2e':>13} {'photos/s steady':>16} {'median s':>9} "
              f"{'p90 s':>7} {'scaling':>8}")
        for name, r in results.items():
            e2e = len(photos) / r["wall"] if name != "bare" else r["steady"]
            scale = r["steady"] / base if name != "bare" else float("nan")
            print(f"{name:<10} {r['wall']:>8.1f} {e2e:>13.2f} {r['steady']:>16.2f} "
                  f"{statistics.median(r['per_photo']):>9.3f} {pct(r['per_photo'], 90):>7.3f} {scale:>8.2f}")
        over = 1.0 / base - statistics.fmean(results["bare"]["per_photo"])
        print(f"\nengine overhead per photo (local x1 steady s/photo - bare mean): {over * 1000:.0f} ms "
              f"({100 * over * results['bare']['steady']:.0f} % of the bare photo)")
        start = results["local x1"]["wall"] - len(photos) / base
        print(f"start-up of a run (local x1 wall - photos at the steady rate): {start:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
