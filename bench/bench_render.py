"""Benchmark one 224 x 224 render (rasterize + interpolate of RGB colours) of a face-sized mesh on one CPU thread.

    python bench/bench_render.py [--backend cpu|nvdiffrast] [--repeats 200] [--synthetic]

Uses the default face model (``facerecon.facemodel`` + ``facerecon.decoder``, mean face at zero pose) when it can be
loaded, else a synthetic front half-ellipsoid of similar size (~17K vertices, ~33K triangles, ~1.6 x 2.0 dm at
d = 10 dm). Prints the median and p90 in milliseconds after warm-up, split into rasterize and interpolate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np
import torch

from facerecon.geometry import Camera
from facerecon.render import get_renderer


def synthetic_face_mesh(rows: int = 130, cols: int = 130) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A front half-ellipsoid (semi-axes 0.8, 1.0, 0.6 dm) facing the reference camera, as a (rows x cols) grid.

    Returns:
        ``(vertices_cam (1, N, 3) float32, triangles (F, 3) int64 counter-clockwise from the camera,
        colors (1, N, 3) float32 in [0, 1])``; N = rows * cols, F = 2 (rows - 1)(cols - 1).
    """
    lat = np.linspace(-0.48 * np.pi, 0.48 * np.pi, rows)  # bottom to top
    lon = np.linspace(-0.48 * np.pi, 0.48 * np.pi, cols)  # left to right
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    x = 0.8 * np.cos(la) * np.sin(lo)
    y = 1.0 * np.sin(la)
    z = 0.6 * np.cos(la) * np.cos(lo)
    verts = np.stack([x, y, 10.0 - z], -1).reshape(1, -1, 3)  # camera space: d = 10 - z
    idx = np.arange(rows * cols).reshape(rows, cols)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    tris = np.concatenate([np.stack([a, b, d], -1), np.stack([a, d, c], -1)])  # CCW seen from +z
    colors = np.stack([0.5 + 0.5 * np.sin(3 * lo), 0.5 + 0.5 * np.cos(2 * la), np.full_like(la, 0.6)], -1)
    return (
        torch.from_numpy(verts).float(),
        torch.from_numpy(tris).long(),
        torch.from_numpy(colors.reshape(1, -1, 3)).float(),
    )


def default_face_mesh() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The default face model's mean face at zero pose, or None when it cannot be loaded."""
    try:
        from facerecon.coefficients import Coefficients
        from facerecon.config import get_settings
        from facerecon.decoder import FaceDecoder
        from facerecon.facemodel import FaceModel
        from facerecon.facemodel.registry import resolve

        settings = get_settings()
        model = FaceModel.from_file(resolve(settings.models_dir, settings.face_model))
        with torch.no_grad():
            face = FaceDecoder(model)(Coefficients.zeros(model.layout))
        return face.vertices_cam.float(), model.triangles.long(), face.colors.float()
    except Exception as exc:  # the face model is optional for this benchmark
        print(f"(default face model unavailable: {exc!r}; using a synthetic mesh)")
        return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", choices=["cpu", "nvdiffrast"])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--synthetic", action="store_true", help="skip the face model")
    args = parser.parse_args()

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except Exception:
        pass

    mesh = None if args.synthetic else default_face_mesh()
    name = "default face model, mean face at zero pose"
    if mesh is None:
        mesh = synthetic_face_mesh()
        name = "synthetic half-ellipsoid"
    verts, tris, colors = mesh
    renderer = get_renderer(args.backend)
    device = renderer.device
    verts, tris, colors = verts.to(device), tris.to(device), colors.to(device)
    intr = Camera().intrinsics

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    renderer.warmup()
    print(f"warm-up (JIT / context): {time.perf_counter() - t0:.2f} s")
    for _ in range(10):
        renderer.render(verts, tris, colors, intr)
    sync()

    t_rast, t_interp, t_total = [], [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            sync()
            a = time.perf_counter()
            raster = renderer.rasterize(verts, tris, intr)
            sync()
            b = time.perf_counter()
            image = renderer.interpolate(colors, raster, tris)
            sync()
            c = time.perf_counter()
            t_rast.append((b - a) * 1e3)
            t_interp.append((c - b) * 1e3)
            t_total.append((c - a) * 1e3)
        t_render = []
        for _ in range(args.repeats):
            sync()
            a = time.perf_counter()
            renderer.render(verts, tris, colors, intr)
            sync()
            t_render.append((time.perf_counter() - a) * 1e3)
    # with autograd on positions and colours (the training path)
    t_grad = []
    vg = verts.clone().requires_grad_(True)
    cg = colors.clone().requires_grad_(True)
    for _ in range(max(10, args.repeats // 4)):
        sync()
        a = time.perf_counter()
        img = renderer.render(vg, tris, cg, intr).image
        img.sum().backward()
        sync()
        t_grad.append((time.perf_counter() - a) * 1e3)

    coverage = float(raster.mask.float().mean())
    print(
        f"mesh: {name}: {verts.shape[1]} vertices, {tris.shape[0]} triangles; 224 x 224, "
        f"backend {renderer.name}, torch threads {torch.get_num_threads()}; coverage {coverage:.1%}; "
        f"image {tuple(image.shape)}"
    )
    print(f"{'stage':<32}{'median ms':>10}{'p90 ms':>10}")
    for label, values in [
        ("rasterize", t_rast),
        ("interpolate", t_interp),
        ("rasterize + interpolate", t_total),
        ("render() (image, mask, depth)", t_render),
        ("render() + backward", t_grad),
    ]:
        print(f"{label:<32}{statistics.median(values):>10.2f}{percentile(values, 90):>10.2f}")


if __name__ == "__main__":
    main()
