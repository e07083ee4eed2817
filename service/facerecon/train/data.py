"""Training data: real photos through our own preprocessing, and synthetic photos rendered from the face model.

Real photos (:func:`build_real_cache`): image folders -> 68 landmarks (the given ``landmarks_68.csv`` of
``ytf_68pt`` when present, else our detector) -> the pipeline's own prepare stage (:func:`facerecon.pipeline.
prepare_face`: the reference alignment, recentred for turned faces) -> the 224 crop, the 68 landmarks in crop
pixels (y up) and the skin probability of the crop
(:data:`facerecon.skin.REFERENCE_GMM` unless another GMM is given). Everything is cached as one uncompressed npz
(plain arrays, ``allow_pickle=False``) under a cache directory, keyed by the file list and the settings; it is never
committed.

Synthetic photos (:class:`SyntheticPool`): random identity / expression / albedo / pose / SH light rendered with the
CPU renderer (whole mesh, 224 crop camera) with their true coefficients and 68 landmarks; the foreground and its
coverage mask are stored separately and composited over a fresh random background each time a sample is drawn
(random colours, gradients, blurred crops of real photos' backgrounds), so a small pool gives many images.

Augmentation (:func:`augment`): the reference PT augmentation (shift, scale, rotation, flip with the 68-point mirror
re-indexing) on aligned crops, skin maps and landmarks, in torch.

Conventions: crops ``(224, 224, 3)`` uint8 RGB, row 0 at the top; landmarks ``(68, 2)`` float32 crop pixels
``(u, v_up)``, **y up** (row = 223 - v_up), as :class:`facerecon.fit.FitTarget`; skin ``(224, 224)`` uint8
(round(255 p)).

Size: over 400 lines: the real-photo cache, the augmentation and the synthetic pool are the training data of one run
and share its conventions (crop frame, landmark order, cache key).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.detect import DetectedFace, select_faces
from facerecon.detect.face import make_face
from facerecon.errors import NoFaceFound
from facerecon.render.base import Renderer
from facerecon.skin import REFERENCE_GMM, SkinGMM

log = logging.getLogger(__name__)

CROP = 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Bump when the preprocessing changes, so old caches are not reused.
CACHE_VERSION = 2

#: 68-point mirror re-indexing of the reference augmentation (reference.md section 12): index i of the flipped
#: image takes landmark MIRROR_68[i] of the original.
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw 0-16 reversed
    + list(range(26, 16, -1))  # brows 17-21 <-> 26-22
    + [27, 28, 29, 30]  # nose bridge kept
    + list(range(35, 30, -1))  # nostrils reversed
    + [45, 44, 43, 42, 47, 46]  # eye 36-39 <-> 45-42, 40-41 <-> 47-46
    + [39, 38, 37, 36, 41, 40]
    + list(range(54, 47, -1))  # outer lip 48-54 reversed
    + list(range(59, 54, -1))  # 55-59 reversed
    + list(range(64, 59, -1))  # inner lip 60-64 reversed
    + list(range(67, 64, -1)),  # 65-67 reversed
    dtype=np.int64,
)


# ---------------------------------------------------------------------------------------------------------------
# Real photos
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhotoEntry:
    """One source photo: path, identity label (``""`` when unknown), 68 photo landmarks (y down) when given."""

    path: Path
    identity: str
    lm68: np.ndarray | None = None


def read_landmarks_csv(csv_path: Path) -> dict[str, np.ndarray]:
    """``landmarks_68.csv`` (``image, x0, y0, ... x67, y67``) -> relative image path -> ``(68, 2)`` float32,
    photo pixels, y down."""
    out: dict[str, np.ndarray] = {}
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            out[row[0]] = np.asarray(row[1:137], dtype=np.float32).reshape(68, 2)
    return out


def identity_from_name(path: Path) -> str:
    """``First_Last_0001.jpg`` -> ``First_Last`` (LFW / YouTube Faces style names); CFP's
    ``.../<person_id>/<frontal|profile>/NN.jpg`` -> ``cfp<person_id>``; else ``""``."""
    if path.parent.name in ("frontal", "profile") and path.parent.parent.name.isdigit():
        return f"cfp{path.parent.parent.name}"
    stem = path.stem
    head, _, tail = stem.rpartition("_")
    return head if head and tail.isdigit() else ""


def list_photos(data_dirs: Iterable[Path], limit: int | None = None) -> list[PhotoEntry]:
    """Every image under the given folders (sorted), with given landmarks where a ``landmarks_68.csv`` sits in a
    folder or its parent (the ``ytf_68pt`` layout: ``images/<split>/<file>`` listed as ``<split>/<file>``)."""
    entries: list[PhotoEntry] = []
    for root in data_dirs:
        root = Path(root)
        given: dict[Path, np.ndarray] = {}
        for csv_path in sorted(root.rglob("landmarks_68.csv")):
            table = read_landmarks_csv(csv_path)
            base = csv_path.parent / "images" if (csv_path.parent / "images").is_dir() else csv_path.parent
            given.update({(base / k).resolve(): v for k, v in table.items()})
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for p in files:
            entries.append(PhotoEntry(p, identity_from_name(p), given.get(p.resolve())))
    if limit is not None:
        entries = entries[:limit]
    return entries


@dataclass
class RealSet:
    """Preprocessed real photos, N of them.

    Attributes:
        images: ``(N, 224, 224, 3)`` uint8 aligned crops.
        lm68: ``(N, 68, 2)`` float32 crop pixels, y up.
        skin: ``(N, 224, 224)`` uint8 skin probability x 255.
        identity: N labels; paths: N source paths; given: ``(N,)`` bool, landmarks from an annotation file.
        yaw: ``(N,)`` float32 the detector's yaw estimate in degrees (NaN where the crop came from given landmarks
            alone).
        params: ``(N, 5)`` float64 the crop's ``trans_params`` (:meth:`facerecon.align.Alignment.from_params`
            rebuilds the transform, so later annotations can be mapped into the crop; NaN in caches without them).
        lm_weight: ``(N, 68)`` float32 per-landmark weight of the landmark loss (1; 0 for points a label source
            does not know, e.g. the hidden side of a profile).
    """

    images: np.ndarray
    lm68: np.ndarray
    skin: np.ndarray
    identity: list[str]
    paths: list[str]
    given: np.ndarray
    yaw: np.ndarray | None = None
    params: np.ndarray | None = None
    lm_weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.yaw is None:
            self.yaw = np.full(n, np.nan, np.float32)
        if self.params is None:
            self.params = np.full((n, 5), np.nan, np.float64)
        if self.lm_weight is None:
            self.lm_weight = np.ones((n, 68), np.float32)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray) -> RealSet:
        ix = np.asarray(index, dtype=np.int64)
        return RealSet(self.images[ix], self.lm68[ix], self.skin[ix], [self.identity[i] for i in ix],
                       [self.paths[i] for i in ix], self.given[ix], _rows(self.yaw, ix), _rows(self.params, ix),
                       _rows(self.lm_weight, ix))

    @staticmethod
    def concat(parts: Sequence[RealSet]) -> RealSet:
        return RealSet(np.concatenate([p.images for p in parts]), np.concatenate([p.lm68 for p in parts]),
                       np.concatenate([p.skin for p in parts]), [i for p in parts for i in p.identity],
                       [q for p in parts for q in p.paths], np.concatenate([p.given for p in parts]),
                       np.concatenate([p.yaw for p in parts]), np.concatenate([p.params for p in parts]),  # type: ignore[misc]
                       np.concatenate([p.lm_weight for p in parts]))  # type: ignore[misc]


def preprocess_photo(image: np.ndarray, lm68_photo: np.ndarray | DetectedFace, lm3d5: np.ndarray,
                     gmm: SkinGMM = REFERENCE_GMM, *, target_lm68: np.ndarray | None = None,
                     with_params: bool = False) -> tuple[Any, ...]:
    """One photo -> ``(crop (224, 224, 3) uint8, lm68 (68, 2) float32 crop px y up, skin (224, 224) uint8)``.

    The crop is the pipeline's own (:func:`facerecon.pipeline.prepare_face`): what R-Net sees at inference.

    Args:
        image: ``(H, W, 3)`` uint8 RGB; lm68_photo: ``(68, 2)`` given landmarks (photo pixels, y down), or the
            detector's face (then its pose recentres a turned face's crop as at inference); lm3d5: the face model's
            5 standard 3D points (:attr:`FaceModel.standard_lm5`); target_lm68: given landmarks (photo px, y down)
            to return in the crop made from the detector's face (else the face's own landmarks); with_params: also
            return the crop's ``trans_params`` (5 floats).

    Raises:
        NoFaceFound: the landmarks cannot be aligned.
    """
    from facerecon.pipeline import prepare_face

    if isinstance(lm68_photo, DetectedFace):
        face = lm68_photo
    else:
        lm = np.asarray(lm68_photo, dtype=np.float32)
        face = make_face((*lm.min(0).tolist(), *lm.max(0).tolist()), 1.0, lm.copy(), backend="given")
    p = prepare_face(image, face, lm3d5)
    skin = np.round(gmm.probability(p.crop) * 255.0).astype(np.uint8)
    lm = p.lm68_crop if target_lm68 is None else p.alignment.to_crop(np.asarray(target_lm68, np.float64))
    out = (p.crop, np.asarray(lm, np.float32), skin)
    return (*out, np.asarray(p.alignment.trans_params, np.float64)) if with_params else out


def _cache_key(entries: Sequence[PhotoEntry], gmm: SkinGMM) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{gmm.source}|{json.dumps(gmm.to_dict(), sort_keys=True)[:2000]}".encode())
    for e in entries:
        h.update(str(e.path).encode())
        h.update(b"1" if e.lm68 is not None else b"0")
    return h.hexdigest()[:16]


def build_real_cache(
    entries: Sequence[PhotoEntry],
    cache_dir: Path,
    lm3d5: np.ndarray,
    *,
    gmm: SkinGMM = REFERENCE_GMM,
    detect_missing: bool = True,
    progress: Callable[[Iterable[PhotoEntry]], Iterable[PhotoEntry]] | None = None,
) -> RealSet:
    """Preprocess ``entries`` once and cache the result (``<cache_dir>/real_<key>.npz``); later calls load it.

    Every photo goes through our detector (largest face), so the crop is made as at inference (a turned face's crop
    is recentred from the detector's pose). Given landmarks are the targets, mapped into that crop; when the
    detector finds nothing or a face that disagrees with them (mean distance > 20 % of the given landmarks' box
    side), the crop is made from the given landmarks instead. Photos without given landmarks take the detector's
    68 points; photos where it finds nothing, or whose alignment is degenerate, are skipped (logged).
    """
    cache_dir = Path(cache_dir)
    cache_file = cache_dir / f"real_{_cache_key(entries, gmm)}.npz"
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            log.info("real photos: %d from cache %s", z["images"].shape[0], cache_file)
            return RealSet(z["images"], z["lm68"], z["skin"], meta["identity"], meta["paths"], z["given"],
                           z["yaw"], z["params"] if "params" in z.files else None)
    detector = None
    images, lms, skins, ids, paths, given, yaws, params = [], [], [], [], [], [], [], []
    it: Iterable[PhotoEntry] = progress(entries) if progress is not None else entries
    skipped = 0
    for e in it:
        try:
            img = np.asarray(Image.open(e.path).convert("RGB"))
        except OSError as exc:
            log.warning("skipping unreadable %s: %s", e.path, exc)
            skipped += 1
            continue
        face: DetectedFace | None = None
        if e.lm68 is not None or detect_missing:
            if detector is None:
                from facerecon.detect import FaceDetector

                detector = FaceDetector()
            faces = select_faces(detector.detect(img, "largest"), "largest")
            face = faces[0] if faces else None
        if e.lm68 is not None and face is not None:
            side = float(np.sqrt(np.prod(np.ptp(e.lm68, axis=0).clip(1.0))))
            if float(np.linalg.norm(face.lm68 - e.lm68, axis=1).mean()) > 0.2 * side:
                face = None
        if face is None and e.lm68 is None:
            skipped += 1
            continue
        try:
            align_with = face if face is not None else e.lm68
            assert align_with is not None
            crop, lm_crop, skin, tp = preprocess_photo(img, align_with, lm3d5, gmm, target_lm68=e.lm68,
                                                       with_params=True)
        except (ValueError, NoFaceFound) as exc:
            log.warning("skipping %s: %s", e.path, exc)
            skipped += 1
            continue
        images.append(crop)
        lms.append(lm_crop)
        skins.append(skin)
        ids.append(e.identity)
        paths.append(str(e.path))
        given.append(e.lm68 is not None)
        yaws.append(face.pose[1] if face is not None and face.pose is not None else np.nan)
        params.append(tp)
    if not images:
        raise ValueError("no usable photo in the training folders")
    real = RealSet(np.stack(images), np.stack(lms), np.stack(skins), ids, paths, np.asarray(given, bool),
                   np.asarray(yaws, np.float32), np.asarray(params, np.float64))
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"identity": ids, "paths": paths}).encode()
    tmp = cache_file.with_suffix(".tmp.npz")
    np.savez(tmp, images=real.images, lm68=real.lm68, skin=real.skin, given=real.given, yaw=real.yaw,
             params=real.params,
             meta=np.frombuffer(meta, dtype=np.uint8))
    tmp.replace(cache_file)
    log.info("real photos: %d preprocessed (%d skipped), cached at %s", len(real), skipped, cache_file)
    return real


def _rows(a: np.ndarray | None, ix: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[ix]


#: iBUG-68 points on the image-left half of a frontal face (the subject's right), and the midline; the image-right
#: half is their mirror (:data:`MIRROR_68`).
LEFT_68 = np.array([*range(0, 8), *range(17, 22), 31, 32, *range(36, 42), 48, 49, 50, 58, 59, 60, 61, 67])
MIDLINE_68 = np.array([8, 27, 28, 29, 30, 33, 51, 57, 62, 66])


def read_cfp_fiducials(csv_path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """``fiducials_30.csv`` -> resolved image path -> ``(view, (30, 2) photo px y down)``."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        pts = np.asarray(row[3:63], np.float32).reshape(30, 2)
        out[str((Path(csv_path).parent / row[0]).resolve())] = (row[2], pts)
    return out


#: CFP's 30-point scheme -> iBUG 68 for the visible side of a face looking towards the image's right (checked on
#: overlays of frontal and profile photos, ``python -m eval.detection --show-cfp``): 12 = outer eye corner, 15 =
#: inner eye corner, 21 = nose tip (most protruding point of the nose line 18-24), 25 = mouth corner, 8 = chin (end
#: of the ear-to-chin contour); the visible side is then the subject's right (iBUG's image-left indices).
CFP_TO_IBUG_RIGHT = {12: 36, 15: 39, 21: 30, 25: 48, 8: 8}
#: The same for a face looking towards the image's left (the mirrored iBUG indices).
CFP_TO_IBUG_LEFT = {k: int(MIRROR_68[v]) for k, v in CFP_TO_IBUG_RIGHT.items()}


def cfp_looks_right(points30: np.ndarray) -> bool:
    """Whether a CFP face looks towards the image's right (its nose tip, 21, right of its ear, 0)."""
    return bool(points30[21, 0] > points30[0, 0])


def cfp_to_ibug(points30: np.ndarray) -> dict[int, int]:
    """The visible side's CFP -> iBUG correspondence of one photo's 30 fiducials."""
    return CFP_TO_IBUG_RIGHT if cfp_looks_right(points30) else CFP_TO_IBUG_LEFT


def apply_profile_fiducials(real: RealSet, fiducials: dict[str, tuple[str, np.ndarray]]) -> int:
    """Profile photos (CFP): the manual visible-side fiducials replace the detector's targets at their 5 iBUG
    points, and the hidden side's points get weight 0 (the face mesh guesses them, reading profiles as 45-65
    degrees). Needs the crops' ``params``; returns how many photos changed (in place)."""
    from facerecon.align import Alignment

    assert real.params is not None and real.lm_weight is not None
    changed = 0
    for i, path in enumerate(real.paths):
        hit = fiducials.get(str(Path(path).resolve()))
        if hit is None or hit[0] != "profile" or not np.isfinite(real.params[i]).all():
            continue
        pts = hit[1]
        looks_right = cfp_looks_right(pts)
        table = cfp_to_ibug(pts)
        al = Alignment.from_params(*real.params[i])
        crop = al.to_crop(pts[list(table)].astype(np.float64))
        real.lm68[i, list(table.values())] = crop.astype(np.float32)
        hidden = MIRROR_68[LEFT_68] if looks_right else LEFT_68
        real.lm_weight[i, hidden] = 0.0
        changed += 1
    return changed


def is_validation_person(identity: str) -> bool:
    """The fixed 10 % of people never trained on (sha1 of the identity label; every folder, every run, every eval
    that measures generalisation draws from these). Unlabelled photos (``""``) are not validation people."""
    return bool(identity) and int(hashlib.sha1(identity.encode()).hexdigest(), 16) % 10 == 0


#: Folders never trained on (the 300-W validation halves of ``afw_helen``), matched on the path.
VALIDATION_FOLDERS = ("/afw/", "/helen_testset/")


def is_validation_photo(path: str, identity: str) -> bool:
    return is_validation_person(identity) or any(f in path for f in VALIDATION_FOLDERS)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic photos
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticConfig:
    """Sampling ranges of the synthetic photos (coefficient units of the face model; angles in degrees)."""

    id_std: float = 0.9
    tex_std: float = 0.8
    exp_prob: float = 0.12
    exp_max: float = 0.8
    pitch_deg: float = 20.0
    yaw_deg: float = 45.0
    roll_deg: float = 12.0
    trans_xy_std: float = 0.08
    trans_z_std: float = 0.3
    ambient_std: float = 0.15
    light_dir_std: float = 0.25
    light_high_std: float = 0.06
    light_colour_std: float = 0.04


def sample_coefficients(decoder: FaceDecoder, n: int, gen: torch.Generator,
                        cfg: SyntheticConfig = SyntheticConfig()) -> Coefficients:
    """``n`` random coefficient sets: Gaussian identity/albedo, sparse expression weights in [0, exp_max], uniform
    pose, and near-white SH light (shared direction, small per-channel jitter)."""
    lay = decoder.model.layout

    def rn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    def ru(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen)

    idc = rn(n, lay.id) * cfg.id_std
    tex = rn(n, lay.tex) * cfg.tex_std
    exp = (ru(n, lay.exp) < cfg.exp_prob).float() * ru(n, lay.exp) * cfg.exp_max
    lim = torch.tensor([cfg.pitch_deg, cfg.yaw_deg, cfg.roll_deg]) * (math.pi / 180.0)
    angle = (ru(n, 3) * 2 - 1) * lim
    shared = torch.zeros(n, 9)
    shared[:, 0] = rn(n) * cfg.ambient_std
    shared[:, 1:4] = rn(n, 3) * cfg.light_dir_std
    shared[:, 4:] = rn(n, 5) * cfg.light_high_std
    gamma = shared[:, None, :] + rn(n, 3, 9) * cfg.light_colour_std * torch.tensor([1.0] + [0.3] * 8)
    trans = torch.cat([rn(n, 2) * cfg.trans_xy_std, rn(n, 1) * cfg.trans_z_std], dim=1)
    dev = decoder.model.mean_shape.device
    return Coefficients(idc, exp, tex, angle, gamma.reshape(n, 27), trans).to(dev)


@dataclass
class SyntheticPool:
    """Rendered synthetic faces, N of them.

    Attributes:
        foreground: ``(N, 224, 224, 3)`` uint8 render (whole mesh, lit, clamped).
        mask: ``(N, 224, 224)`` uint8 coverage (255 on the mesh).
        coeffs: ``(N, layout.total)`` float32 true coefficient vectors.
        lm68: ``(N, 68, 2)`` float32 true landmarks, crop pixels, y up.
    """

    foreground: np.ndarray
    mask: np.ndarray
    coeffs: np.ndarray
    lm68: np.ndarray

    def __len__(self) -> int:
        return int(self.coeffs.shape[0])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, foreground=self.foreground, mask=self.mask, coeffs=self.coeffs, lm68=self.lm68)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SyntheticPool:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["foreground"], z["mask"], z["coeffs"], z["lm68"])


def render_synthetic(decoder: FaceDecoder, renderer: Renderer, n: int, seed: int, *, chunk: int = 8,
                     cfg: SyntheticConfig = SyntheticConfig(),
                     progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> SyntheticPool:
    """Render ``n`` synthetic faces (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(int(seed))
    model = decoder.model
    fgs, masks, coeffs, lms = [], [], [], []
    starts: Iterable[int] = range(0, n, chunk)
    if progress is not None:
        starts = progress(starts)
    with torch.no_grad():
        for s in starts:
            c = sample_coefficients(decoder, min(chunk, n - s), gen, cfg)
            face = decoder(c)
            out = renderer.render(face.vertices_cam, model.triangles, face.colors.clamp(0, 1),
                                  decoder.camera.intrinsics)
            fgs.append((out.image.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
            masks.append((out.mask[:, 0] * 255).round().byte().cpu().numpy())
            coeffs.append(c.to_vector().cpu().numpy().astype(np.float32))
            lms.append(face.landmarks_2d.cpu().numpy().astype(np.float32))
    return SyntheticPool(np.concatenate(fgs), np.concatenate(masks), np.concatenate(coeffs), np.concatenate(lms))


def synthetic_pool(decoder: FaceDecoder, renderer: Renderer, n: int, seed: int, cache_dir: Path,
                   progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
                   cfg: SyntheticConfig = SyntheticConfig()) -> SyntheticPool:
    """:func:`render_synthetic`, cached as ``<cache_dir>/synthetic_<model>_<n>_<seed>[_yaw<deg>].npz``."""
    tag = "" if cfg == SyntheticConfig() else f"_yaw{cfg.yaw_deg:g}_pitch{cfg.pitch_deg:g}"
    path = Path(cache_dir) / f"synthetic_{decoder.model.name}_{n}_{seed}{tag}_v{CACHE_VERSION}.npz"
    if path.is_file():
        log.info("synthetic photos: %d from cache %s", n, path)
        return SyntheticPool.load(path)
    pool = render_synthetic(decoder, renderer, n, seed, progress=progress, cfg=cfg)
    pool.save(path)
    log.info("synthetic photos: %d rendered, cached at %s", n, path)
    return pool


def random_backgrounds(n: int, rng: np.random.Generator, real_crops: np.ndarray | None = None) -> np.ndarray:
    """``(n, 224, 224, 3)`` uint8 backgrounds: flat random colours, linear gradients, or blurred (radius 6-16 px)
    real crops (the face itself smeared out, so no sharp second face), each a third of the time."""
    out = np.empty((n, CROP, CROP, 3), np.uint8)
    yy, xx = np.mgrid[0:CROP, 0:CROP].astype(np.float32) / (CROP - 1)
    for i in range(n):
        kind = rng.integers(0, 3) if real_crops is not None and len(real_crops) else rng.integers(0, 2)
        if kind == 0:
            out[i] = rng.integers(0, 256, size=3, dtype=np.uint8)
        elif kind == 1:
            a, b = rng.uniform(0, 255, size=(2, 3))
            theta = rng.uniform(0, 2 * math.pi)
            t = (np.cos(theta) * xx + np.sin(theta) * yy)
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            out[i] = np.clip(a + (b - a) * t[..., None], 0, 255).astype(np.uint8)
        else:
            assert real_crops is not None
            src = real_crops[int(rng.integers(0, len(real_crops)))]
            if rng.random() < 0.5:
                src = src[:, ::-1]
            im = Image.fromarray(np.ascontiguousarray(src)).filter(ImageFilter.GaussianBlur(float(rng.uniform(6, 16))))
            out[i] = np.asarray(im)
    return out


def composite(foreground: np.ndarray, mask: np.ndarray, background: np.ndarray, rng: np.random.Generator,
              noise_std: float = 3.0) -> np.ndarray:
    """Foreground over background by the coverage mask (edges softened by one 3x3 blur of the mask), plus
    Gaussian pixel noise (std in 8-bit levels, random up to ``noise_std``). All ``(n, 224, 224, ...)`` uint8."""
    m = torch.from_numpy(mask).float()[:, None] / 255.0
    m = F.avg_pool2d(F.pad(m, (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0, :, :, None].numpy()
    img = foreground.astype(np.float32) * m + background.astype(np.float32) * (1 - m)
    sig = rng.uniform(0, noise_std, size=(len(img), 1, 1, 1)).astype(np.float32)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * sig
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation (reference PT: shift, scale, rotation, flip)
# ---------------------------------------------------------------------------------------------------------------
def augment(images: Tensor, skin: Tensor, lm68: Tensor, rng: np.random.Generator, *, shift: float = 10.0,
            scale: tuple[float, float] = (0.9, 1.1), rot_deg: float = 10.0, flip: float = 0.5,
            lm_weight: Tensor | None = None, points: Tensor | None = None) -> tuple[Tensor, ...]:
    """Random similarity + flip of aligned crops, as the reference's augmentation (reference.md section 12).

    Args:
        images: ``(B, 3, 224, 224)`` float [0, 1]; skin: ``(B, 1, 224, 224)`` float; lm68: ``(B, 68, 2)`` crop
            pixels, y up.
        rng: the sampler.

        lm_weight: optional ``(B, 68)`` per-landmark weights, re-indexed with the landmarks (then returned 4th).
        points: optional ``(B, P, 2)`` more crop points (y up), moved with the image but not re-indexed (with
            ``lm_weight``; returned 5th, then the ``(B,)`` bool mask of the flipped rows, for the caller to mirror
            what the points mark, e.g. :class:`facerecon.train.mesh.MeshTerm`).

    Returns:
        The transformed ``(images, skin, lm68)`` (bilinear resampling, zero outside; flipped landmarks re-indexed
        with :data:`MIRROR_68`), and ``lm_weight`` when given.
    """
    b = images.shape[0]
    c = (CROP - 1) / 2.0  # pixel-centre frame: the crop's centre
    mats = np.zeros((b, 2, 3), np.float64)  # forward maps, y-down pixel coordinates
    flips = rng.random(b) < flip
    for i in range(b):
        s = rng.uniform(*scale)
        a = math.radians(rng.uniform(-rot_deg, rot_deg))
        dx, dy = rng.integers(-int(shift), int(shift) + 1, size=2)
        fx = -1.0 if flips[i] else 1.0
        rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * s
        lin = rot @ np.diag([fx, 1.0])
        # p' = c + s R (F (p - c) + d)
        mats[i, :, :2] = lin
        mats[i, :, 2] = np.array([c, c]) + rot @ np.array([dx, dy], np.float64) - lin @ np.array([c, c])
    a_fwd = torch.from_numpy(mats).to(images)
    # grid_sample needs output -> input in normalised coordinates (align_corners=True: -1 / 1 = pixel centres 0 / 223)
    inv = torch.linalg.inv(torch.cat([a_fwd, torch.tensor([0.0, 0.0, 1.0]).to(images).expand(b, 1, 3)], dim=1))
    norm = torch.tensor([[2.0 / (CROP - 1), 0, -1], [0, 2.0 / (CROP - 1), -1], [0, 0, 1]]).to(images)
    theta = (norm @ inv @ torch.linalg.inv(norm))[:, :2]
    grid = F.affine_grid(theta, [b, 1, CROP, CROP], align_corners=True)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    skin = F.grid_sample(skin, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def move(pts: Tensor) -> Tensor:
        yd = torch.stack([pts[..., 0], (CROP - 1) - pts[..., 1]], dim=-1)  # y down
        yd = yd @ a_fwd[:, :, :2].transpose(1, 2) + a_fwd[:, None, :, 2]
        return torch.stack([yd[..., 0], (CROP - 1) - yd[..., 1]], dim=-1)

    out = move(lm68)
    if flips.any():
        mirror = torch.from_numpy(MIRROR_68)
        fl = torch.from_numpy(flips)
        out = torch.where(fl[:, None, None], out[:, mirror], out)
        if lm_weight is not None:
            lm_weight = torch.where(fl[:, None], lm_weight[:, mirror], lm_weight)
    if points is not None:
        if lm_weight is None:
            raise ValueError("points need lm_weight (the outputs keep their order)")
        return images, skin, out, lm_weight, move(points.to(a_fwd)), torch.from_numpy(flips)
    return (images, skin, out) if lm_weight is None else (images, skin, out, lm_weight)
