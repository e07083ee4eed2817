"""Weakly-supervised training of the R-Net (and the C-Net) with the paper's hybrid loss.

R-Net (:func:`train_rnet`): each batch mixes synthetic photos rendered from the face model (true coefficients known:
a coefficient-supervision term + the landmark loss) and real photos (landmark loss with the reference weights and
the coefficient / gamma regularisers on all of them; for ``photo_per_batch`` of them also the skin-attention
photometric loss through the differentiable renderer, the albedo-flatness loss, and the perceptual loss with the
:class:`~facerecon.train.face_descriptor.FaceDescriptor` on the photo vs the render, black outside its mask). Weights
are :class:`facerecon.losses.LossWeights` (the reference's). The reference PT augmentation (shift/scale/rotation/
flip with 68-point mirror re-indexing) is applied to real photos.

Run directory ``RUN_DIR``: ``config.json``, ``split.json`` (validation photos), ``checkpoint.pt`` (state dicts only,
``torch.save``, read back with ``weights_only=True``), ``losses.csv`` (one row per step), ``val.csv`` and
``val/step_XXXXXX.png`` (validation renders). Determinism: every random draw of step ``k`` comes from generators
seeded with ``(seed, k)``, so a resumed run draws exactly what an uninterrupted one would.

C-Net (:func:`train_cnet`): R-Net frozen; sets of 2-4 photos of one person (LFW); the C-Net starts as exact mean
pooling (zero last layer); the loss is the hybrid loss of each image rendered with the set's aggregated identity.

Devices: CUDA (nvdiffrast renderer, mixed precision for the trunk) when available, else CPU (numba renderer).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from facerecon import losses
from facerecon.coefficients import CoefficientLayout, Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.facemodel import FaceModel
from facerecon.facemodel.registry import resolve
from facerecon.nets.cnet import ConfidenceNet, aggregate_set
from facerecon.nets.rnet import ReconNet
from facerecon.objective import hybrid_terms
from facerecon.render import get_renderer
from facerecon.render.base import Renderer
from facerecon.skin import skin_attention
from facerecon.train import data as D

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CNET_CHECKPOINT = "cnet_checkpoint.pt"


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
_C = TypeVar("_C")


def _from_known_fields(cls: type[_C], d: dict[str, Any]) -> _C:
    """A config dataclass from a saved dict, ignoring keys it no longer has (old run directories stay loadable)."""
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RNetConfig:
    """Everything a run needs; stored as ``RUN_DIR/config.json`` (a resumed run reads it back).

    Attributes (units): lr per Adam step, cosine-decayed to ``lr * lr_final`` after ``warmup`` linear steps;
    ``synthetic_fraction`` of every batch is synthetic; ``photo_per_batch`` real images per batch get the
    photometric + perceptual terms, rendered at ``render_size`` px; ``time_limit_s`` stops (with a checkpoint)
    after that many seconds of this process; ``val_people`` identities of the first annotated folder are held out.
    """

    data: list[str]
    out: str
    val_data: list[str] = field(default_factory=list)
    face_model: str = "ict"
    models_dir: str = "models"
    steps: int = 1000
    batch: int = 16
    backbone: str = "resnet18"
    trunk_size: int = 112
    lr: float = 3e-4
    lr_final: float = 0.1
    warmup: int = 30
    synthetic: int = 3000
    synthetic_fraction: float = 0.5
    synthetic_only: bool = False
    photo_per_batch: int = 2
    render_size: int = 112
    perceptual: bool = True
    coef_supervision: float = 0.1
    augment: bool = True
    val_people: int = 10
    val_max: int = 50
    val_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    cache_dir: str = ""
    max_real: int = 0
    time_limit_s: float = 0.0
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RNetConfig:
        return _from_known_fields(cls, d)


#: Scale of each coefficient group in the synthetic sampler; the supervision term is the mean squared error of each
#: group divided by its scale squared, averaged over groups (so every group counts about equally).
SUPERVISION_SCALES = {"id": 0.9, "exp": 0.3, "tex": 0.8, "angle": 0.35, "gamma": 0.15, "trans": 0.15}


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _rng(seed: int, step: int, stream: int) -> tuple[np.random.Generator, torch.Generator]:
    """Per-step generators (numpy, torch CPU) so that resuming reproduces the same draws."""
    np_rng = np.random.default_rng([seed, step, stream])
    return np_rng, torch.Generator().manual_seed(int(np_rng.integers(0, 2**62)))


def lr_at(step: int, cfg: RNetConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * lr_final`` at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------------------------
# Loss pieces
# ---------------------------------------------------------------------------------------------------------------
def supervision_loss(pred: Coefficients, true: Coefficients) -> Tensor:
    """Mean over the six groups of ``mean((pred - true)^2) / scale^2`` (:data:`SUPERVISION_SCALES`)."""
    terms = [((getattr(pred, k) - getattr(true, k)) ** 2).mean() / s**2 for k, s in SUPERVISION_SCALES.items()]
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------------------------
# Data for a run
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class RunData:
    train: D.RealSet | None
    val: D.RealSet | None
    synthetic: D.SyntheticPool
    synthetic_val: D.SyntheticPool


def _identity_split(real: D.RealSet, n_people: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``n_people`` identities among photos with given landmarks (none of their photos is trained on)."""
    people = sorted({p for p, g in zip(real.identity, real.given, strict=True) if p and g})
    rng = np.random.default_rng([seed, 7])
    held = set(rng.choice(people, size=min(n_people, len(people)), replace=False).tolist()) if people else set()
    is_val = np.array([p in held for p in real.identity])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def prepare_data(cfg: RNetConfig, decoder: FaceDecoder, renderer: Renderer,
                 progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> RunData:
    """Build (or load from the cache) the real photo sets, the split and the synthetic pools."""
    out = Path(cfg.out)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    lm3d5 = decoder.model.standard_lm5
    split_file = out / "split.json"
    train: D.RealSet | None = None
    val: D.RealSet | None = None
    if cfg.data:
        entries = D.list_photos([Path(p) for p in cfg.data], limit=cfg.max_real or None)
        real = D.build_real_cache(entries, cache, lm3d5, progress=progress)
        tr, va = _identity_split(real, cfg.val_people, cfg.seed)
        rng = np.random.default_rng([cfg.seed, 8])
        va = np.sort(rng.permutation(va)[: cfg.val_max]) if len(va) else va
        # synthetic-only runs still validate on the same held-out real photos, but never train on real pixels
        train, val = (None if cfg.synthetic_only else real.subset(tr)), real.subset(va)
    if cfg.val_data:
        extra = D.build_real_cache(D.list_photos([Path(p) for p in cfg.val_data]), cache, lm3d5, progress=progress)
        val = extra if val is None else _concat(val, extra)
    if val is not None:
        split = {"train_photos": len(train) if train is not None else 0, "val_paths": val.paths}
        split_file.write_text(json.dumps(split, indent=1))
    pool = D.synthetic_pool(decoder, renderer, cfg.synthetic, cfg.seed, cache)
    pool_val = D.synthetic_pool(decoder, renderer, 200, cfg.seed + 12345, cache)
    return RunData(train, val, pool, pool_val)


def _concat(a: D.RealSet, b: D.RealSet) -> D.RealSet:
    return D.RealSet(np.concatenate([a.images, b.images]), np.concatenate([a.lm68, b.lm68]),
                     np.concatenate([a.skin, b.skin]), a.identity + b.identity, a.paths + b.paths,
                     np.concatenate([a.given, b.given]))


def _to_tensor_images(x: np.ndarray, device: torch.device) -> Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None) -> None:
    """State dicts + step (+ plain extras) via ``torch.save``; atomic replace."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": int(step), **(extra or {})}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers only, no pickle of code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build_rnet(layout: CoefficientLayout, cfg: RNetConfig) -> ReconNet:
    return ReconNet(layout, backbone=cfg.backbone, trunk_size=cfg.trunk_size)


def load_rnet(run_dir: Path, device: torch.device | str = "cpu") -> tuple[ReconNet, RNetConfig, FaceModel, int]:
    """The trained R-Net of a run (eval mode), its config, its face model and its step count."""
    run_dir = Path(run_dir)
    cfg = RNetConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = FaceModel.from_file(resolve(Path(cfg.models_dir), cfg.face_model), device=device)
    net = build_rnet(model.layout, cfg)
    state = load_checkpoint(run_dir / CHECKPOINT)
    net.load_state_dict(state["model"])
    return net.to(device).eval(), cfg, model, int(state["step"])


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
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
    syn = D.composite(rd.synthetic_val.foreground[:64], rd.synthetic_val.mask[:64],
                      D.random_backgrounds(64, np.random.default_rng(5)), np.random.default_rng(6))
    vec = predict(net, syn, device)
    pc = Coefficients.from_vector(vec, layout)
    tc = Coefficients.from_vector(torch.from_numpy(rd.synthetic_val.coeffs[:64]), layout)
    out["syn_angle_deg"] = float(torch.rad2deg((pc.angle - tc.angle).abs()).mean())
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


# ---------------------------------------------------------------------------------------------------------------
# R-Net training
# ---------------------------------------------------------------------------------------------------------------
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


def _real_batch(rd: RunData, n: int, rng: np.random.Generator, device: torch.device, augment: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` real photos: images ``(n, 3, 224, 224)``, skin attention ``(n, 1, 224, 224)``, landmarks."""
    assert rd.train is not None
    ix = rng.integers(0, len(rd.train), size=n)
    img = _to_tensor_images(rd.train.images[ix], device)
    skin = torch.from_numpy(rd.train.skin[ix]).to(device)[:, None].float().div_(255.0)
    lm = torch.from_numpy(rd.train.lm68[ix]).to(device)
    if augment:
        img, skin, lm = D.augment(img, skin, lm, rng)
    return img, skin_attention(skin), lm


_LOSS_COLUMNS = ["step", "seconds", "lr", "total", "landmark", "coef", "gamma", "supervision", "photo",
                 "perceptual", "reflectance", "lm_px_real", "lm_px_syn"]


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
    descriptor = None
    use_photo = rd.train is not None and cfg.photo_per_batch > 0 and not cfg.synthetic_only
    if use_photo and cfg.perceptual:
        from facerecon.train.face_descriptor import FaceDescriptor

        descriptor = FaceDescriptor(cache=True, input_scale=1.0).to(device)
    w = losses.LossWeights()
    lm_w = losses.LANDMARK_WEIGHTS.to(device)
    amp = device.type == "cuda"
    n_syn = cfg.batch if (cfg.synthetic_only or rd.train is None) else round(cfg.batch * cfg.synthetic_fraction)
    n_real = cfg.batch - n_syn
    n_photo = min(cfg.photo_per_batch, n_real) if use_photo else 0
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
                g["lr"] = lr_at(step, cfg)
            parts, row = [], {}
            s_img, s_vec, s_lm = _synthetic_batch(rd, n_syn, rng, device)
            parts.append(s_img)
            if n_real:
                r_img, r_skin, r_lm = _real_batch(rd, n_real, rng, device, cfg.augment)
                parts.append(r_img)
            images = torch.cat(parts)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                vec = net(images)
            vec = vec.float()
            c_all = Coefficients.from_vector(vec, model.layout)
            lm_pred = decoder.landmarks(c_all)
            lm_target = torch.cat([s_lm, r_lm]) if n_real else s_lm
            lm_loss = losses.landmark_loss(lm_pred, lm_target, lm_w)
            true = Coefficients.from_vector(s_vec, model.layout)
            sup = supervision_loss(Coefficients.from_vector(vec[:n_syn], model.layout), true)
            total = w.landmark * lm_loss + cfg.coef_supervision * sup
            coef = gam = photo = per = refl = vec.new_zeros(())
            if n_real:
                c_real = Coefficients.from_vector(vec[n_syn:], model.layout)
                coef = losses.coefficient_loss(c_real.id, c_real.exp, c_real.tex, w)
                gam = losses.gamma_loss(c_real.gamma)
                total = total + w.coef * coef + w.gamma * gam
            if n_photo:
                c_ph = Coefficients.from_vector(vec[n_syn: n_syn + n_photo], model.layout)
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
                   "reflectance": refl.item(), "lm_px_real": err[n_syn:].mean().item() if n_real else float("nan"),
                   "lm_px_syn": err[:n_syn].mean().item()}
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


# ---------------------------------------------------------------------------------------------------------------
# C-Net training
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CNetConfig:
    """C-Net run: ``rnet_run`` is the R-Net run directory (frozen); sets of ``min_set``-``max_set`` photos of one
    person from ``data``; Adam ``lr`` (paper 2e-5; a short CPU run uses more)."""

    data: list[str]
    out: str
    rnet_run: str
    steps: int = 100
    lr: float = 1e-4
    min_set: int = 2
    max_set: int = 4
    render_size: int = 112
    perceptual: bool = True
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    cache_dir: str = ""
    max_photos: int = 0
    checkpoint_every: int = 25
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CNetConfig:
        return _from_known_fields(cls, d)


def set_loss(decoder: FaceDecoder, renderer: Renderer, coeffs: Coefficients, images: Tensor, skin: Tensor,
             lm: Tensor, size: int, descriptor: torch.nn.Module | None) -> dict[str, Tensor]:
    """The hybrid loss (:func:`facerecon.objective.hybrid_terms`, training's ``front`` region) of every image of a
    set rendered with ``coeffs`` (already aggregated)."""
    w = losses.LossWeights()
    t = hybrid_terms(decoder, renderer, coeffs, images, skin, lm, region="front", size=size, descriptor=descriptor,
                     w=w)
    return {"total": t.total(w), "photo": t.photo, "perceptual": t.perceptual, "landmark": t.landmark}


def _person_sets(real: D.RealSet, min_set: int) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(real.identity):
        if p:
            groups.setdefault(p, []).append(i)
    return [np.asarray(v) for _, v in sorted(groups.items()) if len(v) >= min_set]


def train_cnet(cfg: CNetConfig, resume: bool = False) -> Path:
    """Train a C-Net on image sets with the R-Net of ``cfg.rnet_run`` frozen; returns the checkpoint path.

    Logs, per step, the set loss with the C-Net's aggregation and with plain mean pooling (the baseline) to
    ``cnet_losses.csv``.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cnet_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    rnet, _, model, _ = load_rnet(Path(cfg.rnet_run), device)
    rnet.requires_grad_(False)
    decoder = FaceDecoder(model)
    renderer = get_renderer("auto", device)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    entries = D.list_photos([Path(p) for p in cfg.data], limit=cfg.max_photos or None)
    real = D.build_real_cache(entries, cache, model.standard_lm5, progress=_progress if cfg.progress else None)
    sets = _person_sets(real, cfg.min_set)
    if not sets:
        raise ValueError("no person with enough photos for an image set")
    cnet = ConfidenceNet(model.layout, rnet.feature_dim).to(device).train()
    opt = torch.optim.Adam(cnet.parameters(), lr=cfg.lr)
    ckpt = out / CNET_CHECKPOINT
    step = 0
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        cnet.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    descriptor = None
    if cfg.perceptual:
        from facerecon.train.face_descriptor import FaceDescriptor

        descriptor = FaceDescriptor(cache=True, input_scale=1.0).to(device)
    path = out / "cnet_losses.csv"
    fh = open(path, "w" if step == 0 else "a", newline="")  # noqa: SIM115 (closed in the finally below)
    writer = csv.writer(fh)
    if step == 0:
        writer.writerow(["step", "total", "mean_pool_total", "photo", "perceptual", "landmark"])
    pbar = _progress_bar(cfg.steps, step) if cfg.progress else None
    try:
        while step < cfg.steps:
            rng, _ = _rng(cfg.seed, step, 1)
            members = sets[int(rng.integers(0, len(sets)))]
            k = int(min(len(members), rng.integers(cfg.min_set, cfg.max_set + 1)))
            ix = np.sort(rng.choice(members, size=k, replace=False))
            img = _to_tensor_images(real.images[ix], device)
            skin = skin_attention(torch.from_numpy(real.skin[ix]).to(device)[:, None].float() / 255.0)
            lm = torch.from_numpy(real.lm68[ix]).to(device)
            with torch.no_grad():
                vec, feats = rnet.forward_with_features(img)
            coeffs = Coefficients.from_vector(vec, model.layout)
            conf_id, conf_tex = cnet(img, feats)
            agg = aggregate_set(coeffs, conf_id, conf_tex)
            terms = set_loss(decoder, renderer, agg, img, skin, lm, cfg.render_size, descriptor)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            step += 1
            with torch.no_grad():
                ones = torch.ones_like(conf_id), torch.ones_like(conf_tex)
                base = set_loss(decoder, renderer, aggregate_set(coeffs, *ones), img, skin, lm, cfg.render_size,
                                descriptor)["total"]
            writer.writerow([step, *(f"{v:.6g}" for v in (terms["total"].item(), base.item(), terms["photo"].item(),
                                                            terms["perceptual"].item(), terms["landmark"].item()))])
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{terms['total'].item():.4f}", mean=f"{base.item():.4f}")
            if step % cfg.checkpoint_every == 0:
                fh.flush()
                save_checkpoint(ckpt, cnet, opt, step, {"rnet_run": str(cfg.rnet_run)})
    finally:
        fh.close()
        if pbar is not None:
            pbar.close()
    save_checkpoint(ckpt, cnet, opt, step, {"rnet_run": str(cfg.rnet_run)})
    return ckpt


def load_cnet(run_dir: Path, feature_dim: int, layout: CoefficientLayout) -> tuple[ConfidenceNet, int]:
    """The trained C-Net of a run (eval mode) and its step count."""
    state = load_checkpoint(Path(run_dir) / CNET_CHECKPOINT)
    net = ConfidenceNet(layout, feature_dim)
    net.load_state_dict(state["model"])
    return net.eval(), int(state["step"])
