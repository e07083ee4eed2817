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

The z-buffer pass and the no-grad interpolation live torch-free in :mod:`facerecon.render.raster` (the fit's
fused engine and the overlay call them on NumPy arrays); this module adds the differentiable parts and the
:class:`~facerecon.render.base.Renderer` interface over tensors.

Size: over 400 lines: the numba kernels of the gradients (barycentrics and interpolation, forward and backward) and
their torch autograd glue are one backend of the :class:`~facerecon.render.base.Renderer` interface.
"""

from __future__ import annotations

import logging
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
from facerecon.render.raster import _interpolate_kernel, _pixel_ray, _rasterize_kernel, rasterize_arrays, ray_triple

__all__ = ["CpuRenderer", "rasterize_arrays", "ray_triple", "warmup"]  # the raster kernels: render.raster

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# numba kernels


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
