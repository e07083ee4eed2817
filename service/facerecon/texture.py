"""Textures in the face model's UV space: a photo texture and an albedo texture, and the atlas they live in (the
files that carry them, OBJ+MTL+PNG and GLB, are written by :mod:`facerecon.export`).

Two textures, both ``(H, W, 3)`` uint8 RGB images, row 0 at the top (as PNG stores them):

* **Photo texture** (:func:`photo_texture`): the photo's colours resampled into UV space. Per texel, the UV raster
  gives the face index ``f`` and barycentrics ``b`` (``uv_triangles`` and ``triangles`` share ``f`` and the corner
  order), hence the surface point ``P = sum_k b_k V[triangles[f, k]]`` in camera space. ``P`` is projected with the
  photo intrinsics (:meth:`facerecon.align.Alignment.photo_intrinsics`) and the photo is sampled bilinearly there
  when ``P`` is **visible**: the depth rendered at the photo's resolution (bilinear at the projection) is
  within a tolerance of ``P``'s depth, and the interpolated normal faces the camera (``n . v > min_cos``), as
  3DDFA_V2 and eos decide it; pixels within ``silhouette_margin`` of the mesh's outline against the background are
  not used (the fitted outline is never exact). Texels that are not visible are, in order:

  1. **mirrored**: the same barycentrics on the mirrored triangle (``mirror_index`` of the three vertices: the
     point mirrored about the model's x = 0 plane, in model space) give ``P'``; if ``P'`` is visible, the photo at
     ``P'`` is used, multiplied per channel by the ratio of the fitted lit model colours ``lit(P) / lit(P')``
     (clipped to [0.5, 2]) so the shading of the side it is copied to is kept;
  2. **filled**: the fitted model's lit colour (albedo times the fitted SH shading, the shading floored at
     its mean over the front, :data:`MIN_FILL_SHADING`: the SH fitted to the front is about zero on the back) plus the
     photo-minus-model residual of the known texels spread smoothly over the unknown ones by push-pull
     (``fill="model"``, the default: seamless at the border, the model's shading and a low-frequency colour
     correction inside), or the known colours alone spread by push-pull (``fill="inpaint"``).

  A confidence map ``(H, W)`` uint8 comes with it: :data:`CONF_VISIBLE` (255) seen directly, :data:`CONF_MIRRORED`
  (128) copied from the mirrored side, :data:`CONF_FILLED` (0) filled, and 0 off the charts.

* **Albedo texture** (:func:`albedo_texture`): the fitted de-lit albedo (``decoded.albedo``, per vertex, [0, 1])
  interpolated linearly over each triangle.

**The texture atlas** (:func:`texture_atlas`). A model's own UVs cannot always be used as they are: the ICT model
lays its UVs over two UDIM tiles (u in [0, 1] the face, u in [1, 2] head, neck, mouth and eye sockets), and both
eyeballs reuse the whole of tile 0, on top of the face. The textured exports therefore repack the UV charts into one
unit square: a chart is a UDIM tile, and every ``eyeball*`` region (where the model names its vertex regions) is a
chart of its own. The chart holding the most ``face_mask`` triangles gets the left 3/4 of the texture; the others
are stacked in the right quarter; each is scaled uniformly (aspect kept) and centred in its cell with a gutter.
A model whose UVs form a single chart inside the unit square keeps its UVs unchanged. The atlas UVs are written
into the textured OBJ and GLB; the plain OBJ export (:mod:`facerecon.export`) keeps the model's own UVs.

Conventions: UVs ``(u, v)`` in [0, 1] with origin at the **bottom-left** (OBJ's convention; trimesh flips ``v`` when
writing glTF, whose origin is top-left). Texel (column c, row r) of an ``H x W`` texture has its centre at
``u = (c + 0.5) / W``, ``v = 1 - (r + 0.5) / H``. Camera space ``(x, y, d)`` in decimetres, d the depth in front of the
camera (:func:`facerecon.geometry.to_camera`); photo pixels y down, centres at integers + 0.5 in the renderer's
frame. Gutter texels (off every chart) are filled by push-pull from the chart texels, so bilinear filtering and
mipmaps do not bleed black into the seams.

Cost (1024 x 1024, ICT, after the renderer's JIT warm-up, measured on a busy shared 2-core machine): a photo texture
0.5-1 s of CPU (1-2 s wall there), an albedo texture 0.1-0.4 s; the OBJ bundle (PNG encoding) and the GLB about 0.5 s
each more. Time grows with the texel count (2048 x 2048: about 4x).

Size: over 400 lines: the atlas, the photo texture (visibility, mirroring, filling) and the albedo texture share the
UV raster and its conventions; the files that carry them are written by :mod:`facerecon.export`.
"""

from __future__ import annotations

import io
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from facerecon.decoder import DecodedFace
from facerecon.export import TextureKind
from facerecon.facemodel import FaceModel
from facerecon.geometry import Camera, Intrinsics
from facerecon.render import get_renderer
from facerecon.render.base import Renderer

if TYPE_CHECKING:
    from facerecon.appearance import FeatureColours
    from facerecon.results import Reconstruction

__all__ = [
    "CONF_FILLED",
    "CONF_MIRRORED",
    "CONF_VISIBLE",
    "PhotoTextureOptions",
    "Texture",
    "TextureAtlas",
    "TextureKind",
    "albedo_texture",
    "atlas_faces",
    "make_texture",
    "photo_texture",
    "push_pull",
    "sample_texture",
    "supports_texture",
    "texture_atlas",
]

#: Confidence values of :attr:`Texture.confidence`.
CONF_VISIBLE = 255
CONF_MIRRORED = 128
CONF_FILLED = 0

#: Atlas layout: the main chart's share of the texture width, and the gutter around every chart (UV units).
_MAIN_FRACTION = 0.75
_GUTTER = 0.004


# ----------------------------------------------------------------------------------------------------------------
# the atlas


@dataclass(frozen=True)
class TextureAtlas:
    """The UVs the textured exports use (see the module docstring).

    Attributes:
        uvs: ``(T, 2)`` float32 in [0, 1], origin bottom-left.
        uv_faces: ``(F, 3)`` int64 per-corner indices into ``uvs``, row f matching ``model.triangles[f]``.
        chart: ``(F,)`` int64 chart index of every face.
        chart_names: one name per chart, e.g. ``"tile(0,0)"``, ``"tile(1,0)"``, ``"eyeball_left"``.
        main_chart: the chart holding the face (most ``face_mask`` triangles).
        repacked: False when the model's own UVs are used unchanged.
    """

    uvs: np.ndarray
    uv_faces: np.ndarray
    chart: np.ndarray
    chart_names: tuple[str, ...]
    main_chart: int
    repacked: bool


def supports_texture(model: FaceModel) -> bool:
    """Whether the model has UVs (``uv_coords`` and ``uv_triangles``), so textured exports can be made. Models
    without (BFM) keep per-vertex colours."""
    return "uv_coords" in model.extras and "uv_triangles" in model.extras


def _require_uvs(model: FaceModel) -> None:
    if not supports_texture(model):
        raise ValueError(
            f"face model {model.name!r} has no UV coordinates, so it cannot carry a texture; "
            "export it with per-vertex colours (OBJ/PLY/GLB) instead"
        )


_ATLAS_CACHE: weakref.WeakKeyDictionary[FaceModel, TextureAtlas] = weakref.WeakKeyDictionary()


def texture_atlas(model: FaceModel) -> TextureAtlas:
    """The repacked, non-overlapping UV layout of a model with UVs (cached per model object).

    Raises:
        ValueError: the model has no UVs.
    """
    _require_uvs(model)
    atlas = _ATLAS_CACHE.get(model)
    if atlas is None:
        atlas = _build_atlas(model)
        _ATLAS_CACHE[model] = atlas
    return atlas


def _build_atlas(model: FaceModel) -> TextureAtlas:
    uv = np.asarray(model.extras["uv_coords"], dtype=np.float64)
    uv_faces = np.asarray(model.extras["uv_triangles"], dtype=np.int64)
    tris = model.triangles.cpu().numpy()
    n_faces = len(tris)
    # chart key of every face: its UDIM tile (from the corner mean), and eyeball regions apart
    tile = np.floor(uv[uv_faces].mean(axis=1)).astype(np.int64)
    region_key = np.full(n_faces, -1, np.int64)
    names_of_region: dict[int, str] = {}
    region = model.extras.get("vertex_region")
    if region is not None:
        for name, rid in model.card.regions.items():
            if name.startswith("eyeball"):
                names_of_region[int(rid)] = name
                in_region = (np.asarray(region)[tris] == rid).all(axis=1)
                region_key[in_region] = rid
    keys = np.stack([region_key, tile[:, 0], tile[:, 1]], axis=1)
    uniq, chart = np.unique(keys, axis=0, return_inverse=True)
    chart = chart.reshape(-1).astype(np.int64)
    names = tuple(names_of_region.get(int(r), f"tile({tu},{tv})") for r, tu, tv in uniq.tolist())
    face_mask = model.face_mask.cpu().numpy()[tris].all(axis=1)
    n_face = np.bincount(chart, weights=face_mask, minlength=len(uniq))
    n_all = np.bincount(chart, minlength=len(uniq))
    main = int(np.lexsort((-n_all, -n_face))[0])

    if len(uniq) == 1 and uv.min() >= 0.0 and uv.max() <= 1.0:
        return TextureAtlas(uv.astype(np.float32), uv_faces, chart, names, main, repacked=False)

    # every UV index belongs to the faces of one chart (a UV shared across charts would be split here)
    corner_chart = np.repeat(chart, 3)
    corner_uv = uv_faces.reshape(-1)
    key = corner_uv * len(uniq) + corner_chart
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    new_uv_src = uv[corner_uv[first]]
    new_chart = corner_chart[first]
    new_faces = inverse.reshape(-1, 3).astype(np.int64)

    others = [c for c in range(len(uniq)) if c != main]
    cells: dict[int, tuple[float, float, float, float]] = {}  # chart -> (u0, v0, width, height) of its cell
    if others:
        cells[main] = (0.0, 0.0, _MAIN_FRACTION, 1.0)
        h = 1.0 / len(others)
        for k, c in enumerate(others):  # top to bottom in the right column
            cells[c] = (_MAIN_FRACTION, 1.0 - (k + 1) * h, 1.0 - _MAIN_FRACTION, h)
    else:
        cells[main] = (0.0, 0.0, 1.0, 1.0)
    out = np.empty_like(new_uv_src)
    for c, (u0, v0, cw, ch) in cells.items():
        sel = new_chart == c
        pts = new_uv_src[sel]
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        size = np.maximum(hi - lo, 1e-9)
        scale = min((cw - 2 * _GUTTER) / size[0], (ch - 2 * _GUTTER) / size[1])
        offset = np.array([u0 + cw / 2, v0 + ch / 2]) - scale * (lo + hi) / 2
        out[sel] = pts * scale + offset
    return TextureAtlas(out.astype(np.float32), new_faces, chart, names, main, repacked=True)


# ----------------------------------------------------------------------------------------------------------------
# results and options


@dataclass
class Texture:
    """A texture in the :class:`TextureAtlas` layout.

    Attributes:
        kind: ``"photo"`` or ``"albedo"``.
        image: ``(H, W, 3)`` uint8 RGB, row 0 = top (``v = 1``).
        confidence: ``(H, W)`` uint8 (photo texture): 255 visible, 128 mirrored, 0 filled or off the charts;
            ``None`` for the albedo texture.
        coverage: ``(H, W)`` bool, texel centres inside a chart triangle (the rest is gutter).
        atlas: the UV layout the image is made for.
        timings: stage -> milliseconds.
    """

    kind: TextureKind
    image: np.ndarray
    confidence: np.ndarray | None
    coverage: np.ndarray
    atlas: TextureAtlas
    timings: dict[str, float] = field(default_factory=dict)

    def fractions(self, texels: np.ndarray | None = None) -> dict[str, float]:
        """Fractions of visible, mirrored and filled texels among ``texels`` (``(H, W)`` bool; default: all chart
        texels). Only for a photo texture."""
        if self.confidence is None:
            raise ValueError("an albedo texture has no confidence map")
        sel = self.coverage if texels is None else texels & self.coverage
        n = max(int(sel.sum()), 1)
        conf = self.confidence[sel]
        return {
            "visible": float((conf == CONF_VISIBLE).sum()) / n,
            "mirrored": float((conf == CONF_MIRRORED).sum()) / n,
            "filled": float((conf == CONF_FILLED).sum()) / n,
        }

    def png(self) -> bytes:
        """The image as PNG bytes."""
        buf = io.BytesIO()
        PIL.Image.fromarray(self.image).save(buf, format="PNG")
        return buf.getvalue()


@dataclass(frozen=True)
class PhotoTextureOptions:
    """Knobs of :func:`photo_texture`.

    Attributes:
        min_cos: a texel is visible only where its unit normal and the unit direction to the camera have a dot
            product above this (0.15: about 81 degrees from the view direction).
        depth_tolerance: decimetres; the texel's depth may exceed the rendered depth (bilinear at the projection
            where the four pixels around are covered, else the containing pixel's) by this, plus half a pixel's
            footprint times the surface slope (``0.5 d / f * min(tan(angle), 5)``).
        silhouette_margin: photo pixels within this many pixels (square neighbourhood) of the mesh's outline against
            the background are not used: the fitted outline is never exact, and those pixels often show background.
        mirror: fill occluded texels from the mirrored side when that is visible.
        fill: ``"model"``: lit model colour plus the smoothly spread photo-model residual; ``"inpaint"``: push-pull of
            the known colours.
    """

    min_cos: float = 0.15
    depth_tolerance: float = 0.005
    silhouette_margin: int = 2
    mirror: bool = True
    fill: Literal["model", "inpaint"] = "model"


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if not (8 <= h <= 8192 and 8 <= w <= 8192):
        raise ValueError(f"texture size must be between 8 and 8192 texels a side, got {h} x {w}")
    return int(h), int(w)


def _renderer(renderer: Renderer | None) -> Renderer:
    return renderer if renderer is not None else get_renderer("cpu")


@dataclass(frozen=True)
class _UvRaster:
    """The covered texels of an atlas raster: flat indices ``(P,)`` into ``H * W``, faces ``(P,)``, barycentrics
    ``(P, 3)`` float64."""

    height: int
    width: int
    texels: np.ndarray
    faces: np.ndarray
    bary: np.ndarray

    @property
    def coverage(self) -> np.ndarray:
        mask = np.zeros(self.height * self.width, bool)
        mask[self.texels] = True
        return mask.reshape(self.height, self.width)


def _uv_raster(atlas: TextureAtlas, height: int, width: int, renderer: Renderer) -> _UvRaster:
    """Rasterise the atlas: UVs as camera-space ``(u W, v H, 1)`` with ``fx = fy = 1``, ``cx = cy = 0``, so texel
    (c, r) samples ``u = (c + 0.5) / W``, ``v = 1 - (r + 0.5) / H``; at constant depth the barycentrics are affine."""
    uv = torch.from_numpy(atlas.uvs.astype(np.float64))
    verts = torch.cat([uv[:, :1] * width, uv[:, 1:] * height, torch.ones(len(uv), 1, dtype=uv.dtype)], dim=1)
    verts = verts[None].to(torch.float32).to(renderer.device)
    faces = torch.from_numpy(atlas.uv_faces).to(renderer.device)
    raster = renderer.rasterize(verts, faces, Intrinsics(1.0, 1.0, 0.0, 0.0, width, height), znear=0.5, zfar=2.0)
    tid = raster.triangle_id[0].reshape(-1).cpu().numpy()
    texels = np.flatnonzero(tid >= 0)
    bary = raster.barycentrics[0].reshape(-1, 3).cpu().numpy()[texels].astype(np.float64)
    return _UvRaster(height, width, texels, tid[texels], bary)


def atlas_faces(model: FaceModel, size: int | tuple[int, int] = 1024, *, renderer: Renderer | None = None
                ) -> np.ndarray:
    """The face (triangle row of ``model.triangles``) under every texel centre of the atlas, ``(H, W)`` int64,
    -1 in the gutter: to select texels by region (e.g. ``face_mask`` triangles) in a :class:`Texture`.

    Raises:
        ValueError: the model has no UVs, or a bad size.
    """
    h, w = _size_hw(size)
    raster = _uv_raster(texture_atlas(model), h, w, _renderer(renderer))
    out = np.full(h * w, -1, np.int64)
    out[raster.texels] = raster.faces
    return out.reshape(h, w)


def _blend(values: np.ndarray, corners: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """``sum_k bary[:, k] * values[corners[:, k]]``: ``values (N, C)``, ``corners (P, 3)``, ``bary (P, 3)`` ->
    ``(P, C)`` float64."""
    v = values.astype(np.float64, copy=False)
    return (bary[:, 0:1] * v[corners[:, 0]] + bary[:, 1:2] * v[corners[:, 1]] + bary[:, 2:3] * v[corners[:, 2]])


def bilinear(image: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image (H, W, C)`` at continuous ``(col, row)`` ``(P,)`` with pixel centres at integers,
    clamped at the border; ``(P, C)`` float64."""
    h, w = image.shape[:2]
    col = np.clip(col, 0.0, w - 1.0)
    row = np.clip(row, 0.0, h - 1.0)
    c0 = np.minimum(np.floor(col).astype(np.int64), w - 2) if w > 1 else np.zeros(len(col), np.int64)
    r0 = np.minimum(np.floor(row).astype(np.int64), h - 2) if h > 1 else np.zeros(len(row), np.int64)
    c1 = np.minimum(c0 + 1, w - 1)
    r1 = np.minimum(r0 + 1, h - 1)
    fc = (col - c0)[:, None]
    fr = (row - r0)[:, None]
    img = image.astype(np.float64, copy=False) if image.dtype != np.uint8 else image
    top = img[r0, c0] * (1.0 - fc) + img[r0, c1] * fc
    bottom = img[r1, c0] * (1.0 - fc) + img[r1, c1] * fc
    return np.asarray(top * (1.0 - fr) + bottom * fr, dtype=np.float64)


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear samples of a texture at UVs (origin bottom-left, the module's convention).

    Args:
        image: ``(H, W, C)`` texture, row 0 = top.
        uv: ``(P, 2)`` float UVs in [0, 1].

    Returns:
        ``(P, C)`` float64 in the image's units (0-255 for uint8).
    """
    h, w = image.shape[:2]
    col = uv[:, 0] * w - 0.5
    row = (1.0 - uv[:, 1]) * h - 0.5
    return bilinear(image, col, row)


def push_pull(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill the unknown pixels of an image smoothly from the known ones (push-pull, Gortler et al. 1996).

    Push: the known pixels and their coverage are averaged down a 2 x 2 pyramid to one pixel. Pull: coming back
    up, every level keeps its coverage-weighted average and takes the bilinearly upsampled coarser level for the
    uncovered part, ``c_l = v_l + (1 - w_l) up(c_{l+1})`` (``v_l`` the mean of value x known, ``w_l`` the mean of
    known over the block).

    Args:
        values: ``(H, W, C)`` float.
        known: ``(H, W)`` bool.

    Returns:
        ``(H, W, C)`` float32; equal to ``values`` where ``known``; all zeros when nothing is known.
    """
    if not known.any():
        return np.zeros(values.shape, np.float32)
    w = torch.from_numpy(np.ascontiguousarray(known, dtype=np.float32))[None, None]
    v = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).permute(2, 0, 1)[None] * w
    levels = [torch.cat([v, w], dim=1)]  # (1, C + 1, h, w): value x known, then known; pooled together
    while max(levels[-1].shape[-2:]) > 1:
        levels.append(F.avg_pool2d(levels[-1], 2, ceil_mode=True))
    top = levels[-1]
    color = top[:, :-1] / top[:, -1:].clamp_min(1e-12)
    for level in reversed(levels[:-1]):
        up = F.interpolate(color, size=level.shape[-2:], mode="bilinear", align_corners=False)
        color = level[:, :-1] + up * (1.0 - level[:, -1:])
    return color[0].permute(1, 2, 0).contiguous().numpy()


def _check_rec(rec: Reconstruction, model: FaceModel) -> DecodedFace:
    decoded = rec.decoded
    if decoded.vertices_cam.shape[0] != 1 or decoded.vertices_cam.shape[1] != model.n_vertices:
        raise ValueError(
            f"expected one decoded face with {model.n_vertices} vertices, got {tuple(decoded.vertices_cam.shape)}"
        )
    return decoded


def _np(t: torch.Tensor) -> np.ndarray:
    return t[0].detach().cpu().numpy().astype(np.float64)


def _finish_image(values: np.ndarray, raster: _UvRaster) -> tuple[np.ndarray, np.ndarray]:
    """Scatter per-texel RGB ``(P, 3)`` in [0, 255] into the image, push-pull the gutter; -> (image, coverage)."""
    h, w = raster.height, raster.width
    img = np.zeros((h * w, 3), np.float64)
    img[raster.texels] = values
    coverage = raster.coverage
    full = push_pull(img.reshape(h, w, 3), coverage)
    return np.clip(np.rint(full), 0, 255).astype(np.uint8), coverage


# ----------------------------------------------------------------------------------------------------------------
# the textures


def albedo_texture(
    rec: Reconstruction,
    model: FaceModel,
    *,
    size: int | tuple[int, int] = 1024,
    renderer: Renderer | None = None,
    colours: FeatureColours | None = None,
) -> Texture:
    """The fitted albedo (``decoded.albedo``, per vertex, clamped to [0, 1]) interpolated into the atlas.

    Args:
        rec: one reconstruction (its decoded face has batch 1).
        model: the face model it was decoded with (must have UVs).
        size: ``H`` (= ``W``) or ``(H, W)`` texels.
        renderer: rasteriser for the UV raster (default: the CPU one).
        colours: per-vertex colours with the brows, eyes, lips and inner mouth from the photo
            (:func:`facerecon.appearance.feature_colours`); its ``albedo`` replaces ``decoded.albedo``.

    Raises:
        ValueError: no UVs on the model, or a bad size.
    """
    _require_uvs(model)
    decoded = _check_rec(rec, model)
    h, w = _size_hw(size)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    atlas = texture_atlas(model)
    raster = _uv_raster(atlas, h, w, _renderer(renderer))
    t1 = time.perf_counter()
    tris = model.triangles.cpu().numpy()
    source = _np(decoded.albedo) if colours is None else colours.albedo.astype(np.float64)
    albedo = np.clip(source, 0.0, 1.0) * 255.0
    image, coverage = _finish_image(_blend(albedo, tris[raster.faces], raster.bary), raster)
    t2 = time.perf_counter()
    timings.update(uv_raster=(t1 - t0) * 1e3, texture=(t2 - t1) * 1e3)
    return Texture("albedo", image, None, coverage, atlas, timings)


def _photo_window(vertices_cam: np.ndarray, k: Intrinsics) -> tuple[int, int, int, int]:
    """Pixel window ``(c0, r0, c1, r1)`` (half-open) of the photo that the projected mesh covers, with a margin."""
    d = np.maximum(vertices_cam[:, 2], 1e-6)
    u = k.fx * vertices_cam[:, 0] / d + k.cx
    v_up = k.fy * vertices_cam[:, 1] / d + k.cy
    col, row = u, k.height - v_up
    c0 = int(np.clip(np.floor(col.min()) - 2, 0, k.width))
    c1 = int(np.clip(np.ceil(col.max()) + 2, 0, k.width))
    r0 = int(np.clip(np.floor(row.min()) - 2, 0, k.height))
    r1 = int(np.clip(np.ceil(row.max()) + 2, 0, k.height))
    return c0, r0, c1, r1


class _Visibility:
    """Which camera-space points are seen in the photo: a depth map of the mesh at the photo's resolution (only the
    window the face covers), the depth test and the facing test."""

    def __init__(self, vertices_cam: np.ndarray, triangles: np.ndarray, k: Intrinsics, renderer: Renderer,
                 camera: Camera, options: PhotoTextureOptions) -> None:
        self.k = k
        self.options = options
        c0, r0, c1, r1 = _photo_window(vertices_cam, k)
        self.c0, self.r0 = c0, r0
        wk = Intrinsics(k.fx, k.fy, k.cx - c0, k.cy - (k.height - r1), max(c1 - c0, 1), max(r1 - r0, 1))
        verts = torch.from_numpy(vertices_cam.astype(np.float32))[None].to(renderer.device)
        faces = torch.from_numpy(triangles).to(renderer.device)
        raster = renderer.rasterize(verts, faces, wk, znear=camera.znear, zfar=camera.zfar)
        depth = raster.depth[0].cpu().to(torch.float64)
        m = options.silhouette_margin
        if m > 0:  # pixels within m of the background count as background: the fit's outline is never exact
            background = (depth <= 0).to(torch.float64)[None, None]
            near_bg = F.max_pool2d(background, 2 * m + 1, stride=1, padding=m)[0, 0] > 0
            depth = torch.where(near_bg, torch.zeros_like(depth), depth)
        self.depth = depth.numpy()

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(P, 3)`` camera points -> continuous photo ``(col, row)`` with pixel centres at integers."""
        k = self.k
        d = np.maximum(points[:, 2], 1e-6)
        u = k.fx * points[:, 0] / d + k.cx
        v_up = k.fy * points[:, 1] / d + k.cy
        return u - 0.5, k.height - v_up - 0.5

    def _depth_at(self, col: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Rendered depth at continuous window ``(col, row)`` (pixel centres at integers): bilinear where the four
        pixels around are all covered, else the containing pixel's; 0 (nothing) outside the window or off the
        mesh."""
        hh, ww = self.depth.shape
        out = np.zeros(len(col))
        ic = np.floor(col + 0.5).astype(np.int64)
        ir = np.floor(row + 0.5).astype(np.int64)
        inside = (ic >= 0) & (ic < ww) & (ir >= 0) & (ir < hh)
        out[inside] = self.depth[ir[inside], ic[inside]]
        c0 = np.floor(col).astype(np.int64)
        r0 = np.floor(row).astype(np.int64)
        four = inside & (c0 >= 0) & (c0 + 1 < ww) & (r0 >= 0) & (r0 + 1 < hh)
        idx = np.flatnonzero(four)
        c0, r0 = c0[idx], r0[idx]
        z = self.depth
        z00, z01, z10, z11 = z[r0, c0], z[r0, c0 + 1], z[r0 + 1, c0], z[r0 + 1, c0 + 1]
        ok = (z00 > 0) & (z01 > 0) & (z10 > 0) & (z11 > 0)
        fc = col[idx] - c0
        fr = row[idx] - r0
        bil = (z00 * (1 - fc) + z01 * fc) * (1 - fr) + (z10 * (1 - fc) + z11 * fc) * fr
        out[idx[ok]] = bil[ok]
        return out

    def visible(self, points: np.ndarray, normals_world: np.ndarray) -> np.ndarray:
        """``(P, 3)`` camera points and world normals (any length) -> ``(P,)`` bool."""
        k, opt = self.k, self.options
        x, y, d = points[:, 0], points[:, 1], points[:, 2]
        # direction to the camera, world frame: the camera sits at x = y = 0, d = 0, and world z = distance - d
        view = np.stack([-x, -y, d], axis=1)
        view /= np.linalg.norm(view, axis=1, keepdims=True).clip(1e-12)
        n = normals_world / np.linalg.norm(normals_world, axis=1, keepdims=True).clip(1e-12)
        cos = (n * view).sum(axis=1)
        col, row = self.project(points)
        rendered = self._depth_at(col - self.c0, row - self.r0)
        slope = np.sqrt(np.clip(1.0 - cos**2, 0.0, 1.0)) / np.maximum(cos, 1e-3)
        tol = opt.depth_tolerance + 0.5 * d / max(k.fx, 1e-9) * np.minimum(slope, 5.0)
        return (cos > opt.min_cos) & (d > 0) & (rendered > 0) & (d <= rendered + tol)


#: The shading a filled texel keeps at least, as a fraction of the mean shading of the surface facing the camera
#: (1: the unseen back of the head is shown as lit as the front on average).
MIN_FILL_SHADING = 1.0


def _fill_colours(decoded: DecodedFace, normals_world: np.ndarray, colours: FeatureColours | None = None
                  ) -> np.ndarray:
    """Per-vertex colours ``(N, 3)`` in [0, 255] the fill and the mirroring start from: the fitted albedo times the
    fitted SH shading, that shading floored at :data:`MIN_FILL_SHADING` of its mean over the surface facing the
    camera. The SH lighting is fitted to the photo's front: extrapolated to the back of the head it falls to about
    zero, which made the unseen back of a textured head near black (a fifth of the front's brightness on 000002.jpg;
    about two thirds with the floor). ``colours``: the features' photo-based colours instead of the decoder's."""
    if colours is None:
        albedo = np.clip(_np(decoded.albedo), 0.0, 1.0)
        lit = np.clip(_np(decoded.colors), 0.0, 1.0)
    else:
        albedo = np.clip(colours.albedo.astype(np.float64), 0.0, 1.0)
        lit = np.clip(colours.lit.astype(np.float64), 0.0, 1.0)
    shading = lit / np.maximum(albedo, 1e-3)
    front = normals_world[:, 2] > 0.5
    mean_front = shading[front].mean(0) if front.any() else shading.mean(0)
    return np.clip(albedo * np.maximum(shading, MIN_FILL_SHADING * mean_front), 0.0, 1.0) * 255.0


def photo_texture(
    rec: Reconstruction,
    model: FaceModel,
    photo: np.ndarray,
    *,
    size: int | tuple[int, int] = 1024,
    camera: Camera | None = None,
    renderer: Renderer | None = None,
    options: PhotoTextureOptions | None = None,
    colours: FeatureColours | None = None,
) -> Texture:
    """The photo's colours in the atlas, with mirroring and filling of the texels the photo does not show (see the
    module docstring); ``colours`` (:func:`facerecon.appearance.feature_colours`): the model colours the fill
    starts from, with the features' photo colours.

    Args:
        rec: one reconstruction of a face in ``photo``.
        model: the face model it was decoded with (must have UVs).
        photo: ``(H0, W0, 3)`` uint8 RGB, the photo ``rec`` was made from (``rec.photo_size == (W0, H0)``).
        size: ``H`` (= ``W``) or ``(H, W)`` texels.
        camera: the crop camera of the decoder (default :class:`~facerecon.geometry.Camera`).
        renderer: rasteriser (default: the CPU one).
        options: visibility and fill settings.

    Returns:
        A :class:`Texture` with ``confidence``.

    Raises:
        ValueError: no UVs on the model, a photo that is not ``(H0, W0, 3)`` uint8 of the reconstruction's size,
            an unknown ``options.fill``.
    """
    _require_uvs(model)
    decoded = _check_rec(rec, model)
    if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"photo must be (H, W, 3) uint8, got {photo.shape} {photo.dtype}")
    if rec.photo_size != (0, 0) and tuple(rec.photo_size) != (photo.shape[1], photo.shape[0]):
        raise ValueError(
            f"the photo is {photo.shape[1]} x {photo.shape[0]} but the reconstruction was made from a "
            f"{rec.photo_size[0]} x {rec.photo_size[1]} photo"
        )
    h, w = _size_hw(size)
    opt = options or PhotoTextureOptions()
    if opt.fill not in ("model", "inpaint"):
        raise ValueError(f"unknown fill {opt.fill!r}; use 'model' or 'inpaint'")
    cam = camera or Camera()
    rend = _renderer(renderer)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    atlas = texture_atlas(model)
    raster = _uv_raster(atlas, h, w, rend)
    t1 = time.perf_counter()

    tris = model.triangles.cpu().numpy()
    verts = _np(decoded.vertices_cam)
    normals = _np(decoded.normals_world)
    lit = _fill_colours(decoded, normals, colours)
    k = rec.alignment.photo_intrinsics(cam)
    vis = _Visibility(verts, tris, k, rend, cam, opt)
    t2 = time.perf_counter()

    corners = tris[raster.faces]
    points = _blend(verts, corners, raster.bary)
    seen = vis.visible(points, _blend(normals, corners, raster.bary))
    n_texels = len(raster.texels)
    values = np.zeros((n_texels, 3))
    conf = np.full(n_texels, CONF_FILLED, np.uint8)
    col, row = vis.project(points[seen])
    values[seen] = bilinear(photo, col, row)
    conf[seen] = CONF_VISIBLE
    model_lit = _blend(lit, corners, raster.bary)

    mirror = model.extras.get("mirror_index")
    if opt.mirror and mirror is not None:
        todo = np.flatnonzero(~seen)
        m_corners = np.asarray(mirror, dtype=np.int64)[corners[todo]]
        m_bary = raster.bary[todo]
        m_points = _blend(verts, m_corners, m_bary)
        m_seen = vis.visible(m_points, _blend(normals, m_corners, m_bary))
        idx = todo[m_seen]
        col, row = vis.project(m_points[m_seen])
        ratio = model_lit[idx].clip(5.0) / _blend(lit, m_corners[m_seen], m_bary[m_seen]).clip(5.0)
        values[idx] = bilinear(photo, col, row) * np.clip(ratio, 0.5, 2.0)
        conf[idx] = CONF_MIRRORED
    t3 = time.perf_counter()

    unknown = conf == CONF_FILLED
    if unknown.any():
        known_img = np.zeros(h * w, bool)
        known_img[raster.texels[~unknown]] = True
        known_img = known_img.reshape(h, w)
        if opt.fill == "model":
            resid = np.zeros((h * w, 3))
            resid[raster.texels] = values - model_lit
            spread = push_pull(resid.reshape(h, w, 3), known_img).reshape(-1, 3)
            values[unknown] = model_lit[unknown] + spread[raster.texels[unknown]]
        else:
            img = np.zeros((h * w, 3))
            img[raster.texels] = values
            spread = push_pull(img.reshape(h, w, 3), known_img).reshape(-1, 3)
            values[unknown] = spread[raster.texels[unknown]] if known_img.any() else model_lit[unknown]
    image, coverage = _finish_image(values, raster)
    confidence = np.zeros(h * w, np.uint8)
    confidence[raster.texels] = conf
    t4 = time.perf_counter()
    timings.update(uv_raster=(t1 - t0) * 1e3, photo_depth=(t2 - t1) * 1e3, sample=(t3 - t2) * 1e3,
                   fill=(t4 - t3) * 1e3)
    return Texture("photo", image, confidence.reshape(h, w), coverage, atlas, timings)


def make_texture(
    rec: Reconstruction,
    model: FaceModel,
    photo: np.ndarray | None,
    kind: TextureKind = "photo",
    *,
    size: int | tuple[int, int] = 1024,
    camera: Camera | None = None,
    renderer: Renderer | None = None,
    options: PhotoTextureOptions | None = None,
    colours: FeatureColours | None = None,
) -> Texture:
    """:func:`photo_texture` or :func:`albedo_texture` by ``kind`` (``photo`` may be None for ``"albedo"``), with
    ``colours`` (the features' photo colours) for the albedo and the photo texture's fill.

    Raises:
        ValueError: unknown kind, a photo texture without a photo, or see the two functions.
    """
    if kind == "photo":
        if photo is None:
            raise ValueError("a photo texture needs the photo")
        return photo_texture(rec, model, photo, size=size, camera=camera, renderer=renderer, options=options,
                             colours=colours)
    if kind == "albedo":
        return albedo_texture(rec, model, size=size, renderer=renderer, colours=colours)
    raise ValueError(f"unknown texture kind {kind!r}; use 'photo' or 'albedo'")
