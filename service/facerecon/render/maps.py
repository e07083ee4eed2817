"""Depth and normal maps of the reconstructed face(s) in the photo's own frame, and their PNG encodings.

Geometry: the maps are rasterised with the photo-space camera of the JSON (``Reconstruction.photo_camera``: ``K``,
``R``, ``t`` in OpenCV's convention), so a vertex ``v`` of the posed mesh (the OBJ/PLY vertices) lands on photo
pixel ``round(K (R v + t))`` and the depth map holds ``(R v + t)_z`` there, exactly as ``vertices_photo`` gives it.
Only the triangles the overlay draws are rendered (the face region, the eyes and the inner mouth; not the scalp,
neck or back of the head, which would cover hair and collar); the nearest surface wins. Values are taken at the
pixel centres (integer photo coordinates).

* **depth**: the camera-space depth along the view axis (the OpenCV camera's ``z``: distance from the camera
  plane, not along the ray), model units in the arrays of :class:`FaceMaps`; ``0`` off the face.
* **normals**: unit surface normals (the decoder's vertex normals, interpolated and renormalised) in the camera's
  axes as the mesh's own frame has them: x right, y up, z towards the camera (OpenGL's / glTF's; a face seen
  frontally has normals near ``(0, 0, 1)``). OpenCV's camera frame is ``R n`` = ``(x, -y, -z)``. ``(0, 0, 0)`` off
  the face.

PNG files (:func:`depth_png`, :func:`normals_png`) cover the whole photo:

* depth: 16-bit greyscale, ``value / DEPTH_SCALE`` = metres (:data:`DEPTH_SCALE` = 10000: units of 0.1 mm, up to
  6.55 m; the reference camera sits 1 m from the model's origin), ``0`` = no surface. As Open3D reads it with
  ``depth_scale=10000``.
* normals: 8-bit RGB, ``value = round((n + 1) / 2 * 255)`` per channel (so ``n = value / 127.5 - 1``),
  ``(0, 0, 0)`` = no surface (no unit normal encodes to it).

Both carry their encoding in a PNG ``tEXt`` chunk (keyword ``Description``).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facerecon.geometry import Intrinsics
from facerecon.render.base import DEFAULT_ZFAR, DEFAULT_ZNEAR, Renderer
from facerecon.render.overlay import _face_window, _png_chunk, _single, _window_intrinsics, encode_png

__all__ = ["DEPTH_DESCRIPTION", "DEPTH_SCALE", "NORMALS_DESCRIPTION", "FaceMaps", "MapKind", "composite",
           "depth_png", "depth_to_uint16", "encode_png16", "intrinsics_from_k", "normals_png", "render_maps"]

MapKind = Literal["depth", "normals"]
#: Depth PNG/array values per metre: a value of 10000 is 1 m (units of 0.1 mm; 16 bits reach 6.5535 m).
DEPTH_SCALE = 10000.0
DEPTH_DESCRIPTION = ("facerecon depth map: 16-bit grey, value / 10000 = depth in metres along the camera's view "
                     "axis (OpenCV camera z), 0 = no surface")
NORMALS_DESCRIPTION = ("facerecon normal map: RGB, n = value / 127.5 - 1, unit normals in camera axes x right, "
                       "y up, z towards the camera; (0, 0, 0) = no surface")


@dataclass
class FaceMaps:
    """The maps of one face (or of several composited) over a pixel window of the photo.

    Attributes:
        x0, y0: photo pixel (column, row) of the window's top-left pixel.
        depth: ``(h, w)`` float32 camera depth, model units, 0 off the face.
        normals: ``(h, w, 3)`` float32 unit normals (x right, y up, z towards the camera), 0 off the face.
        photo_size: ``(width, height)`` of the photo.
    """

    x0: int
    y0: int
    depth: np.ndarray
    normals: np.ndarray
    photo_size: tuple[int, int]

    @property
    def mask(self) -> np.ndarray:
        return self.depth > 0

    def full(self) -> FaceMaps:
        """The same maps over the whole photo."""
        w0, h0 = self.photo_size
        depth = np.zeros((h0, w0), np.float32)
        normals = np.zeros((h0, w0, 3), np.float32)
        h, w = self.depth.shape
        depth[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.depth
        normals[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.normals
        return FaceMaps(0, 0, depth, normals, self.photo_size)


def intrinsics_from_k(k: np.ndarray, width: int, height: int) -> Intrinsics:
    """The renderer's y-up :class:`Intrinsics` (pixel centres at ``c + 0.5``) for an OpenCV ``K`` (y down, integer =
    pixel centre) applied to camera points ``(x, -y, d)`` (the renderer's ``(x, y, d)`` with y flipped, as
    ``R = diag(1, -1, -1)`` gives)."""
    return Intrinsics(float(k[0, 0]), float(k[1, 1]), float(k[0, 2]) + 0.5, height - 0.5 - float(k[1, 2]),
                      int(width), int(height))


def render_maps(vertices_cam: Tensor, normals_world: Tensor, triangles: Tensor, k: np.ndarray,
                photo_size: tuple[int, int], renderer: Renderer, *, znear: float = DEFAULT_ZNEAR,
                zfar: float = DEFAULT_ZFAR) -> FaceMaps:
    """Rasterise one face's depth and normals over the photo pixels it covers (one raster for both).

    Args:
        vertices_cam: ``(N, 3)`` or ``(1, N, 3)`` camera space ``(x, y, d)``, model units.
        normals_world: ``(N, 3)`` or ``(1, N, 3)`` unit vertex normals of the posed mesh.
        triangles: ``(F, 3)`` int64, the triangles to draw.
        k: the photo camera's OpenCV ``K`` (3 x 3).
        photo_size: ``(width, height)``.
    """
    verts, nrm = _single(vertices_cam, "vertices_cam"), _single(normals_world, "normals_world")
    w0, h0 = int(photo_size[0]), int(photo_size[1])
    intr = intrinsics_from_k(np.asarray(k, np.float64), w0, h0)
    used = verts[:, torch.unique(triangles.reshape(-1))]
    window = _face_window(used, intr, znear)
    if window is None:
        return FaceMaps(0, 0, np.zeros((0, 0), np.float32), np.zeros((0, 0, 3), np.float32), (w0, h0))
    c0, r0, _, _ = window
    with torch.no_grad():
        raster = renderer.rasterize(verts, triangles, _window_intrinsics(intr, window), znear=znear, zfar=zfar)
        n = renderer.interpolate(nrm.to(verts.dtype), raster, triangles)
        n = F.normalize(n, dim=-1, eps=1e-12) * raster.mask.unsqueeze(-1)
        depth = torch.where(raster.mask, raster.depth, torch.zeros_like(raster.depth))
    return FaceMaps(c0, r0, depth[0].float().cpu().numpy(), n[0].float().cpu().numpy(), (w0, h0))


def composite(maps: list[FaceMaps], photo_size: tuple[int, int]) -> FaceMaps:
    """Several faces' maps over the whole photo, the nearest surface winning where they overlap."""
    w0, h0 = int(photo_size[0]), int(photo_size[1])
    depth = np.zeros((h0, w0), np.float32)
    normals = np.zeros((h0, w0, 3), np.float32)
    for m in maps:
        h, w = m.depth.shape
        if h == 0 or w == 0:
            continue
        d = depth[m.y0:m.y0 + h, m.x0:m.x0 + w]
        nn = normals[m.y0:m.y0 + h, m.x0:m.x0 + w]
        take = m.mask & ((d == 0) | (m.depth < d))
        d[take] = m.depth[take]
        nn[take] = m.normals[take]
    return FaceMaps(0, 0, depth, normals, (w0, h0))


def depth_to_uint16(depth: np.ndarray, metres_per_unit: float) -> np.ndarray:
    """Depth in model units -> the 16-bit encoding (``value / DEPTH_SCALE`` = metres, 0 = no surface; a surface is
    at least 1, at most 65535)."""
    v = np.rint(depth.astype(np.float64) * (metres_per_unit * DEPTH_SCALE))
    return np.where(depth > 0, np.clip(v, 1, 65535), 0).astype(np.uint16)


def normals_to_uint8(normals: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Unit normals -> ``round((n + 1) / 2 * 255)`` RGB, ``(0, 0, 0)`` off the face."""
    rgb = np.clip(np.rint((normals.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    rgb[~mask] = 0
    return rgb


def _text_chunk(keyword: str, text: str) -> bytes:
    return _png_chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))


def encode_png16(image: np.ndarray, *, text: dict[str, str] | None = None, level: int = 1) -> bytes:
    """An ``(H, W)`` uint16 image as a 16-bit greyscale PNG (samples big-endian, as PNG stores them), rows with the
    ``up`` filter like :func:`~facerecon.render.overlay.encode_png`, optional ``tEXt`` chunks.

    Raises:
        ValueError: not a non-empty ``(H, W)`` uint16 array.
    """
    img = np.asarray(image)
    if img.dtype != np.uint16 or img.ndim != 2 or img.size == 0:
        raise ValueError(f"encode_png16 needs a non-empty (H, W) uint16 image, got {img.dtype} {img.shape}")
    h, w = img.shape
    rows = img.astype(">u2").view(np.uint8).reshape(h, w * 2)
    raw = np.empty((h, w * 2 + 1), np.uint8)
    raw[:, 0] = 2  # "up": the byte-wise difference to the row above (PNG filters bytes, whatever the bit depth)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)  # 16-bit greyscale
    chunks = [_text_chunk(k, v) for k, v in (text or {}).items()]
    return b"".join([b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), *chunks,
                     _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)), _png_chunk(b"IEND", b"")])


def depth_png(maps: FaceMaps, metres_per_unit: float) -> bytes:
    """The whole photo's depth map as a 16-bit grey PNG (module docstring)."""
    full = maps.full() if maps.depth.shape != (maps.photo_size[1], maps.photo_size[0]) else maps
    return encode_png16(depth_to_uint16(full.depth, metres_per_unit), text={"Description": DEPTH_DESCRIPTION})


def normals_png(maps: FaceMaps) -> bytes:
    """The whole photo's normal map as an RGB PNG (module docstring)."""
    full = maps.full() if maps.depth.shape != (maps.photo_size[1], maps.photo_size[0]) else maps
    png = encode_png(normals_to_uint8(full.normals, full.mask))
    # the tEXt chunk goes right after IHDR (8-byte signature + 25-byte IHDR chunk)
    return png[:33] + _text_chunk("Description", NORMALS_DESCRIPTION) + png[33:]
