"""Skin attention: a naive-Bayes classifier over two Gaussian mixtures in YCbCr (reference.md section 11).

The paper weights its photometric loss by each pixel's skin probability, so that beards, hair, glasses and hands
count less. :data:`REFERENCE_GMM` holds the reference's own parameters (``util/skin_mask.py``, MIT, trained on a skin
dataset we do not have); :func:`fit_skin_gmm` trains new parameters from pixels inside vs outside the landmark face
region of real photos, and :class:`SkinGMM` stores them as plain arrays (JSON/npz, never pickle).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

_P = TypeVar("_P", np.ndarray, "Tensor")

#: RGB (0-255) -> YCbCr, BT.601 studio swing, as the reference (section 11).
_YCC_MATRIX = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255.0
_YCC_OFFSET = np.array([16.0, 128.0, 128.0])


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RGB 0-255 -> ``(..., 3)`` (Y, Cb, Cr), float64."""
    x = np.asarray(rgb, np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    m, o = _YCC_MATRIX, _YCC_OFFSET
    # written out per channel: a (M, 3) x (3, 3) product through NumPy's BLAS starts its threads for a 3-wide sum
    return np.stack([r * m[i, 0] + g * m[i, 1] + b * m[i, 2] + o[i] for i in range(3)], axis=-1)


@dataclass(frozen=True)
class GaussianMixture:
    """``K`` full-covariance Gaussians in 3D: weights ``(K,)``, means ``(K, 3)``, covariances ``(K, 3, 3)``."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    @functools.cached_property
    def _terms(self) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Per component: mean, inverse covariance and ``w / ((2 pi)^(3/2) sqrt(det))``, computed once."""
        return [(mu, np.linalg.inv(cov), float(w / ((2 * math.pi) ** 1.5 * math.sqrt(np.linalg.det(cov)))))
                for w, mu, cov in zip(self.weights, self.means, self.covariances, strict=True)]

    def likelihood(self, x: np.ndarray) -> np.ndarray:
        """Mixture density at ``x`` ``(M, 3)`` -> ``(M,)``."""
        out = np.zeros(x.shape[0])
        for mu, inv, scale in self._terms:
            d0, d1, d2 = x[:, 0] - mu[0], x[:, 1] - mu[1], x[:, 2] - mu[2]
            # the quadratic form d' inv d written out (a three-operand einsum takes twice as long)
            maha = (d0 * (inv[0, 0] * d0 + (inv[0, 1] + inv[1, 0]) * d1 + (inv[0, 2] + inv[2, 0]) * d2)
                    + d1 * (inv[1, 1] * d1 + (inv[1, 2] + inv[2, 1]) * d2) + inv[2, 2] * d2 * d2)
            out += scale * np.exp(-0.5 * maha)
        return out


def _sym(v: tuple[float, ...]) -> np.ndarray:
    """The reference lists Σ⁻¹ as (YY, YCb, YCr, CbCb, CbCr, CrCr)."""
    a, b, c, d, e, f = v
    return np.array([[a, b, c], [b, d, e], [c, e, f]])


def _from_inverse(weights: list[float], means: list[tuple[float, float, float]],
                  inverses: list[tuple[float, ...]]) -> GaussianMixture:
    covs = np.stack([np.linalg.inv(_sym(v)) for v in inverses])
    return GaussianMixture(np.asarray(weights), np.asarray(means, np.float64), covs)


@dataclass(frozen=True)
class SkinGMM:
    """Skin and non-skin mixtures with the class priors; :meth:`probability` is the skin posterior."""

    skin: GaussianMixture
    nonskin: GaussianMixture
    prior_skin: float = 0.8
    source: str = ""

    def probability(self, rgb: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` float32 skin probability in [0, 1]."""
        x = rgb_to_ycbcr(rgb.reshape(-1, 3))
        ls = self.skin.likelihood(x) * self.prior_skin
        ln = self.nonskin.likelihood(x) * (1.0 - self.prior_skin)
        p = ls / np.maximum(ls + ln, 1e-300)
        return p.reshape(rgb.shape[:-1]).astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        def gm(g: GaussianMixture) -> dict[str, list]:
            return {"weights": g.weights.tolist(), "means": g.means.tolist(), "covariances": g.covariances.tolist()}

        return {"skin": gm(self.skin), "nonskin": gm(self.nonskin), "prior_skin": self.prior_skin,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> SkinGMM:
        def gm(x: dict) -> GaussianMixture:
            return GaussianMixture(np.asarray(x["weights"], np.float64), np.asarray(x["means"], np.float64),
                                   np.asarray(x["covariances"], np.float64))

        return cls(gm(d["skin"]), gm(d["nonskin"]), float(d["prior_skin"]), str(d.get("source", "")))


#: The reference's parameters (reference.md section 11 table; priors 0.8 / 0.2).
REFERENCE_GMM = SkinGMM(
    skin=_from_inverse(
        [0.24063933, 0.16365987, 0.26034665, 0.33535415],
        [(113.71862, 103.39613, 164.08226), (150.19858, 105.18467, 155.51428),
         (183.92976, 107.62468, 152.71820), (114.90524, 113.59782, 151.38217)],
        [(0.0019472069, 0.0020450759, -0.00060243998, 0.017700525, 0.0051420014, 0.0081308950),
         (0.0027110141, 0.0011036990, 0.0023122299, 0.010707724, 0.010742856, 0.017481629),
         (0.0048026871, 0.00022935172, 0.0077668377, 0.011729696, 0.0081661865, 0.025374353),
         (0.0011989699, 0.0022453172, -0.0010748957, 0.047758564, 0.020332102, 0.024502251)],
    ),
    nonskin=_from_inverse(
        [0.12791070, 0.31130761, 0.34245777, 0.21832393],
        [(99.200851, 112.07533, 140.20602), (110.91392, 125.52969, 130.19237),
         (129.75864, 129.96107, 126.96808), (112.29587, 128.85121, 129.05431)],
        [(0.00085371657, 0.00071197288, 0.00023958916, 0.0025935620, 0.00076557708, 0.0015042332),
         (0.00024650150, 0.00045542428, 0.00015019422, 0.026412144, 0.018419769, 0.037497383),
         (0.00037054974, 0.00038146760, 0.00040408765, 0.0085505722, 0.0079136286, 0.010982352),
         (0.00013709733, 0.00051228428, 0.00012777430, 0.28237113, 0.10528370, 0.23468947)],
    ),
    prior_skin=0.8,
    source="Deep3DFaceRecon util/skin_mask.py (MIT), reference.md section 11",
)


def skin_attention(prob: _P) -> _P:
    """The paper's attention ``A = 1 if P > 0.5 else P`` (neither reference applies the threshold; we follow the
    paper, which keeps confidently-skin pixels at full weight), of a NumPy array or a tensor (the same kind back)."""
    if isinstance(prob, np.ndarray):
        return np.where(prob > 0.5, np.ones_like(prob), prob)
    import torch

    return torch.where(prob > 0.5, torch.ones_like(prob), prob)
