"""CPU rasteriser: a z-buffer over triangles in numba, plus torch for the differentiable parts.

How it works (conventions in :mod:`facerecon.render.base`):

1. **Raster pass (numba, no grad)**. Vertices go to homogeneous pixel space
   ``X = fx x + (cx - 1/2) d``, ``Y = -fy y + (H - 1/2 - cy) d``, ``W = d``, so that the centre of pixel (column c,
   row r) is the ray ``q = (c, r, 1)``. For each triangle the three *homogeneous edge functions*
   ``e_i(c, r) = q . (P_j x P_k)`` (Olano & Greer 1997) are linear in (c, r); a pixel centre lies inside the triangle
   and in front of the camera when all three have the sign of ``det(P_0, P_1, P_2)``, the perspective-correct
   barycentrics are ``b_i = e_i / sum(e)``, and the depth is ``d = det / sum(e)``. No division by the vertex depth
   is needed, so triangles that cross the near plane or pass behind the camera need no geometric clipping: pixels
   are kept when ``znear <= d <= zfar`` (the set nvdiffrast's frustum clipping gives). Each triangle scans only its
   pixel bounding box (of the part of the triangle between the clip planes), and the nearest ``d`` wins the
   z-buffer (strictly nearer: on an exact tie the earlier triangle keeps the pixel).
2. **Inclusion rule**: a pixel is covered when its *centre* is inside. A centre exactly on an edge (``e_i == 0``)
   goes to the triangle for which that edge's coefficients ``(A_i, B_i)`` of ``e_i = A_i c + B_i r + C_i`` (after
   orienting the triangle so its interior is positive) satisfy ``A_i > 0 or (A_i == 0 and B_i > 0)``, a top-left
   style tie-break. The edge functions are evaluated in float64 with the same expression for every triangle, and
   the two triangles sharing an edge get exactly negated coefficients, so a shared edge's centres are drawn once.
3. **Both windings are rasterised** (no back-face culling), like nvdiffrast.
4. **Gradients**: when the vertices require grad, the barycentrics and depth of the covered pixels are recomputed
   as an autograd function of the positions (float64, the same homogeneous formula ``b_i = e_i / sum(e)`` with
   ``e_i = ray . (V_j x V_k)`` from the camera ray of each pixel centre and the three camera-space vertices of its
   triangle; forward and analytic backward in numba), so gradients reach the positions as through nvdiffrast's
   rasterize backward. Interpolation is an autograd function too (numba forward/backward, gradients to the
   attributes and the barycentrics). Visibility itself (which triangle, the silhouette) is not differentiable.

Cost: one 224 x 224 render of a ~17K-vertex, ~33K-triangle face, rasterise + interpolate, is a few milliseconds on
one core after JIT (``bench/bench_render.py``). Call :func:`warmup` (or :meth:`CpuRenderer.warmup`) at start-up:
the first call compiles the kernel (~2 s; later processes load numba's on-disk cache).

Size: over 400 lines: the numba kernels (rasterise, interpolate forward and backward, antialias) and their torch
autograd glue are one backend of the :class:`~facerecon.render.base.Renderer` interface.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from numba import njit
from torch import Tensor

from facerecon.geometry import Intrinsics
from facerecon.render.base import (
    DEFAULT_ZFAR,
    DEFAULT_ZNEAR,
    Raster,
    Renderer,
    RenderOutput,
    check_attributes,
    check_clip_range,
    check_intrinsics,
    check_triangles,
    check_vertices,
    interpolate_covered,
)

__all__ = ["CpuRenderer", "rasterize_arrays", "ray_triple", "warmup"]

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# numba kernels


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


@njit(cache=True, nogil=True)
def _interpolate_backward_kernel(
    attributes: np.ndarray,
    pixels: np.ndarray,
    pixel_batch: np.ndarray,
    pixel_vertices: np.ndarray,
    pixel_bary: np.ndarray,
    grad_out: np.ndarray,
    channels_first: bool,
    grad_attributes: np.ndarray,
    grad_bary: np.ndarray,
    want_attributes: bool,
    want_bary: bool,
) -> None:
    """Backward of :func:`_interpolate_kernel`: accumulates ``grad_attributes`` (zeroed, attributes' shape) and
    writes ``grad_bary`` ``(P, 3)``, each only if wanted."""
    shared = attributes.shape[0] == 1
    n_chan = attributes.shape[2]
    hw = grad_out.shape[2] if channels_first else grad_out.shape[1]
    for p in range(pixels.shape[0]):
        b = pixel_batch[p]
        ba = 0 if shared else b
        i = pixels[p] - b * hw
        for k in range(3):
            v = pixel_vertices[p, k]
            w = pixel_bary[p, k]
            acc = 0.0
            for ch in range(n_chan):
                g = grad_out[b, ch, i] if channels_first else grad_out[b, i, ch]
                if want_attributes:
                    grad_attributes[ba, v, ch] += w * g
                acc += g * attributes[ba, v, ch]
            if want_bary:
                grad_bary[p, k] = acc


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


@njit(cache=True, nogil=True)
def _bary_forward_kernel(
    vertices: np.ndarray,
    pixels: np.ndarray,
    pixel_batch: np.ndarray,
    pixel_vertices: np.ndarray,
    height: int,
    width: int,
    fx: float,
    fy: float,
    cx: float,
    cy: float,
    bary: np.ndarray,
    depth: np.ndarray,
) -> None:
    """``b_i = e_i / sum(e)``, ``e_i = ray . (V_j x V_k)`` and ``d = sum_i b_i d_i`` per covered pixel.

    ``vertices`` must be float64 (the triple products cancel strongly for small, distant triangles).
    """
    for p in range(pixels.shape[0]):
        b = pixel_batch[p]
        rx, ry = _pixel_ray(pixels[p], b, height, width, fx, fy, cx, cy)
        i0, i1, i2 = pixel_vertices[p, 0], pixel_vertices[p, 1], pixel_vertices[p, 2]
        x0, y0, z0 = vertices[b, i0, 0], vertices[b, i0, 1], vertices[b, i0, 2]
        x1, y1, z1 = vertices[b, i1, 0], vertices[b, i1, 1], vertices[b, i1, 2]
        x2, y2, z2 = vertices[b, i2, 0], vertices[b, i2, 1], vertices[b, i2, 2]
        e0 = ray_triple(rx, ry, x1, y1, z1, x2, y2, z2)
        e1 = ray_triple(rx, ry, x2, y2, z2, x0, y0, z0)
        e2 = ray_triple(rx, ry, x0, y0, z0, x1, y1, z1)
        inv = 1.0 / (e0 + e1 + e2)
        bary[p, 0], bary[p, 1], bary[p, 2] = e0 * inv, e1 * inv, e2 * inv
        depth[p] = (e0 * z0 + e1 * z1 + e2 * z2) * inv


@njit(cache=True, nogil=True)
def _bary_backward_kernel(
    vertices: np.ndarray,
    pixels: np.ndarray,
    pixel_batch: np.ndarray,
    pixel_vertices: np.ndarray,
    height: int,
    width: int,
    fx: float,
    fy: float,
    cx: float,
    cy: float,
    grad_bary: np.ndarray,
    grad_depth: np.ndarray,
    grad_vertices: np.ndarray,
) -> None:
    """Backward of :func:`_bary_forward_kernel`, accumulated into ``grad_vertices`` ``(B, N, 3)`` float64.

    With ``S = sum(e)``: ``dL/de_m = (g_m - sum_i g_i b_i) / S`` where ``g_i = dL/db_i + dL/dd * d_i``;
    ``e_0 = r . (V_1 x V_2)`` gives ``de_0/dV_1 = V_2 x r`` and ``de_0/dV_2 = r x V_1`` (cyclically for e_1, e_2);
    and ``dd/dd_i = b_i`` directly.
    """
    for p in range(pixels.shape[0]):
        b = pixel_batch[p]
        rx, ry = _pixel_ray(pixels[p], b, height, width, fx, fy, cx, cy)
        idx = (pixel_vertices[p, 0], pixel_vertices[p, 1], pixel_vertices[p, 2])
        x0, y0, z0 = vertices[b, idx[0], 0], vertices[b, idx[0], 1], vertices[b, idx[0], 2]
        x1, y1, z1 = vertices[b, idx[1], 0], vertices[b, idx[1], 1], vertices[b, idx[1], 2]
        x2, y2, z2 = vertices[b, idx[2], 0], vertices[b, idx[2], 1], vertices[b, idx[2], 2]
        e0 = ray_triple(rx, ry, x1, y1, z1, x2, y2, z2)
        e1 = ray_triple(rx, ry, x2, y2, z2, x0, y0, z0)
        e2 = ray_triple(rx, ry, x0, y0, z0, x1, y1, z1)
        inv = 1.0 / (e0 + e1 + e2)
        b0, b1, b2 = e0 * inv, e1 * inv, e2 * inv
        gd = grad_depth[p]
        g0 = grad_bary[p, 0] + gd * z0
        g1 = grad_bary[p, 1] + gd * z1
        g2 = grad_bary[p, 2] + gd * z2
        mean = g0 * b0 + g1 * b1 + g2 * b2
        ge = ((g0 - mean) * inv, (g1 - mean) * inv, (g2 - mean) * inv)
        xs = (x0, x1, x2)
        ys = (y0, y1, y2)
        zs = (z0, z1, z2)
        bs = (b0, b1, b2)
        for m in range(3):
            j = (m + 1) % 3
            k = (m + 2) % 3
            # d e_m / d V_j = V_k x r ; d e_m / d V_k = r x V_j   (r = (rx, ry, 1))
            grad_vertices[b, idx[j], 0] += ge[m] * (ys[k] * 1.0 - zs[k] * ry)
            grad_vertices[b, idx[j], 1] += ge[m] * (zs[k] * rx - xs[k] * 1.0)
            grad_vertices[b, idx[j], 2] += ge[m] * (xs[k] * ry - ys[k] * rx)
            grad_vertices[b, idx[k], 0] += ge[m] * (ry * zs[j] - 1.0 * ys[j])
            grad_vertices[b, idx[k], 1] += ge[m] * (1.0 * xs[j] - rx * zs[j])
            grad_vertices[b, idx[k], 2] += ge[m] * (rx * ys[j] - ry * xs[j])
            grad_vertices[b, idx[m], 2] += gd * bs[m]


# ----------------------------------------------------------------------------------------------------------------
# autograd wrappers (numba inside, torch outside)


class _CoveredPixels:
    """The raster's compact covered-pixel arrays as numpy views, plus the image geometry."""

    def __init__(self, raster: Raster) -> None:
        assert raster.pixels is not None and raster.pixel_batch is not None and raster.pixel_vertices is not None
        self.pixels = raster.pixels.numpy()
        self.batch = raster.pixel_batch.numpy()
        self.vertices = raster.pixel_vertices.numpy()
        self.shape = (raster.batch_size, raster.height, raster.width)


class _Barycentrics(torch.autograd.Function):
    """``vertices (B, N, 3) -> (barycentrics (P, 3), depth (P,))`` at the covered pixels, with a numba backward."""

    @staticmethod
    def forward(ctx, vertices: Tensor, covered: _CoveredPixels, intrinsics: Intrinsics) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        verts = vertices.detach().numpy().astype(np.float64)  # (numba's float() keeps float32)
        n = covered.pixels.shape[0]
        bary = np.empty((n, 3), np.float64)
        depth = np.empty(n, np.float64)
        _, height, width = covered.shape
        args = (height, width, float(intrinsics.fx), float(intrinsics.fy), float(intrinsics.cx), float(intrinsics.cy))
        _bary_forward_kernel(verts, covered.pixels, covered.batch, covered.vertices, *args, bary, depth)
        ctx.save_for_backward(vertices)
        ctx.covered, ctx.args = covered, args
        return torch.from_numpy(bary).to(vertices.dtype), torch.from_numpy(depth).to(vertices.dtype)

    @staticmethod
    def backward(ctx, grad_bary: Tensor, grad_depth: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        (vertices,) = ctx.saved_tensors
        covered = ctx.covered
        grad = np.zeros(vertices.shape, np.float64)
        _bary_backward_kernel(
            vertices.detach().numpy().astype(np.float64),
            covered.pixels,
            covered.batch,
            covered.vertices,
            *ctx.args,
            grad_bary.detach().to(torch.float64).contiguous().numpy(),
            grad_depth.detach().to(torch.float64).contiguous().numpy(),
            grad,
        )
        return torch.from_numpy(grad).to(vertices.dtype), None, None


class _Interpolate(torch.autograd.Function):
    """``(attributes (B|1, N, C), bary (P, 3)) -> (B, H*W, C)`` or ``(B, C, H*W)``, numba forward and backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, attributes: Tensor, bary: Tensor, covered: _CoveredPixels, channels_first: bool
    ) -> Tensor:
        attr = attributes.detach().contiguous().numpy()
        w = bary.detach().to(attributes.dtype).contiguous().numpy()
        b, h, wd = covered.shape
        c = attr.shape[2]
        out = np.zeros((b, c, h * wd) if channels_first else (b, h * wd, c), attr.dtype)
        _interpolate_kernel(attr, covered.pixels, covered.batch, covered.vertices, w, out, channels_first)
        ctx.save_for_backward(attributes, bary)
        ctx.covered, ctx.channels_first = covered, channels_first
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        attributes, bary = ctx.saved_tensors
        want_attr, want_bary = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        attr = attributes.detach().contiguous().numpy()
        covered = ctx.covered
        g_attr = np.zeros(attr.shape, attr.dtype)
        g_bary = np.zeros((covered.pixels.shape[0], 3), attr.dtype)
        _interpolate_backward_kernel(
            attr,
            covered.pixels,
            covered.batch,
            covered.vertices,
            bary.detach().to(attributes.dtype).contiguous().numpy(),
            grad_out.detach().to(attributes.dtype).contiguous().numpy(),
            ctx.channels_first,
            g_attr,
            g_bary,
            want_attr,
            want_bary,
        )
        return (
            torch.from_numpy(g_attr) if want_attr else None,
            torch.from_numpy(g_bary).to(bary.dtype) if want_bary else None,
            None,
            None,
        )


def _interpolate(attributes: Tensor, raster: Raster, triangles: Tensor, *, channels_first: bool) -> Tensor:
    """Interpolation on the CPU: ``(B, H, W, C)``, or ``(B, C, H, W)`` with ``channels_first``; differentiable."""
    if attributes.dtype not in (torch.float32, torch.float64):  # e.g. float16: plain torch
        out = interpolate_covered(attributes, raster, triangles)
        return out.permute(0, 3, 1, 2).contiguous() if channels_first else out
    assert raster.pixel_barycentrics is not None
    b, h, w, c = raster.batch_size, raster.height, raster.width, attributes.shape[2]
    out = _Interpolate.apply(attributes, raster.pixel_barycentrics, _CoveredPixels(raster), channels_first)
    return out.view(b, c, h, w) if channels_first else out.view(b, h, w, c)


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


class CpuRenderer(Renderer):
    """Z-buffered CPU rasteriser (numba) with torch interpolation. Inputs must be CPU tensors.

    Thread-safe: the kernel releases the GIL (``nogil``) and keeps no state, so several threads can render at once.
    """

    name = "cpu"
    thread_safe = True

    @property
    def device(self) -> torch.device:
        return _CPU

    def rasterize(
        self,
        vertices_cam: Tensor,
        triangles: Tensor,
        intrinsics: Intrinsics,
        *,
        znear: float = DEFAULT_ZNEAR,
        zfar: float = DEFAULT_ZFAR,
    ) -> Raster:
        """Z-buffered rasterisation on the CPU; see :meth:`Renderer.rasterize` and the module docstring.

        Args:
            vertices_cam: ``(B, N, 3)`` float32 (float64 accepted, e.g. for gradcheck) camera-space ``(x, y, d)``,
                decimetres, CPU.
            triangles: ``(F, 3)`` int64 in ``[0, N)``, CPU.
            intrinsics: image size and projection.
            znear, zfar: clip depths, ``0 < znear < zfar``.

        Returns:
            :class:`Raster` with ``triangle_id (B, H, W) int64``, ``barycentrics (B, H, W, 3)`` and
            ``depth (B, H, W)`` in the vertices' dtype, ``mask (B, H, W) bool``, all CPU.
        """
        check_vertices(vertices_cam, _CPU, self.name)
        check_triangles(triangles, _CPU, self.name)
        check_intrinsics(intrinsics)
        check_clip_range(znear, zfar)
        dtype = vertices_cam.dtype if vertices_cam.dtype in (torch.float32, torch.float64) else torch.float32
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        batch, n_vert = int(vertices_cam.shape[0]), int(vertices_cam.shape[1])
        height, width = int(intrinsics.height), int(intrinsics.width)

        # numpy/numba only from here on in the no-grad path: torch's intra-op threads cost more than they save on
        # these small tensors (and a lot on a busy machine)
        verts = vertices_cam.detach().to(dtype).contiguous().numpy()
        tris = triangles.contiguous().numpy()
        triangle_id = np.empty((batch, height, width), np.int64)
        bary = np.zeros((batch, height, width, 3), np_dtype)
        depth = np.empty((batch, height, width), np_dtype)
        bad, pixels, pixel_batch, pixel_vertices, pixel_bary = _rasterize_kernel(
            verts,
            tris,
            float(intrinsics.fx),
            float(intrinsics.fy),
            float(intrinsics.cx),
            float(intrinsics.cy),
            float(znear),
            float(zfar),
            triangle_id,
            bary,
            depth,
        )
        if bad >= 0:
            raise ValueError(
                f"triangles[{bad}] = {triangles[bad].tolist()} indexes outside the {n_vert} vertices (0-based ids)"
            )
        raster = Raster(
            triangle_id=torch.from_numpy(triangle_id),
            barycentrics=torch.from_numpy(bary),
            depth=torch.from_numpy(depth),
            mask=torch.from_numpy(triangle_id >= 0),
            intrinsics=intrinsics,
            num_vertices=n_vert,
            num_triangles=int(triangles.shape[0]),
            backend=self.name,
            pixels=torch.from_numpy(pixels),
            pixel_batch=torch.from_numpy(pixel_batch),
            pixel_vertices=torch.from_numpy(pixel_vertices),
            pixel_barycentrics=torch.from_numpy(pixel_bary),
        )
        if vertices_cam.requires_grad and torch.is_grad_enabled():
            assert raster.pixels is not None
            p_bary, p_depth = _Barycentrics.apply(vertices_cam, _CoveredPixels(raster), intrinsics)
            total = batch * height * width
            raster.pixel_barycentrics = p_bary
            raster.barycentrics = (
                p_bary.new_zeros(total, 3).index_copy(0, raster.pixels, p_bary).view(batch, height, width, 3)
            )
            raster.depth = p_depth.new_zeros(total).index_copy(0, raster.pixels, p_depth).view(batch, height, width)
        return raster

    def interpolate(self, attributes: Tensor, raster: Raster, triangles: Tensor) -> Tensor:
        """See :meth:`Renderer.interpolate`; touches only the covered pixels.

        Args:
            attributes: ``(B, N, C)`` or ``(1, N, C)`` float, CPU.
            raster: from :meth:`rasterize`.
            triangles: ``(F, 3)`` int64, the rasterised list.

        Returns:
            ``(B, H, W, C)`` CPU, dtype of ``attributes``, zeros off the face; differentiable w.r.t. the attributes
            and the positions.
        """
        check_attributes(attributes, raster, _CPU, self.name)
        check_triangles(triangles, _CPU, self.name)
        if triangles.shape[0] != raster.num_triangles:
            raise ValueError(f"triangles has {triangles.shape[0]} rows but {raster.num_triangles} were rasterised")
        return _interpolate(attributes, raster, triangles, channels_first=False)

    def render(
        self,
        vertices_cam: Tensor,
        triangles: Tensor,
        colors: Tensor,
        intrinsics: Intrinsics,
        *,
        znear: float = DEFAULT_ZNEAR,
        zfar: float = DEFAULT_ZFAR,
        antialias: bool = False,
    ) -> RenderOutput:
        """See :meth:`Renderer.render`; the kernel writes the image channels-first directly."""
        if antialias:
            self.antialias(colors, None, triangles)  # raises: no analytic antialiasing on the CPU
        raster = self.rasterize(vertices_cam, triangles, intrinsics, znear=znear, zfar=zfar)
        check_attributes(colors, raster, _CPU, self.name)
        if triangles.shape[0] != raster.num_triangles:
            raise ValueError(f"triangles has {triangles.shape[0]} rows but {raster.num_triangles} were rasterised")
        image = _interpolate(colors, raster, triangles, channels_first=True)
        if image.requires_grad:
            mask = raster.mask.to(image.dtype)
        else:  # numpy: avoids torch's thread pool for a trivial cast
            mask = torch.from_numpy(raster.mask.numpy().astype(image.numpy().dtype))
        return RenderOutput(image, mask.unsqueeze(1), raster.depth.to(image.dtype).unsqueeze(1))

    def warmup(self) -> None:
        """Compile (or load from numba's cache) the kernel by rendering a tiny mesh, incl. the clipping path."""
        warmup()


def warmup() -> float:
    """JIT-compile the CPU kernels; returns the seconds it took. Safe to call more than once."""
    start = time.perf_counter()
    verts = torch.tensor(
        [[[-0.5, -0.5, 10.0], [0.5, -0.5, 10.0], [0.0, 0.5, 10.0], [0.0, 0.0, 3.0], [0.5, 0.5, 20.0]]],
        dtype=torch.float32,
    )
    tris = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 4, 2]], dtype=torch.int64)
    colors = torch.rand(1, 5, 3)
    renderer = CpuRenderer()
    intr = Intrinsics(1015.0, 1015.0, 8.0, 8.0, 16, 16)
    renderer.render(verts, tris, colors, intr)
    raster = renderer.rasterize(verts, tris, intr)
    renderer.interpolate(colors, raster, tris)
    grad_verts, grad_colors = verts.clone().requires_grad_(True), colors.clone().requires_grad_(True)
    out = renderer.render(grad_verts, tris, grad_colors, intr)
    (out.image.sum() + out.depth.sum()).backward()
    elapsed = time.perf_counter() - start
    logger.debug("CPU renderer warm-up took %.3f s", elapsed)
    return elapsed
