"""Train our own skin / non-skin Gaussian mixtures (reference.md section 11) from real photos.

Pixels of aligned crops are labelled by the 68 landmarks: **skin** = inside the face outline (jaw line closed over
the raised brows) minus the eyes, brows and mouth; **non-skin** = outside the outline grown by a margin, minus the
neck below the chin. Each class gets a 4-component full-covariance mixture in YCbCr (studio swing, as the
reference), fitted by EM in numpy (k-means++ start, a variance floor against collapse). The result is a
:class:`facerecon.skin.SkinGMM` with the reference's priors (0.8 / 0.2), stored as JSON through
:meth:`SkinGMM.to_dict` (no pickle).

Labels from landmarks are noisy (beards and hair fringes inside the outline, skin-coloured backgrounds outside);
the mixtures average that out, but they are weak labels, not a skin-segmentation data set.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from facerecon.skin import REFERENCE_GMM, GaussianMixture, SkinGMM, rgb_to_ycbcr

log = logging.getLogger(__name__)

CROP = 224


def _logpdf(x: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """``(M, D)`` points, ``(K, D)`` means, ``(K, D, D)`` covariances -> ``(M, K)`` log densities."""
    m, d = x.shape
    out = np.empty((m, len(means)))
    for k, (mu, cov) in enumerate(zip(means, covs, strict=True)):
        chol = np.linalg.cholesky(cov)
        z = np.linalg.solve(chol, (x - mu).T)  # (D, M)
        out[:, k] = -0.5 * (z**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * d * math.log(2 * math.pi)
    return out


def fit_gmm(x: np.ndarray, k: int = 4, *, iters: int = 200, tol: float = 1e-6, seed: int = 0,
            var_floor: float = 1.0) -> GaussianMixture:
    """EM for a ``k``-component full-covariance Gaussian mixture.

    Args:
        x: ``(M, D)`` float samples (M >= k).
        k: components; iters / tol: stop after ``iters`` steps or when the mean log-likelihood gains < ``tol``.
        seed: k-means++ initialisation seed.
        var_floor: added to every covariance diagonal (units of x squared), keeps components from collapsing.

    Returns:
        The mixture (weights ``(k,)``, means ``(k, D)``, covariances ``(k, D, D)``), components sorted by mean of the
        first coordinate.
    """
    x = np.asarray(x, np.float64)
    m, d = x.shape
    if m < k:
        raise ValueError(f"need at least {k} samples, got {m}")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(0, m)]]
    for _ in range(1, k):  # k-means++
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(m, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(0, m)])
    means = np.asarray(centres)
    for _ in range(10):  # a few Lloyd steps
        lab = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        means = np.stack([x[lab == j].mean(0) if np.any(lab == j) else means[j] for j in range(k)])
    lab = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    eye = np.eye(d) * var_floor
    covs = np.stack([np.cov(x[lab == j].T) + eye if np.sum(lab == j) > d else np.cov(x.T) + eye for j in range(k)])
    weights = np.bincount(lab, minlength=k).astype(np.float64) / m
    weights = np.maximum(weights, 1e-3)
    weights /= weights.sum()
    prev = -np.inf
    for _ in range(iters):
        logp = _logpdf(x, means, covs) + np.log(weights)
        mx = logp.max(1, keepdims=True)
        ll = np.log(np.exp(logp - mx).sum(1, keepdims=True)) + mx
        resp = np.exp(logp - ll)  # (M, K)
        nk = resp.sum(0) + 1e-10
        weights = nk / m
        means = (resp.T @ x) / nk[:, None]
        covs = np.stack([((resp[:, j, None] * (x - means[j])).T @ (x - means[j])) / nk[j] + eye for j in range(k)])
        cur = float(ll.mean())
        if cur - prev < tol:
            break
        prev = cur
    order = np.argsort(means[:, 0])
    return GaussianMixture(weights[order], means[order], covs[order])


def region_masks(lm68: np.ndarray, size: int = CROP, margin: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Skin and non-skin label masks of one aligned crop from its 68 landmarks.

    Args:
        lm68: ``(68, 2)`` crop pixels, y up (row = 223 - v_up).
        size: crop side; margin: the non-skin region starts this fraction of the face width outside the outline.

    Returns:
        ``(skin, nonskin)`` ``(size, size)`` bool.
    """
    p = np.stack([lm68[:, 0], (size - 1) - lm68[:, 1]], axis=1)  # y down
    brow = p[17:27][::-1].copy()
    eye_y = p[36:48, 1].mean()
    brow[:, 1] -= 0.35 * max(eye_y - brow[:, 1].mean(), 1.0) + 4  # forehead above the brows
    outline = np.concatenate([p[0:17], brow])

    def poly(points: np.ndarray, grow: float = 0.0) -> np.ndarray:
        c = points.mean(0)
        pts = c + (points - c) * (1 + grow)
        im = Image.new("L", (size, size), 0)
        ImageDraw.Draw(im).polygon([tuple(map(float, q)) for q in pts], fill=1)
        return np.asarray(im, bool)

    face = poly(outline)
    holes = poly(p[36:42], 0.6) | poly(p[42:48], 0.6) | poly(p[48:60], 0.25)
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    width = max(2, int(0.08 * np.linalg.norm(p[16] - p[0])))
    for a, b in ((17, 22), (22, 27)):
        draw.line([tuple(map(float, q)) for q in p[a:b]], fill=1, width=width)
    holes |= np.asarray(im, bool)
    skin = face & ~holes
    outer = poly(outline, margin)
    nonskin = ~outer
    # the neck below the chin is skin-coloured but outside the outline: label it neither
    x0, x1 = p[0:17, 0].min(), p[0:17, 0].max()
    chin = p[8, 1]
    yy, xx = np.mgrid[0:size, 0:size]
    nonskin &= ~((yy > chin - 5) & (xx > x0 - 0.1 * (x1 - x0)) & (xx < x1 + 0.1 * (x1 - x0)))
    return skin, nonskin


def collect_pixels(images: np.ndarray, lm68: np.ndarray, per_class: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Sample up to ``per_class`` YCbCr pixels of each class from crops ``(N, 224, 224, 3)`` uint8 with landmarks
    ``(N, 68, 2)`` (crop px, y up); black padding (outside the photo) is never sampled.

    Returns:
        ``(skin (S, 3), nonskin (T, 3))`` float64 YCbCr.
    """
    rng = np.random.default_rng(seed)
    n = len(images)
    per_image = max(1, per_class // max(n, 1))
    skin, non = [], []
    for img, lm in zip(images, lm68, strict=True):
        s_mask, n_mask = region_masks(lm)
        valid = img.reshape(-1, 3).max(1) > 0
        for mask, out in ((s_mask, skin), (n_mask, non)):
            ix = np.flatnonzero(mask.reshape(-1) & valid)
            if len(ix):
                out.append(img.reshape(-1, 3)[rng.choice(ix, size=min(per_image, len(ix)), replace=False)])
    return rgb_to_ycbcr(np.concatenate(skin)), rgb_to_ycbcr(np.concatenate(non))


def train_skin_gmm(images: np.ndarray, lm68: np.ndarray, *, per_class: int = 60_000, k: int = 4, seed: int = 0,
                   source: str = "") -> SkinGMM:
    """Skin / non-skin mixtures from aligned crops and their landmarks (see the module docstring)."""
    s, n = collect_pixels(images, lm68, per_class, seed)
    log.info("skin GMM: %d skin and %d non-skin pixels from %d photos", len(s), len(n), len(images))
    return SkinGMM(fit_gmm(s, k, seed=seed), fit_gmm(n, k, seed=seed + 1), 0.8,
                   source or f"facerecon.train.skin_gmm: EM, {k} components per class, {len(images)} photos")


def save_gmm(gmm: SkinGMM, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(gmm.to_dict(), indent=1) + "\n")


def load_gmm(path: Path) -> SkinGMM:
    return SkinGMM.from_dict(json.loads(Path(path).read_text()))


def skin_map_figure(crops: np.ndarray, gmms: list[SkinGMM], path: Path, tile: int = 112) -> None:
    """One PNG: a row of crops, then one row of skin maps per GMM (grey = probability), tiles of ``tile`` px."""
    rows = [np.concatenate([np.asarray(Image.fromarray(c).resize((tile, tile), Image.BILINEAR)) for c in crops], 1)]
    for g in gmms:
        maps = [np.asarray(Image.fromarray((g.probability(c) * 255).round().astype(np.uint8)).resize(
            (tile, tile), Image.BILINEAR)) for c in crops]
        rows.append(np.repeat(np.concatenate(maps, 1)[..., None], 3, axis=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(path, optimize=True)


def agreement(gmm: SkinGMM, images: np.ndarray, lm68: np.ndarray) -> dict[str, float]:
    """Mean skin probability on the landmark skin region and on the non-skin region (a labelling sanity check)."""
    ps, pn = [], []
    for img, lm in zip(images, lm68, strict=True):
        s, n = region_masks(lm)
        p = gmm.probability(img)
        valid = img.max(-1) > 0
        ps.append(p[s & valid].mean())
        pn.append(p[n & valid].mean())
    return {"p_skin_region": float(np.mean(ps)), "p_nonskin_region": float(np.mean(pn))}


__all__ = ["REFERENCE_GMM", "agreement", "collect_pixels", "fit_gmm", "load_gmm", "region_masks", "save_gmm",
           "skin_map_figure", "train_skin_gmm"]
