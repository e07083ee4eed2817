"""Builder of the default face model from the ICT FaceKit light model (MIT).

Source: ICT-FaceKit ``FaceXModel/`` (github.com/ICT-VGL/ICT-FaceKit), either the lossless conversion in
``../shared/assets/ict-facekit-light`` (``shapes.npz`` + ``generic_neutral_mesh.obj`` + ``vertex_indices.json``) or
a clone of the public repository (``--source DIR`` with ``DIR/FaceXModel/*.obj`` or the OBJs in ``DIR``).

Choices, and why:

* **Vertices kept.** The contiguous parts 0-14061 (face, head and neck, mouth socket, both eye sockets: everything a
  photo of a head shows, with the inner mouth and eye sockets closing the holes behind lips and eyelids) plus the two
  eyeballs, so that open eyes render as eyes rather than holes: 15,662 vertices. Upstream each eye is two nested
  spheres, an outer "sclera" shell (the transparent cornea over the iris in upstream renders) and an inner "iris"
  sphere; we keep the inner sphere only and paint pupil, iris and sclera on it by the angle from its forward axis
  (an opaque outer shell would hide the iris). Teeth, gums, tongue,
  lacrimal fluid, eye blend/occlusion layers and eyelashes are dropped (thin or hidden layers that a 224 crop does
  not resolve and that would only add self-intersections to the z-buffer).
* **Triangles.** Quads split along their 0-2 diagonal, keeping the counter-clockwise (outward) winding.
* **Bases.** 100 identity modes and the 53 expression blendshapes that the upstream config lists, both as deltas
  from the neutral mesh (the identity OBJs are neutral + one PCA mode at one standard deviation, so a coefficient
  ~ N(0, 1); expression weights are conventionally in [0, 1]).
* **Units and placement.** Centimetres become decimetres (x 0.1, the metric scale is kept so that errors can be
  reported in mm). The mesh is translated so that the centroid of its 51 inner landmarks (17-67) coincides with the
  centroid of the same landmarks in the reference's standard BFM landmarks (``similarity_Lm3D_all.mat``), so the
  face sits about the origin exactly where the BFM face sits in the reference and fills the 224 crop the same way
  at the reference camera (focal 1015, centre 112, camera at z = 10). ICT's face is 4.9 % larger than the BFM's
  standard landmarks (least-squares scale 0.951); the alignment uses this model's own 68 standard landmarks, so the
  crop scale adapts.
* **Albedo.** ICT has no albedo model; see :func:`albedo_space` (principled region modes, not learned).

Size: over 400 lines: the whole ICT FaceKit conversion (part selection, quads, blendshapes, landmarks, the
principled albedo space, the card) is one reproducible recipe, tested as a whole against the shipped file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from facerecon import __version__
from facerecon.coefficients import CoefficientLayout
from facerecon.errors import ModelFileError
from facerecon.facemodel.format import (
    FaceModelCard,
    Provenance,
    build_point_buf,
    save_face_model,
    sha256_file,
)
from facerecon.geometry import points_in_polygon

log = logging.getLogger(__name__)

SOURCE_URL = "https://github.com/ICT-VGL/ICT-FaceKit"
SOURCE_COMMIT = "da5f95a607f5e6b37755b38d3385d7f2853732e5"
LICENCE_NOTICE = (
    "ICT FaceKit, Copyright (c) 2020 USC Institute for Creative Technologies, MIT licence. "
    "This file is derived from it (re-indexed, re-scaled, with an added albedo space) and is itself MIT."
)

#: Kept vertex ranges (inclusive) and their part names, from the upstream README's mesh-part table.
PARTS: tuple[tuple[str, int, int], ...] = (
    ("face", 0, 9408),
    ("head_neck", 9409, 11247),
    ("mouth_socket", 11248, 13293),
    ("eye_socket_left", 13294, 13677),
    ("eye_socket_right", 13678, 14061),
    ("eyeball_left", 22221, 23020),
    ("eyeball_right", 23791, 24590),
)
#: Kept polygon ranges (inclusive): parts 0-4 and the two inner eyeball spheres (upstream "iris" parts).
POLYGONS: tuple[tuple[int, int], ...] = ((0, 14033), (22296, 23093), (23894, 24691))
#: Angular radii (degrees from the eyeball's forward axis) of the painted pupil and iris.
PUPIL_DEGREES = 9.0
IRIS_DEGREES = 21.0
#: The narrow face area (upstream README), used as the photometric-loss region.
NARROW_FACE_VERTICES = 6706
NARROW_FACE_POLYGONS = 6560

#: Centroid of landmarks 17-67 of the reference's 68 standard 3D points (``similarity_Lm3D_all.mat`` in
#: ``../shared/assets/bfm-aux``, MIT), decimetres. ``tests/test_facemodel_ict.py`` recomputes it from the file.
BFM_INNER_LANDMARK_CENTROID = (0.00044808, 0.01700104, 0.280227)

#: Skin GMM of the reference (reference.md section 11, from ``util/skin_mask.py``): component weights and means
#: in (Y, Cb, Cr), 0-255. The weighted mean gives the mean skin tone; the spread of the component means the main
#: colour axes of the albedo space.
SKIN_GMM_WEIGHTS = (0.24063933, 0.16365987, 0.26034665, 0.33535415)
SKIN_GMM_MEANS = (
    (113.71862, 103.39613, 164.08226),
    (150.19858, 105.18467, 155.51428),
    (183.92976, 107.62468, 152.71820),
    (114.90524, 113.59782, 151.38217),
)


@dataclass(frozen=True)
class IctSource:
    """The raw source arrays (centimetres, the upstream vertex order)."""

    neutral: np.ndarray  # (V, 3)
    identity: np.ndarray  # (100, V, 3) absolute positions
    expression: np.ndarray  # (53, V, 3) absolute positions, config order
    expression_names: list[str]
    landmarks68: np.ndarray  # (68,)
    polygons: list[list[int]]  # 0-based vertex ids per polygon
    uv_polygons: list[list[int]]  # 0-based vt ids per polygon corner
    uvs: np.ndarray  # (T, 2)
    files: dict[str, str]  # name -> sha256


def _parse_obj(path: Path) -> tuple[np.ndarray, np.ndarray, list[list[int]], list[list[int]]]:
    verts: list[list[float]] = []
    uvs: list[list[float]] = []
    polys: list[list[int]] = []
    uv_polys: list[list[int]] = []
    with open(path) as f:
        for line in f:
            if line.startswith("v "):
                verts.append([float(t) for t in line.split()[1:4]])
            elif line.startswith("vt "):
                uvs.append([float(t) for t in line.split()[1:3]])
            elif line.startswith("f "):
                corners = [c.split("/") for c in line.split()[1:]]
                polys.append([int(c[0]) - 1 for c in corners])
                uv_polys.append([int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in corners])
    return np.asarray(verts, np.float32), np.asarray(uvs, np.float32), polys, uv_polys


def read_source(source: Path) -> IctSource:
    """Read the ICT model from the shared lossless conversion or from a clone of the upstream repository."""
    source = Path(source)
    if (source / "FaceXModel").is_dir():
        source = source / "FaceXModel"
    obj = source / "generic_neutral_mesh.obj"
    config = source / "vertex_indices.json"
    if not obj.is_file() or not config.is_file():
        raise ModelFileError(f"{source} is not an ICT FaceKit model folder (need generic_neutral_mesh.obj, "
                             "vertex_indices.json and shapes.npz or the identity/expression OBJs)")
    cfg = json.loads(config.read_text())
    names: list[str] = list(cfg["expressions"])
    neutral_obj, uvs, polys, uv_polys = _parse_obj(obj)
    files = {p.name: sha256_file(p) for p in (obj, config)}
    npz = source / "shapes.npz"
    if npz.is_file():
        files[npz.name] = sha256_file(npz)
        with np.load(npz, allow_pickle=False) as z:
            neutral = z["neutral"]
            identity = z["identity"]
            expression = z["expression"][z["config_expression_index"]]
            stored = [str(s) for s in z["expression_names"][z["config_expression_index"]]]
            landmarks = z["landmarks68"].astype(np.int64)
        if stored != names:
            raise ModelFileError(f"{npz}: expression order differs from vertex_indices.json")
        if not np.array_equal(neutral, neutral_obj):
            raise ModelFileError(f"{npz}: neutral vertices differ from {obj.name}")
    else:  # a clone of the upstream repository: one OBJ per mode
        neutral = neutral_obj
        id_files = sorted(source.glob("identity[0-9][0-9][0-9].obj"))
        if len(id_files) != 100:
            raise ModelFileError(f"{source}: expected 100 identityNNN.obj files, found {len(id_files)}")
        identity = np.stack([_parse_obj(p)[0] for p in id_files])
        expression = np.stack([_parse_obj(source / f"{n}.obj")[0] for n in names])
        landmarks = np.asarray(cfg["idx_to_landmark_verts"], np.int64)
    return IctSource(neutral, identity, expression, names, landmarks, polys, uv_polys, uvs, files)


def _triangulate(polys: list[list[int]]) -> np.ndarray:
    tris: list[list[int]] = []
    for p in polys:
        for k in range(1, len(p) - 1):
            tris.append([p[0], p[k], p[k + 1]])
    return np.asarray(tris, np.int64)


def _polyline_distance(points: np.ndarray, line: np.ndarray, samples: int = 20) -> np.ndarray:
    """Distance of ``points`` (M, 2) to the polyline through ``line`` (K, 2) (dense sampling)."""
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[:, None]
    dense = np.concatenate([line[i] + t * (line[i + 1] - line[i]) for i in range(len(line) - 1)] + [line[-1:]])
    d, _ = cKDTree(dense).query(points)
    return d


def _smooth(x: np.ndarray, width: float) -> np.ndarray:
    """A smooth step from 0 (x <= -width) to 1 (x >= width)."""
    return 0.5 * (1.0 + np.tanh(x / max(width, 1e-9)))


def _ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of the reference's (BT.601 studio-swing) RGB -> YCbCr of section 11, values 0-255."""
    forward = np.array(
        [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]
    ) / 255.0
    return np.linalg.solve(forward, (ycc - np.array([16.0, 128.0, 128.0])).T).T


def albedo_space(
    mean_shape_cm: np.ndarray, normals: np.ndarray, region: np.ndarray, regions: dict[str, int], lm: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A principled albedo space for a model without one: mean albedo + region/smooth modes.

    **Not learned from data.** Mean skin = the weight-averaged skin-class means of the reference's skin GMM
    (section 11), converted to RGB (it is the colour of lit skin in photos, which the 0.8-ambient lighting of the
    reference then reproduces at about 0.71x; the lighting coefficients absorb the brightness). Region colours for
    lips, brows, the eyes (sclera, iris, pupil) and the inner mouth and eye sockets are hand-set. Every basis
    column is scaled so that a coefficient of 1 is a plausible one-standard-deviation change:

    * 3 global colour modes along the principal axes of the skin GMM's component means (plus a luminance axis),
    * 15 smooth spatial modes: {x, y, x^2, y^2, xy} over the head x 3 colour axes,
    * lips (3, RGB), brows (1), beard/stubble (2), cheek redness (1), iris colour (3), hair on the scalp (3),
      inner mouth/eye-socket darkness (1).

    Returns:
        mean ``(N, 3)`` float32 in [0, 1], basis ``(K, N, 3)`` float32, and the K mode names.
    """
    n = mean_shape_cm.shape[0]
    xy = mean_shape_cm[:, :2]
    front = normals[:, 2] > 0.2
    is_region = {name: region == idx for name, idx in regions.items()}
    skin_part = is_region["face"] | is_region["head_neck"]

    # Mean skin tone and colour axes from the skin GMM.
    w = np.asarray(SKIN_GMM_WEIGHTS)
    rgb_means = _ycbcr_to_rgb(np.asarray(SKIN_GMM_MEANS)) / 255.0
    skin = (w[:, None] * rgb_means).sum(0)
    centred = rgb_means - skin
    cov = (w[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
    evals, evecs = np.linalg.eigh(cov)
    axes = [evecs[:, i] * math.sqrt(max(evals[i], 0.0)) for i in (2, 1)]
    axes.append(np.full(3, 0.06))  # overall luminance, 6 % of full scale
    axes = [a if a.sum() >= 0 else -a for a in axes]

    mean = np.tile(skin, (n, 1))
    modes: list[tuple[str, np.ndarray]] = []

    def region_colour(mask: np.ndarray, rgb: tuple[float, float, float], weight: np.ndarray | None = None) -> None:
        wgt = mask.astype(np.float64) if weight is None else weight * mask
        mean[:] = mean * (1.0 - wgt[:, None]) + np.asarray(rgb)[None] * wgt[:, None]

    # Lips: inside the outer lip contour, outside the inner one, front-facing, soft edge.
    outer, inner = lm[48:60, :2], lm[60:68, :2]
    in_lips = points_in_polygon(xy, outer) & ~points_in_polygon(xy, inner) & front & is_region["face"]
    lip_edge = np.exp(-((_polyline_distance(xy, np.vstack([outer, outer[:1]])) / 0.25) ** 2))
    lips = np.clip(in_lips + lip_edge * (front & is_region["face"]) * 0.5, 0.0, 1.0)
    # Brows: near the brow polylines.
    brow_d = np.minimum(_polyline_distance(xy, lm[17:22, :2]), _polyline_distance(xy, lm[22:27, :2]))
    brows = np.exp(-((brow_d / 0.45) ** 2)) * (front & is_region["face"])
    # Beard: below the nose base and around the mouth and chin, not the lips.
    nose_base_y = lm[33, 1]
    jaw_y = lm[8, 1]
    lower = _smooth(nose_base_y - 0.3 - xy[:, 1], 0.4) * _smooth(xy[:, 1] - (jaw_y - 2.5), 0.8)
    beard = lower * (1.0 - lips) * is_region["face"] * (mean_shape_cm[:, 2] > lm[0, 2] - 1.0)
    # Cheeks: Gaussians between the nose wings and the jaw.
    cheek_l = 0.5 * (lm[31] + lm[3])
    cheek_r = 0.5 * (lm[35] + lm[13])
    cheeks = (np.exp(-(np.linalg.norm(mean_shape_cm - cheek_l, axis=1) / 2.0) ** 2)
              + np.exp(-(np.linalg.norm(mean_shape_cm - cheek_r, axis=1) / 2.0) ** 2)) * skin_part
    # Hair: the scalp above the brows, on the head and the top of the face part.
    brow_top = lm[17:27, 1].max()
    hair = _smooth(xy[:, 1] - (brow_top + 4.5), 1.0) * skin_part
    hair = np.maximum(hair, _smooth(-mean_shape_cm[:, 2] + lm[0, 2] - 2.0, 1.0) * is_region["head_neck"]
                      * _smooth(xy[:, 1] - lm[0, 1], 1.5))
    eyeball = is_region["eyeball_left"] | is_region["eyeball_right"]
    angle = np.zeros(n)
    for side in ("eyeball_left", "eyeball_right"):
        sel = is_region[side]
        centre = mean_shape_cm[sel].mean(0)
        d = mean_shape_cm[sel] - centre
        angle[sel] = np.degrees(np.arccos(np.clip(d[:, 2] / np.linalg.norm(d, axis=1), -1.0, 1.0)))
    pupil = eyeball & (angle < PUPIL_DEGREES)
    iris = eyeball & (angle >= PUPIL_DEGREES) & (angle < IRIS_DEGREES)
    sclera = eyeball & (angle >= IRIS_DEGREES)
    sockets = is_region["mouth_socket"] | is_region["eye_socket_left"] | is_region["eye_socket_right"]

    region_colour(lips, (0.62, 0.32, 0.30))
    region_colour(np.ones(n, bool), (0.40, 0.28, 0.22), brows * 0.6)
    region_colour(sclera, (0.80, 0.76, 0.72))
    region_colour(iris, (0.30, 0.20, 0.13))
    region_colour(pupil, (0.03, 0.03, 0.03))
    region_colour(is_region["mouth_socket"], (0.30, 0.10, 0.10))
    region_colour(is_region["eye_socket_left"] | is_region["eye_socket_right"], (0.45, 0.25, 0.22))

    face_like = skin_part.astype(np.float64)
    for i, axis in enumerate(axes):
        modes.append((f"global_colour_{i}", face_like[:, None] * axis[None]))
    centre = mean_shape_cm[skin_part].mean(0)
    u = (mean_shape_cm[:, 0] - centre[0]) / 8.0
    v = (mean_shape_cm[:, 1] - centre[1]) / 10.0
    for fname, fval in (("x", u), ("y", v), ("x2", u**2), ("y2", v**2), ("xy", u * v)):
        fval = (fval - fval[skin_part].mean()) * face_like
        fval = fval / max(np.abs(fval).max(), 1e-9)
        for i, axis in enumerate(axes):
            modes.append((f"smooth_{fname}_{i}", fval[:, None] * (0.5 * axis)[None]))
    for c, name in enumerate(("r", "g", "b")):
        e = np.zeros(3)
        e[c] = 0.08
        modes.append((f"lips_{name}", lips[:, None] * e[None]))
    modes.append(("brows", -brows[:, None] * np.full(3, 0.12)[None]))
    modes.append(("beard_dark", -beard[:, None] * np.full(3, 0.10)[None]))
    modes.append(("beard_blue", beard[:, None] * np.array([-0.03, -0.01, 0.02])[None]))
    modes.append(("cheek_red", cheeks[:, None] * np.array([0.05, -0.01, -0.01])[None]))
    for c, name in enumerate(("r", "g", "b")):
        e = np.zeros(3)
        e[c] = 0.12
        modes.append((f"iris_{name}", iris[:, None] * e[None]))
    for i, axis in enumerate((np.full(3, -0.18), np.array([0.06, 0.02, -0.04]), np.array([-0.03, -0.02, 0.05]))):
        modes.append((f"hair_{i}", hair[:, None] * axis[None]))
    modes.append(("socket_dark", sockets[:, None] * np.full(3, -0.08)[None]))

    basis = np.stack([m for _, m in modes]).astype(np.float32)
    return np.clip(mean, 0.0, 1.0).astype(np.float32), basis, [name for name, _ in modes]


def _vertex_normals_np(v: np.ndarray, tris: np.ndarray) -> np.ndarray:
    fn = np.cross(v[tris[:, 0]] - v[tris[:, 1]], v[tris[:, 1]] - v[tris[:, 2]])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    vn = np.zeros_like(v)
    for c in range(3):
        np.add.at(vn, tris[:, c], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _skin_mask(shape_cm: np.ndarray, normals: np.ndarray, lm: np.ndarray, face_mask: np.ndarray) -> np.ndarray:
    """Cheeks, nose and forehead: the narrow face area, front-facing, away from eyes, brows, lips and nostrils."""
    pts = shape_cm[:, :2]
    far = np.ones(len(pts), bool)
    for idx, radius in ((range(17, 27), 0.9), (range(36, 48), 1.0), (range(48, 68), 0.8), (range(31, 36), 0.45)):
        d, _ = cKDTree(lm[list(idx), :2]).query(pts)
        far &= d > radius
    below_jaw = pts[:, 1] < lm[8, 1] + 1.0
    return (face_mask.astype(bool) & far & (normals[:, 2] > 0.3) & ~below_jaw).astype(np.uint8)


def build(source: Path, out: Path, *, basis_dtype: str = "float16") -> dict[str, object]:
    """Build the ICT face model file ``out`` (``.npz`` + ``.json``) from ``source``; returns the side-car card."""
    src = read_source(source)
    keep = np.concatenate([np.arange(a, b + 1) for _, a, b in PARTS])
    remap = np.full(src.neutral.shape[0], -1, np.int64)
    remap[keep] = np.arange(keep.size)
    region = np.concatenate([np.full(b - a + 1, i, np.uint8) for i, (_, a, b) in enumerate(PARTS)])
    regions = {name: i for i, (name, _, _) in enumerate(PARTS)}

    poly_ids = np.concatenate([np.arange(a, b + 1) for a, b in POLYGONS])
    polys = [src.polygons[i] for i in poly_ids]
    uv_polys = [src.uv_polygons[i] for i in poly_ids]
    tris_src = _triangulate(polys)
    tris = remap[tris_src]
    if (tris < 0).any():
        raise ModelFileError("kept polygons reference dropped vertices")
    uv_tris = _triangulate(uv_polys)
    used_uv = np.unique(uv_tris)
    uv_remap = np.full(src.uvs.shape[0], -1, np.int64)
    uv_remap[used_uv] = np.arange(used_uv.size)
    uv_tris = uv_remap[uv_tris]
    uvs = src.uvs[used_uv]
    front_polys = [src.polygons[i] for i in range(NARROW_FACE_POLYGONS)]
    front_tris = remap[_triangulate(front_polys)]

    # Units and placement (module docstring).
    neutral_cm = src.neutral.astype(np.float64)
    lm_idx = remap[src.landmarks68]
    inner_centroid_dm = neutral_cm[src.landmarks68[17:]].mean(0) * 0.1
    offset = np.asarray(BFM_INNER_LANDMARK_CENTROID) - inner_centroid_dm
    offset[0] = 0.0  # the ICT mesh is mirror-symmetric about x = 0
    mean_shape = neutral_cm[keep] * 0.1 + offset
    id_basis = (src.identity.astype(np.float64)[:, keep] - neutral_cm[keep][None]) * 0.1
    exp_basis = (src.expression.astype(np.float64)[:, keep] - neutral_cm[keep][None]) * 0.1

    shape_cm = neutral_cm[keep]
    normals = _vertex_normals_np(shape_cm, tris)
    lm_cm = shape_cm[lm_idx]
    mean_albedo, albedo_basis, albedo_modes = albedo_space(shape_cm, normals, region, regions, lm_cm)
    face_mask = np.zeros(keep.size, np.uint8)
    face_mask[:NARROW_FACE_VERTICES] = 1
    skin = _skin_mask(shape_cm, normals, lm_cm, face_mask)

    dt = np.dtype(basis_dtype)
    stored = {k: v.astype(dt) for k, v in (("id_basis", id_basis), ("exp_basis", exp_basis))}
    quant_mm = max(float(np.abs(stored[k].astype(np.float64) - v).max()) * 100.0
                   for k, v in (("id_basis", id_basis), ("exp_basis", exp_basis)))
    arrays = {
        "mean_shape": mean_shape.astype(np.float32),
        **stored,
        "mean_albedo": mean_albedo,
        "albedo_basis": albedo_basis.astype(dt),
        "triangles": tris.astype(np.int32),
        "point_buf": build_point_buf(tris, keep.size),
        "landmarks68": lm_idx.astype(np.int32),
        "standard_landmarks68": mean_shape[lm_idx].astype(np.float32),
        "face_mask": face_mask,
        "front_triangles": front_tris.astype(np.int32),
        "skin_mask": skin,
        "uv_coords": uvs.astype(np.float32),
        "uv_triangles": uv_tris.astype(np.int32),
        "vertex_region": region,
        "mirror_index": _mirror_index(mean_shape),
    }
    card = FaceModelCard(
        name="ict",
        description=(
            "ICT FaceKit light model: face, head, neck, inner mouth, eye sockets and eyeballs (15,662 vertices), "
            "100 identity PCA modes, 53 ARKit-style expression blendshapes, principled albedo modes."
        ),
        licence="MIT",
        licence_notice=LICENCE_NOTICE,
        redistributable=True,
        layout=CoefficientLayout(id=id_basis.shape[0], exp=exp_basis.shape[0], tex=albedo_basis.shape[0]),
        n_vertices=int(keep.size),
        n_triangles=int(tris.shape[0]),
        has_uvs=True,
        expression_names=src.expression_names,
        regions=regions,
        albedo=(
            "Not learned: mean skin tone from the reference skin GMM's skin-class means, hand-set region colours "
            "(lips, brows, sclera/iris/pupil, inner mouth, eye sockets), and "
            f"{len(albedo_modes)} modes: " + ", ".join(albedo_modes)
        ),
        storage={
            "basis_dtype": str(dt),
            "basis_max_abs_error_mm": float(f"{quant_mm:.3g}"),
        },
        limits=[
            "Albedo space is principled, not data-driven: it cannot express freckles, make-up, scars or "
            "fine texture; use the photo-sampled texture export for appearance.",
            "Expression coefficients are blendshape weights meant to lie in [0, 1]; the regressor and the fit "
            "may return small negative values.",
            "Fixed (not contour-sliding) jaw landmarks, as in the reference: at large yaw the detected jaw "
            "points lie on the silhouette, not on these vertices.",
            "Eyeballs move with the identity modes but do not rotate with gaze (eyeLook* blendshapes move the "
            "eyelids, as upstream).",
        ],
        provenance=Provenance(
            source="ICT FaceKit FaceXModel (light), lossless npz conversion in shared/assets/ict-facekit-light",
            source_url=SOURCE_URL,
            source_commit=SOURCE_COMMIT,
            source_files=src.files,
            builder="facerecon.facemodel.ict",
            builder_version=__version__,
        ),
    )
    log.info("writing %s (%d vertices, %d triangles)", out, keep.size, tris.shape[0])
    return save_face_model(out, arrays, card)


def _mirror_index(shape: np.ndarray) -> np.ndarray:
    """For every vertex, the nearest vertex of the mesh mirrored about x = 0 (the model is symmetric)."""
    mirrored = shape * np.array([-1.0, 1.0, 1.0])
    _, idx = cKDTree(shape).query(mirrored)
    return idx.astype(np.int32)
