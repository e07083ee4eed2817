"""Losses, the skin model and test-time fitting on synthetic targets with known coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facerecon import losses
from facerecon.coefficients import Coefficients
from facerecon.fit import FitConfig, FitTarget, fit
from facerecon.skin import REFERENCE_GMM, rgb_to_ycbcr, skin_attention


def test_landmark_weights_match_the_reference() -> None:
    w = losses.LANDMARK_WEIGHTS
    assert w.sum() == 68 - 11 + 11 * 20
    assert (w[[28, 29, 30]] == 20).all() and (w[60:68] == 20).all() and w[27] == 1 and w[59] == 1


def test_photometric_loss_is_l21_over_the_mask() -> None:
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.zeros(1, 3, 2, 2)
    target[0, :, 0, 0] = torch.tensor([0.3, 0.4, 0.0])  # distance 0.5 at one pixel
    mask = torch.ones(1, 1, 2, 2)
    assert losses.photometric_loss(pred, target, mask).item() == pytest.approx((0.5 + 3 * 1e-3) / 4, rel=1e-3)
    mask[0, 0, 0, 0] = 0
    assert losses.photometric_loss(pred, target, mask).item() == pytest.approx(1e-3, rel=1e-3)


def test_reflectance_and_gamma_losses_vanish_when_flat() -> None:
    albedo = torch.full((2, 10, 3), 0.5)
    skin = torch.ones(10, dtype=torch.bool)
    assert losses.reflectance_loss(albedo, skin).item() == 0
    albedo[0, 3, 0] = 1.0
    assert losses.reflectance_loss(albedo, skin).item() > 0
    assert losses.gamma_loss(torch.zeros(1, 27)).item() == 0
    assert losses.gamma_loss(torch.randn(1, 27)).item() > 0


def test_reference_skin_gmm_on_known_colours() -> None:
    # YCbCr matches the BT.601 studio-swing definition at the primaries.
    np.testing.assert_allclose(rgb_to_ycbcr(np.array([[255, 255, 255]])), [[235, 128, 128]], atol=1e-6)
    np.testing.assert_allclose(rgb_to_ycbcr(np.array([[0, 0, 0]])), [[16, 128, 128]], atol=1e-6)
    colours = np.array([[[224, 172, 150], [198, 134, 66], [141, 85, 36], [40, 120, 220], [30, 200, 40],
                          [128, 128, 128]]], np.uint8)
    p = REFERENCE_GMM.probability(colours)[0]
    assert (p[:3] > 0.5).all(), f"skin tones are skin: {p[:3]}"
    assert (p[3:5] < 0.1).all(), f"blue and green are not: {p[3:5]}"
    a = skin_attention(torch.tensor([0.2, 0.6]))
    assert a.tolist() == pytest.approx([0.2, 1.0])


def test_skin_mixture_density_is_the_sum_of_weighted_gaussians() -> None:
    """The mixture density (its quadratic form written out) against scipy's multivariate normal pdf, and the
    posterior against the naive-Bayes formula with the 0.8 / 0.2 priors."""
    from scipy.stats import multivariate_normal

    x = np.random.default_rng(0).uniform(0, 255, (500, 3))
    ycc = rgb_to_ycbcr(x)
    for gm in (REFERENCE_GMM.skin, REFERENCE_GMM.nonskin):
        ref = sum(w * multivariate_normal(mu, cov).pdf(ycc)
                  for w, mu, cov in zip(gm.weights, gm.means, gm.covariances, strict=True))
        np.testing.assert_allclose(gm.likelihood(ycc), ref, rtol=1e-10, atol=1e-300)
    rgb = x.round().astype(np.uint8)
    ls, ln = (gm.likelihood(rgb_to_ycbcr(rgb)) for gm in (REFERENCE_GMM.skin, REFERENCE_GMM.nonskin))
    got = REFERENCE_GMM.probability(rgb.reshape(20, 25, 3)).reshape(-1)
    np.testing.assert_allclose(got, (0.8 * ls / (0.8 * ls + 0.2 * ln)).astype(np.float32), rtol=1e-6)


@pytest.fixture(scope="module")
def synthetic(ict_model, ict_decoder):
    from facerecon.render import get_renderer

    renderer = get_renderer("cpu")
    g = torch.Generator().manual_seed(0)
    lay = ict_model.layout
    v = torch.zeros(1, lay.total)
    s = lay.slices()
    v[0, s["id"]] = torch.randn(lay.id, generator=g) * 0.7
    v[0, s["exp"]] = torch.rand(lay.exp, generator=g) * 0.15
    v[0, s["tex"]] = torch.randn(lay.tex, generator=g) * 0.5
    v[0, s["gamma"]] = torch.randn(27, generator=g) * 0.1
    v[0, s["angle"]] = torch.tensor([0.1, 0.3, -0.05])
    v[0, s["trans"]] = torch.tensor([0.05, -0.03, 0.2])
    truth = Coefficients.from_vector(v, lay)
    with torch.no_grad():
        face = ict_decoder(truth)
        out = renderer.render(face.vertices_cam, ict_model.triangles, face.colors, ict_decoder.camera.intrinsics)
    image = out.image * out.mask + 0.3 * (1 - out.mask)  # grey background
    return renderer, truth, face, FitTarget(image, face.landmarks_2d)


def test_fit_recovers_a_synthetic_face(ict_model, ict_decoder, synthetic) -> None:
    renderer, truth, _face, target = synthetic
    res = fit(ict_decoder, renderer, target, config=FitConfig(landmark_steps=60, photo_steps=20))
    start, end = res.landmark_error_start[0], res.landmark_error_end[0]
    print(f"landmark error {start:.2f} -> {end:.2f} px in {res.seconds:.2f} s")
    assert start > 8 and end < 2.0
    photo = [h["photo"] for h in res.history if h["stage"] == 2.0]
    assert photo[-1] < photo[0] * 0.8, "the photometric stage lowers the photometric loss"
    # Pose from a 2D fit: within ~5 degrees per axis (yaw trades off against identity depth cues).
    np.testing.assert_allclose(res.coefficients.angle.numpy(), truth.angle.numpy(), atol=0.09)


def test_fit_set_shares_identity(ict_model, ict_decoder, synthetic) -> None:
    """Two different faces (the synthetic one and the same with its landmarks widened by 8 %): fitted as a set they
    get one identity; fitted apart (the control), different ones. Without the control this passed with sharing
    switched off, since identical inputs fit identically anyway."""
    _, _, _, target = synthetic
    lm = target.landmarks
    centre = lm.mean(dim=1, keepdim=True)
    wider = centre + (lm - centre) * torch.tensor([1.08, 1.0])
    pair = FitTarget(target.image.repeat(2, 1, 1, 1), torch.cat([lm, wider]))
    cfg = dict(landmark_steps=20, photo_steps=0)
    shared = fit(ict_decoder, None, pair, config=FitConfig(**cfg, share_identity=True))
    apart = fit(ict_decoder, None, pair, config=FitConfig(**cfg, share_identity=False))
    assert torch.equal(shared.coefficients.id[0], shared.coefficients.id[1])
    assert (apart.coefficients.id[0] - apart.coefficients.id[1]).abs().max() > 1e-3
    assert shared.landmark_error_end[0] < shared.landmark_error_start[0]


def test_one_objective_with_a_named_region(ict_model, ict_decoder, synthetic) -> None:
    """The hybrid loss is assembled in one place (facerecon.objective); fitting and training differ only by the
    named photometric region, and each region is what its name says."""
    from facerecon.objective import hybrid_terms, landmark_terms

    renderer, truth, _face, target = synthetic
    skin = torch.ones_like(target.image[:, :1])
    fm = hybrid_terms(ict_decoder, renderer, truth, target.image, skin, target.landmarks, region="face_mask")
    fr = hybrid_terms(ict_decoder, renderer, truth, target.image, skin, target.landmarks, region="front")
    # the true coefficients reproduce the synthetic render inside either region
    assert fm.photo.item() < 0.01 and fr.photo.item() < 0.01
    # the regions differ: the front triangles cover pixels the face_mask region does not (and vice versa)
    assert fm.mask is not None and fr.mask is not None and (fm.mask != fr.mask).sum() > 100
    w = losses.LossWeights()
    parts = (w.photo * fm.photo + w.landmark * fm.landmark + w.coef * fm.coef + w.reflectance * fm.reflectance
             + w.gamma * fm.gamma)
    torch.testing.assert_close(fm.total(w), parts)
    lm_only = landmark_terms(ict_decoder, truth, target.landmarks)
    torch.testing.assert_close(lm_only.landmark, fm.landmark)
    torch.testing.assert_close(lm_only.coef, fm.coef)
    with pytest.raises(ValueError, match="region"):
        hybrid_terms(ict_decoder, renderer, truth, target.image, skin, target.landmarks, region="everything")
