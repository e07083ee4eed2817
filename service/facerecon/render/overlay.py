"""Images for people: the shaded face composited over the photo, a plain grey geometry view, and PNG writing.

Both images are antialiased by supersampling: the face is rendered at ``supersample`` times the resolution and the
coverage and premultiplied colour are box-averaged back down (the reference has no antialiasing, reference.md
section 16, pitfall 3). Only the pixel window around the projected face is rendered, so a large photo costs little.

Frames: ``vertices_cam`` are camera-space ``(x, y, d)`` decimetres as everywhere in :mod:`facerecon.render`; the
photo's :class:`~facerecon.geometry.Intrinsics` map them to the photo's own pixels (y up, pixel (c, r) centred at
``u = c + 0.5``, ``v_up = H0 - (r + 0.5)``; the alignment module provides them).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from facerecon.geometry import Intrinsics, project
from facerecon.render.base import DEFAULT_ZFAR, DEFAULT_ZNEAR, Renderer

__all__ = ["MAX_SUPERSAMPLED_PIXELS", "overlay_on_photo", "save_png", "shaded_geometry"]

logger = logging.getLogger(__name__)

#: Upper bound on the pixels of one supersampled render window; beyond it the supersampling factor is lowered.
MAX_SUPERSAMPLED_PIXELS = 4096 * 4096


def overlay_on_photo(
    photo: np.ndarray,
    vertices_cam: Tensor,
    triangles: Tensor,
    colors: Tensor,
    photo_intrinsics: Intrinsics,
    alpha: float = 1.0,
    *,
    supersample: int = 2,
    renderer: Renderer | None = None,
    znear: float = DEFAULT_ZNEAR,
    zfar: float = DEFAULT_ZFAR,
) -> np.ndarray:
    """Composite the rendered face over the photo at the photo's resolution.

    ``out = photo (1 - alpha m) + alpha 255 c_premult``, with ``m`` the antialiased coverage and ``c_premult`` the
    box-averaged ``mask x colour`` (colours clamped to [0, 1] first).

    Args:
        photo: ``(H0, W0, 3)`` uint8 RGB.
        vertices_cam: ``(N, 3)`` or ``(1, N, 3)`` float32 camera space, decimetres, on the renderer's device.
        triangles: ``(F, 3)`` int64.
        colors: ``(N, 3)`` or ``(1, N, 3)`` float RGB in [0, 1] (e.g. the shaded vertex colours).
        photo_intrinsics: the photo's intrinsics; ``width x height`` must be ``W0 x H0``.
        alpha: opacity of the face, in [0, 1].
        supersample: antialiasing factor (1 = none; lowered automatically for huge windows).
        renderer: default ``get_renderer("auto", vertices_cam.device)``.
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
    coverage, premult = _supersampled(
        verts,
        triangles,
        rgb.clamp(0.0, 1.0),
        _window_intrinsics(photo_intrinsics, window),
        supersample,
        renderer,
        znear,
        zfar,
    )
    region = out[r0:r1, c0:c1].astype(np.float32)
    blended = region * (1.0 - alpha * coverage[..., None]) + (alpha * 255.0) * premult
    out[r0:r1, c0:c1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


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
    verts, nrm = _single(vertices_cam, "vertices_cam"), _single(normals, "normals")
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
    if isinstance(array, Tensor):
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
    Image.fromarray(np.ascontiguousarray(img)).save(os.fspath(path), format="PNG")


# ----------------------------------------------------------------------------------------------------------------


def _single(x: Tensor, name: str) -> Tensor:
    """``(N, 3)`` or ``(1, N, 3)`` -> ``(1, N, 3)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != 3:
        raise ValueError(f"{name} must be (N, 3) or (1, N, 3) for one face, got {tuple(x.shape)}")
    return x.detach()


def _face_window(verts: Tensor, intrinsics: Intrinsics, znear: float) -> tuple[int, int, int, int] | None:
    """Pixel window ``(c0, r0, c1, r1)`` (end-exclusive) that holds every drawable pixel, or None if empty.

    When every vertex is in front of the near plane, the face projects inside the bounding box of its projected
    vertices (perspective maps segments in front of the camera to segments); otherwise the whole image.
    """
    width, height = int(intrinsics.width), int(intrinsics.height)
    d = verts[..., 2]
    if not bool(torch.isfinite(verts).all()) or bool((d < znear).any()):
        return 0, 0, width, height
    uv = project(verts.double(), intrinsics)[0]
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
