"""The CPU rasteriser's z-buffer pass on NumPy arrays (numba, no torch): the kernels :class:`facerecon.render.cpu.
CpuRenderer` runs (its docstring says how they work), :func:`rasterize_arrays` for callers that keep their own arrays
(the fit's fused engine, the torch-free overlay), and the ray helpers the fused engine's barycentrics share.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from facerecon.geometry import Intrinsics

__all__ = ["DEFAULT_ZFAR", "DEFAULT_ZNEAR", "interpolate_arrays", "rasterize_arrays", "ray_triple"]

#: Clip planes of the reference renderer (reference.md section 9), decimetres.
DEFAULT_ZNEAR = 5.0
DEFAULT_ZFAR = 15.0


@njit(cache=True, nogil=True)
def _slab_bbox(
    x0: float,
    y0: float,
    w0: float,
    x1: float,
    y1: float,
    w1: float,
    x2: float,
    y2: float,
    w2: float,
    znear: float,
    zfar: float,
) -> tuple[float, float, float, float]:
    """Projected bounding box ``(xmin, xmax, ymin, ymax)`` of the part of a triangle with ``znear <= w <= zfar``.

    Homogeneous pixel-space vertices ``(x, y, w)``. Its vertices are the triangle's vertices inside the slab and
    the crossings of its edges with the two planes. Returns ``xmin > xmax`` when nothing is left.
    """
    xs = (x0, x1, x2)
    ys = (y0, y1, y2)
    ws = (w0, w1, w2)
    xmin = math.inf
    xmax = -math.inf
    ymin = math.inf
    ymax = -math.inf
    for k in range(3):
        xp, yp, wp = xs[k], ys[k], ws[k]
        xq, yq, wq = xs[(k + 1) % 3], ys[(k + 1) % 3], ws[(k + 1) % 3]
        if znear <= wp <= zfar:
            px, py = xp / wp, yp / wp
            xmin, xmax, ymin, ymax = min(xmin, px), max(xmax, px), min(ymin, py), max(ymax, py)
        for plane in (znear, zfar):
            if (wp - plane) * (wq - plane) < 0.0:
                t = (plane - wp) / (wq - wp)
                px = (xp + t * (xq - xp)) / plane
                py = (yp + t * (yq - yp)) / plane
                xmin, xmax, ymin, ymax = min(xmin, px), max(xmax, px), min(ymin, py), max(ymax, py)
    return xmin, xmax, ymin, ymax


@njit(cache=True, nogil=True)
def _rasterize_kernel(
    vertices: np.ndarray,
    triangles: np.ndarray,
    fx: float,
    fy: float,
    cx: float,
    cy: float,
    znear: float,
    zfar: float,
    triangle_id: np.ndarray,
    barycentrics: np.ndarray,
    depth: np.ndarray,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffer rasterisation of a batch.

    Args:
        vertices: ``(B, N, 3)`` float32 or float64 camera-space ``(x, y, d)`` (computed in float64).
        triangles: ``(F, 3)`` int64.
        fx, fy, cx, cy: intrinsics (y-up frame).
        znear, zfar: clip depths.
        triangle_id: ``(B, H, W)`` int64 output, any content (set here; -1 = background).
        barycentrics: ``(B, H, W, 3)`` float output, must be zero on entry.
        depth: ``(B, H, W)`` same float type, output (0 off the face).

    Returns:
        ``(bad, pixels (P,), pixel_batch (P,), pixel_vertices (P, 3), pixel_barycentrics (P, 3))``; ``bad`` is -1,
        or the first triangle row with an index outside ``[0, N)`` (then nothing is drawn).
    """
    n_batch, n_vert = vertices.shape[0], vertices.shape[1]
    n_tri = triangles.shape[0]
    height, width = triangle_id.shape[1], triangle_id.shape[2]

    for f in range(n_tri):
        for k in range(3):
            if triangles[f, k] < 0 or triangles[f, k] >= n_vert:
                return (
                    f,
                    np.empty(0, np.int64),
                    np.empty(0, np.int64),
                    np.empty((0, 3), np.int64),
                    np.empty((0, 3), barycentrics.dtype),
                )

    zbuf = np.empty((height, width), np.float64)
    hx = np.empty(n_vert, np.float64)
    hy = np.empty(n_vert, np.float64)
    hw = np.empty(n_vert, np.float64)
    ox = cx - 0.5
    oy = height - 0.5 - cy
    for b in range(n_batch):
        zbuf[:] = math.inf
        triangle_id[b] = -1
        for i in range(n_vert):
            d = vertices[b, i, 2]
            hx[i] = fx * vertices[b, i, 0] + ox * d
            hy[i] = -fy * vertices[b, i, 1] + oy * d
            hw[i] = d
        for f in range(n_tri):
            i0, i1, i2 = triangles[f, 0], triangles[f, 1], triangles[f, 2]
            x0, y0, w0 = hx[i0], hy[i0], hw[i0]
            x1, y1, w1 = hx[i1], hy[i1], hw[i1]
            x2, y2, w2 = hx[i2], hy[i2], hw[i2]
            if (w0 < znear and w1 < znear and w2 < znear) or (w0 > zfar and w1 > zfar and w2 > zfar):
                continue
            # e_i = q . (P_j x P_k) = a_i c + b_i r + c_i
            a0 = y1 * w2 - w1 * y2
            b0 = w1 * x2 - x1 * w2
            c0 = x1 * y2 - y1 * x2
            a1 = y2 * w0 - w2 * y0
            b1 = w2 * x0 - x2 * w0
            c1 = x2 * y0 - y2 * x0
            a2 = y0 * w1 - w0 * y1
            b2 = w0 * x1 - x0 * w1
            c2 = x0 * y1 - y0 * x1
            det = x0 * a0 + y0 * b0 + w0 * c0
            if not (abs(det) > 0.0 and abs(det) < math.inf):
                continue  # degenerate (zero area, or edge-on through the eye) or non-finite
            if det < 0.0:
                a0, b0, c0, a1, b1, c1, a2, b2, c2 = -a0, -b0, -c0, -a1, -b1, -c1, -a2, -b2, -c2
                det = -det
            if znear <= w0 <= zfar and znear <= w1 <= zfar and znear <= w2 <= zfar:
                px0, py0 = x0 / w0, y0 / w0
                px1, py1 = x1 / w1, y1 / w1
                px2, py2 = x2 / w2, y2 / w2
                xmin, xmax = min(px0, px1, px2), max(px0, px1, px2)
                ymin, ymax = min(py0, py1, py2), max(py0, py1, py2)
            else:
                xmin, xmax, ymin, ymax = _slab_bbox(x0, y0, w0, x1, y1, w1, x2, y2, w2, znear, zfar)
            # (NaN comparisons are false: non-finite boxes are skipped here too)
            if not (xmax >= -1.0 and xmin <= width and ymax >= -1.0 and ymin <= height):
                continue
            c_lo = math.ceil(max(xmin - 1e-9, 0.0))
            c_hi = math.floor(min(xmax + 1e-9, width - 1.0))
            r_lo = math.ceil(max(ymin - 1e-9, 0.0))
            r_hi = math.floor(min(ymax + 1e-9, height - 1.0))
            # tie-break owners of the three edges (used only when a centre lies exactly on an edge)
            own0 = a0 > 0.0 or (a0 == 0.0 and b0 > 0.0)
            own1 = a1 > 0.0 or (a1 == 0.0 and b1 > 0.0)
            own2 = a2 > 0.0 or (a2 == 0.0 and b2 > 0.0)
            for r in range(r_lo, r_hi + 1):
                fr = float(r)
                row0 = b0 * fr + c0
                row1 = b1 * fr + c1
                row2 = b2 * fr + c2
                for c in range(c_lo, c_hi + 1):
                    fc = float(c)
                    e0 = a0 * fc + row0
                    e1 = a1 * fc + row1
                    e2 = a2 * fc + row2
                    if min(e0, e1, e2) < 0.0:
                        continue
                    if e0 * e1 * e2 == 0.0 and (
                        (e0 == 0.0 and not own0) or (e1 == 0.0 and not own1) or (e2 == 0.0 and not own2)
                    ):
                        continue
                    s = e0 + e1 + e2
                    if s <= 0.0:
                        continue
                    d = det / s
                    if d < znear or d > zfar or d >= zbuf[r, c]:
                        continue
                    zbuf[r, c] = d
                    triangle_id[b, r, c] = f
                    inv = 1.0 / s
                    barycentrics[b, r, c, 0] = e0 * inv
                    barycentrics[b, r, c, 1] = e1 * inv
                    barycentrics[b, r, c, 2] = e2 * inv
        for r in range(height):
            for c in range(width):
                depth[b, r, c] = zbuf[r, c] if triangle_id[b, r, c] >= 0 else 0.0

    # compact list of the covered pixels
    count = 0
    for b in range(n_batch):
        for r in range(height):
            for c in range(width):
                if triangle_id[b, r, c] >= 0:
                    count += 1
    pixels = np.empty(count, np.int64)
    pixel_batch = np.empty(count, np.int64)
    pixel_vertices = np.empty((count, 3), np.int64)
    pixel_bary = np.empty((count, 3), barycentrics.dtype)
    p = 0
    for b in range(n_batch):
        for r in range(height):
            for c in range(width):
                f = triangle_id[b, r, c]
                if f >= 0:
                    pixels[p] = (b * height + r) * width + c
                    pixel_batch[p] = b
                    for k in range(3):
                        pixel_vertices[p, k] = triangles[f, k]
                        pixel_bary[p, k] = barycentrics[b, r, c, k]
                    p += 1
    return -1, pixels, pixel_batch, pixel_vertices, pixel_bary


@njit(cache=True, nogil=True)
def _pixel_ray(pixel: int, batch: int, height: int, width: int, fx: float, fy: float, cx: float, cy: float):
    """Camera ray ``((u - cx)/fx, (v_up - cy)/fy, 1)`` through the centre of a flat pixel index."""
    i = pixel - batch * height * width
    row = i // width
    col = i - row * width
    return (col + 0.5 - cx) / fx, (height - 0.5 - row - cy) / fy


@njit(cache=True, nogil=True)
def ray_triple(rx: float, ry: float, ax: float, ay: float, az: float, bx: float, by: float, bz: float) -> float:
    """``r . (a x b)`` with ``r = (rx, ry, 1)``."""
    return rx * (ay * bz - az * by) + ry * (az * bx - ax * bz) + (ax * by - ay * bx)


def rasterize_arrays(
    vertices: np.ndarray,
    triangles: np.ndarray,
    intrinsics: Intrinsics,
    znear: float = DEFAULT_ZNEAR,
    zfar: float = DEFAULT_ZFAR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The no-grad raster of one image straight on NumPy arrays (no torch, no validation): for callers that
    rasterise in a loop and keep their own arrays (the fit's fused photometric objective, :mod:`facerecon.fit`).

    Args:
        vertices: ``(N, 3)`` float64 (or float32) camera-space ``(x, y, d)``.
        triangles: ``(F, 3)`` int64 in ``[0, N)`` (checked: raises ``ValueError`` otherwise).
        intrinsics: image size and projection.

    Returns:
        ``(triangle_id (H, W) int64 (-1 = background), pixels (P,) flat row-major, pixel_vertices (P, 3),
        pixel_barycentrics (P, 3))``, as :meth:`CpuRenderer.rasterize`'s compact covered-pixel arrays.
    """
    height, width = int(intrinsics.height), int(intrinsics.width)
    verts = np.ascontiguousarray(vertices)[None]
    triangle_id = np.empty((1, height, width), np.int64)
    bary = np.zeros((1, height, width, 3), verts.dtype)
    depth = np.empty((1, height, width), verts.dtype)
    bad, pixels, _, pixel_vertices, pixel_bary = _rasterize_kernel(
        verts, np.ascontiguousarray(triangles), float(intrinsics.fx), float(intrinsics.fy), float(intrinsics.cx),
        float(intrinsics.cy), float(znear), float(zfar), triangle_id, bary, depth,
    )
    if bad >= 0:
        raise ValueError(f"triangles[{bad}] indexes outside the {verts.shape[1]} vertices (0-based ids)")
    return triangle_id[0], pixels, pixel_vertices, pixel_bary


@njit(cache=True, nogil=True)
def _interpolate_kernel(
    attributes: np.ndarray,
    pixels: np.ndarray,
    pixel_batch: np.ndarray,
    pixel_vertices: np.ndarray,
    pixel_bary: np.ndarray,
    out: np.ndarray,
    channels_first: bool,
) -> None:
    """``out[pixel] = sum_k bary[k] * attributes[b, v_k]`` over the covered pixels (no-grad fast path).

    Args:
        attributes: ``(B or 1, N, C)`` float.
        pixels, pixel_batch, pixel_vertices, pixel_bary: the raster's compact covered-pixel arrays.
        out: zero-filled ``(B, H * W, C)`` (``channels_first=False``) or ``(B, C, H * W)``, attributes' dtype.
    """
    shared = attributes.shape[0] == 1
    n_chan = attributes.shape[2]
    hw = out.shape[2] if channels_first else out.shape[1]
    for p in range(pixels.shape[0]):
        b = pixel_batch[p]
        ba = 0 if shared else b
        i = pixels[p] - b * hw
        v0, v1, v2 = pixel_vertices[p, 0], pixel_vertices[p, 1], pixel_vertices[p, 2]
        w0, w1, w2 = pixel_bary[p, 0], pixel_bary[p, 1], pixel_bary[p, 2]
        for ch in range(n_chan):
            value = w0 * attributes[ba, v0, ch] + w1 * attributes[ba, v1, ch] + w2 * attributes[ba, v2, ch]
            if channels_first:
                out[b, ch, i] = value
            else:
                out[b, i, ch] = value


def interpolate_arrays(attributes: np.ndarray, pixels: np.ndarray, pixel_vertices: np.ndarray,
                       pixel_bary: np.ndarray, size: int) -> np.ndarray:
    """``(size, C)`` attributes' dtype: the per-vertex ``attributes`` ``(N, C)`` interpolated at the covered pixels
    of one :func:`rasterize_arrays` raster (flat row-major ``pixels`` of an image of ``size`` pixels), 0 elsewhere:
    what :meth:`CpuRenderer.interpolate` gives, on NumPy arrays."""
    attr = np.ascontiguousarray(attributes)[None]
    out = np.zeros((1, size, attr.shape[2]), attr.dtype)
    _interpolate_kernel(attr, pixels, np.zeros(pixels.shape[0], np.int64), pixel_vertices, pixel_bary, out, False)
    return out[0]
