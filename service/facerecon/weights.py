"""The weights of the total loss (torch-free: the fit's settings and its fused engine read them without torch;
:mod:`facerecon.losses` re-exports :class:`LossWeights`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LossWeights"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the total loss. Defaults: the reference code's (PT) options, which are the paper's except the
    texture-coefficient weight (the code's 1.7e-2 is 10x the paper's 1.7e-3) and the gamma term (code only)."""

    photo: float = 1.92
    landmark: float = 1.6e-3
    perceptual: float = 0.2
    coef: float = 3.0e-4
    coef_id: float = 1.0
    coef_exp: float = 0.8
    coef_tex: float = 1.7e-2
    reflectance: float = 5.0
    gamma: float = 10.0
