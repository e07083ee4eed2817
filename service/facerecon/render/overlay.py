"""Images for people: the shaded face composited over the photo, a plain grey geometry view, and PNG writing.

The overlay (:func:`overlay_on_photo`, ``antialias="edge"``, the default) renders only the pixel window around the
projected face, at the face's scale: the window's own size, or at most :data:`MAX_OVERLAY_RENDER` px on its long
side for a large face (the mesh's vertices are ~4 px apart on a face in a 1080-px photo, so the shading loses
nothing), and composites that window alone. Only the edges are antialiased: a render at the window's size gets a
3 x 3 box filter at the silhouette's pixels and at occlusion edges inside it (eyelids, nostrils, lips); a smaller
render is upsampled bilinearly, which ramps every edge over one render pixel. ~10-15 ms for a face in a 1080-px
photo on the shared 2-core machine, where the former path (``antialias="supersample"``: the whole window at 2 x and
box-averaged, kept as the reference) takes ~130-200 ms; the two differ by ~1 level (0-255) on average, along the
edges only. :func:`shaded_geometry` supersamples (the reference has no antialiasing, reference.md section 16,
pitfall 3).

PNG: :func:`encode_png` writes the ``up`` filter and zlib level 1 (a photo-sized overlay in ~25 ms at 1.2 MP, smaller
than Pillow's level 1, which filters adaptively and takes twice as long).

Frames: ``vertices_cam`` are camera-space ``(x, y, d)`` decimetres as everywhere in :mod:`facerecon.render`; the
photo's :class:`~facerecon.geometry.Intrinsics` map them to the photo's own pixels (y up, pixel (c, r) centred at
``u = c + 0.5``, ``v_up = H0 - (r + 0.5)``; the alignment module provides them).

Size: over 400 lines: the overlay's window, render-scale and edge-antialiasing steps (with the numba edge kernel
they share) are one path whose pieces only make sense together, and the PNG encoder beside it is what every
overlay is written with; the grey geometry view reuses the same window and composite helpers.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numba import njit
from PIL import Image

from facerecon.geometry import Intrinsics, project
from facerecon.render.raster import DEFAULT_ZFAR, DEFAULT_ZNEAR, interpolate_arrays, rasterize_arrays

if TYPE_CHECKING:
    from torch import Tensor

    from facerecon.render.base import Renderer

__all__ = ["MAX_SUPERSAMPLED_PIXELS", "encode_png", "overlay_on_photo", "save_png", "shaded_geometry"]

logger = logging.getLogger(__name__)

#: Upper bound on the pixels of one supersampled render window; beyond it the supersampling factor is lowered.
MAX_SUPERSAMPLED_PIXELS = 4096 * 4096


def overlay_on_photo(
    photo: np.ndarray,
    vertices_cam: np.ndarray | Tensor,
    triangles: np.ndarray | Tensor,
    colors: np.ndarray | Tensor,
    photo_intrinsics: Intrinsics,
    alpha: float = 1.0,
    *,
    antialias: Literal["edge", "supersample"] = "edge",
    supersample: int = 2,
    renderer: Renderer | None = None,
    znear: float = DEFAULT_ZNEAR,
    zfar: float = DEFAULT_ZFAR,
) -> np.ndarray:
    """Composite the rendered face over the photo at the photo's resolution.

    ``out = photo (1 - alpha m) + alpha 255 c_premult``, with ``m`` the antialiased coverage and ``c_premult`` the
    box-averaged ``mask x colour`` (colours clamped to [0, 1] first): box-averaged over the 3 x 3 neighbourhood at
    the silhouette's pixels only (``antialias="edge"``), or over ``supersample`` x ``supersample`` sub-pixels
    everywhere (``"supersample"``, the former path).

    Args:
        photo: ``(H0, W0, 3)`` uint8 RGB.
        vertices_cam: ``(N, 3)`` or ``(1, N, 3)`` float32 camera space, decimetres: NumPy arrays (then the edge
            path runs without torch, on the CPU rasteriser's kernels, when ``renderer`` is None or the CPU one),
            or tensors on the renderer's device.
        triangles: ``(F, 3)`` int64.
        colors: ``(N, 3)`` or ``(1, N, 3)`` float RGB in [0, 1] (e.g. the shaded vertex colours).
        photo_intrinsics: the photo's intrinsics; ``width x height`` must be ``W0 x H0``.
        alpha: opacity of the face, in [0, 1].
        antialias: ``"edge"`` (default) or ``"supersample"``.
        supersample: the ``"supersample"`` factor (1 = none; lowered automatically for huge windows).
        renderer: default: NumPy inputs the CPU kernels, tensors ``get_renderer("auto", vertices_cam.device)``.
        znear, zfar: clip depths, decimetres.

    Returns:
        ``(H0, W0, 3)`` uint8, a new array.
    """
    if not isinstance(photo, np.ndarray) or photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        shape = getattr(photo, "shape", None)
        raise ValueError(f"photo must be an (H, W, 3) uint8 array, got {type(photo).__name__} {shape}")
    h0, w0 = photo.shape[:2]
    if (int(photo_intrinsics.width), int(photo_intrinsics.height)) != (w0, h0):
        raise ValueError(
            f"photo_intrinsics are for {photo_intrinsics.width} x {photo_intrinsics.height} but the photo is "
            f"{w0} x {h0}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    verts, rgb = _single(vertices_cam, "vertices_cam"), _single(colors, "colors")
    out = photo.copy()
    window = _face_window(verts, photo_intrinsics, znear)
    if window is None:
        return out
    c0, r0, c1, r1 = window
    intr = _window_intrinsics(photo_intrinsics, window)
    if antialias == "edge":
        _composite_edge_aa(out[r0:r1, c0:c1], verts, triangles, rgb, intr, alpha, renderer, znear, zfar)
        return out
    if antialias != "supersample":
        raise ValueError(f"antialias must be 'edge' or 'supersample', got {antialias!r}")
    verts, triangles, rgb = _tensors(verts, triangles, rgb)
    coverage, premult = _supersampled(verts, triangles, rgb.clamp(0.0, 1.0), intr, supersample, renderer, znear, zfar)
    region = out[r0:r1, c0:c1].astype(np.float32)
    blended = region * (1.0 - alpha * coverage[..., None]) + (alpha * 255.0) * premult
    out[r0:r1, c0:c1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


#: The longest side, in pixels, of the overlay's render window; a larger face window is rendered at this size and
#: upsampled (bilinearly) at the composite. The ICT mesh's vertices are ~4 px apart on a face 1080-px photo's face,
#: so shading sampled at this density loses nothing the mesh has.
MAX_OVERLAY_RENDER = 320
#: A colour step (0-1, any channel) to a neighbour above this marks an occlusion edge inside the face to antialias.
EDGE_STEP = 0.06


@njit(cache=True, nogil=True)
def _edge_aa(mask: np.ndarray, color: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """``(coverage (h, w), premultiplied colour (h, w, 3))`` float32 with only the edges antialiased: the
    neighbourhood's mean of the mask and of mask x colour (a 3 x 3 box, within the window) at the silhouette's
    pixels (partly covered neighbourhoods) and at the occlusion edges inside it (a colour step of more than
    ``step`` to a neighbour: eyelids, nostrils, lips); elsewhere 1 and the pixel's colour, or 0 off the face."""
    h, w = mask.shape
    cov = np.zeros((h, w), np.float32)
    pm = np.zeros((h, w, 3), np.float32)
    for y in range(h):
        for x in range(w):
            n = 0
            total = 0
            r = np.float32(0.0)
            g = np.float32(0.0)
            b = np.float32(0.0)
            jump = np.float32(0.0)
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    total += 1
                    if mask[yy, xx]:
                        n += 1
                        r += color[yy, xx, 0]
                        g += color[yy, xx, 1]
                        b += color[yy, xx, 2]
                        if mask[y, x]:
                            for k in range(3):
                                jump = max(jump, abs(color[yy, xx, k] - color[y, x, k]))
            if n == 0:
                continue
            if n == total and jump <= step:
                cov[y, x] = 1.0
                pm[y, x, 0] = color[y, x, 0]
                pm[y, x, 1] = color[y, x, 1]
                pm[y, x, 2] = color[y, x, 2]
                continue
            cov[y, x] = n / np.float32(total)
            pm[y, x, 0] = r / np.float32(total)
            pm[y, x, 1] = g / np.float32(total)
            pm[y, x, 2] = b / np.float32(total)
    return cov, pm


@njit(cache=True, nogil=True)
def _blend(region: np.ndarray, cov: np.ndarray, pm: np.ndarray, alpha: float) -> None:  # pragma: no cover
    """``region = region (1 - alpha cov) + alpha 255 pm`` in place, ``cov`` and ``pm`` sampled bilinearly at the
    region's pixel centres (pixel centres aligned: ``u_render = (u + 0.5) h_render / h - 0.5``). The column taps
    and weights are the same on every row (computed once), and a row whose two render rows are empty is skipped."""
    h, w = region.shape[0], region.shape[1]
    hr, wr = cov.shape
    sy, sx = hr / h, wr / w
    a255 = alpha * 255.0
    xs0 = np.empty(w, np.int64)
    xs1 = np.empty(w, np.int64)
    txs = np.empty(w)
    for x in range(w):
        fx = (x + 0.5) * sx - 0.5
        x0 = int(np.floor(fx))
        txs[x] = fx - x0
        xs1[x] = min(max(x0 + 1, 0), wr - 1)
        xs0[x] = min(max(x0, 0), wr - 1)
    row_any = np.zeros(hr, np.bool_)
    for yr in range(hr):
        for xr in range(wr):
            if cov[yr, xr] > 0.0:
                row_any[yr] = True
                break
    for y in range(h):
        fy = (y + 0.5) * sy - 0.5
        y0 = int(np.floor(fy))
        ty = fy - y0
        y1 = min(max(y0 + 1, 0), hr - 1)
        y0 = min(max(y0, 0), hr - 1)
        if not (row_any[y0] or row_any[y1]):
            continue
        for x in range(w):
            x0, x1, tx = xs0[x], xs1[x], txs[x]
            w00 = (1.0 - ty) * (1.0 - tx)
            w01 = (1.0 - ty) * tx
            w10 = ty * (1.0 - tx)
            w11 = ty * tx
            c = w00 * cov[y0, x0] + w01 * cov[y0, x1] + w10 * cov[y1, x0] + w11 * cov[y1, x1]
            if c <= 0.0:
                continue
            keep = 1.0 - alpha * c
            for k in range(3):
                p = w00 * pm[y0, x0, k] + w01 * pm[y0, x1, k] + w10 * pm[y1, x0, k] + w11 * pm[y1, x1, k]
                v = region[y, x, k] * keep + a255 * p + 0.5
                region[y, x, k] = 255 if v >= 255.0 else (0 if v <= 0.0 else int(v))


def _composite_edge_aa(
    region: np.ndarray,
    verts: np.ndarray | Tensor,
    triangles: np.ndarray | Tensor,
    rgb: np.ndarray | Tensor,
    intrinsics: Intrinsics,
    alpha: float,
    renderer: Renderer | None,
    znear: float,
    zfar: float,
) -> None:
    """Render the window at the face's scale (its own size, at most :data:`MAX_OVERLAY_RENDER` px on the long
    side) and blend into ``region`` (``(h, w, 3)`` uint8, in place). At the window's own size the edges are
    antialiased by :func:`_edge_aa`; a smaller render is upsampled bilinearly, which ramps every edge (the outline and
    the occlusion edges inside) over one render pixel."""
    h, w = region.shape[:2]
    scale = min(1.0, MAX_OVERLAY_RENDER / max(h, w))
    hr, wr = max(1, round(h * scale)), max(1, round(w * scale))
    kx, ky = wr / w, hr / h  # pixel edges onto pixel edges (centres at +0.5 in both frames)
    intr = Intrinsics(intrinsics.fx * kx, intrinsics.fy * ky, intrinsics.cx * kx, intrinsics.cy * ky, wr, hr)
    if isinstance(verts, np.ndarray) and (renderer is None or renderer.name == "cpu"):
        # the CPU renderer's own kernels on the arrays (no torch): the same raster and interpolation
        tid, pixels, pix_verts, bary = rasterize_arrays(verts[0], np.asarray(triangles, np.int64), intr, znear, zfar)
        colours = np.clip(np.asarray(rgb)[0], 0.0, 1.0)
        color = interpolate_arrays(colours, pixels, pix_verts, bary, hr * wr).reshape(hr, wr, -1)
        color = color.astype(np.float32, copy=False)
        mask = tid >= 0
    else:
        import torch

        verts, triangles, rgb = _tensors(verts, triangles, rgb)
        if renderer is None:
            from facerecon.render import get_renderer

            renderer = get_renderer("auto", verts.device)
        with torch.no_grad():
            raster = renderer.rasterize(verts, triangles, intr, znear=znear, zfar=zfar)
            color = renderer.interpolate(rgb.clamp(0.0, 1.0), raster, triangles)[0].float().cpu().numpy()
            mask = raster.mask[0].cpu().numpy()
    if (hr, wr) == (h, w):
        cov, pm = _edge_aa(mask, color, EDGE_STEP)
    else:  # upsampled: the bilinear taps already give every edge a ramp of one render pixel
        cov = mask.astype(np.float32)
        pm = color * cov[..., None]
    _blend(region, cov, pm, float(alpha))


def _tensors(*xs: Any) -> tuple[Any, ...]:
    """NumPy arrays as CPU tensors (tensors as they are), for the renderer's paths."""
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for x in xs)


def shaded_geometry(
    vertices_cam: Tensor,
    triangles: Tensor,
    normals: Tensor,
    intrinsics: Intrinsics,
    *,
    light: Sequence[float] = (0.0, 0.0, 1.0),
    albedo: float = 0.8,
    ambient: float = 0.25,
    background: Sequence[int] = (0, 0, 0),
    supersample: int = 2,
    renderer: Renderer | None = None,
    znear: float = DEFAULT_ZNEAR,
    zfar: float = DEFAULT_ZFAR,
) -> np.ndarray:
    """A plain grey Lambertian view of the geometry (per-pixel interpolated normals), antialiased.

    ``grey = albedo (ambient + (1 - ambient) max(0, n . l))`` with ``n`` the normalised interpolated normal.

    Args:
        vertices_cam: ``(N, 3)`` or ``(1, N, 3)`` float32 camera space, decimetres.
        triangles: ``(F, 3)`` int64.
        normals: ``(N, 3)`` or ``(1, N, 3)`` unit vertex normals in world orientation (x right, y up, z towards the
            camera), e.g. the decoder's rotated normals.
        intrinsics: output size and projection.
        light: direction *towards* the light in the same axes; the default ``(0, 0, 1)`` is a headlight.
        albedo: grey level of the surface, in [0, 1].
        ambient: fraction of ambient light, in [0, 1].
        background: RGB uint8 of the empty pixels.
        supersample: antialiasing factor (1 = none).
        renderer: default ``get_renderer("auto", vertices_cam.device)``.
        znear, zfar: clip depths, decimetres.

    Returns:
        ``(H, W, 3)`` uint8.
    """
    import torch
    import torch.nn.functional as F

    verts, nrm = _tensors(_single(vertices_cam, "vertices_cam"), _single(normals, "normals"))
    direction = torch.tensor(light, dtype=torch.float32, device=verts.device)
    if direction.shape != (3,) or not bool(direction.norm() > 0):
        raise ValueError(f"light must be a non-zero 3-vector, got {light!r}")
    direction = direction / direction.norm()
    height, width = int(intrinsics.height), int(intrinsics.width)
    bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 3)
    window = _face_window(verts, intrinsics, znear)
    out = np.empty((height, width, 3), np.float32)
    out[:] = bg
    if window is not None:
        c0, r0, c1, r1 = window

        def shade(raster_normals: Tensor) -> Tensor:
            n = F.normalize(raster_normals, dim=-1, eps=1e-12)
            lambert = (n * direction).sum(-1, keepdim=True).clamp_min(0.0)
            return (albedo * (ambient + (1.0 - ambient) * lambert)).expand(*n.shape[:-1], 3)

        coverage, premult = _supersampled(
            verts,
            triangles,
            nrm.float(),
            _window_intrinsics(intrinsics, window),
            supersample,
            renderer,
            znear,
            zfar,
            shade=shade,
        )
        region = out[r0:r1, c0:c1]
        out[r0:r1, c0:c1] = region * (1.0 - coverage[..., None]) + 255.0 * premult
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray | Tensor, path: str | os.PathLike[str]) -> None:
    """Write an image as PNG.

    Args:
        array: ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``; uint8 is written as is, floats are taken as [0, 1],
            multiplied by 255, clamped and rounded. A torch tensor may also be ``(C, H, W)`` or ``(1, C, H, W)``
            with C in {1, 3, 4} (a render's image), and is moved to the CPU.
        path: destination file.
    """
    if not isinstance(array, np.ndarray) and hasattr(array, "detach"):  # a torch tensor
        t = array.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        array = t.numpy()
    img = np.asarray(array)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ValueError(f"save_png needs (H, W), (H, W, 3) or (H, W, 4), got {img.shape}")
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.floating):
            raise TypeError(f"save_png needs uint8 or float [0, 1] pixels, got {img.dtype}")
        img = np.clip(np.rint(np.nan_to_num(img.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 3:
        with open(os.fspath(path), "wb") as fh:
            fh.write(encode_png(img))
        return
    Image.fromarray(np.ascontiguousarray(img)).save(os.fspath(path), format="PNG")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """An ``(H, W, 3)`` uint8 RGB image as PNG bytes, fast: every row with PNG's ``up`` filter (the difference to
    the row above, one numpy subtraction) and zlib at ``level`` (1: fastest). Pillow's PNG writer filters each row
    adaptively, which at level 1 takes about twice as long for a photo and compresses it no better.

    Raises:
        ValueError: not an ``(H, W, 3)`` uint8 array.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"encode_png needs a non-empty (H, W, 3) uint8 image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    rows = img.reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 2  # filter type "up"
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # modulo 256, as the filter is defined
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, filter method 0, no interlace
    return b"".join([b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)), _png_chunk(b"IEND", b"")])


# ----------------------------------------------------------------------------------------------------------------


def _single(x: np.ndarray | Tensor, name: str) -> Any:
    """``(N, 3)`` or ``(1, N, 3)`` -> ``(1, N, 3)`` (a NumPy array or a detached tensor, as given)."""
    if isinstance(x, np.ndarray):
        x = x[None] if x.ndim == 2 else x
    elif hasattr(x, "detach"):
        x = (x.unsqueeze(0) if x.ndim == 2 else x).detach()
    else:
        raise TypeError(f"{name} must be a NumPy array or a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != 3:
        raise ValueError(f"{name} must be (N, 3) or (1, N, 3) for one face, got {tuple(x.shape)}")
    return x


def _face_window(verts: np.ndarray | Tensor, intrinsics: Intrinsics, znear: float
                 ) -> tuple[int, int, int, int] | None:
    """Pixel window ``(c0, r0, c1, r1)`` (end-exclusive) that holds every drawable pixel, or None if empty.

    When every vertex is in front of the near plane, the face projects inside the bounding box of its projected
    vertices (perspective maps segments in front of the camera to segments); otherwise the whole image.
    """
    width, height = int(intrinsics.width), int(intrinsics.height)
    v = np.asarray(verts if isinstance(verts, np.ndarray) else verts.detach().cpu().numpy(), np.float64)
    if not bool(np.isfinite(v).all()) or bool((v[..., 2] < znear).any()):
        return 0, 0, width, height
    uv = project(v, intrinsics)[0]
    u_min, u_max = float(uv[:, 0].min()), float(uv[:, 0].max())
    v_min, v_max = float(uv[:, 1].min()), float(uv[:, 1].max())
    c0 = max(0, math.floor(u_min) - 1)
    c1 = min(width, math.ceil(u_max) + 1)
    r0 = max(0, math.floor(height - v_max) - 1)
    r1 = min(height, math.ceil(height - v_min) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return c0, r0, c1, r1


def _window_intrinsics(intrinsics: Intrinsics, window: tuple[int, int, int, int]) -> Intrinsics:
    """Intrinsics of the sub-image of columns [c0, c1) and rows [r0, r1) (same pixel-centre convention)."""
    c0, r0, c1, r1 = window
    height = int(intrinsics.height)
    return Intrinsics(intrinsics.fx, intrinsics.fy, intrinsics.cx - c0, intrinsics.cy - (height - r1), c1 - c0, r1 - r0)


def _supersampled(
    verts: Tensor,
    triangles: Tensor,
    attributes: Tensor,
    intrinsics: Intrinsics,
    supersample: int,
    renderer: Renderer | None,
    znear: float,
    zfar: float,
    shade: Callable[[Tensor], Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render at ``s`` x resolution and box-average: ``(coverage (h, w), premultiplied colour (h, w, 3))``.

    ``shade``, if given, maps the interpolated ``(1, H, W, C)`` attributes to ``(1, H, W, 3)`` colours.
    """
    import torch
    import torch.nn.functional as F

    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    if renderer is None:
        from facerecon.render import get_renderer

        renderer = get_renderer("auto", verts.device)
    pixels = int(intrinsics.width) * int(intrinsics.height)
    s = int(supersample)
    if pixels * s * s > MAX_SUPERSAMPLED_PIXELS:
        s = max(1, int(math.sqrt(MAX_SUPERSAMPLED_PIXELS / pixels)))
        logger.debug("overlay window %d px: supersampling lowered to %d", pixels, s)
    with torch.no_grad():
        raster = renderer.rasterize(verts, triangles, intrinsics.scaled(s), znear=znear, zfar=zfar)
        values = renderer.interpolate(attributes, raster, triangles)
        if shade is not None:
            values = shade(values)
        mask = raster.mask.to(values.dtype).unsqueeze(-1)
        stacked = torch.cat([values * mask, mask], dim=-1).permute(0, 3, 1, 2)  # (1, 4, H s, W s)
        if s > 1:
            stacked = F.avg_pool2d(stacked, s)
        stacked = stacked[0].permute(1, 2, 0).float().cpu().numpy()
    return stacked[..., 3], stacked[..., :3]
