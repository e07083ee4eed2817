"""Weakly-supervised R-Net training: data for a run, batches, validation, the training loop.

Size: over 400 lines: a run's data (:class:`RunData`), the batch assembly (synthetic, turned and real rows, in that
order), validation and the step loop all read one batch layout; the loop itself is a third of the module.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from facerecon import geometry, losses
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.export import metres_per_unit
from facerecon.facemodel import FaceModel
from facerecon.facemodel.registry import resolve
from facerecon.nets.rnet import ReconNet
from facerecon.objective import hybrid_terms
from facerecon.render import get_renderer
from facerecon.render.base import Renderer
from facerecon.skin import skin_attention
from facerecon.train import data as D
from facerecon.train.checkpoints import build_rnet, load_checkpoint, load_rnet_onnx_weights, save_checkpoint
from facerecon.train.config import CHECKPOINT, SUPERVISION_SCALES, RNetConfig, _device, _rng, keeps_torch_threads, lr_at
from facerecon.train.large_pose import (
    LargePoseConfig,
    LargePosePool,
    build_large_pose_pool,
    large_pose_pool,
    select_sources,
)
from facerecon.train.mesh import YAW_FADE_DEG, MeshTargets, MeshTerm, crop_mesh_targets, load_correspondence

log = logging.getLogger(__name__)


def supervision_loss(pred: Coefficients, true: Coefficients, groups: tuple[str, ...] | None = None) -> Tensor:
    """Mean over the groups (default all six) of ``mean((pred - true)^2) / scale^2`` (:data:`SUPERVISION_SCALES`)."""
    keys = groups or tuple(SUPERVISION_SCALES)
    terms = [((getattr(pred, k) - getattr(true, k)) ** 2).mean() / SUPERVISION_SCALES[k] ** 2 for k in keys]
    return torch.stack(terms).mean()


#: What a turned real photo's label knows exactly (:mod:`facerecon.train.large_pose`): its albedo and light are the
#: source fit's, and its translation is the source crop's, not the re-detected crop's.
LARGE_POSE_GROUPS = ("id", "exp", "angle")


#: Every how many face-region vertices :func:`vertex_bases` keeps (a third of the 6,706 of the ICT face region: the
#: term's cost stays a fraction of the batch's landmark decode, its geometry the whole region's).
VERTEX_STRIDE = 3


def vertex_bases(model: FaceModel, stride: int = VERTEX_STRIDE) -> tuple[Tensor, Tensor, Tensor, float]:
    """The face region's vertices (every ``stride``-th of ``face_mask``) for :func:`vertex_loss`: mean ``(M, 3)``,
    identity basis ``(K_id, 3M)``, expression basis ``(K_exp, 3M)`` (model units), and centimetres per model unit."""
    return (*model.subset_bases(model.face_mask.nonzero().flatten()[::stride]),
            metres_per_unit(model.card.units) * 100.0)


def posed_vertices(c: Coefficients, bases: tuple[Tensor, Tensor, Tensor, float]) -> Tensor:
    """``(B, M, 3)`` centimetres: the face region's vertices with identity and expression, turned by the pose's
    rotation about the model origin (no translation: a turned photo's label does not know the crop's)."""
    mean, id_b, exp_b, cm = bases
    shape = mean[None] + (c.id @ id_b + c.exp @ exp_b).view(-1, mean.shape[0], 3)
    return geometry.transform(shape, geometry.euler_to_rotation(c.angle), torch.zeros_like(c.trans)) * cm


def vertex_loss(pred: Coefficients, true: Coefficients, bases: tuple[Tensor, Tensor, Tensor, float]) -> Tensor:
    """Dense supervision of the rows whose true coefficients are known (synthetic and turned photos): the mean over
    rows and face-region vertices of the squared distance (cm^2) between the predicted and the true vertices, both
    turned by their pose (:func:`posed_vertices`). Unlike the per-coefficient term (:func:`supervision_loss`) it
    weighs each identity, expression and angle error by how far it moves the face's surface (the vertex distance
    cost of 3DDFA, Zhu et al. 2016, in 3D)."""
    return ((posed_vertices(pred, bases) - posed_vertices(true, bases)) ** 2).sum(-1).mean()


def identity_contrast_loss(ids: Tensor, pairs: int, temperature: float = 0.1) -> Tensor:
    """Same-person consistency of identity coefficients (InfoNCE over the batch's real rows).

    ``ids (N, K_id)``: identity coefficients of the real rows, the first ``2 * pairs`` of them photos of ``pairs``
    people, two each (rows ``2p`` and ``2p + 1``); the other rows are random photos (other people, negatives only).
    Each paired row must find its partner among all the other rows by the cosine of their identity vectors (the
    measure ``eval.consistency`` reports as the identity AUC): cross entropy of ``cos / temperature``. The paper's
    identity consistency over a set comes from its C-Net and shared fit; this term asks the single-photo R-Net for
    it directly, on people of the training split only.
    """
    z = torch.nn.functional.normalize(ids.float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim - torch.eye(len(z), device=z.device, dtype=z.dtype) * 1e4  # never oneself
    rows = torch.arange(2 * pairs, device=z.device)
    partner = rows ^ 1
    return torch.nn.functional.cross_entropy(sim[rows], partner)


def paired_people(identity: list[str]) -> list[np.ndarray]:
    """Row indices of each person with at least two photos, for :func:`identity_contrast_loss`. Labels that are
    only digits are not people (AFW / HELEN name faces by photo id: two faces of one group photo share it)."""
    by: dict[str, list[int]] = {}
    for i, ident in enumerate(identity):
        if ident and not ident.isdigit():
            by.setdefault(ident, []).append(i)
    return [np.asarray(v) for v in by.values() if len(v) >= 2]


@dataclass
class RunData:
    train: D.RealSet | None
    val: D.RealSet | None
    synthetic: D.SyntheticPool
    synthetic_val: D.SyntheticPool
    large_pose: LargePosePool | None = None
    mesh: MeshTargets | None = None  # the training rows' face-mesh targets (``mesh_weight``)


def _holdout_split(real: D.RealSet) -> tuple[np.ndarray, np.ndarray]:
    """Indices of photos to train on and of held-out photos (:func:`facerecon.train.data.is_validation_photo`:
    the fixed 10 % of people and the 300-W validation folders; none of their photos is trained on)."""
    is_val = np.array([D.is_validation_photo(p, i) for p, i in zip(real.paths, real.identity, strict=True)])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def real_photos(folders: list[str], cache: Path, lm3d5: np.ndarray, limit: int = 0,
                progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> D.RealSet:
    """Every photo of ``folders`` through :func:`facerecon.train.data.build_real_cache`, one cache per folder (so
    folders are prepared once, in parallel if wanted, and shared by runs that use them)."""
    parts = []
    for folder in folders:
        entries = D.list_photos([Path(folder)], limit=limit or None)
        if entries:
            part = D.build_real_cache(entries, cache, lm3d5, progress=progress)
            fid = Path(folder) / "fiducials_30.csv"
            if fid.is_file():
                log.info("%s: manual profile fiducials applied to %d photos", folder,
                         D.apply_profile_fiducials(part, D.read_cfp_fiducials(fid)))
            parts.append(part)
    if not parts:
        raise ValueError(f"no photos in {folders}")
    return D.RealSet.concat(parts)


#: Folders whose given 68 landmarks are manual annotations (300-W's HELEN training half; the validation halves
#: never reach a training set, :func:`facerecon.train.data.is_validation_photo`).
MANUAL_68_FOLDERS = ("afw_helen",)


def weight_manual_rows(real: D.RealSet, factor: float) -> int:
    """Scale the landmark weights of the photos with manual 68-point labels (given landmarks from
    :data:`MANUAL_68_FOLDERS`) by ``factor``, in place; returns how many."""
    assert real.lm_weight is not None
    rows = [i for i, p in enumerate(real.paths)
            if real.given[i] and any(f in Path(p).parts for f in MANUAL_68_FOLDERS)]
    real.lm_weight[rows] *= np.float32(factor)
    return len(rows)


def prepare_data(cfg: RNetConfig, decoder: FaceDecoder, renderer: Renderer,
                 progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> RunData:
    """Build (or load from the cache) the real photo sets, the held-out split and the synthetic pools."""
    out = Path(cfg.out)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    lm3d5 = decoder.model.standard_lm5
    split_file = out / "split.json"
    train: D.RealSet | None = None
    val: D.RealSet | None = None
    if cfg.data:
        real = real_photos(cfg.data, cache, lm3d5, cfg.max_real, progress)
        tr, va = _holdout_split(real)
        rng = np.random.default_rng([cfg.seed, 8])
        va = np.sort(rng.permutation(va)[: cfg.val_max]) if len(va) else va
        # synthetic-only runs still validate on the same held-out real photos, but never train on real pixels
        train, val = (None if cfg.synthetic_only else real.subset(tr)), real.subset(va)
        if train is not None and cfg.manual_landmark_weight != 1.0:
            n = weight_manual_rows(train, cfg.manual_landmark_weight)
            log.info("landmark weight x%g on %d training photos with manual 68-point labels",
                     cfg.manual_landmark_weight, n)
    if cfg.val_data:
        extra = real_photos(cfg.val_data, cache, lm3d5, 0, progress)
        val = extra if val is None else D.RealSet.concat([val, extra])
    if val is not None:
        split = {"train_photos": len(train) if train is not None else 0, "val_paths": val.paths}
        split_file.write_text(json.dumps(split, indent=1))
    syn = D.SyntheticConfig(yaw_deg=cfg.synthetic_yaw_deg)
    pool = D.synthetic_pool(decoder, renderer, cfg.synthetic, cfg.seed, cache, cfg=syn)
    pool_val = D.synthetic_pool(decoder, renderer, cfg.synthetic_val, cfg.seed + 12345, cache, cfg=syn)
    lp = None
    if cfg.large_pose and cfg.data:
        lp = turned_photos(cfg, cache, progress)
    mesh = None
    if cfg.mesh_weight and train is not None:
        corr = load_correspondence(resolve(Path(cfg.models_dir), cfg.face_model))
        mesh = crop_mesh_targets(train.images, train.lm68, corr, cache, progress=progress)
        log.info("face-mesh targets: %d training crops, %.0f %% of them weighted (the mesh's yaw below %g degrees)",
                 len(train), 100 * float((mesh.weight.max(1) > 0).mean()), YAW_FADE_DEG[1])
    return RunData(train, val, pool, pool_val, lp, mesh)


def turned_photos(cfg: RNetConfig, cache: Path,
                  progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> LargePosePool:
    """``cfg.large_pose`` training photos turned to large yaw (:mod:`facerecon.train.large_pose`), their sources
    fitted from the R-Net installed in ``cfg.models_dir`` (cached per sources, seed and recipe)."""
    from facerecon.config import Settings
    from facerecon.errors import NoFaceFound
    from facerecon.pipeline import Reconstructor

    sources = select_sources(cfg.data, cfg.large_pose, cfg.seed)
    lp_cfg = LargePoseConfig()

    def build() -> LargePosePool:
        rec = Reconstructor(Settings(models_dir=Path(cfg.models_dir), face_model=cfg.face_model))
        if rec.rnet is None:
            raise ValueError(f"large-pose synthesis needs an installed R-Net in {cfg.models_dir}")
        rnet = rec.rnet

        def detect(image: np.ndarray) -> list:
            try:
                return rec.detect(image, "largest")
            except NoFaceFound:
                return []

        return build_large_pose_pool(sources, rnet=lambda x: rnet.run(x)["coeffs"], decoder=rec.decoder,
                                     renderer=rec.renderer, detect=detect, seed=cfg.seed, cfg=lp_cfg,
                                     progress=progress)

    return large_pose_pool([str(e.path) for e in sources], cache, cfg.seed, lp_cfg, build)


def _to_tensor_images(x: np.ndarray, device: torch.device) -> Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def predict(net: ReconNet, images: np.ndarray, device: torch.device, batch: int = 16) -> Tensor:
    """``(N, 224, 224, 3)`` uint8 crops -> ``(N, total)`` coefficient vectors (eval mode, on CPU)."""
    was = net.training
    net.eval()
    outs = [net(_to_tensor_images(images[i: i + batch], device)).float().cpu() for i in range(0, len(images), batch)]
    net.train(was)
    return torch.cat(outs)


def landmark_errors(pred: Tensor, target: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean landmark error (crop px) and the same normalised by the outer-eye-corner (36, 45) distance."""
    err = (pred - target).norm(dim=-1).mean(dim=-1)
    iod = (target[:, 36] - target[:, 45]).norm(dim=-1).clamp(min=1e-6)
    return err.numpy(), (err / iod).numpy()


@torch.no_grad()
def validate(net: ReconNet, decoder: FaceDecoder, renderer: Renderer, rd: RunData, device: torch.device,
             png: Path | None = None) -> dict[str, float]:
    """R-Net-alone landmark error on the real validation photos and pose error on held-out synthetic ones; with
    ``png``, a strip of crops with the render composited over them."""
    out: dict[str, float] = {}
    layout = decoder.model.layout
    if rd.val is not None and len(rd.val):
        vec = predict(net, rd.val.images, device)
        c = Coefficients.from_vector(vec.to(device), layout)
        lm = decoder.landmarks(c).cpu()
        e, nme = landmark_errors(lm, torch.from_numpy(rd.val.lm68))
        out["val_lm_px"], out["val_nme"] = float(e.mean()), float(nme.mean())
    n_syn = min(64, len(rd.synthetic_val.coeffs))  # (a run may hold fewer held-out renders than 64)
    syn = D.composite(rd.synthetic_val.foreground[:n_syn], rd.synthetic_val.mask[:n_syn],
                      D.random_backgrounds(n_syn, np.random.default_rng(5)), np.random.default_rng(6))
    vec = predict(net, syn, device)
    pc = Coefficients.from_vector(vec, layout)
    tc = Coefficients.from_vector(torch.from_numpy(rd.synthetic_val.coeffs[:n_syn]), layout)
    out["syn_angle_deg"] = float(torch.rad2deg((pc.angle - tc.angle).abs()).mean())
    # the same renders' face-region surface, turned by each pose (what vertex_loss compares), mean distance in mm
    v_mean, v_id, v_exp, cm = vertex_bases(decoder.model)
    vb = (v_mean.cpu(), v_id.cpu(), v_exp.cpu(), cm)
    out["syn_vertex_mm"] = float((posed_vertices(pc, vb) - posed_vertices(tc, vb)).norm(dim=-1).mean() * 10.0)
    if png is not None and rd.val is not None and len(rd.val):
        n = min(6, len(rd.val))
        idx = np.linspace(0, len(rd.val) - 1, n).round().astype(int)
        save_overlays(decoder, renderer, rd.val.images[idx], Coefficients.from_vector(
            predict(net, rd.val.images[idx], device).to(device), layout), png)
    return out


@torch.no_grad()
def save_overlays(decoder: FaceDecoder, renderer: Renderer, crops: np.ndarray, coeffs: Coefficients,
                  path: Path) -> None:
    """Two rows: the crops, and the lit render composited over them (PNG)."""
    face = decoder(coeffs)
    tris = decoder.model.front_triangles
    img, mask, _ = renderer.render(face.vertices_cam, tris, face.colors.clamp(0, 1), decoder.camera.intrinsics)
    photo = _to_tensor_images(crops, img.device)
    comp = img * mask + photo * (1 - mask)
    top = np.concatenate(list(crops), axis=1)
    bottom = np.concatenate(list((comp.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)), axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(path)


def _synthetic_batch(rd: RunData, n: int, rng: np.random.Generator, device: torch.device
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` synthetic photos over fresh backgrounds: images ``(n, 3, 224, 224)``, true vectors, landmarks."""
    pool = rd.synthetic
    ix = rng.integers(0, len(pool), size=n)
    bg_src = rd.train.images if rd.train is not None and len(rd.train) else None
    bg = D.random_backgrounds(n, rng, bg_src)
    img = D.composite(pool.foreground[ix], pool.mask[ix], bg, rng)
    return (_to_tensor_images(img, device), torch.from_numpy(pool.coeffs[ix]).to(device),
            torch.from_numpy(pool.lm68[ix]).to(device))


def _large_pose_batch(rd: RunData, n: int, rng: np.random.Generator, device: torch.device
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` turned real photos as the detector cropped them (no augmentation: the labels' pose would change):
    images ``(n, 3, 224, 224)``, label vectors, landmarks."""
    assert rd.large_pose is not None
    ix = rng.integers(0, len(rd.large_pose), size=n)
    return (_to_tensor_images(rd.large_pose.images[ix], device), torch.from_numpy(rd.large_pose.coeffs[ix]).to(device),
            torch.from_numpy(rd.large_pose.lm68[ix]).to(device))


def _real_batch(rd: RunData, n: int, rng: np.random.Generator, device: torch.device, augment: bool,
                people: list[np.ndarray] | None = None, pairs: int = 0
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """``n`` real photos: images ``(n, 3, 224, 224)``, skin attention ``(n, 1, 224, 224)``, landmarks, the
    landmarks' weights ``(n, 68)``, and with face-mesh targets (``rd.mesh``) their points ``(n, 468, 2)``, weights
    ``(n, 468)`` and the rows the augmentation flipped ``(n,)`` (else None); with ``pairs``, the first
    ``2 * pairs`` rows are two photos each of that many people drawn from ``people`` (:func:`paired_people`)."""
    assert rd.train is not None and rd.train.lm_weight is not None
    ix = rng.integers(0, len(rd.train), size=n)
    if pairs and people:
        for p, who in enumerate(rng.choice(len(people), size=pairs, replace=False)):
            ix[2 * p: 2 * p + 2] = rng.choice(people[who], size=2, replace=False)
    img = _to_tensor_images(rd.train.images[ix], device)
    skin = torch.from_numpy(rd.train.skin[ix]).to(device)[:, None].float().div_(255.0)
    lm = torch.from_numpy(rd.train.lm68[ix]).to(device)
    lw = torch.from_numpy(rd.train.lm_weight[ix]).to(device)
    mesh = None
    if rd.mesh is not None:
        pts = torch.from_numpy(rd.mesh.points[ix]).to(device)
        mw = torch.from_numpy(rd.mesh.weight[ix]).to(device)
        flips = torch.zeros(n, dtype=torch.bool, device=device)
        if augment:
            img, skin, lm, lw, pts, flips = D.augment(img, skin, lm, rng, lm_weight=lw, points=pts)
        mesh = (pts, mw, flips.to(device))
    elif augment:
        img, skin, lm, lw = D.augment(img, skin, lm, rng, lm_weight=lw)
    return img, skin_attention(skin), lm, lw, mesh


_LOSS_COLUMNS = ["step", "seconds", "lr", "total", "landmark", "coef", "gamma", "supervision", "photo",
                 "perceptual", "reflectance", "identity", "lm_px_real", "lm_px_syn", "lm_px_lp", "anchor", "vertex",
                 "mesh"]


@keeps_torch_threads
def train_rnet(cfg: RNetConfig, resume: bool = False) -> Path:
    """Train (or resume) an R-Net; returns the checkpoint path. See the module docstring for the recipe."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.json"
    ckpt_file = out / CHECKPOINT
    if resume and cfg_file.is_file():
        saved = RNetConfig.from_dict(json.loads(cfg_file.read_text()))
        # the recipe comes from the run; what the caller may change on resume: length and time budget
        saved.steps, saved.time_limit_s, saved.progress = cfg.steps, cfg.time_limit_s, cfg.progress
        cfg = saved
    cfg_file.write_text(json.dumps(asdict(cfg), indent=1))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    model = FaceModel.from_file(resolve(Path(cfg.models_dir), cfg.face_model), device=device)
    decoder = FaceDecoder(model)
    renderer = get_renderer("auto", device)
    bar = _progress if cfg.progress else None
    rd = prepare_data(cfg, decoder, renderer, progress=bar)
    net = build_rnet(model.layout, cfg).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    step = 0
    if resume and ckpt_file.is_file():
        state = load_checkpoint(ckpt_file)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log.info("resumed %s at step %d", ckpt_file, step)
    elif cfg.init_from:
        # the shipped network (models/<name>/rnet.onnx) or another run's checkpoint.pt; a new optimiser, step 0
        _load_weights(net, cfg.init_from)
        log.info("weights from %s (new optimiser, step 0)", cfg.init_from)
    anchor_net = None
    if cfg.anchor_weight:
        if not cfg.init_from:
            raise ValueError("anchor_weight needs init_from: the landmarks are held near the starting network's")
        anchor_net = build_rnet(model.layout, cfg).to(device)
        _load_weights(anchor_net, cfg.init_from)
        anchor_net.eval().requires_grad_(False)
    v_bases = vertex_bases(model) if cfg.vertex_weight else None
    mesh_term = MeshTerm(decoder, rd.mesh.vertices) if rd.mesh is not None else None
    descriptor = None
    use_photo = rd.train is not None and cfg.photo_per_batch > 0 and not cfg.synthetic_only
    if use_photo and cfg.perceptual:
        from facerecon.train.face_descriptor import FaceDescriptor

        descriptor = FaceDescriptor(cache=True, input_scale=1.0).to(device)
    w = losses.LossWeights()
    lm_w = losses.LANDMARK_WEIGHTS.to(device)
    amp = device.type == "cuda"
    n_syn = cfg.batch if (cfg.synthetic_only or rd.train is None) else round(cfg.batch * cfg.synthetic_fraction)
    n_lp = round(cfg.batch * cfg.large_pose_fraction) if rd.large_pose is not None and n_syn < cfg.batch else 0
    n_real = cfg.batch - n_syn - n_lp
    if n_real < 0:
        raise ValueError(f"synthetic_fraction {cfg.synthetic_fraction} + large_pose_fraction "
                         f"{cfg.large_pose_fraction} leave no room in a batch of {cfg.batch}")
    n_sup = n_syn + n_lp  # the supervised rows come first: synthetic, then turned real photos
    n_photo = min(cfg.photo_per_batch, n_real) if use_photo else 0
    people = paired_people(rd.train.identity) if (cfg.identity_pairs and n_real and rd.train is not None) else []
    n_pairs = min(cfg.identity_pairs, n_real // 2, len(people))
    if cfg.identity_pairs and not n_pairs:
        log.warning("identity_pairs=%d but no training person has two photos (or no real rows): term off",
                    cfg.identity_pairs)
    loss_csv = out / "losses.csv"
    new_csv = not loss_csv.is_file() or step == 0
    fh = open(loss_csv, "w" if new_csv else "a", newline="")  # noqa: SIM115 (closed in the finally below)
    writer = csv.writer(fh)
    if new_csv:
        writer.writerow(_LOSS_COLUMNS)
    t_start = time.perf_counter()
    pbar = _progress_bar(cfg.steps, step) if cfg.progress else None
    try:
        while step < cfg.steps:
            if cfg.time_limit_s and time.perf_counter() - t_start > cfg.time_limit_s:
                log.info("time limit reached at step %d", step)
                break
            t0 = time.perf_counter()
            rng, _ = _rng(cfg.seed, step, 0)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, time.perf_counter() - t_start)
            parts, row = [], {}
            s_img, s_vec, s_lm = _synthetic_batch(rd, n_syn, rng, device)
            parts.append(s_img)
            if n_lp:
                lp_img, lp_vec, lp_lm = _large_pose_batch(rd, n_lp, rng, device)
                parts.append(lp_img)
            if n_real:
                r_img, r_skin, r_lm, r_lw, r_mesh = _real_batch(rd, n_real, rng, device, cfg.augment, people,
                                                                n_pairs)
                parts.append(r_img)
            images = torch.cat(parts)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                vec = net(images)
            vec = vec.float()
            c_all = Coefficients.from_vector(vec, model.layout)
            lm_pred = decoder.landmarks(c_all)
            lm_target = torch.cat([s_lm, *([lp_lm] if n_lp else []), *([r_lm] if n_real else [])])
            # per-sample landmark weights: the reference's (nose, inner mouth x 20) times each photo's own (0 where
            # its label source does not know a point)
            sample_w = torch.ones(n_sup, 68, device=device)
            if n_real:
                sample_w = torch.cat([sample_w, r_lw])
            lm_loss = losses.landmark_loss(lm_pred, lm_target, lm_w[None] * sample_w)
            true = Coefficients.from_vector(s_vec, model.layout)
            sup = supervision_loss(Coefficients.from_vector(vec[:n_syn], model.layout), true)
            if n_lp:
                # the turned photos' labels: identity, expression and pose (weighted by their share of the rows)
                lp_sup = supervision_loss(Coefficients.from_vector(vec[n_syn:n_sup], model.layout),
                                          Coefficients.from_vector(lp_vec, model.layout), LARGE_POSE_GROUPS)
                sup = (n_syn * sup + n_lp * lp_sup) / n_sup
            total = w.landmark * lm_loss + cfg.coef_supervision * sup
            vert = vec.new_zeros(())
            if v_bases is not None:
                true_sup = true if not n_lp else Coefficients.from_vector(torch.cat([s_vec, lp_vec]), model.layout)
                vert = vertex_loss(Coefficients.from_vector(vec[:n_sup], model.layout), true_sup, v_bases)
                total = total + cfg.vertex_weight * vert
            coef = gam = photo = per = refl = ident = anchor = mesh_l = vec.new_zeros(())
            if n_real and anchor_net is not None:
                # the starting network's own landmarks on the same (augmented) real rows: every point, the
                # reference's weights, also where a photo has no label for it
                with torch.no_grad():
                    a_lm = decoder.landmarks(Coefficients.from_vector(anchor_net(r_img).float(), model.layout))
                anchor = losses.landmark_loss(lm_pred[n_sup:], a_lm, lm_w)
                total = total + w.landmark * cfg.anchor_weight * anchor
            if n_real:
                c_real = Coefficients.from_vector(vec[n_sup:], model.layout)
                coef = losses.coefficient_loss(c_real.id, c_real.exp, c_real.tex, w)
                gam = losses.gamma_loss(c_real.gamma)
                total = total + w.coef * coef + w.gamma * gam
                if n_pairs:
                    ident = identity_contrast_loss(c_real.id, n_pairs, cfg.identity_temperature)
                    total = total + cfg.identity_weight * ident
                if mesh_term is not None and r_mesh is not None:
                    mesh_l = mesh_term.loss(c_real, *r_mesh)
                    total = total + w.landmark * cfg.mesh_weight * mesh_l
            if n_photo:
                c_ph = Coefficients.from_vector(vec[n_sup: n_sup + n_photo], model.layout)
                # the photo subset's rendered terms (the landmark and prior terms are taken over the whole batch
                # above); the reference R-Net's region: the front-face triangles' coverage
                pt = hybrid_terms(decoder, renderer, c_ph, r_img[:n_photo], r_skin[:n_photo], r_lm[:n_photo],
                                  region="front", size=cfg.render_size, descriptor=descriptor, w=w)
                photo, per, refl = pt.photo, pt.perceptual, pt.reflectance
                total = total + w.photo * photo + w.perceptual * per + w.reflectance * refl
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                err = (lm_pred - lm_target).norm(dim=-1).mean(dim=-1)
            row = {"step": step, "seconds": round(time.perf_counter() - t0, 3), "lr": opt.param_groups[0]["lr"],
                   "total": total.item(), "landmark": lm_loss.item(), "coef": coef.item(), "gamma": gam.item(),
                   "supervision": sup.item(), "photo": photo.item(), "perceptual": per.item(),
                   "reflectance": refl.item(), "identity": ident.item(), "anchor": anchor.item(),
                   "vertex": vert.item(), "mesh": mesh_l.item(),
                   "lm_px_real": err[n_sup:].mean().item() if n_real else float("nan"),
                   "lm_px_syn": err[:n_syn].mean().item(),
                   "lm_px_lp": err[n_syn:n_sup].mean().item() if n_lp else float("nan")}
            writer.writerow([f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in _LOSS_COLUMNS])
            fh.flush()
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{row['total']:.3f}", lm=f"{row['lm_px_real']:.2f}",
                                 syn=f"{row['lm_px_syn']:.2f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                fh.flush()
                save_checkpoint(ckpt_file, net, opt, step)
            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
                _write_val(out, step, validate(net, decoder, renderer, rd, device,
                                               png=out / "val" / f"step_{step:06d}.png"))
    finally:
        fh.close()
        if pbar is not None:
            pbar.close()
    save_checkpoint(ckpt_file, net, opt, step)
    log.info("R-Net run %s at step %d (%.0f s this session)", out, step, time.perf_counter() - t_start)
    return ckpt_file


def _load_weights(net: ReconNet, source: str) -> None:
    """A shipped ``rnet.onnx`` or another run's ``checkpoint.pt`` into ``net``."""
    if source.endswith(".onnx"):
        load_rnet_onnx_weights(net, Path(source))
    else:
        net.load_state_dict(load_checkpoint(Path(source))["model"])


def _write_val(out: Path, step: int, metrics: dict[str, float]) -> None:
    path = out / "val.csv"
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["step", *metrics])
        w.writerow([step, *(f"{v:.5g}" for v in metrics.values())])
    log.info("validation at step %d: %s", step, metrics)


def _progress(it: Iterable[Any]) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(it, leave=False)


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
