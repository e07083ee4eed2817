"""Evaluation of a training run: R-Net alone vs R-Net + test-time fitting vs fitting alone.

Real validation photos (the run's held-out people + its ``val_data``): mean 68-landmark error in crop pixels and the
same normalised by the outer-eye-corner distance (NME, 300-W style). Held-out synthetic photos (true coefficients
known): pose error (degrees, mean absolute per axis) and vertex error of the un-posed shape (mm, mean over the
face-region vertices after rigid alignment, Kabsch without scale).

Fitting runs the pipeline's :func:`facerecon.fit.fit` (landmark stage + ``photo_steps`` photometric steps on the
224 crop with the CPU renderer). The photometric stage is the expensive part on a CPU, so it is run on the first
``fit_photos`` images only; the landmark-only variant (``photo_steps=0``) covers every image.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.fit import FitConfig, FitTarget, fit
from facerecon.render import get_renderer
from facerecon.render.base import Renderer
from facerecon.skin import skin_attention
from facerecon.train import data as D
from facerecon.train.checkpoints import load_rnet
from facerecon.train.config import keeps_torch_threads
from facerecon.train.rnet import _to_tensor_images, landmark_errors, predict, prepare_data

log = logging.getLogger(__name__)


def rigid_vertex_error_mm(pred: Tensor, true: Tensor) -> Tensor:
    """``(B, N, 3)`` shapes in dm -> ``(B,)`` mean vertex distance in mm after the best rotation + translation."""
    p = pred - pred.mean(1, keepdim=True)
    t = true - true.mean(1, keepdim=True)
    u, _, vt = torch.linalg.svd(p.transpose(1, 2) @ t)
    d = torch.sign(torch.linalg.det(u @ vt))
    fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    rot = u @ fix @ vt
    return ((p @ rot - t).norm(dim=-1).mean(-1)) * 100.0


def _fit(decoder: FaceDecoder, renderer: Renderer | None, images: np.ndarray, lm: np.ndarray,
         skin: np.ndarray | None, init: Tensor | None, photo_steps: int, chunk: int = 8) -> tuple[Tensor, float]:
    """Fit every image (chunks of ``chunk``); returns the fitted vectors ``(N, total)`` and the seconds per image."""
    layout = decoder.model.layout
    cfg = FitConfig(photo_steps=photo_steps)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(images), chunk):
        img = _to_tensor_images(images[i: i + chunk], torch.device("cpu"))
        sk = None if skin is None else skin_attention(torch.from_numpy(skin[i: i + chunk])[:, None].float() / 255.0)
        target = FitTarget(image=img, landmarks=torch.from_numpy(lm[i: i + chunk]).float(), skin=sk)
        start = None if init is None else Coefficients.from_vector(init[i: i + chunk], layout)
        res = fit(decoder, renderer if photo_steps else None, target, init=start, config=cfg)
        out.append(res.coefficients.to_vector())
    return torch.cat(out), (time.perf_counter() - t0) / max(len(images), 1)


def _lm_report(decoder: FaceDecoder, vec: Tensor, lm: np.ndarray) -> dict[str, float]:
    c = Coefficients.from_vector(vec, decoder.model.layout)
    with torch.no_grad():
        e, nme = landmark_errors(decoder.landmarks(c), torch.from_numpy(lm))
    return {"lm_px": round(float(e.mean()), 3), "nme_iod": round(float(nme.mean()), 4), "n": len(e)}


def _syn_report(decoder: FaceDecoder, vec: Tensor, true: Tensor) -> dict[str, float]:
    layout = decoder.model.layout
    m = decoder.model
    p, t = Coefficients.from_vector(vec, layout), Coefficients.from_vector(true, layout)
    with torch.no_grad():
        ang = torch.rad2deg((p.angle - t.angle).abs()).mean(0)
        sp, st = m.shape(p.id, p.exp)[:, m.face_mask], m.shape(t.id, t.exp)[:, m.face_mask]
        ve = rigid_vertex_error_mm(sp, st)
        zero = m.shape(torch.zeros_like(t.id), torch.zeros_like(t.exp))[:, m.face_mask].expand_as(st)
        mean_face = rigid_vertex_error_mm(zero, st)
    return {"pitch_deg": round(float(ang[0]), 3), "yaw_deg": round(float(ang[1]), 3),
            "roll_deg": round(float(ang[2]), 3), "pose_deg_mean": round(float(ang.mean()), 3),
            "vertex_mm": round(float(ve.mean()), 3), "mean_face_vertex_mm": round(float(mean_face.mean()), 3),
            "n": len(ve)}


@keeps_torch_threads
def evaluate_run(run_dir: Path, *, fit_photos: int = 16, photo_steps: int = 30, synthetic_n: int = 100,
                 threads: int = 0) -> dict[str, Any]:
    """All figures of the module docstring as a nested dict (also what ``facerecon train eval`` prints)."""
    if threads:
        torch.set_num_threads(threads)
    net, cfg, model, step = load_rnet(run_dir, "cpu")
    decoder = FaceDecoder(model)
    renderer = get_renderer("cpu")
    rd = prepare_data(cfg, decoder, renderer)
    dev = torch.device("cpu")
    report: dict[str, Any] = {"run": str(run_dir), "step": step}
    if rd.val is not None and len(rd.val):
        val = rd.val
        groups = {"all": np.arange(len(val))}
        is_d3d = np.array(["deep3d" in p for p in val.paths])
        if is_d3d.any() and (~is_d3d).any():
            groups = {"heldout_people": np.flatnonzero(~is_d3d), "deep3d_examples": np.flatnonzero(is_d3d),
                      "all": np.arange(len(val))}
        rvec = predict(net, val.images, dev)
        lm_fit, t_lm_fit = _fit(decoder, None, val.images, val.lm68, None, None, 0)
        lm_rfit, t_lm_rfit = _fit(decoder, None, val.images, val.lm68, None, rvec, 0)
        real: dict[str, Any] = {}
        for name, ix in groups.items():
            real[name] = {
                "mean_face": _lm_report(decoder, torch.zeros_like(rvec[ix]), val.lm68[ix]),
                "rnet": _lm_report(decoder, rvec[ix], val.lm68[ix]),
                "rnet+fit_landmarks": _lm_report(decoder, lm_rfit[ix], val.lm68[ix]),
                "fit_landmarks": _lm_report(decoder, lm_fit[ix], val.lm68[ix]),
            }
        real["seconds_per_image"] = {"fit_landmarks": round(t_lm_fit, 3), "rnet+fit_landmarks": round(t_lm_rfit, 3)}
        if fit_photos and photo_steps:
            # full fitting (landmark + photometric stages, as the pipeline) on a subset spread over both groups
            ix = np.linspace(0, len(val) - 1, min(fit_photos, len(val))).round().astype(int)
            full_f, tf = _fit(decoder, renderer, val.images[ix], val.lm68[ix], val.skin[ix], None, photo_steps)
            full_r, tr = _fit(decoder, renderer, val.images[ix], val.lm68[ix], val.skin[ix], rvec[ix], photo_steps)
            real[f"full_fit_subset_{len(ix)}"] = {
                "rnet": _lm_report(decoder, rvec[ix], val.lm68[ix]),
                "rnet+fit": _lm_report(decoder, full_r, val.lm68[ix]),
                "fit": _lm_report(decoder, full_f, val.lm68[ix]),
                "seconds_per_image": {"rnet+fit": round(tr, 2), "fit": round(tf, 2)},
                "photo_steps": photo_steps,
            }
        report["real"] = real
    pool = rd.synthetic_val
    n = min(synthetic_n, len(pool))
    imgs = D.composite(pool.foreground[:n], pool.mask[:n], D.random_backgrounds(n, np.random.default_rng(11),
                       rd.val.images if rd.val is not None else None), np.random.default_rng(12))
    true = torch.from_numpy(pool.coeffs[:n])
    svec = predict(net, imgs, dev)
    s_fit, _ = _fit(decoder, None, imgs, pool.lm68[:n], None, None, 0)
    s_rfit, _ = _fit(decoder, None, imgs, pool.lm68[:n], None, svec, 0)
    report["synthetic"] = {
        "rnet": {**_syn_report(decoder, svec, true), **_lm_report(decoder, svec, pool.lm68[:n])},
        "rnet+fit_landmarks": {**_syn_report(decoder, s_rfit, true),
                               **_lm_report(decoder, s_rfit, pool.lm68[:n])},
        "fit_landmarks": {**_syn_report(decoder, s_fit, true), **_lm_report(decoder, s_fit, pool.lm68[:n])},
    }
    log.info("evaluation of %s: %s", run_dir, report)
    return report
