"""Large-pose training photos made from real ones, as 300W-LP was made (Zhu et al., "Face Alignment Across Large
Poses: A 3D Solution", CVPR 2016, section 4: "face profiling").

A frontal or moderately turned training photo is reconstructed (R-Net, then a landmark fit to its given 68
landmarks), the fitted head is turned in 3D about a fixed point of the head (yaw out to 90 degrees, pitch jittered)
and rendered back into the photo, textured from the photo itself:

* every pixel of the turned head is a surface point (triangle + barycentrics, which a rigid motion does not change);
  where that point was **seen** in the photo (the photo-resolution depth test and a facing test in the original
  pose, as :mod:`facerecon.texture` does) it takes the photo's colour there;
* else its **mirror image** (the default model is left-right symmetric to 0.1 mm) where that was seen: the side of
  the face a turn reveals is the photo's other cheek;
* else (ear, side and back of the head) the fitted model's lit colour, matched in gain to the photo's colours.

The photo's own head is removed first (its coverage, widened, filled smoothly from around it by push-pull), so no
second face shows behind the turned one; the body and the rest of the photo stay. Then the synthesised photo goes
through exactly what inference runs: our detector, the reference alignment recentred for turned faces, the 224 crop
(the exact projected landmarks stand in when the detector misses or disagrees, which is counted). Labels, all
exact by construction: the turned head's identity, expression and pose coefficients and its 68 landmarks
(3D landmark vertices projected, hidden side included, the AFLW2000-3D / 300W-LP convention).

Shapes: photos ``(H, W, 3)`` uint8, y down; camera-space points ``(x, y, d)`` with ``d = distance - z``
(:class:`facerecon.decoder.DecodedFace`); intrinsics y up with pixel centres at ``u = col + 0.5``,
``v_up = H - (row + 0.5)`` (:mod:`facerecon.render.base`).

Size: over 400 lines: one recipe (fit, turn, texture from the photo, remove the photo's head, re-detect, label)
whose steps share the frames above and the cached pool's key (its steps tested in ``tests/test_large_pose.py``,
the whole pool by the tiny training run of ``tests/test_train.py``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from facerecon import geometry
from facerecon.align import Alignment
from facerecon.coefficients import Coefficients
from facerecon.decoder import DecodedFace, FaceDecoder
from facerecon.detect.face import DetectedFace, make_face
from facerecon.errors import NoFaceFound
from facerecon.fit import FitConfig, FitTarget, fit
from facerecon.geometry import Intrinsics
from facerecon.render.base import Renderer
from facerecon.texture import bilinear, push_pull

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True)
class LargePoseConfig:
    """How source photos are chosen and turned.

    Attributes:
        source_max_yaw_deg: only photos whose detected |yaw| is below this are turned (their texture is reliable).
        yaw_min_deg, yaw_max_deg: the turned head's |yaw|, uniform in this range, either sign.
        pitch_jitter_deg: added to the source pitch (uniform, +-), then clipped to +-``pitch_max_deg``.
        pivot: the head point (model space, dm) that stays in place: about the middle of the head between the ears
            (the default model spans z -1.69 ... 0.55 dm, y -1.98 ... 1.40 with the neck).
        max_photo_px_per_crop_px: photos are downscaled so that a crop pixel covers at most this many photo pixels
            (the crop resamples them anyway; the render costs the photo's resolution).
        fit_steps: landmark-fit steps after R-Net (source coefficients).
    """

    source_max_yaw_deg: float = 30.0
    yaw_min_deg: float = 35.0
    yaw_max_deg: float = 90.0
    pitch_jitter_deg: float = 20.0
    pitch_max_deg: float = 30.0
    pivot: tuple[float, float, float] = (0.0, 0.0, -0.55)
    max_photo_px_per_crop_px: float = 1.5
    fit_steps: int = 60


def turn_head(coeffs: Coefficients, angle: torch.Tensor, pivot: Sequence[float]) -> Coefficients:
    """The same head with Euler angles ``angle (B, 3)`` (radians), translated so that the model-space ``pivot``
    stays where it was: ``R1 p + t1 = R0 p + t0``."""
    p = torch.tensor(pivot, dtype=coeffs.angle.dtype, device=coeffs.angle.device)
    r0 = geometry.euler_to_rotation(coeffs.angle)
    r1 = geometry.euler_to_rotation(angle)
    trans = coeffs.trans + (r0 - r1) @ p
    return Coefficients(coeffs.id, coeffs.exp, coeffs.tex, angle, coeffs.gamma, trans)


def project(points: np.ndarray, k: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """``(P, 3)`` camera points -> continuous photo ``(col, row)``, pixel centres at integers, y down."""
    d = np.maximum(points[:, 2], 1e-6)
    u = k.fx * points[:, 0] / d + k.cx
    v_up = k.fy * points[:, 1] / d + k.cy
    return u - 0.5, k.height - v_up - 0.5


def _window(points: Sequence[np.ndarray], k: Intrinsics, margin: float) -> tuple[int, int, int, int]:
    """Half-open photo window ``(c0, r0, c1, r1)`` around every projected point set, widened by ``margin`` of the
    larger side, clipped to the photo."""
    cols, rows = zip(*(project(p, k) for p in points), strict=True)
    col, row = np.concatenate(cols), np.concatenate(rows)
    pad = margin * max(float(np.ptp(col)), float(np.ptp(row)), 1.0)
    c0 = int(np.clip(np.floor(col.min() - pad), 0, k.width))
    c1 = int(np.clip(np.ceil(col.max() + pad) + 1, 0, k.width))
    r0 = int(np.clip(np.floor(row.min() - pad), 0, k.height))
    r1 = int(np.clip(np.ceil(row.max() + pad) + 1, 0, k.height))
    return c0, r0, c1, r1


def _sub_intrinsics(k: Intrinsics, c0: int, r0: int, c1: int, r1: int) -> Intrinsics:
    """The intrinsics of the photo window (same pixels, origin moved)."""
    return Intrinsics(k.fx, k.fy, k.cx - c0, k.cy - (k.height - r1), max(c1 - c0, 1), max(r1 - r0, 1))


def _facing(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Cosine between world-frame ``normals`` and the direction from camera-space ``points`` to the camera (camera
    at x = y = d = 0; world z = distance - d, so that direction is ``(-x, -y, d)`` in world axes)."""
    view = np.stack([-points[:, 0], -points[:, 1], points[:, 2]], axis=1)
    view /= np.linalg.norm(view, axis=1, keepdims=True).clip(1e-12)
    n = normals / np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-12)
    return (n * view).sum(axis=1)


@dataclass(frozen=True)
class TurnedPhoto:
    """One synthesised photo: ``image (H, W, 3)`` uint8, the turned head's exact ``lm68 (68, 2)`` photo px y down,
    and the share of its rendered pixels textured from the photo (``seen``), from the mirror side (``mirrored``) or
    from the model (the rest)."""

    image: np.ndarray
    lm68: np.ndarray
    seen: float
    mirrored: float


def render_turned(photo: np.ndarray, k: Intrinsics, before: DecodedFace, after: DecodedFace, triangles: torch.Tensor,
                  landmarks68: torch.Tensor, renderer: Renderer, *, head_vertices: np.ndarray | None = None,
                  znear: float = 0.1, zfar: float = 100.0,
                  depth_tol: float = 0.03, mirror_tol: float = 0.08, min_facing: float = 0.02) -> TurnedPhoto:
    """Render the turned head ``after`` (batch 1) into ``photo`` textured from the photo as seen by ``before``
    (the same head in the photo's pose); module docstring for the recipe.

    Args:
        photo: ``(H, W, 3)`` uint8; k: its intrinsics (:meth:`facerecon.align.Alignment.photo_intrinsics`, scaled
            with the photo); triangles: ``(F, 3)`` the mesh; landmarks68: ``(68,)`` vertex ids.
        head_vertices: ``(N,)`` bool, the scalp / neck vertices: where the photo never saw them they take the
            filled background's colour (hair and surroundings, smoothed) instead of the model's skin, so a turned
            head is not a bald mannequin.
        depth_tol, mirror_tol: depth-test tolerances (dm) for a point and for its mirror image (which is off the
            fitted surface by the face's asymmetry).
        min_facing: the least cosine between a seen point's normal and its view ray (grazing texture is stretched,
            but better than none; the mirror image needs 0.05 more).
    """
    v0 = before.vertices_cam[0].detach().cpu().numpy().astype(np.float64)
    v1 = after.vertices_cam[0].detach().cpu().numpy().astype(np.float64)
    c0, r0, c1, r1 = _window([v0, v1], k, margin=0.15)
    wk = _sub_intrinsics(k, c0, r0, c1, r1)
    tris_t = triangles.to(renderer.device)
    verts = torch.from_numpy(np.stack([v0, v1]).astype(np.float32)).to(renderer.device)
    raster = renderer.rasterize(verts, tris_t, wk, znear=znear, zfar=zfar)
    depth0 = raster.depth[0].cpu().numpy().astype(np.float64)
    mask0 = depth0 > 0
    # pixels within ~1 % of the face size of the original outline count as background (the fit's outline is not
    # exact: sampling there would paint the photo's background onto the face)
    m = max(1, round(0.012 * max(wk.width, wk.height)))
    near_bg = F.max_pool2d(torch.from_numpy((~mask0).astype(np.float32))[None, None], 2 * m + 1, stride=1,
                           padding=m)[0, 0].numpy() > 0
    depth0 = np.where(near_bg, 0.0, depth0)
    tid = raster.triangle_id[1].cpu().numpy()
    bary = raster.barycentrics[1].cpu().numpy().astype(np.float64)
    cover = tid >= 0
    rows_px, cols_px = np.nonzero(cover)
    tri = triangles.cpu().numpy()[tid[cover]]
    b = bary[cover]

    def blend(values: np.ndarray) -> np.ndarray:
        return (b[:, 0:1] * values[tri[:, 0]] + b[:, 1:2] * values[tri[:, 1]] + b[:, 2:3] * values[tri[:, 2]])

    window = photo[r0:r1, c0:c1]

    def seen(points: np.ndarray, normals: np.ndarray, tol: float, facing: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        col, row = project(points, wk)
        ic, ir = np.rint(col).astype(np.int64), np.rint(row).astype(np.int64)
        inside = (ic >= 0) & (ic < wk.width) & (ir >= 0) & (ir < wk.height)
        z = np.zeros(len(points))
        z[inside] = depth0[ir[inside], ic[inside]]
        ok = inside & (z > 0) & (np.abs(points[:, 2] - z) < tol) & (_facing(points, normals) > facing)
        return ok, col, row

    # the surface point of every turned-head pixel, in the original pose
    p0 = blend(v0)
    n0 = blend(before.normals_world[0].detach().cpu().numpy().astype(np.float64))
    ok, col, row = seen(p0, n0, depth_tol, min_facing)
    rgb = np.zeros((len(p0), 3), np.float32)
    rgb[ok] = bilinear(window, col[ok], row[ok])
    # its mirror image (model x -> -x), posed as in the photo
    rot0 = before.rotation[0].detach().cpu().numpy().astype(np.float64)
    world0 = before.vertices_world[0].detach().cpu().numpy().astype(np.float64)
    shape = before.shape[0].detach().cpu().numpy().astype(np.float64)
    t0 = (world0 - shape @ rot0.T).mean(axis=0)
    flip = np.array([-1.0, 1.0, 1.0])
    sm = blend(shape) * flip
    wm = sm @ rot0.T + t0
    distance = float(world0[0, 2] + v0[0, 2])  # world z = distance - d
    pm = np.stack([wm[:, 0], wm[:, 1], distance - wm[:, 2]], axis=1)
    nm = (blend(before.normals[0].detach().cpu().numpy().astype(np.float64)) * flip) @ rot0.T
    okm, colm, rowm = seen(pm, nm, mirror_tol, min_facing + 0.05)
    okm &= ~ok
    rgb[okm] = bilinear(window, colm[okm], rowm[okm])
    # the rest: the model's lit colour, gain-matched to the photo-textured pixels
    rest = ~(ok | okm)
    model_rgb = blend(after.colors[0].detach().cpu().numpy().astype(np.float64)).clip(0, 1) * 255.0
    if ok.sum() > 50:
        gain = np.median(rgb[ok], axis=0) / np.maximum(np.median(model_rgb[ok], axis=0), 1.0)
        model_rgb = model_rgb * np.clip(gain, 0.3, 3.0)
    rgb[rest] = model_rgb[rest]

    # the photo without its own head: the widened coverage filled from around it
    grow = max(2, round(0.04 * max(wk.width, wk.height)))
    old = F.max_pool2d(torch.from_numpy(mask0.astype(np.float32))[None, None], 2 * grow + 1, stride=1,
                       padding=grow)[0, 0].numpy() > 0
    background = push_pull(window.astype(np.float32), ~old)
    if head_vertices is not None:
        hair = rest & head_vertices[tri].all(axis=1)
        rgb[hair] = background[rows_px[hair], cols_px[hair]]
    head = np.zeros(window.shape, np.float32)
    head[rows_px, cols_px] = rgb
    alpha = cover.astype(np.float32)
    alpha = F.avg_pool2d(F.pad(torch.from_numpy(alpha)[None, None], (1, 1, 1, 1), mode="replicate"), 3,
                         stride=1)[0, 0].numpy()[..., None]
    out = photo.copy()
    out[r0:r1, c0:c1] = np.clip(head * alpha + background * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    lm_col, lm_row = project(v1[landmarks68.cpu().numpy()], k)
    n = max(int(cover.sum()), 1)
    return TurnedPhoto(out, np.stack([lm_col, lm_row], axis=1).astype(np.float32), float(ok.sum()) / n,
                       float(okm.sum()) / n)


def scaled_photo(photo: np.ndarray, alignment: Alignment, max_px_per_crop_px: float) -> tuple[np.ndarray, Intrinsics]:
    """The photo (downscaled when its face is finer than ``max_px_per_crop_px`` photo px per crop px) and its
    intrinsics for the alignment's crop camera."""
    k = alignment.photo_intrinsics()
    s = min(1.0, max_px_per_crop_px * alignment.sigma)
    if s >= 0.999:
        return photo, k
    h0, w0 = photo.shape[:2]
    w1, h1 = max(1, round(w0 * s)), max(1, round(h0 * s))
    img = np.asarray(Image.fromarray(photo).resize((w1, h1), Image.Resampling.BILINEAR, reducing_gap=2.0))
    kx, ky = w1 / w0, h1 / h0  # pixel edges at integers: u' = u kx, v_up' = v_up ky
    return img, Intrinsics(k.fx * kx, k.fy * ky, k.cx * kx, k.cy * ky, w1, h1)


@dataclass
class LargePosePool:
    """Turned real photos, N of them, as R-Net sees them.

    Attributes:
        images: ``(N, 224, 224, 3)`` uint8 crops (our detector + the reference alignment, as at inference).
        coeffs: ``(N, layout.total)`` float32 labels (identity, expression and pose exact; albedo and light are the
            source fit's, not supervised).
        lm68: ``(N, 68, 2)`` float32 exact landmarks, crop px, y up.
        yaw: ``(N,)`` float32 label yaw, degrees.
        detected: ``(N,)`` bool: the crop came from our detector's face (else from the exact landmarks).
        source: ``(N,)`` int64 row of the source photo in the set it was built from.
    """

    images: np.ndarray
    coeffs: np.ndarray
    lm68: np.ndarray
    yaw: np.ndarray
    detected: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **asdict(self))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LargePosePool:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in ("images", "coeffs", "lm68", "yaw", "detected", "source")})


def _fallback_face(lm68: np.ndarray, angle_deg: np.ndarray) -> DetectedFace:
    lo, hi = lm68.min(axis=0), lm68.max(axis=0)
    return make_face((*lo.tolist(), *hi.tolist()), 1.0, lm68.copy(), backend="given",
                     pose=tuple(float(a) for a in angle_deg))


def _agrees(face: DetectedFace, lm68: np.ndarray) -> bool:
    side = float(np.sqrt(np.prod(np.ptp(lm68, axis=0).clip(1.0))))
    return float(np.linalg.norm(face.lm68 - lm68, axis=1).mean()) < 0.2 * side


@dataclass(frozen=True)
class _Source:
    photo: np.ndarray
    crop: np.ndarray
    alignment: Alignment
    lm68_crop: np.ndarray
    index: int


def _prepare_source(i: int, path: Path, given: np.ndarray | None, detect: Callable[[np.ndarray], list[DetectedFace]],
                    lm3d5: np.ndarray, max_yaw: float) -> _Source | None:
    """A source photo through the inference stages (as :func:`facerecon.train.data.build_real_cache`: our
    detector's face, the given landmarks as the target when they agree with it), or None when it is not usable or
    turned more than ``max_yaw``."""
    from facerecon.pipeline import prepare_face

    photo = np.asarray(Image.open(path).convert("RGB"))
    faces = detect(photo)
    if given is not None:
        faces = [f for f in faces if _agrees(f, given)]
    if not faces or faces[0].pose is None or abs(faces[0].pose[1]) > max_yaw:
        return None
    prep = prepare_face(photo, faces[0], lm3d5)
    target = prep.lm68_crop if given is None else prep.alignment.to_crop(np.asarray(given, np.float64))
    return _Source(photo, prep.crop, prep.alignment, np.asarray(target, np.float32), i)


def build_large_pose_pool(
    entries: Sequence[Any],
    *,
    rnet: Callable[[np.ndarray], np.ndarray],
    decoder: FaceDecoder,
    renderer: Renderer,
    detect: Callable[[np.ndarray], list[DetectedFace]],
    seed: int,
    cfg: LargePoseConfig = LargePoseConfig(),
    chunk: int = 32,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> LargePosePool:
    """Turn each usable source photo once (module docstring).

    Args:
        entries: :class:`facerecon.train.data.PhotoEntry` rows (path, identity, given 68 landmarks or None); the
            caller keeps held-out people out.
        rnet: ``(B, 3, 224, 224)`` float [0, 1] -> ``(B, total)`` coefficient vectors.
        detect: photo -> faces (best first), our detector; ``[]`` when none.
        seed: the turn angles' sampler.
    """
    from facerecon.pipeline import prepare_face

    model = decoder.model
    layout = model.layout
    device = model.mean_shape.device
    rng = np.random.default_rng([seed, 300])
    lm3d5 = model.standard_lm5
    tris = model.triangles
    region = model.extras.get("vertex_region")
    head = None
    if region is not None and "head_neck" in model.card.regions:
        head = np.asarray(region) == model.card.regions["head_neck"]
    out: dict[str, list[Any]] = {k: [] for k in ("images", "coeffs", "lm68", "yaw", "detected", "source")}
    stats = {"seen": 0.0, "mirrored": 0.0, "failed": 0, "unused": 0}
    starts: Iterable[int] = range(0, len(entries), chunk)
    if progress is not None:
        starts = progress(starts)
    for s in starts:
        sources: list[_Source] = []
        for i in range(s, min(s + chunk, len(entries))):
            e = entries[i]
            try:
                src = _prepare_source(i, Path(e.path), e.lm68, detect, lm3d5, cfg.source_max_yaw_deg)
            except (OSError, ValueError, NoFaceFound) as exc:
                log.warning("large pose: skipping %s: %s", e.path, exc)
                src = None
            if src is None:
                stats["unused"] += 1
            else:
                sources.append(src)
        if not sources:
            continue
        crops = np.stack([q.crop for q in sources])
        x = crops.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        init = Coefficients.from_vector(torch.from_numpy(rnet(x)).float().to(device), layout)
        target = FitTarget(image=torch.from_numpy(x).to(device),
                           landmarks=torch.from_numpy(np.stack([q.lm68_crop for q in sources])).float().to(device))
        fitted = fit(decoder, None, target, init=init,
                     config=FitConfig(landmark_steps=cfg.fit_steps, photo_steps=0)).coefficients
        # keep the fitted roll, jitter the pitch, set a large yaw of either sign
        n = fitted.batch_size
        yaw = rng.uniform(cfg.yaw_min_deg, cfg.yaw_max_deg, n) * rng.choice([-1.0, 1.0], n)
        pitch = np.degrees(fitted.angle[:, 0].cpu().numpy()) + rng.uniform(-cfg.pitch_jitter_deg,
                                                                           cfg.pitch_jitter_deg, n)
        pitch = np.clip(pitch, -cfg.pitch_max_deg, cfg.pitch_max_deg)
        angle = fitted.angle.clone()
        angle[:, 0] = torch.from_numpy(np.radians(pitch)).to(angle)
        angle[:, 1] = torch.from_numpy(np.radians(yaw)).to(angle)
        turned = turn_head(fitted, angle, cfg.pivot)
        with torch.no_grad():
            before_all, after_all = decoder(fitted), decoder(turned)
        for j, src in enumerate(sources):
            try:
                img, k = scaled_photo(src.photo, src.alignment, cfg.max_photo_px_per_crop_px)
                tp = render_turned(img, k, _index(before_all, j), _index(after_all, j), tris, model.landmarks68,
                                   renderer, head_vertices=head)
                faces = [f for f in detect(tp.image) if _agrees(f, tp.lm68)]
                deg = np.degrees(turned.angle[j].cpu().numpy())
                face = faces[0] if faces else _fallback_face(tp.lm68, deg)
                prep = prepare_face(tp.image, face, lm3d5)
            except (ValueError, NoFaceFound) as exc:
                log.warning("large pose: skipping %s: %s", entries[src.index].path, exc)
                stats["failed"] += 1
                continue
            out["images"].append(prep.crop)
            out["coeffs"].append(turned.index(j).to_vector()[0].cpu().numpy().astype(np.float32))
            out["lm68"].append(prep.alignment.to_crop(tp.lm68.astype(np.float64)).astype(np.float32))
            out["yaw"].append(np.float32(deg[1]))
            out["detected"].append(bool(faces))
            out["source"].append(src.index)
            stats["seen"] += tp.seen
            stats["mirrored"] += tp.mirrored
    m = max(len(out["images"]), 1)
    log.info("large pose: %d photos (%d sources unused, %d failed), detector found %.0f %%, head pixels textured "
             "from the photo %.0f %%, from its mirror side %.0f %%", len(out["images"]), stats["unused"],
             stats["failed"], 100.0 * np.mean(out["detected"]) if out["detected"] else 0.0,
             100 * stats["seen"] / m, 100 * stats["mirrored"] / m)
    if not out["images"]:
        raise ValueError("no usable source photo for large-pose synthesis")
    return LargePosePool(np.stack(out["images"]), np.stack(out["coeffs"]), np.stack(out["lm68"]),
                         np.asarray(out["yaw"], np.float32), np.asarray(out["detected"], bool),
                         np.asarray(out["source"], np.int64))


def _index(face: DecodedFace, i: int) -> DecodedFace:
    return DecodedFace(**{k: v[i: i + 1] for k, v in face.__dict__.items()})


def large_pose_pool(key_paths: Sequence[str], cache_dir: Path, seed: int, cfg: LargePoseConfig,
                    build: Callable[[], LargePosePool]) -> LargePosePool:
    """:func:`build_large_pose_pool` cached as ``<cache_dir>/largepose_<key>.npz`` (key: sources, seed, config)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{seed}|{sorted(asdict(cfg).items())}".encode())
    for p in key_paths:
        h.update(p.encode())
    path = Path(cache_dir) / f"largepose_{h.hexdigest()[:16]}.npz"
    if path.is_file():
        pool = LargePosePool.load(path)
        log.info("large pose: %d photos from cache %s", len(pool), path)
        return pool
    pool = build()
    pool.save(path)
    log.info("large pose: cached at %s", path)
    return pool



def select_sources(folders: Sequence[str | Path], n: int, seed: int) -> list[Any]:
    """``n`` source photos (seeded, uniform) of the training people in ``folders``: every photo of
    :func:`facerecon.train.data.list_photos` except the held-out people and folders
    (:func:`facerecon.train.data.is_validation_photo`) and CFP's profiles (turned already)."""
    from facerecon.train import data as D

    entries = [e for e in D.list_photos([Path(f) for f in folders])
               if not D.is_validation_photo(str(e.path), e.identity) and e.path.parent.name != "profile"]
    rng = np.random.default_rng([seed, 301])
    pick = np.sort(rng.permutation(len(entries))[: min(n, len(entries))])
    return [entries[i] for i in pick]
