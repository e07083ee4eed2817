"""The colours of the brows, eyes, lips and inner mouth taken from the photo, not from the albedo model's tints.

The shipped ICT albedo space is principled, not learned (``facemodel/ict.py``): its brows, sclera, iris, lips and
inner mouth are hand-set tints (a brown brow at 60 %, an off-white sclera, a red mouth socket). The SH lighting
fitted to a photo is per colour channel and mostly corrects the skin tone (on a greyscale photo it turns the
model's warm skin grey, which is blue-green light), so the tints came out wrong: pale blue-grey brows, staring white
eyes, cyan eyes and a red mouth on a greyscale photo. The albedo model itself is left as it is (the R-Net is
trained on it); the outputs take these regions' colours from the photo instead:

* **regions** (:func:`feature_regions`, once per face model, from its mean shape and 68 landmark vertices, so any
  model with landmarks gets them): ``brows`` (a band around the brow landmark polylines, soft),
  ``eye_whites`` and ``irises`` (the eyeball parts, for a model with eyeball regions; else one ``eyes`` region
  inside the eye landmarks' polygons), ``lips`` (between the outer and inner lip contours, soft edge),
  ``inner_mouth`` (the mouth socket, else inside the inner lip contour).
* **photo colour** (:func:`feature_colours`): the median RGB of the aligned crop's pixels where the region's own
  surface is visible (its core triangles are the nearest surface in a z-buffer of the whole mesh, inside the
  photo), at least :data:`MIN_PIXELS` of them; for the brows the median of the darker half (the hair in the band),
  for the eyes the brightest quarter (white) and the darker half (iris) of the eye opening (:data:`TONES`); a
  region the photo does not show keeps the model's colours.
* **lit colours** (overlay, vertex-colour meshes): ``c x E(v) / median E``, ``E`` the fitted SH irradiance per
  channel, so the region matches the photo's colour on average with the model's shading; the light's colour cast
  cancels, and a greyscale photo gives grey brows and eyes.
* **albedo** (``texture=albedo``, the fill of the photo texture): ``c / luma(median E)``: the photo colour with the
  shading's brightness removed (not its colour: the per-channel light corrects the skin model's tone, not the
  features'), so a greyscale photo gives grey features there too.

Blending: ``out = (1 - w) model + w photo-based`` with ``w = min(1, 2 x`` the region's soft weight ``)``: full over the
core, a ramp over the soft edge (where the model's own tint fades).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from facerecon.geometry import points_in_polygon
from facerecon.render.raster import rasterize_arrays

if TYPE_CHECKING:
    from facerecon.facemodel import FaceModel
    from facerecon.geometry import Camera
    from facerecon.render.base import Renderer
    from facerecon.results import Reconstruction

__all__ = ["MIN_PIXELS", "FeatureColours", "FeatureRegions", "feature_colours", "feature_regions"]

log = logging.getLogger(__name__)

#: Fewest visible crop pixels of a region for its photo colour to be used.
MIN_PIXELS = 6
#: Brow band: Gaussian fall-off of the distance to the brow landmark polylines, in inter-ocular distances (the
#: ICT model's own brow tint uses 0.45 cm, 0.05 of its 9 cm).
BROW_SIGMA_IOD = 0.05
#: Soft outer edge of the lips, in inter-ocular distances (ICT: 0.25 cm).
LIP_EDGE_IOD = 0.028
#: Angle from the eyeball's forward axis, degrees, inside which the eyeball is iris (and pupil): the ICT model's
#: ``IRIS_DEGREES``.
IRIS_DEGREES = 21.0


@dataclass(frozen=True)
class FeatureRegions:
    """Per-vertex soft weights of the feature regions of one face model.

    Attributes:
        names: region names, e.g. ``("brows", "eye_whites", "irises", "lips", "inner_mouth")``.
        weights: ``(R, N)`` float32 in [0, 1].
        core: ``(R, N)`` bool, the vertices whose triangles are sampled (weight >= 0.5).
        sampled: ``(R, N)`` bool: a visible triangle with its three vertices in it gives the region its colour
            (the core of the region, or of those it is sampled with, :data:`SAMPLED_WITH`).
        vertices: per region, the vertices with a weight above 0 (those it recolours).
    """

    names: tuple[str, ...]
    weights: np.ndarray
    core: np.ndarray
    sampled: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    vertices: tuple[np.ndarray, ...] = ()

    _triangles: list[Any] = field(default_factory=list, compare=False, repr=False)

    def weight(self, name: str) -> np.ndarray:
        return self.weights[self.names.index(name)]

    def sampled_triangles(self, triangles: Any) -> np.ndarray:
        """``(R, F)`` bool: the triangles of ``(F, 3)`` ``triangles`` (an array or a tensor) with every corner in each
        region's sampled set; kept for the last triangle object asked about (the pipeline passes the same overlay
        triangles for every photo; ~3 ms to gather)."""
        if self._triangles and self._triangles[0] is triangles:
            return self._triangles[1]
        tris = np.asarray(_numpy(triangles), np.int64)
        got = np.logical_and.reduce(self.sampled.T[tris], axis=1).T  # (F, 3, R) -> (R, F)
        self._triangles[:] = [triangles, got]  # the reference keeps the object alive, so `is` stays meaningful
        return got


@dataclass
class FeatureColours:
    """The outputs' per-vertex colours with the features' photo colours.

    Attributes:
        lit: ``(N, 3)`` float32 lit colours (the decoder's ``colors`` elsewhere).
        albedo: ``(N, 3)`` float32 albedo (the decoder's ``albedo`` elsewhere).
        photo: region -> its photo colour (RGB 0-1), for the regions the photo shows.
        pixels: region -> visible crop pixels it was taken from (0: not shown, model colours kept).
    """

    lit: np.ndarray
    albedo: np.ndarray
    photo: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    pixels: dict[str, int] = field(default_factory=dict)


def _vertex_normals(v: np.ndarray, tris: np.ndarray) -> np.ndarray:
    fn = np.cross(v[tris[:, 1]] - v[tris[:, 0]], v[tris[:, 2]] - v[tris[:, 0]])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    vn = np.zeros_like(v)
    for c in range(3):
        np.add.at(vn, tris[:, c], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _segment_distance(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance of ``points`` (M, 2) to the polyline through ``line`` (K, 2), exact (segment by segment)."""
    a, b = line[:-1][None], line[1:][None]
    ab = b - a
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-18), 0.0, 1.0)
    return np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1).min(axis=1)


def feature_regions(model: FaceModel) -> FeatureRegions:
    """The feature regions of ``model`` (module docstring), from its mean shape (x right, y up, z towards the
    camera), its 68 landmark vertices (iBUG order) and, when it has them, its ``vertex_region`` parts."""
    return feature_regions_of(model.mean_shape.detach().cpu().numpy(), model.triangles.detach().cpu().numpy(),
                              model.landmarks68.detach().cpu().numpy(), model.card.regions or {},
                              model.extras.get("vertex_region"))


def feature_regions_of(mean_shape: np.ndarray, triangles: np.ndarray, landmarks68: np.ndarray,
                       part_ids: dict[str, int], region: np.ndarray | None) -> FeatureRegions:
    """:func:`feature_regions` from a face model's arrays (``(N, 3)`` mean shape, ``(F, 3)`` triangles, the 68
    landmark vertex ids, the card's part names -> ids and the ``(N,)`` part id per vertex, or None), no torch."""
    shape = np.asarray(mean_shape).reshape(-1, 3).astype(np.float64)
    tris = np.asarray(triangles, np.int64)
    n = shape.shape[0]
    normals = _vertex_normals(shape, tris)
    lm = shape[np.asarray(landmarks68, np.int64)]
    iod = float(np.linalg.norm(lm[36] - lm[45]))
    xy = shape[:, :2]
    front = normals[:, 2] > 0.2

    def part(*names: str) -> np.ndarray | None:
        if region is None or not all(k in part_ids for k in names):
            return None
        return np.isin(region, [part_ids[k] for k in names])

    face = part("face")
    surface = front & (face if face is not None else np.ones(n, bool))
    names: list[str] = []
    weights: list[np.ndarray] = []
    cores: list[np.ndarray] = []

    def add(name: str, w: np.ndarray, core: np.ndarray | None = None) -> None:
        names.append(name)
        weights.append(np.clip(w, 0.0, 1.0).astype(np.float32))
        cores.append(w >= 0.5 if core is None else core)

    def distance(line: np.ndarray) -> np.ndarray:  # to the polyline, on the surface only (the bands need no more)
        d = np.full(n, np.inf)
        d[surface] = _segment_distance(xy[surface], line)
        return d

    brow_d = np.minimum(distance(lm[17:22, :2]), distance(lm[22:27, :2]))
    add("brows", np.exp(-((brow_d / (BROW_SIGMA_IOD * iod)) ** 2)) * surface)
    eyeball = part("eyeball_left", "eyeball_right")
    if eyeball is not None:
        iris = np.zeros(n, bool)
        for side in ("eyeball_left", "eyeball_right"):
            sel = part(side)
            assert sel is not None
            d = shape[sel] - shape[sel].mean(0)
            angle = np.degrees(np.arccos(np.clip(d[:, 2] / np.linalg.norm(d, axis=1), -1.0, 1.0)))
            iris[np.flatnonzero(sel)[angle < IRIS_DEGREES]] = True
        add("eye_whites", (eyeball & ~iris).astype(np.float64))
        add("irises", iris.astype(np.float64))
    else:
        eyes = (points_in_polygon(xy, lm[36:42, :2]) | points_in_polygon(xy, lm[42:48, :2])) & front
        add("eyes", eyes.astype(np.float64))
    outer, inner = lm[48:60, :2], lm[60:68, :2]
    in_inner = points_in_polygon(xy, inner)
    in_lips = points_in_polygon(xy, outer) & ~in_inner & surface
    edge = np.exp(-((distance(np.vstack([outer, outer[:1]])) / (LIP_EDGE_IOD * iod)) ** 2))
    add("lips", in_lips + 0.5 * edge * surface, core=in_lips)
    mouth = part("mouth_socket")
    add("inner_mouth", (mouth if mouth is not None else in_inner & front & ~in_lips).astype(np.float64))
    core = np.stack(cores)
    sampled = [core[[names.index(o) for o in SAMPLED_WITH.get(name, (name,)) if o in names]].any(axis=0)
               for name in names]
    return FeatureRegions(tuple(names), np.stack(weights), core, np.stack(sampled),
                          tuple(np.flatnonzero(w > 0) for w in weights))


#: Which part of a region's visible pixels gives its colour: ``median`` (all), ``dark`` (the median of the darker
#: half by luma) or ``light`` (of the brightest quarter): brow hair is the dark part of the brow band, the iris the
#: dark part of the eye opening and the sclera its bright part (the model's eyeball parts do not follow the
#: photo's gaze).
TONES: dict[str, str] = {"brows": "dark", "eye_whites": "light", "irises": "dark"}
#: Regions sampled over the pixels of several (the eye opening as a whole for its white and its iris).
SAMPLED_WITH: dict[str, tuple[str, ...]] = {"eye_whites": ("eye_whites", "irises"),
                                            "irises": ("eye_whites", "irises")}


def _statistic(pixels: np.ndarray, tone: str) -> np.ndarray:
    """The median colour of ``pixels`` (P, 3): of all of them, of the darker half by luma (``dark``), or of the
    brightest quarter (``light``: the sclera is a small part of an eye opening with lashes, lids and a large iris)."""
    if tone != "median":
        luma = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
        part = pixels[luma <= np.median(luma)] if tone == "dark" else pixels[luma >= np.percentile(luma, 75)]
        if len(part):
            pixels = part
    return np.asarray(np.median(pixels, axis=0))


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _luma(rgb: np.ndarray) -> float:
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def _irradiance(lit: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """The SH irradiance per channel, ``lit / albedo`` (``colors = albedo x irradiance``), NaN where the albedo is
    too small to divide by."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(albedo) > 0.02, lit / albedo, np.nan)


def feature_colours(rec: Reconstruction, regions: FeatureRegions, triangles: Any, renderer: Renderer | None,
                    camera: Camera) -> FeatureColours:
    """The lit colours and the albedo of ``rec`` with its feature regions' colours from the photo (module
    docstring), from one z-buffer over the aligned 224 crop.

    Args:
        rec: one reconstruction (batch of one).
        regions: :func:`feature_regions` of its face model.
        triangles: ``(F, 3)`` int64, the triangles of the z-buffer: the features and what can hide them (eyelids,
            lips, the nose of a turned face), e.g. the overlay's; a tensor for ``renderer``, or a NumPy array.
        renderer: the rasteriser; None (or the CPU one with NumPy triangles): the CPU kernels on the NumPy decode.
        camera: the decoder's crop camera.
    """
    if renderer is None or (renderer.name == "cpu" and isinstance(triangles, np.ndarray)):
        # the CPU renderer's raster kernel on the NumPy decode: no torch
        decoded = rec.decoded_arrays
        tid = rasterize_arrays(np.asarray(decoded.vertices_cam[0], np.float32), np.asarray(triangles, np.int64),
                               camera.intrinsics)[0]
    else:
        import torch

        decoded = rec.decoded
        with torch.no_grad():
            raster = renderer.rasterize(decoded.vertices_cam.float(), triangles, camera.intrinsics)
        tid = _numpy(raster.triangle_id)[0]
    lit = _numpy(decoded.colors)[0].astype(np.float32)
    albedo = _numpy(decoded.albedo)[0].astype(np.float32)
    out = FeatureColours(lit.copy(), albedo.copy())
    a = rec.alignment
    covered = tid >= 0
    covered[:, :max(0, -a.left)] = False  # crop pixels outside the photo (the crop pads a face at its edge)
    covered[:, max(0, a.w - a.left):] = False
    covered[:max(0, -a.up)] = False
    covered[max(0, a.h - a.up):] = False
    tris = _numpy(triangles)
    tri_in = regions.sampled_triangles(triangles)  # (R, F): every corner of the triangle in the sampled region
    ids = tid[covered]
    keep = tri_in.any(axis=0)[ids]  # only the pixels of some region are read
    ids = ids[keep]
    colours = rec.crop[covered][keep].astype(np.float32) / 255.0
    corners = tris[ids]  # (P, 3) the vertices of the triangle seen at each of those pixels
    for r, name in enumerate(regions.names):
        pix = tri_in[r][ids]
        count = int(pix.sum())
        out.pixels[name] = count
        if count < MIN_PIXELS:
            continue
        colour = _statistic(colours[pix], TONES.get(name, "median"))
        seen = np.unique(corners[pix])
        e_seen = _irradiance(lit[seen], albedo[seen])
        e_seen = e_seen[np.isfinite(e_seen).all(axis=1)]
        if len(e_seen) == 0:
            continue
        e_med = np.maximum(np.median(e_seen, axis=0), 1e-3)
        sel = regions.vertices[r]
        w_sel = np.minimum(1.0, 2.0 * regions.weights[r][sel, None])  # full over the core: no trace of the tint
        e_v = _irradiance(lit[sel], albedo[sel])
        e_v = np.where(np.isfinite(e_v), e_v, e_med)
        out.lit[sel] = (1.0 - w_sel) * out.lit[sel] + w_sel * (colour * e_v / e_med)
        feature_albedo = np.clip(colour / max(_luma(e_med), 1e-3), 0.0, 1.0)
        out.albedo[sel] = (1.0 - w_sel) * out.albedo[sel] + w_sel * feature_albedo
        out.photo[name] = (float(colour[0]), float(colour[1]), float(colour[2]))
    log.debug("feature colours from the photo: %s", {k: f"{v} px" for k, v in out.pixels.items()})
    return out
