"""The outputs of one reconstruction: OBJ / PLY / GLB export of the default model and the overlay on a 1080-px
photo (render + composite, and PNG encoding), median and p90 in milliseconds with the ratio to issue #20's targets
(5 ms per export, 10 ms for the overlay), and the former overlay path (2x supersampled) measured in the same run.
Figures only; nothing is asserted.

    python bench/bench_outputs.py [--photo PATH] [--repeats 30]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTO = REPO.parent / "shared" / "data" / "deep3d-examples" / "015316.jpg"  # 1131 x 1080


def _time(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this thread's) milliseconds per call: on a shared machine the CPU time is what the call costs,
    the wall time what it costs there and then."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1000.0)
        cpu.append((time.thread_time() - c0) * 1000.0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    import torch
    from PIL import Image

    from facerecon.imaging import load_image
    from facerecon.pipeline import Reconstructor
    from facerecon.render.overlay import encode_png, overlay_on_photo

    torch.set_num_threads(1)
    rec = Reconstructor()
    image = load_image(args.photo, max_bytes=1 << 26, max_pixels=1 << 26)
    r = rec.reconstruct(image, refine=False)[0]
    overlay_args = (image, r.decoded.vertices_cam, rec.overlay_triangles, r.decoded.colors.clamp(0, 1),
                    r.alignment.photo_intrinsics(rec.decoder.camera))
    over = rec.overlay(image, r)

    def pil_png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(over).save(buf, format="PNG", compress_level=3)
        return buf.getvalue()

    rows: list[tuple[str, tuple[list[float], list[float]], float | None]] = [
        (f"export {fmt}", _time(lambda fmt=fmt: rec.export(r, fmt), args.repeats), 5.0) for fmt in ("obj", "ply", "glb")
    ]
    rows += [
        ("overlay (render + composite)", _time(lambda: rec.overlay(image, r), args.repeats), 10.0),
        ("  former path (2x supersampled)", _time(
            lambda: overlay_on_photo(*overlay_args, renderer=rec.renderer, antialias="supersample"),
            max(5, args.repeats // 3)), 10.0),
        ("overlay PNG (encode_png: up filter, zlib 1)", _time(lambda: encode_png(over), args.repeats), None),
        ("  Pillow PNG, compress_level=3", _time(pil_png, max(5, args.repeats // 3)), None),
    ]
    load = os.getloadavg()
    print(f"{args.photo.name} {image.shape[1]} x {image.shape[0]}; torch threads 1; load average {load[0]:.2f} / "
          f"{load[1]:.2f} (1 / 5 min) on {os.cpu_count()} CPUs")
    print(f"{'ms':<46}{'median':>9}{'p90':>9}{'cpu med':>9}{'target':>9}{'ratio':>9}")
    for label, (wall, cpu), target in rows:
        med, p90 = statistics.median(wall), float(np.percentile(wall, 90))
        ratio = f"{med / target:>8.2f}x" if target else ""
        print(f"{label:<46}{med:>9.2f}{p90:>9.2f}{statistics.median(cpu):>9.2f}{target or '':>9}{ratio}")


if __name__ == "__main__":
    main()
