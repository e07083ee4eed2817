"""C-Net training on image sets (R-Net frozen): the set loss after aggregation, the training loop."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facerecon import losses
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.nets.cnet import ConfidenceNet, aggregate_set
from facerecon.objective import hybrid_terms
from facerecon.render import get_renderer
from facerecon.render.base import Renderer
from facerecon.skin import skin_attention
from facerecon.train import data as D
from facerecon.train.checkpoints import load_checkpoint, load_rnet, save_checkpoint
from facerecon.train.config import CNET_CHECKPOINT, CNetConfig, _device, _rng, keeps_torch_threads
from facerecon.train.rnet import _progress, _progress_bar, _to_tensor_images, real_photos

log = logging.getLogger(__name__)


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


@keeps_torch_threads
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
    everyone = real_photos(cfg.data, cache, model.standard_lm5, cfg.max_photos, _progress if cfg.progress else None)
    # the held-out people (eval.consistency and eval.rnet_pose measure on them) never form a training set
    real = everyone.subset([i for i, p in enumerate(everyone.identity) if not D.is_validation_person(p)])
    held = everyone.subset([i for i, p in enumerate(everyone.identity) if D.is_validation_person(p)])
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
    if cfg.eval_sets:
        report = compare_with_mean_pooling(rnet, cnet.eval(), decoder, renderer, held, cfg, descriptor, device)
        (out / "cnet_eval.json").write_text(json.dumps(report, indent=1) + "\n")
        log.info("C-Net vs mean pooling on held-out sets: %s", report)
    return ckpt


@torch.no_grad()
def compare_with_mean_pooling(rnet: torch.nn.Module, cnet: ConfidenceNet, decoder: FaceDecoder, renderer: Renderer,
                              held: D.RealSet, cfg: CNetConfig, descriptor: torch.nn.Module | None,
                              device: torch.device) -> dict[str, float]:
    """The set loss of held-out people's image sets (up to ``cfg.max_set`` photos each, the first
    ``cfg.eval_sets`` people) with the C-Net's aggregation and with plain mean pooling."""
    ours, base = [], []
    for members in _person_sets(held, cfg.min_set)[: cfg.eval_sets]:
        ix = members[: cfg.max_set]
        img = _to_tensor_images(held.images[ix], device)
        skin = skin_attention(torch.from_numpy(held.skin[ix]).to(device)[:, None].float() / 255.0)
        lm = torch.from_numpy(held.lm68[ix]).to(device)
        vec, feats = rnet.forward_with_features(img)  # type: ignore[operator]
        coeffs = Coefficients.from_vector(vec, decoder.model.layout)
        conf_id, conf_tex = cnet(img, feats)
        ours.append(set_loss(decoder, renderer, aggregate_set(coeffs, conf_id, conf_tex), img, skin, lm,
                             cfg.render_size, descriptor)["total"].item())
        ones = torch.ones_like(conf_id), torch.ones_like(conf_tex)
        base.append(set_loss(decoder, renderer, aggregate_set(coeffs, *ones), img, skin, lm, cfg.render_size,
                             descriptor)["total"].item())
    o, b = np.asarray(ours), np.asarray(base)
    return {"sets": len(o), "cnet_set_loss": float(o.mean()) if len(o) else float("nan"),
            "mean_pool_set_loss": float(b.mean()) if len(b) else float("nan"),
            "share_lower": float((o < b).mean()) if len(o) else float("nan")}
