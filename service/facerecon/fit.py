"""Test-time fitting (analysis by synthesis) with the paper's hybrid loss.

Fits the coefficients of one photo, or of a set of photos of one person sharing identity and albedo, to the aligned
224 crops: first a cheap landmark stage (pose, identity, expression from the 68 landmarks, decoding only the
landmark vertices), then a photometric stage through the differentiable renderer (skin-attention L2,1 photometric
loss + landmark loss + coefficient, albedo-flatness and gamma regularisers, the reference's weights). Starts from
R-Net's prediction or from the mean face (zero coefficients), which the alignment already places on the photo.
The optimiser is :class:`facerecon.adam.Adam` (``torch.optim.Adam``'s arithmetic without importing the compiler).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from facerecon import losses
from facerecon.adam import Adam
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.objective import hybrid_terms, landmark_terms
from facerecon.render.base import Renderer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitTarget:
    """What the fit matches, for a batch of B aligned crops.

    Attributes:
        image: ``(B, 3, 224, 224)`` float32 RGB in [0, 1].
        landmarks: ``(B, 68, 2)`` crop pixels, y up (the detector's 68 points mapped with the alignment).
        skin: ``(B, 1, 224, 224)`` skin attention in [0, 1] (:func:`facerecon.skin.skin_attention`), or None for 1.
        landmark_weights: ``(68,)`` or None for the reference weights.
    """

    image: Tensor
    landmarks: Tensor
    skin: Tensor | None = None
    landmark_weights: Tensor | None = None


@dataclass(frozen=True)
class FitConfig:
    landmark_steps: int = 60
    photo_steps: int = 30
    lr_pose: float = 0.01
    lr_shape: float = 0.05
    lr_light: float = 0.05
    share_identity: bool = False
    #: The reference's training weights, except a 10x stronger coefficient prior (3e-3): one photo's 2D evidence
    #: under-determines identity, and on synthetic faces with known shape (eval.synthetic, 10 samples, R-Net +
    #: fit) the 10x prior cut the vertex error from 4.66 to 4.17 mm (neutral shape 3.76 -> 3.48 mm, now below the
    #: mean face's 3.57) for 0.26 px more landmark error. Training keeps the reference's 3e-4.
    weights: losses.LossWeights = field(default_factory=lambda: losses.LossWeights(coef=3.0e-3))


@dataclass
class FitResult:
    coefficients: Coefficients
    landmark_error_start: list[float]
    landmark_error_end: list[float]
    history: list[dict[str, float]]
    seconds: float


def landmark_error(pred: Tensor, target: Tensor) -> list[float]:
    """Per-image mean Euclidean landmark error in crop pixels."""
    return (pred - target).norm(dim=-1).mean(dim=-1).tolist()


class _Params(torch.nn.Module):
    def __init__(self, init: Coefficients, share_identity: bool) -> None:
        super().__init__()
        idc, tex = init.id, init.tex
        if share_identity:
            idc, tex = idc.mean(0, keepdim=True), tex.mean(0, keepdim=True)
        self.share = share_identity
        self.batch = init.batch_size
        self.id = torch.nn.Parameter(idc.detach().clone())
        self.tex = torch.nn.Parameter(tex.detach().clone())
        self.exp = torch.nn.Parameter(init.exp.detach().clone())
        self.angle = torch.nn.Parameter(init.angle.detach().clone())
        self.gamma = torch.nn.Parameter(init.gamma.detach().clone())
        self.trans = torch.nn.Parameter(init.trans.detach().clone())

    def coefficients(self) -> Coefficients:
        idc, tex = self.id, self.tex
        if self.share:
            idc, tex = idc.expand(self.batch, -1), tex.expand(self.batch, -1)
        return Coefficients(idc, self.exp, tex, self.angle, self.gamma, self.trans)


def fit(
    decoder: FaceDecoder,
    renderer: Renderer | None,
    target: FitTarget,
    init: Coefficients | None = None,
    config: FitConfig | None = None,
) -> FitResult:
    """Fit coefficients to ``target``; ``renderer=None`` or ``photo_steps=0`` fits landmarks only.

    Returns the fitted coefficients (detached), the landmark error (crop px) before and after, and the loss history.
    """
    cfg = config or FitConfig()
    w = cfg.weights
    t0 = time.perf_counter()
    device = target.image.device
    b = target.image.shape[0]
    layout = decoder.model.layout
    init = init if init is not None else Coefficients.zeros(layout, b, device)
    params = _Params(init, cfg.share_identity)
    lm_w = target.landmark_weights
    history: list[dict[str, float]] = []

    with torch.no_grad():
        err_start = landmark_error(decoder.landmarks(params.coefficients()), target.landmarks)

    # Stage 1: landmarks (pose, shape, expression), relative weights as in the total loss.
    opt = Adam([
        {"params": [params.angle, params.trans], "lr": cfg.lr_pose},
        {"params": [params.id, params.exp], "lr": cfg.lr_shape},
    ])
    for _ in range(cfg.landmark_steps):
        t = landmark_terms(decoder, params.coefficients(), target.landmarks, lm_w, w)
        loss = t.total(w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"stage": 1.0, "loss": loss.item(), "landmark": t.landmark.item()})

    # Stage 2: photometric through the renderer, everything free.
    if renderer is not None and cfg.photo_steps > 0:
        opt = Adam([
            {"params": [params.angle, params.trans], "lr": cfg.lr_pose * 0.3},
            {"params": [params.id, params.exp, params.tex], "lr": cfg.lr_shape},
            {"params": [params.gamma], "lr": cfg.lr_light},
        ])
        skin = target.skin if target.skin is not None else torch.ones_like(target.image[:, :1])
        for step in range(cfg.photo_steps):
            # the photometric region: the model's face region where it is visible in the photo
            t = hybrid_terms(decoder, renderer, params.coefficients(), target.image, skin, target.landmarks,
                             region="face_mask", lm_weights=lm_w, w=w)
            loss = t.total(w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"stage": 2.0, "loss": loss.item(), "photo": t.photo.item(), "landmark": t.landmark.item(),
                            "step": float(step)})

    final = params.coefficients().detach()
    with torch.no_grad():
        err_end = landmark_error(decoder.landmarks(final), target.landmarks)
    seconds = time.perf_counter() - t0
    log.debug("fit %d image(s): landmark error %s -> %s px in %.2f s", b, err_start, err_end, seconds)
    return FitResult(final, err_start, err_end, history, seconds)
