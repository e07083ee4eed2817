"""The fit's fused engine: the objective of :func:`facerecon.fit.fit` and its gradient written out in NumPy/numba,
no autograd and no torch (so ``facerecon reconstruct`` in its default mode, and a service that fits on the CPU,
never import torch).

The objective is ``hybrid_terms(region="face_mask")`` in the photometric stage and ``landmark_terms`` in the
landmark stage (:mod:`facerecon.objective`), with the fit's schedule (:class:`facerecon.fitconfig.FitConfig`):
Adam on both stages, light and albedo solved exactly every ``appearance_every`` photometric steps.

The photometric term is rendered at ``photo_size`` (112: the photo and skin map average-pooled 2x, as
``hybrid_terms(size=112)``), and only the face: the shape, normals, shading and camera are evaluated on the vertices
the ``face_mask`` region can reach (their one-ring for the normals; ~7.3K of the ICT model's 15.7K vertices), whose
bases are gathered once per face model and kept (:meth:`FusedObjective.cached`). Visibility is the whole mesh's, as
in ``hybrid_terms``: the whole mesh is rasterised once at the start of the stage and the pixels another part of the
head covers (ears, neck, hair at large yaw) are left out; the face's own triangles are rasterised again every
``refresh_every`` steps. Per step: the covered pixels' perspective-correct barycentrics from the current vertices,
the interpolated lit colour, the L2,1 residual and its analytic gradient to the colours and the camera positions (as
the CPU rasteriser's backward), then SH shading, rotation, vertex and face normals backwards by hand, and two basis
products; the light and albedo solves build their normal equations in numba too. ``tests/test_fit.py`` checks its
loss and gradient against autograd through ``hybrid_terms`` (equal but for the occluding head parts, which are held
from the stage's start) and its solve against the autograd engine's.

Inputs are NumPy arrays (:func:`fit_arrays`): the face model's arrays (a :class:`FusedObjective`), the starting
coefficients (float64, ``id`` and ``tex`` one row for a set that shares them), the ``(B, 3, 224, 224)`` float32 crops
in [0, 1], their skin attention and 68 landmarks. The basis products are numba loops (single-threaded: NumPy's BLAS
starts its own threads for a matrix-vector product, ~6x slower on a busy two-core machine).

Size: over 400 lines: the kernels (forward and hand-written backward of the normals, shading, barycentrics and
landmark projection) belong to the one objective that uses them, next to its two stages.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numba import njit

from facerecon.coefficients import CoefficientArrays, Coefficients
from facerecon.fitconfig import CROP, FitConfig, FitResult, Stall, light_prior, solves
from facerecon.geometry import INIT_LIGHT, SH_CONSTANTS, Camera, Intrinsics
from facerecon.landmarks import LANDMARK_WEIGHTS_68
from facerecon.npfit import rotation, rotation_derivatives
from facerecon.render.raster import rasterize_arrays, ray_triple
from facerecon.weights import LossWeights

if TYPE_CHECKING:
    from facerecon.npdecode import NumpyDecoder

__all__ = ["FusedObjective", "FusedTarget", "PhotometricStage", "State", "fit_arrays", "fit_numpy", "warmup"]

log = logging.getLogger(__name__)

#: The face model arrays the objective reads (``FaceModel`` buffers or ``FaceModelData`` arrays, as NumPy).
MODEL_ARRAYS = ("mean_shape", "id_basis", "exp_basis", "mean_albedo", "albedo_basis", "triangles", "point_buf",
                "landmarks68", "face_mask", "skin_mask")

_A0C0, _A1C1, _A2C2 = SH_CONSTANTS
_A2C2_7 = _A2C2 / (2.0 * math.sqrt(3.0))
_EPS = 1e-12  # torch.nn.functional.normalize's


@njit(cache=True, nogil=True)
def _shade_forward(s, tris, pb, rot, trans, albedo, gam, distance, fn, fnorm, n, vnorm, nw, sh, shade, color, cam):
    """Normals, SH shading and camera positions of the face's vertices (``geometry.vertex_normals``,
    ``sh_shading``, ``transform``, ``to_camera``). ``s`` ``(M2, 3)`` un-posed shape, the first ``M`` rows the
    face's vertices, the rest their one-ring; ``tris`` ``(T, 3)`` the triangles around them; ``pb`` ``(M, P)`` their
    incident triangles (``T`` pads); ``gam`` ``(3, 9)`` with the ambient 0.8 added. Writes the other arrays."""
    for f in range(tris.shape[0]):
        i, j, k = tris[f, 0], tris[f, 1], tris[f, 2]
        ax, ay, az = s[i, 0] - s[j, 0], s[i, 1] - s[j, 1], s[i, 2] - s[j, 2]
        bx, by, bz = s[j, 0] - s[k, 0], s[j, 1] - s[k, 1], s[j, 2] - s[k, 2]
        cx, cy, cz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
        ln = math.sqrt(cx * cx + cy * cy + cz * cz)
        fnorm[f] = ln
        inv = 1.0 / max(ln, _EPS)
        fn[f, 0], fn[f, 1], fn[f, 2] = cx * inv, cy * inv, cz * inv
    n_tri = tris.shape[0]
    for v in range(pb.shape[0]):
        x = y = z = 0.0
        for q in range(pb.shape[1]):
            f = pb[v, q]
            if f < n_tri:
                x += fn[f, 0]
                y += fn[f, 1]
                z += fn[f, 2]
        ln = math.sqrt(x * x + y * y + z * z)
        vnorm[v] = ln
        inv = 1.0 / max(ln, _EPS)
        x, y, z = x * inv, y * inv, z * inv
        n[v, 0], n[v, 1], n[v, 2] = x, y, z
        nx = rot[0, 0] * x + rot[0, 1] * y + rot[0, 2] * z
        ny = rot[1, 0] * x + rot[1, 1] * y + rot[1, 2] * z
        nz = rot[2, 0] * x + rot[2, 1] * y + rot[2, 2] * z
        nw[v, 0], nw[v, 1], nw[v, 2] = nx, ny, nz
        sh[v, 0] = _A0C0
        sh[v, 1] = -_A1C1 * ny
        sh[v, 2] = _A1C1 * nz
        sh[v, 3] = -_A1C1 * nx
        sh[v, 4] = _A2C2 * nx * ny
        sh[v, 5] = -_A2C2 * ny * nz
        sh[v, 6] = _A2C2_7 * (3.0 * nz * nz - 1.0)
        sh[v, 7] = -_A2C2 * nx * nz
        sh[v, 8] = 0.5 * _A2C2 * (nx * nx - ny * ny)
        for ch in range(3):
            acc = 0.0
            for k in range(9):
                acc += gam[ch, k] * sh[v, k]
            shade[v, ch] = acc
            color[v, ch] = albedo[v, ch] * acc
        for a in range(3):
            wv = rot[a, 0] * s[v, 0] + rot[a, 1] * s[v, 1] + rot[a, 2] * s[v, 2] + trans[a]
            cam[v, a] = distance - wv if a == 2 else wv


@njit(cache=True, nogil=True, inline="always")
def _ray_barycentrics(cam, tri, rx, ry, vs, bc):
    """The perspective-correct barycentrics of the ray ``(rx, ry, 1)`` in triangle ``tri`` of ``cam`` ``(M, 3)``, as
    the CPU rasteriser computes them (``b_i = e_i / sum e``, ``e_i = r . (V_j x V_k)``, :func:`ray_triple`): the
    triangle's vertices into ``vs`` (3, 3), the barycentrics into ``bc`` (3,); returns ``1 / sum e``."""
    for m in range(3):
        for c in range(3):
            vs[m, c] = cam[tri[m], c]
    for m in range(3):
        j, k = (m + 1) % 3, (m + 2) % 3
        bc[m] = ray_triple(rx, ry, vs[j, 0], vs[j, 1], vs[j, 2], vs[k, 0], vs[k, 1], vs[k, 2])
    inv = 1.0 / (bc[0] + bc[1] + bc[2])
    for m in range(3):
        bc[m] *= inv
    return inv


@njit(cache=True, nogil=True)
def _photo_kernel(cam, color, pix_tris, rays, target, weight, scale, g_cam, g_color):
    """``sum_p weight_p sqrt(1e-6 + |c_p - I_p|^2)`` over the selected pixels, ``c_p`` the colour interpolated with
    the perspective-correct barycentrics of the pixel's ray ``(rx, ry, 1)`` in its triangle (``b_i = e_i / sum e``,
    ``e_0 = r . (V_1 x V_2)``, the CPU rasteriser's formula); accumulates ``scale`` x its gradient into ``g_cam``
    and ``g_color`` ``(M, 3)``."""
    total = 0.0
    vs = np.empty((3, 3))
    e = np.empty(3)
    gb = np.empty(3)
    for p in range(pix_tris.shape[0]):
        rx, ry = rays[p, 0], rays[p, 1]
        inv = _ray_barycentrics(cam, pix_tris[p], rx, ry, vs, e)
        i0, i1, i2 = pix_tris[p, 0], pix_tris[p, 1], pix_tris[p, 2]
        r0 = e[0] * color[i0, 0] + e[1] * color[i1, 0] + e[2] * color[i2, 0] - target[p, 0]
        r1 = e[0] * color[i0, 1] + e[1] * color[i1, 1] + e[2] * color[i2, 1] - target[p, 1]
        r2 = e[0] * color[i0, 2] + e[1] * color[i1, 2] + e[2] * color[i2, 2] - target[p, 2]
        dist = math.sqrt(1e-6 + r0 * r0 + r1 * r1 + r2 * r2)
        total += weight[p] * dist
        g = scale * weight[p] / dist
        g0, g1, g2 = g * r0, g * r1, g * r2
        mean = 0.0
        for m in range(3):
            v = pix_tris[p, m]
            g_color[v, 0] += e[m] * g0
            g_color[v, 1] += e[m] * g1
            g_color[v, 2] += e[m] * g2
            gb[m] = g0 * color[v, 0] + g1 * color[v, 1] + g2 * color[v, 2]
            mean += gb[m] * e[m]
        for m in range(3):
            ge = (gb[m] - mean) * inv
            j, k = (m + 1) % 3, (m + 2) % 3
            vj, vk = pix_tris[p, j], pix_tris[p, k]
            # d e_m / d V_j = V_k x r ; d e_m / d V_k = r x V_j  (r = (rx, ry, 1))
            g_cam[vj, 0] += ge * (vs[k, 1] - vs[k, 2] * ry)
            g_cam[vj, 1] += ge * (vs[k, 2] * rx - vs[k, 0])
            g_cam[vj, 2] += ge * (vs[k, 0] * ry - vs[k, 1] * rx)
            g_cam[vk, 0] += ge * (ry * vs[j, 2] - vs[j, 1])
            g_cam[vk, 1] += ge * (vs[j, 0] - rx * vs[j, 2])
            g_cam[vk, 2] += ge * (rx * vs[j, 1] - ry * vs[j, 0])
    return total


@njit(cache=True, nogil=True)
def _shade_backward(g_cam, g_color, s, tris, pb, rot, albedo, gam, fn, fnorm, n, vnorm, sh, shade,
                    g_s, g_rot, g_trans, g_albedo, g_gam, g_fn):
    """Backward of :func:`_shade_forward` from ``g_cam`` and ``g_color`` ``(M, 3)``: accumulates the shape
    ``g_s`` ``(M2, 3)``, rotation ``g_rot`` (3, 3), translation, albedo ``(M, 3)`` and light ``(3, 9)`` gradients
    (``g_fn`` ``(T, 3)``: workspace)."""
    n_tri = tris.shape[0]
    g_fn[:] = 0.0
    gy = np.empty(9)
    gw = np.empty(3)
    gn = np.empty(3)
    gnw = np.empty(3)
    for v in range(pb.shape[0]):
        # camera (x, y, distance - z) of R s + t
        gw[0], gw[1], gw[2] = g_cam[v, 0], g_cam[v, 1], -g_cam[v, 2]
        for a in range(3):
            g_trans[a] += gw[a]
            for c in range(3):
                g_rot[a, c] += gw[a] * s[v, c]
                g_s[v, c] += rot[a, c] * gw[a]
        # colour = albedo * (gam . Y(R n))
        gy[:] = 0.0
        for ch in range(3):
            g_albedo[v, ch] += g_color[v, ch] * shade[v, ch]
            gsh = g_color[v, ch] * albedo[v, ch]
            for k in range(9):
                g_gam[ch, k] += gsh * sh[v, k]
                gy[k] += gsh * gam[ch, k]
        nx, ny, nz = (rot[0, 0] * n[v, 0] + rot[0, 1] * n[v, 1] + rot[0, 2] * n[v, 2],
                      rot[1, 0] * n[v, 0] + rot[1, 1] * n[v, 1] + rot[1, 2] * n[v, 2],
                      rot[2, 0] * n[v, 0] + rot[2, 1] * n[v, 1] + rot[2, 2] * n[v, 2])
        gnw[0] = -_A1C1 * gy[3] + _A2C2 * ny * gy[4] - _A2C2 * nz * gy[7] + _A2C2 * nx * gy[8]
        gnw[1] = -_A1C1 * gy[1] + _A2C2 * nx * gy[4] - _A2C2 * nz * gy[5] - _A2C2 * ny * gy[8]
        gnw[2] = _A1C1 * gy[2] - _A2C2 * ny * gy[5] + 6.0 * _A2C2_7 * nz * gy[6] - _A2C2 * nx * gy[7]
        gn[:] = 0.0
        for a in range(3):
            for c in range(3):
                g_rot[a, c] += gnw[a] * n[v, c]
                gn[c] += rot[a, c] * gnw[a]
        # n = normalize(sum of the incident unit face normals)
        ln = vnorm[v]
        dot = gn[0] * n[v, 0] + gn[1] * n[v, 1] + gn[2] * n[v, 2]
        if ln > _EPS:
            gv = ((gn[0] - n[v, 0] * dot) / ln, (gn[1] - n[v, 1] * dot) / ln, (gn[2] - n[v, 2] * dot) / ln)
        else:
            gv = (gn[0] / _EPS, gn[1] / _EPS, gn[2] / _EPS)
        for q in range(pb.shape[1]):
            f = pb[v, q]
            if f < n_tri:
                g_fn[f, 0] += gv[0]
                g_fn[f, 1] += gv[1]
                g_fn[f, 2] += gv[2]
    for f in range(n_tri):
        ln = fnorm[f]
        dot = g_fn[f, 0] * fn[f, 0] + g_fn[f, 1] * fn[f, 1] + g_fn[f, 2] * fn[f, 2]
        if ln > _EPS:
            gcx, gcy, gcz = ((g_fn[f, 0] - fn[f, 0] * dot) / ln, (g_fn[f, 1] - fn[f, 1] * dot) / ln,
                             (g_fn[f, 2] - fn[f, 2] * dot) / ln)
        else:
            gcx, gcy, gcz = g_fn[f, 0] / _EPS, g_fn[f, 1] / _EPS, g_fn[f, 2] / _EPS
        i, j, k = tris[f, 0], tris[f, 1], tris[f, 2]
        ax, ay, az = s[i, 0] - s[j, 0], s[i, 1] - s[j, 1], s[i, 2] - s[j, 2]
        bx, by, bz = s[j, 0] - s[k, 0], s[j, 1] - s[k, 1], s[j, 2] - s[k, 2]
        # c = a x b: dL/da = b x g, dL/db = g x a
        gax, gay, gaz = by * gcz - bz * gcy, bz * gcx - bx * gcz, bx * gcy - by * gcx
        gbx, gby, gbz = gcy * az - gcz * ay, gcz * ax - gcx * az, gcx * ay - gcy * ax
        g_s[i, 0] += gax
        g_s[i, 1] += gay
        g_s[i, 2] += gaz
        g_s[j, 0] += gbx - gax
        g_s[j, 1] += gby - gay
        g_s[j, 2] += gbz - gaz
        g_s[k, 0] -= gbx
        g_s[k, 1] -= gby
        g_s[k, 2] -= gbz


@njit(cache=True, nogil=True)
def _landmark_kernel(geo, mean, basis, rot, trans, target, weight, fx, fy, cx, cy, distance, scale, g_geo, g_rot,
                     g_trans, s, g_s):
    """``scale * sum_n w_n |proj(R s_n + t) - l_n|^2`` (``losses.landmark_loss`` of one image) with ``s = mean +
    geo . basis`` (``basis`` ``(K, 68 * 3)``), and its gradient, accumulated into ``g_geo`` ``(K,)``, ``g_rot``,
    ``g_trans`` (``s``, ``g_s`` ``(68, 3)``: workspace)."""
    n_pts = mean.shape[0]
    for p in range(n_pts):
        for c in range(3):
            s[p, c] = mean[p, c]
            g_s[p, c] = 0.0
    for k in range(geo.shape[0]):
        gk = geo[k]
        for p in range(n_pts):
            for c in range(3):
                s[p, c] += gk * basis[k, 3 * p + c]
    total = 0.0
    for p in range(n_pts):
        wx = rot[0, 0] * s[p, 0] + rot[0, 1] * s[p, 1] + rot[0, 2] * s[p, 2] + trans[0]
        wy = rot[1, 0] * s[p, 0] + rot[1, 1] * s[p, 1] + rot[1, 2] * s[p, 2] + trans[1]
        wz = rot[2, 0] * s[p, 0] + rot[2, 1] * s[p, 1] + rot[2, 2] * s[p, 2] + trans[2]
        d = distance - wz
        ru = fx * wx / d + cx - target[p, 0]
        rv = fy * wy / d + cy - target[p, 1]
        total += weight[p] * (ru * ru + rv * rv)
        gu, gv = 2.0 * scale * weight[p] * ru, 2.0 * scale * weight[p] * rv
        gw = (gu * fx / d, gv * fy / d, (gu * fx * wx + gv * fy * wy) / (d * d))
        for a in range(3):
            g_trans[a] += gw[a]
            for c in range(3):
                g_rot[a, c] += gw[a] * s[p, c]
                g_s[p, c] += rot[a, c] * gw[a]
    for k in range(geo.shape[0]):
        acc = 0.0
        for p in range(n_pts):
            for c in range(3):
                acc += basis[k, 3 * p + c] * g_s[p, c]
        g_geo[k] += acc
    return scale * total


@njit(cache=True, nogil=True)
def _select_kernel(pixels, pix_verts, bary, face_mask, occluded, photo, skin, size, fx, fy, cx, cy):
    """The covered pixels in the region: interpolated ``face_mask`` over 0.5 and nothing else of the head in front.
    Returns their triangles' vertices ``(P, 3)``, rays ``(P, 2)``, photo colours ``(P, 3)``, skin weights ``(P,)``."""
    keep = np.zeros(pixels.shape[0], np.bool_)
    count = 0
    for p in range(pixels.shape[0]):
        area = (bary[p, 0] * face_mask[pix_verts[p, 0]] + bary[p, 1] * face_mask[pix_verts[p, 1]]
                + bary[p, 2] * face_mask[pix_verts[p, 2]])
        if area > 0.5 and not occluded[pixels[p]]:
            keep[p] = True
            count += 1
    verts = np.empty((count, 3), np.int64)
    rays = np.empty((count, 2))
    colours = np.empty((count, 3))
    weights = np.empty(count)
    q = 0
    for p in range(pixels.shape[0]):
        if keep[p]:
            i = pixels[p]
            row, col = i // size, i % size
            for c in range(3):
                verts[q, c] = pix_verts[p, c]
                colours[q, c] = photo[c, i]
            rays[q, 0] = (col + 0.5 - cx) / fx
            rays[q, 1] = (size - 0.5 - row - cy) / fy
            weights[q] = skin[i]
            q += 1
    return verts, rays, colours, weights


@njit(cache=True, nogil=True)
def _appearance_system(cam, color, shade, albedo, mean_albedo, basis, sh, pix_tris, rays, target, weight, scale,
                       want_tex, jac_tex, res_tex, h_light, rhs_light):
    """The normal equations of one appearance block with the geometry fixed, for the L2,1 term's reweighted
    quadratic majoriser ``sum_p u_p / 2 |c_p - I_p|^2`` with ``u_p = scale weight_p / |c_p - I_p|`` at the current
    colours. ``want_tex``: the colour is ``const + J . tex`` (``basis`` ``(M, 3, K)`` vertex-major); rows ``3 p + ch``
    of ``sqrt(u) J`` into ``jac_tex`` and of ``sqrt(u) (const - I)`` into ``res_tex``. Else per channel the colour is
    ``G . gamma_ch`` (ambient included): ``sum u G G^T`` (upper triangle) into ``h_light`` (3, 9, 9), ``sum u G I``
    into ``rhs_light``."""
    bc = np.empty(3)
    vs = np.empty((3, 3))
    gl = np.empty(9)
    n_basis = basis.shape[2]
    for p in range(pix_tris.shape[0]):
        _ray_barycentrics(cam, pix_tris[p], rays[p, 0], rays[p, 1], vs, bc)
        sq = 0.0
        for ch in range(3):
            r = -target[p, ch]
            for m in range(3):
                r += bc[m] * color[pix_tris[p, m], ch]
            sq += r * r
        u = scale * weight[p] / math.sqrt(1e-6 + sq)
        su = math.sqrt(u)
        for ch in range(3):
            if want_tex:
                row = 3 * p + ch
                v0, v1, v2 = pix_tris[p, 0], pix_tris[p, 1], pix_tris[p, 2]
                f0, f1, f2 = bc[0] * shade[v0, ch], bc[1] * shade[v1, ch], bc[2] * shade[v2, ch]
                c0 = f0 * mean_albedo[v0, ch] + f1 * mean_albedo[v1, ch] + f2 * mean_albedo[v2, ch]
                f0, f1, f2 = f0 * su, f1 * su, f2 * su
                for q in range(n_basis):
                    jac_tex[row, q] = f0 * basis[v0, ch, q] + f1 * basis[v1, ch, q] + f2 * basis[v2, ch, q]
                res_tex[row] = su * (c0 - target[p, ch])
            else:
                gl[:] = 0.0
                for m in range(3):
                    v = pix_tris[p, m]
                    f = bc[m] * albedo[v, ch]
                    for q in range(9):
                        gl[q] += f * sh[v, q]
                for q in range(9):
                    ug = u * gl[q]
                    rhs_light[ch, q] += ug * target[p, ch]
                    for t in range(q, 9):  # the upper triangle; mirrored by the caller
                        h_light[ch, q, t] += ug * gl[t]


@njit(cache=True, nogil=True, fastmath=True)
def _combine(coef, basis, out):  # pragma: no cover
    """``out = float32(coef) @ basis`` (``basis`` ``(K, D)`` float32, ``out`` ``(D,)`` float32): a basis
    combination, one thread."""
    out[:] = 0.0
    for k in range(basis.shape[0]):
        c = np.float32(coef[k])
        for j in range(basis.shape[1]):
            out[j] += c * basis[k, j]


@njit(cache=True, nogil=True, fastmath=True)
def _project(basis, vec, out):  # pragma: no cover
    """``out = basis @ float32(vec)`` (``(K, D)`` float32 by ``(D,)``, into ``(K,)`` float64): a gradient onto the
    coefficients, one thread."""
    for k in range(basis.shape[0]):
        s = np.float32(0.0)
        for j in range(basis.shape[1]):
            s += basis[k, j] * np.float32(vec[j])
        out[k] = s


_GROUPS = ("id", "exp", "tex", "angle", "gamma", "trans")


class State:
    """The parameters as float64 NumPy arrays (``id`` and ``tex`` one row when ``share``, else ``(B, K)``), what
    the engine's Adam moves."""

    def __init__(self, values: Mapping[str, np.ndarray], share: bool) -> None:
        self.share = share
        self.values = {k: np.array(values[k], np.float64) for k in _GROUPS}  # copies
        self.nb = int(self.values["exp"].shape[0])

    def zeros(self) -> dict[str, np.ndarray]:
        return {k: np.zeros_like(v) for k, v in self.values.items()}

    def row(self, name: str, b: int) -> np.ndarray:
        return self.values[name][0 if self.share and name in ("id", "tex") else b]

    def geo(self, b: int) -> np.ndarray:
        return np.concatenate([self.row("id", b), self.values["exp"][b]])


class _NpAdam:
    """:class:`facerecon.adam.Adam`'s update (``torch.optim.Adam``'s defaults) on :class:`State`'s arrays."""

    def __init__(self, groups: list[tuple[tuple[str, ...], float]], beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.groups, self.beta1, self.beta2, self.eps = groups, beta1, beta2, eps
        self.moments: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.count = 0

    def step(self, state: State, grads: dict[str, np.ndarray]) -> None:
        self.count += 1
        c1, c2 = 1.0 - self.beta1**self.count, math.sqrt(1.0 - self.beta2**self.count)
        for names, lr in self.groups:
            for k in names:
                g = grads[k]
                if k not in self.moments:
                    self.moments[k] = (np.zeros_like(g), np.zeros_like(g))
                m, v = self.moments[k]
                m += (1.0 - self.beta1) * (g - m)
                v *= self.beta2
                v += (1.0 - self.beta2) * g * g
                state.values[k] -= (lr / c1) * m / (np.sqrt(v) / c2 + self.eps)


def reflectance_quadratic(mean_albedo: np.ndarray, albedo_basis: np.ndarray, skin_mask: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, float]:
    """``(Q, q, |a|^2)`` with ``sum_R (T - mean_R T)^2 = |a|^2 + 2 q . tex + tex Q tex`` over the skin vertices R,
    for ``T = mean + tex . B`` (``losses.reflectance_loss`` times B |R|); ``albedo_basis`` ``(K, 3N)``."""
    skin = np.flatnonzero(skin_mask)
    k = albedo_basis.shape[0]
    b_skin = albedo_basis.reshape(k, -1, 3)[:, skin].astype(np.float64)
    a_skin = mean_albedo[skin].astype(np.float64)
    c = (b_skin - b_skin.mean(axis=1, keepdims=True)).reshape(k, -1)
    a = (a_skin - a_skin.mean(axis=0, keepdims=True)).reshape(-1)
    return c @ c.T, c @ a, float(a @ a)


def _cols(v: np.ndarray) -> np.ndarray:
    """The ``(3 |v|,)`` columns of vertices ``v`` in a ``(K, 3N)`` basis."""
    return (v[:, None] * 3 + np.arange(3)).reshape(-1)


class FusedObjective:
    """The fit's objective with hand-written gradients on a face model's face region (module docstring); built once
    per face model (:meth:`cached`) and kept: the gathered bases are the buffers every fit reuses.

    Args:
        arrays: :data:`MODEL_ARRAYS` as NumPy, the bases ``(K, 3N)`` float32 (a ``FaceModel``'s buffers, or
            :class:`~facerecon.npdecode.NumpyDecoder`'s arrays with the model file's masks).
        k_id: identity coefficients (the rest of the shape basis is expression).
        camera: the crop camera.
    """

    _cache: ClassVar[weakref.WeakKeyDictionary[object, FusedObjective]] = weakref.WeakKeyDictionary()
    _lock: ClassVar[threading.Lock] = threading.Lock()
    key: tuple = ()

    @classmethod
    def cached(cls, owner: object, key: tuple, build: Callable[[], tuple[Mapping[str, np.ndarray], int, Camera]]
               ) -> FusedObjective:
        """The objective kept for ``owner`` (a face model; weakly referenced) while its ``key`` (what identifies its
        arrays and camera) is unchanged; else built from ``build()`` -> ``(arrays, k_id, camera)``."""
        with cls._lock:
            obj = cls._cache.get(owner)
            if obj is None or obj.key != key:
                obj = cls(*build())
                obj.key = key
                cls._cache[owner] = obj
        return obj

    def __init__(self, arrays: Mapping[str, np.ndarray], k_id: int, camera: Camera) -> None:
        self.camera, self.distance = camera, float(camera.distance)
        self.k_id = k_id
        mean_shape = np.ascontiguousarray(arrays["mean_shape"], np.float32).reshape(-1, 3)
        n = mean_shape.shape[0]
        id_basis = np.ascontiguousarray(arrays["id_basis"], np.float32).reshape(-1, 3 * n)
        exp_basis = np.ascontiguousarray(arrays["exp_basis"], np.float32).reshape(-1, 3 * n)
        albedo_basis = np.ascontiguousarray(arrays["albedo_basis"], np.float32).reshape(-1, 3 * n)
        mean_albedo = np.ascontiguousarray(arrays["mean_albedo"], np.float32).reshape(-1, 3)
        tri = np.asarray(arrays["triangles"], np.int64)
        n_tri = tri.shape[0]
        face = np.asarray(arrays["face_mask"]).astype(bool)
        touch = face[tri].any(axis=1)  # a pixel is in the region only on a triangle with a face_mask vertex
        used = np.unique(tri[touch])
        pb = np.asarray(arrays["point_buf"], np.int64)
        inc = np.unique(pb[used])
        inc = inc[inc < n_tri]
        verts = np.concatenate([used, np.setdiff1d(np.unique(tri[inc]), used)])  # the face first, then its ring
        local = np.full(n, -1, np.int64)
        local[verts] = np.arange(verts.size)
        tri_local = np.full(n_tri + 1, inc.size, np.int64)
        tri_local[inc] = np.arange(inc.size)
        self.n_face, self.n_ring = used.size, verts.size
        self.tris = np.ascontiguousarray(local[tri[inc]])
        self.pb = np.ascontiguousarray(tri_local[pb[used]])
        self.raster_tris = np.ascontiguousarray(local[tri[touch]])
        self.touch = touch
        self.face_mask = face[used].astype(np.float64)
        shape_basis = np.concatenate([id_basis, exp_basis])
        self.shape_basis = np.ascontiguousarray(shape_basis[:, _cols(verts)])  # (K, 3 M2) float32
        self.mean_shape = mean_shape[verts].astype(np.float64)
        self.albedo_basis = np.ascontiguousarray(albedo_basis[:, _cols(used)])  # (K_tex, 3 M) float32
        self.albedo_basis_vm = np.ascontiguousarray(
            self.albedo_basis.astype(np.float64).reshape(-1, used.size, 3).transpose(1, 2, 0))
        self.mean_albedo = mean_albedo[used].astype(np.float64)
        lm = np.asarray(arrays["landmarks68"], np.int64)
        self.lm_basis = shape_basis[:, _cols(lm)].astype(np.float64)
        self.lm_mean = mean_shape[lm].astype(np.float64)
        skin = np.asarray(arrays["skin_mask"]).astype(bool)
        self.refl_q, self.refl_a, self.refl_c0 = reflectance_quadratic(mean_albedo, albedo_basis, skin)
        self.n_skin = int(skin.sum())
        # the whole mesh, for the occlusion raster
        self.full_mean, self.full_basis, self.triangles = mean_shape, shape_basis, tri

    # -- the terms both stages share --------------------------------------------------------------------------
    def pose(self, st: State, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        angle = st.values["angle"][b]
        return rotation(angle), rotation_derivatives(angle), st.values["trans"][b]

    def landmarks(self, geo: np.ndarray, rot: np.ndarray, trans: np.ndarray, target: np.ndarray,
                  weight: np.ndarray, scale: float, g_geo: np.ndarray, g_rot: np.ndarray, g_trans: np.ndarray) -> float:
        intr = self.camera.intrinsics
        return _landmark_kernel(geo, self.lm_mean, self.lm_basis, rot, trans, target, weight, intr.fx, intr.fy,
                                intr.cx, intr.cy, self.distance, scale, g_geo, g_rot, g_trans, np.empty((68, 3)),
                                np.empty((68, 3)))

    def priors(self, st: State, w: LossWeights, grads: dict[str, np.ndarray], photometric: bool = True
               ) -> dict[str, float]:
        """The coefficient prior, and in the photometric stage albedo flatness and the gamma prior (the rest of
        ``hybrid_terms``): values (unweighted, as :class:`~facerecon.objective.Terms`) and weighted gradients."""
        v, nb = st.values, st.nb
        rep = nb if st.share else 1  # a shared row counts once per image, then / B
        coef = (w.coef_id * rep * (v["id"] ** 2).sum() + w.coef_exp * (v["exp"] ** 2).sum()
                + w.coef_tex * rep * (v["tex"] ** 2).sum()) / nb
        grads["id"] += (w.coef * 2.0 * w.coef_id * rep / nb) * v["id"]
        grads["exp"] += (w.coef * 2.0 * w.coef_exp / nb) * v["exp"]
        if not photometric:
            return {"coef": float(coef)}
        grads["tex"] += (w.coef * 2.0 * w.coef_tex * rep / nb) * v["tex"]
        tex = v["tex"]
        qt = tex @ self.refl_q
        refl = rep * (self.refl_c0 * tex.shape[0] + 2.0 * (tex @ self.refl_a).sum() + (qt * tex).sum())
        refl /= nb * self.n_skin
        grads["tex"] += (w.reflectance * 2.0 * rep / (nb * self.n_skin)) * (qt + self.refl_a)
        g = v["gamma"].reshape(nb, 3, 9)
        dev = g - g.mean(axis=1, keepdims=True)
        grads["gamma"] += (w.gamma * 2.0 / (nb * 27)) * dev.reshape(nb, 27)
        return {"coef": float(coef), "reflectance": float(refl), "gamma": float((dev**2).mean())}

    def add_pose_grads(self, grads: dict[str, np.ndarray], b: int, d_rot: np.ndarray, g_rot: np.ndarray,
                       g_trans: np.ndarray) -> None:
        grads["angle"][b] += (d_rot * g_rot[None]).sum(axis=(1, 2))
        grads["trans"][b] += g_trans

    def add_geo_grads(self, st: State, grads: dict[str, np.ndarray], b: int, g_geo: np.ndarray) -> None:
        grads["id"][0 if st.share else b] += g_geo[: self.k_id]
        grads["exp"][b] += g_geo[self.k_id:]

    def landmark_step(self, st: State, lm_target: np.ndarray, lm_weight: np.ndarray, w: LossWeights
                      ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """``landmark_terms(...).total(w)`` (value and gradient)."""
        grads = st.zeros()
        total = 0.0
        for b in range(st.nb):
            rot, d_rot, trans = self.pose(st, b)
            g_geo, g_rot, g_trans = np.zeros(self.lm_basis.shape[0]), np.zeros((3, 3)), np.zeros(3)
            total += self.landmarks(st.geo(b), rot, trans, lm_target[b], lm_weight[b], w.landmark / (68 * st.nb), g_geo,
                                    g_rot, g_trans)
            self.add_pose_grads(grads, b, d_rot, g_rot, g_trans)
            self.add_geo_grads(st, grads, b, g_geo)
        coef = self.priors(st, w, grads, photometric=False)["coef"]
        return {"loss": total + w.coef * coef, "landmark": total / w.landmark if w.landmark else 0.0}, grads


@dataclass(frozen=True)
class FusedTarget:
    """What the fused engine matches, for B aligned crops (NumPy; :class:`facerecon.fit.FitTarget`'s arrays).

    Attributes:
        image: ``(B, 3, 224, 224)`` float32 RGB in [0, 1].
        landmarks: ``(B, 68, 2)`` crop pixels, y up.
        skin: ``(B, 1, 224, 224)`` skin attention in [0, 1], or None for 1.
        landmark_weights: ``(68,)`` for every face or ``(B, 68)`` per face, or None for the reference weights.
    """

    image: np.ndarray
    landmarks: np.ndarray
    skin: np.ndarray | None = None
    landmark_weights: np.ndarray | None = None

    def lm_weight(self) -> np.ndarray:
        """``(B, 68)`` float64."""
        w = np.asarray(LANDMARK_WEIGHTS_68 if self.landmark_weights is None else self.landmark_weights, np.float64)
        return np.ascontiguousarray(np.broadcast_to(w.reshape(-1, 68), (len(self.landmarks), 68)))


def _pool(x: np.ndarray, k: int) -> np.ndarray:
    """``(B, C, H, W)`` -> ``(B, C, H / k, W / k)`` float64 box means (``avg_pool2d(x, k)``)."""
    b, c, h, w = x.shape
    x = x.astype(np.float64)
    return x if k == 1 else x.reshape(b, c, h // k, k, w // k, k).mean(axis=(3, 5))


class PhotometricStage:
    """One photometric stage of the fused objective: the pooled photo and skin map, the visibility and the buffers."""

    def __init__(self, obj: FusedObjective, st: State, target: FusedTarget, cfg: FitConfig) -> None:
        self.obj, self.st, self.cfg, self.w = obj, st, cfg, cfg.weights
        self.light_start = st.values["gamma"].copy()  # (B, 27): the light solves' ridge pulls towards it
        k = CROP // cfg.photo_size
        image = np.asarray(target.image)
        skin = np.ones_like(image[:, :1]) if target.skin is None else np.asarray(target.skin)
        b, s = image.shape[0], cfg.photo_size
        self.photo = _pool(image, k).reshape(b, 3, s * s)  # (B, 3, S*S)
        self.skin = _pool(skin, k).reshape(b, s * s)  # (B, S*S)
        self.intr = obj.camera.intrinsics.scaled(cfg.photo_size / CROP)
        self.lm_target = np.asarray(target.landmarks, np.float64)
        self.lm_weight = target.lm_weight()
        m, m2, nt = obj.n_face, obj.n_ring, obj.tris.shape[0]
        self.bufs = [{"fn": np.empty((nt, 3)), "fnorm": np.empty(nt), "n": np.empty((m, 3)), "vnorm": np.empty(m),
                      "nw": np.empty((m, 3)), "sh": np.empty((m, 9)), "shade": np.empty((m, 3)),
                      "color": np.empty((m, 3)), "cam": np.empty((m, 3))} for _ in range(st.nb)]
        self.work = {"g_cam": np.empty((m, 3)), "g_color": np.empty((m, 3)), "g_s": np.empty((m2, 3)),
                     "g_albedo": np.empty((m, 3)), "g_fn": np.empty((nt, 3)), "s": np.empty(3 * m2, np.float32),
                     "albedo": np.empty(3 * m, np.float32), "g_geo": np.empty(obj.shape_basis.shape[0]),
                     "g_tex": np.empty(obj.albedo_basis.shape[0])}
        self.pixels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.occluded = [self._occlusion(b) for b in range(st.nb)]

    def _occlusion(self, b: int) -> np.ndarray:
        """``(S*S,)`` bool: pixels where the whole mesh's nearest triangle is not one of the face's (the rest of the
        head in front of it), from the whole mesh's raster at the stage's start."""
        st, obj = self.st, self.obj
        flat = np.empty(obj.full_basis.shape[1], np.float32)
        _combine(st.geo(b), obj.full_basis, flat)
        shape = (obj.full_mean + flat.reshape(-1, 3)).astype(np.float64)
        rot, _, trans = obj.pose(st, b)
        # R s + t written out per axis (a (N, 3) x (3, 3) product through NumPy's BLAS would start its threads)
        cam = shape[:, :1] * rot[:, 0] + shape[:, 1:2] * rot[:, 1] + shape[:, 2:3] * rot[:, 2] + trans
        cam[:, 2] = obj.distance - cam[:, 2]
        tid = rasterize_arrays(cam, obj.triangles, self.intr)[0].reshape(-1)
        return (tid >= 0) & ~obj.touch[np.maximum(tid, 0)]

    def _select(self, b: int, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        _, pix, pv, bary = rasterize_arrays(cam, self.obj.raster_tris, self.intr)
        i = self.intr
        return _select_kernel(pix, pv, bary, self.obj.face_mask, self.occluded[b], self.photo[b], self.skin[b],
                              self.cfg.photo_size, i.fx, i.fy, i.cx, i.cy)

    def _shape(self, geo: np.ndarray) -> np.ndarray:
        """The face's (and its ring's) un-posed vertices ``(M2, 3)`` float64 for shape coefficients ``geo``."""
        _combine(geo, self.obj.shape_basis, self.work["s"])
        return self.obj.mean_shape + self.work["s"].reshape(-1, 3)

    def _albedo(self, tex: np.ndarray) -> np.ndarray:
        """The face's albedo ``(M, 3)`` float64 for albedo coefficients ``tex``."""
        _combine(tex, self.obj.albedo_basis, self.work["albedo"])
        return self.obj.mean_albedo + self.work["albedo"].reshape(-1, 3)

    def _forward(self, refresh: bool) -> tuple[list[tuple], float]:
        """Shape, albedo, shading and camera positions of every image into its buffers (and the region's pixels
        when ``refresh``); returns each image's inputs to the backward and the photometric normaliser."""
        obj, st = self.obj, self.st
        refresh = refresh or not self.pixels
        poses = []
        for b in range(st.nb):
            geo = st.geo(b)
            s = self._shape(geo)
            albedo = self._albedo(st.row("tex", b))
            gam = st.values["gamma"][b].reshape(3, 9).copy()
            gam[:, 0] += INIT_LIGHT
            rot, d_rot, trans = obj.pose(st, b)
            buf = self.bufs[b]
            _shade_forward(s, obj.tris, obj.pb, rot, trans, albedo, gam, obj.distance, buf["fn"], buf["fnorm"],
                           buf["n"], buf["vnorm"], buf["nw"], buf["sh"], buf["shade"], buf["color"], buf["cam"])
            poses.append((geo, s, albedo, gam, rot, d_rot, trans))
            if refresh:
                if len(self.pixels) <= b:
                    self.pixels.append(self._select(b, buf["cam"]))
                else:
                    self.pixels[b] = self._select(b, buf["cam"])
        return poses, max(sum(float(px[3].sum()) for px in self.pixels), 1.0)

    def step(self, step: int, solve: bool = False) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """The photometric stage's total loss (``hybrid_terms(...).total(w)``) and its gradient; with ``solve``,
        light and albedo are first solved for with the rest fixed (:meth:`_solve_appearance`)."""
        obj, st, w = self.obj, self.st, self.w
        grads = st.zeros()
        poses, norm = self._forward(step % self.cfg.refresh_every == 0)
        if solve:
            self._solve_appearance(poses, norm)
        photo = landmark = 0.0
        wk = self.work
        for b in range(st.nb):
            geo, s, albedo, gam, rot, d_rot, trans = poses[b]
            buf, (pv, rays, colours, weight) = self.bufs[b], self.pixels[b]
            for key in ("g_cam", "g_color", "g_s", "g_albedo"):
                wk[key].fill(0.0)
            photo += _photo_kernel(buf["cam"], buf["color"], pv, rays, colours, weight, w.photo / norm,
                                   wk["g_cam"], wk["g_color"]) / norm
            g_rot, g_trans, g_gam = np.zeros((3, 3)), np.zeros(3), np.zeros((3, 9))
            _shade_backward(wk["g_cam"], wk["g_color"], s, obj.tris, obj.pb, rot, albedo, gam, buf["fn"],
                            buf["fnorm"], buf["n"], buf["vnorm"], buf["sh"], buf["shade"], wk["g_s"], g_rot, g_trans,
                            wk["g_albedo"], g_gam, wk["g_fn"])
            g_geo = wk["g_geo"]  # overwritten by the projection, then the landmark term adds to it
            _project(obj.shape_basis, wk["g_s"].reshape(-1), g_geo)
            landmark += obj.landmarks(geo, rot, trans, self.lm_target[b], self.lm_weight[b], w.landmark / (68 * st.nb),
                                      g_geo, g_rot, g_trans)
            obj.add_geo_grads(st, grads, b, g_geo)
            obj.add_pose_grads(grads, b, d_rot, g_rot, g_trans)
            _project(obj.albedo_basis, wk["g_albedo"].reshape(-1), wk["g_tex"])
            grads["tex"][0 if st.share else b] += wk["g_tex"]
            grads["gamma"][b] += g_gam.reshape(-1)
        pri = obj.priors(st, w, grads)
        total = (w.photo * photo + landmark + w.coef * pri["coef"] + w.reflectance * pri["reflectance"]
                 + w.gamma * pri["gamma"])
        return {"loss": total, "photo": photo, "landmark": landmark / w.landmark if w.landmark else 0.0}, grads

    def _solve_appearance(self, poses: list[tuple], norm: float) -> None:
        """Light, then albedo, each set to the minimum with everything else fixed of the L2,1 term's
        iteratively-reweighted quadratic majoriser (weights ``m_p / (M |r_p|)`` at the current residuals) plus the
        quadratic priors on it (coefficient, albedo flatness, gamma): exact block steps that never raise the loss
        (the colours are linear in either given the other). Updates the buffers' shading and colours."""
        obj, st, w = self.obj, self.st, self.w
        nb, rep = st.nb, (st.nb if st.share else 1)
        k_tex = obj.albedo_basis_vm.shape[2]
        prior = (2.0 * w.gamma / (27 * nb)) * np.kron(np.eye(3) - 1.0 / 3.0, np.eye(9))
        scale = w.photo / norm
        no_tex, no_res = np.empty((0, k_tex), np.float32), np.empty(0, np.float32)
        for b in range(nb):  # light, per image
            buf, (pv, rays, colours, weight) = self.bufs[b], self.pixels[b]
            h, rhs = np.zeros((3, 9, 9)), np.zeros((3, 9))
            _appearance_system(buf["cam"], buf["color"], buf["shade"], poses[b][2], obj.mean_albedo,
                               obj.albedo_basis_vm, buf["sh"], pv, rays, colours, weight, scale, False, no_tex,
                               no_res, h, rhs)
            a = prior.copy()
            for ch in range(3):
                a[ch * 9:(ch + 1) * 9, ch * 9:(ch + 1) * 9] += np.triu(h[ch]) + np.triu(h[ch], 1).T
            start = self.light_start[b].reshape(3, 9).copy()
            start[:, 0] += INIT_LIGHT
            mu = light_prior(a, self.cfg.light_prior)
            gam = np.linalg.solve(a + mu * np.eye(27), rhs.reshape(-1) + mu * start.reshape(-1)).reshape(3, 9)
            _shade_product(buf["sh"], gam, buf["shade"])
            np.multiply(poses[b][2], buf["shade"], out=buf["color"])
            gam[:, 0] -= INIT_LIGHT
            st.values["gamma"][b] = gam.reshape(-1)
        systems: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for b in range(nb):  # albedo, per image or shared
            buf, (pv, rays, colours, weight) = self.bufs[b], self.pixels[b]
            jac, res = np.empty((3 * pv.shape[0], k_tex), np.float32), np.empty(3 * pv.shape[0], np.float32)
            _appearance_system(buf["cam"], buf["color"], buf["shade"], poses[b][2], obj.mean_albedo,
                               obj.albedo_basis_vm, buf["sh"], pv, rays, colours, weight, scale, True, jac, res,
                               np.empty((0, 9, 9)), np.empty((0, 9)))
            # the Gram matrix through BLAS (a (3P, K) x (K, 3P) product: threads do not cost here, unlike a gemv)
            h, g = (jac.T @ jac).astype(np.float64), (jac.T @ res).astype(np.float64)
            row = 0 if st.share else b
            h0, g0 = systems.get(row, (0.0, 0.0))
            systems[row] = (h0 + h, g0 + g)
        refl = 2.0 * w.reflectance * rep / (nb * obj.n_skin)
        for row, (h, g) in systems.items():
            h = h + (2.0 * w.coef * w.coef_tex * rep / nb) * np.eye(k_tex) + refl * obj.refl_q
            st.values["tex"][row] = np.linalg.solve(h, -(g + refl * obj.refl_a))
        for b in range(nb):
            albedo = self._albedo(st.row("tex", b))
            np.multiply(albedo, self.bufs[b]["shade"], out=self.bufs[b]["color"])
            gam = st.values["gamma"][b].reshape(3, 9).copy()
            gam[:, 0] += INIT_LIGHT
            poses[b] = (*poses[b][:2], albedo, gam, *poses[b][4:])


@njit(cache=True, nogil=True)
def _shade_product(sh, gam, out):  # pragma: no cover
    """``out = sh @ gam.T`` (``(M, 9)`` by ``(3, 9)``): the shading of every vertex for a light."""
    for i in range(sh.shape[0]):
        for c in range(3):
            s = 0.0
            for q in range(9):
                s += sh[i, q] * gam[c, q]
            out[i, c] = s


def fit_arrays(obj: FusedObjective, start: Mapping[str, np.ndarray], share: bool, target: FusedTarget,
               cfg: FitConfig, photometric: bool, history: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Both stages of the fit (the schedule of :func:`facerecon.fit.fit`) on the fused objective, from ``start``
    (float64 groups; ``id`` and ``tex`` one row when ``share``); returns the fitted groups (the same shapes) and
    appends one entry per step to ``history``."""
    st = State(start, share)
    lm_target, lm_weight = np.asarray(target.landmarks, np.float64), target.lm_weight()
    opt = _NpAdam([(("angle", "trans"), cfg.lr_pose), (("id", "exp"), cfg.lr_shape)])
    stall = Stall(cfg.stall_steps, cfg.stall_tol)
    for _ in range(cfg.landmark_steps):
        terms, grads = obj.landmark_step(st, lm_target, lm_weight, cfg.weights)
        opt.step(st, grads)
        history.append({"stage": 1.0, **terms})
        if stall.stalled(terms["loss"]):
            break
    if photometric:
        stage = PhotometricStage(obj, st, target, cfg)
        opt = _NpAdam([(("angle", "trans"), cfg.lr_pose * 0.3), (("id", "exp"), cfg.lr_shape),
                       (("tex",), cfg.lr_albedo), (("gamma",), cfg.lr_light)])
        stall = Stall(cfg.stall_steps, cfg.stall_tol)
        for step in range(cfg.photo_steps):
            terms, grads = stage.step(step, solves(cfg, step))
            opt.step(st, grads)
            history.append({"stage": 2.0, **terms, "step": float(step)})
            if stall.stalled(terms["loss"]):
                break
    return st.values


def start_values(init: CoefficientArrays, share: bool) -> dict[str, np.ndarray]:
    """The fit's starting groups from ``init``: float32 values as float64, a set's identity and albedo their mean
    (in float32, as :func:`facerecon.fit.fit` takes it)."""
    out = {k: np.asarray(v, np.float32) for k, v in init._asdict().items()}
    if share:
        for k in ("id", "tex"):
            out[k] = out[k].mean(axis=0, keepdims=True, dtype=np.float32)
    return {k: v.astype(np.float64) for k, v in out.items()}


def fit_numpy(obj: FusedObjective, decoder: NumpyDecoder, target: FusedTarget, init: Coefficients | None = None,
              config: FitConfig | None = None, photometric: bool = True) -> FitResult:
    """:func:`facerecon.fit.fit` without torch: the fused engine on NumPy coefficients (``init`` NumPy, or None for
    the mean face), landmark errors by ``decoder``; the result's coefficients are NumPy float32."""
    cfg = config or FitConfig()
    t0 = time.perf_counter()
    b = int(target.image.shape[0])
    layout = decoder.layout
    if init is None:
        init = Coefficients.from_vector(np.zeros((b, layout.total), np.float32), layout)
        cfg = replace(cfg, landmark_steps=cfg.landmark_steps_from_mean)
    share = cfg.share_identity
    start = start_values(init.arrays(), share)
    start_c = _coefficients(start, b)
    err_start = _landmark_error(decoder.landmarks(start_c), target.landmarks)
    history: list[dict[str, float]] = []
    values = fit_arrays(obj, start, share, target, cfg, photometric and cfg.photo_steps > 0, history)
    final = _coefficients(values, b)
    err_end = _landmark_error(decoder.landmarks(final), target.landmarks)
    return FitResult(final, err_start, err_end, history, time.perf_counter() - t0)


def _coefficients(values: Mapping[str, np.ndarray], b: int) -> Coefficients:
    """Float32 NumPy coefficients of ``values`` (a shared row repeated for the batch)."""
    return Coefficients(*(np.ascontiguousarray(np.broadcast_to(values[k].astype(np.float32),
                                                               (b, values[k].shape[1]))) for k in _GROUPS))


def _landmark_error(pred: np.ndarray, target: np.ndarray) -> list[float]:
    """Per-image mean Euclidean landmark error in crop pixels."""
    return np.linalg.norm(np.asarray(pred, np.float64) - np.asarray(target, np.float64), axis=-1).mean(-1).tolist()


def warmup() -> float:
    """Compile (or load from numba's on-disk cache) the fused engine's kernels on a one-triangle problem, so the
    first fit does not pay for it (``python -m facerecon.warmup`` at install time); returns the seconds it took."""
    start = time.perf_counter()
    s = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]])
    tris = np.array([[0, 1, 2]], np.int64)
    pb = np.array([[0, 1], [0, 1], [0, 1]], np.int64)  # 1 = the padding triangle
    rot = rotation(np.zeros(3))
    trans, gam, albedo = np.zeros(3), np.full((3, 9), 0.1), np.full((3, 3), 0.5)
    fn, fnorm, n, vnorm = np.empty((1, 3)), np.empty(1), np.empty((3, 3)), np.empty(3)
    nw, sh, shade, color, cam = np.empty((3, 3)), np.empty((3, 9)), np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3))
    _shade_forward(s, tris, pb, rot, trans, albedo, gam, 10.0, fn, fnorm, n, vnorm, nw, sh, shade, color, cam)
    pix, rays, target, weight = tris.copy(), np.full((1, 2), 0.003), np.full((1, 3), 0.4), np.ones(1)
    g_cam, g_color, g_s = np.zeros((3, 3)), np.zeros((3, 3)), np.zeros((3, 3))
    _photo_kernel(cam, color, pix, rays, target, weight, 1.0, g_cam, g_color)
    _shade_backward(g_cam, g_color, s, tris, pb, rot, albedo, gam, fn, fnorm, n, vnorm, sh, shade, g_s,
                    np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3)), np.zeros((3, 9)), np.zeros((1, 3)))
    basis = np.zeros((3, 3, 2))
    _appearance_system(cam, color, shade, albedo, albedo, basis, sh, pix, rays, target, weight, 1.0, True,
                       np.empty((3, 2), np.float32), np.empty(3, np.float32), np.empty((0, 9, 9)), np.empty((0, 9)))
    _appearance_system(cam, color, shade, albedo, albedo, basis, sh, pix, rays, target, weight, 1.0, False,
                       np.empty((0, 2), np.float32), np.empty(0, np.float32), np.zeros((3, 9, 9)), np.zeros((3, 9)))
    lm = np.zeros((68, 3))
    _landmark_kernel(np.zeros(2), lm, np.zeros((2, 204)), rot, trans, np.zeros((68, 2)), np.ones(68), 1015.0,
                     1015.0, 112.0, 112.0, 10.0, 1.0, np.zeros(2), np.zeros((3, 3)), np.zeros(3), np.empty((68, 3)),
                     np.empty((68, 3)))
    _select_kernel(np.zeros(1, np.int64), pix, np.full((1, 3), 1 / 3), np.ones(3), np.zeros(4, np.bool_),
                   np.zeros((3, 4)), np.ones(4), 2, 1015.0, 1015.0, 1.0, 1.0)
    flat32, basis32 = np.empty(4, np.float32), np.zeros((2, 4), np.float32)
    _combine(np.zeros(2), basis32, flat32)
    _project(basis32, np.zeros(4), np.empty(2))
    _shade_product(sh, gam, shade)
    rasterize_arrays(s + np.array([0.0, 0.0, 10.0]), tris, Intrinsics(1015.0, 1015.0, 2.0, 2.0, 4, 4))  # float64
    elapsed = time.perf_counter() - start
    log.debug("fit kernels ready in %.3f s", elapsed)
    return elapsed
