"""The paper's hybrid loss terms (reference.md section 10), shared by test-time fitting and training.

Pure torch; no I/O. Images are ``(B, 3, H, W)`` RGB in [0, 1]; landmarks ``(B, 68, 2)`` crop pixels, y up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from facerecon.landmarks import LANDMARK_WEIGHTS_68
from facerecon.weights import LossWeights as LossWeights  # re-exported: it lives torch-free in facerecon.weights

#: Landmark weights of the reference: 20 on the nose (0-based 28, 29, 30) and the inner mouth (60-67), else 1
#: (:data:`facerecon.landmarks.LANDMARK_WEIGHTS_68` as a float32 tensor).
LANDMARK_WEIGHTS = torch.tensor(LANDMARK_WEIGHTS_68, dtype=torch.float32)


def photometric_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Skin-attention L2,1 photometric loss pooled over the batch (PT ``Photo_loss``).

    ``sum_{b,i} sqrt(1e-6 + sum_ch (I' - I)^2) * m / max(sum m, 1)``.

    Args:
        pred: ``(B, 3, H, W)`` rendered image.
        target: ``(B, 3, H, W)`` photo crop.
        weight: ``(B, 1, H, W)`` per-pixel weight m = skin attention x rendered face coverage.
    """
    dist = torch.sqrt(1e-6 + ((pred - target) ** 2).sum(dim=1, keepdim=True))
    return (dist * weight).sum() / weight.sum().clamp(min=1.0)


def landmark_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """``(1 / (68 B)) sum_b sum_n w_n |q - q'|^2`` in crop pixels (PT ``landmark_loss``).

    Args:
        pred, target: ``(B, 68, 2)`` crop pixels, y up.
        weights: ``(68,)``, default :data:`LANDMARK_WEIGHTS`; use 0 to ignore a landmark.
    """
    w = (LANDMARK_WEIGHTS if weights is None else weights).to(pred)
    return (((pred - target) ** 2).sum(-1) * w).sum() / (pred.shape[0] * pred.shape[1])


def coefficient_loss(id_coeff: Tensor, exp_coeff: Tensor, tex_coeff: Tensor, w: LossWeights) -> Tensor:
    """``(1/B) sum_b (w_id |α|^2 + w_exp |β|^2 + w_tex |δ|^2)``."""
    b = id_coeff.shape[0]
    return (
        w.coef_id * id_coeff.pow(2).sum() + w.coef_exp * exp_coeff.pow(2).sum() + w.coef_tex * tex_coeff.pow(2).sum()
    ) / b


def gamma_loss(gamma: Tensor) -> Tensor:
    """Near-monochromatic light: mean over B x 27 of ``(γ_{b,ch,k} - mean_ch γ_{b,ch,k})^2`` (PT, not the paper)."""
    g = gamma.view(-1, 3, 9)
    return ((g - g.mean(dim=1, keepdim=True)) ** 2).mean()


def reflectance_loss(albedo: Tensor, skin_mask: Tensor) -> Tensor:
    """Albedo flatness over the skin region: ``(1/(B |R|)) sum_b sum_{v in R} sum_ch (T - mean_R T)^2``.

    Args:
        albedo: ``(B, N, 3)`` RGB [0, 1].
        skin_mask: ``(N,)`` bool.
    """
    t = albedo[:, skin_mask]
    return ((t - t.mean(dim=1, keepdim=True)) ** 2).sum() / (t.shape[0] * t.shape[1])


def perceptual_loss(feat_a: Tensor, feat_b: Tensor) -> Tensor:
    """``(1/B) sum_b (1 - cos(f(I), f(I')))`` over ``(B, D)`` face-recognition embeddings."""
    return (1.0 - torch.nn.functional.cosine_similarity(feat_a, feat_b, dim=-1)).mean()
