"""The torch-free landmark stage (``facerecon.npfit``): the same objective as the torch fit's first stage, solved to
convergence; checked against analytic cases, finite differences and torch's own optimiser on that objective."""

from __future__ import annotations

import numpy as np
import pytest

from facerecon.coefficients import Coefficients
from facerecon.npdecode import NumpyDecoder, euler_to_rotation
from facerecon.npfit import LandmarkPrior, _Solver, refine_landmarks, rotation

from .conftest import ICT_MODEL


@pytest.fixture(scope="module")
def npdec() -> NumpyDecoder:
    from facerecon.facemodel.format import load_face_model

    return NumpyDecoder.from_data(load_face_model(ICT_MODEL))


def _random_face(dec: NumpyDecoder, rng: np.random.Generator, yaw_deg: float = 20.0) -> Coefficients:
    lay = dec.layout
    f = np.float32
    return Coefficients(rng.normal(0, 0.8, (1, lay.id)).astype(f), rng.uniform(0, 0.4, (1, lay.exp)).astype(f),
                        np.zeros((1, lay.tex), f),
                        np.radians([[rng.uniform(-10, 10), yaw_deg, rng.uniform(-8, 8)]]).astype(f),
                        np.zeros((1, 27), f), np.array([[0.05, -0.1, 0.3]], f))


def test_rotation_is_the_decoders() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.uniform(-1.5, 1.5, 3)
        np.testing.assert_allclose(rotation(a), euler_to_rotation(a[None])[0], atol=1e-12)


def test_jacobian_matches_finite_differences(npdec: NumpyDecoder) -> None:
    rng = np.random.default_rng(1)
    face = _random_face(npdec, rng, 35.0)
    c = face.arrays()
    x = np.concatenate([c.id[0], c.exp[0], c.angle[0], c.trans[0]]).astype(np.float64)
    s = _Solver(npdec, LandmarkPrior())
    q, jac = s.jacobian(x)
    np.testing.assert_allclose(q, npdec.landmarks(face)[0], atol=2e-3)
    for k in rng.choice(x.size, 12, replace=False):
        e = np.zeros_like(x)
        e[k] = 1e-4
        fd = (s.landmarks(x + e) - s.landmarks(x - e)) / 2e-4
        np.testing.assert_allclose(jac[:, :, k], fd, atol=1e-4 * max(1.0, np.abs(fd).max()))


def test_exact_landmarks_are_recovered_from_the_mean_face(npdec: NumpyDecoder) -> None:
    """Targets that are a face's own projected landmarks, a weak prior: from the mean face at the right place the
    solution reproduces them (well below a pixel) and lands near the true pose."""
    rng = np.random.default_rng(2)
    truth = _random_face(npdec, rng, 25.0)
    target = npdec.landmarks(truth)
    lay = npdec.layout
    start = truth.arrays()
    f = np.float32
    init = Coefficients(np.zeros((1, lay.id), f), np.zeros((1, lay.exp), f), start.tex, np.zeros((1, 3), f),
                        start.gamma, start.trans)
    res = refine_landmarks(npdec, init, target, prior=LandmarkPrior(coef=1e-7), iterations=30)
    assert res.error_start[0] > 5.0
    assert res.error_end[0] < 0.3, res
    yaw = np.degrees(res.coefficients.arrays().angle[0, 1])
    assert abs(yaw - 25.0) < 3.0
    # albedo and light are not the landmarks' business
    np.testing.assert_array_equal(res.coefficients.arrays().tex, init.arrays().tex)
    np.testing.assert_array_equal(res.coefficients.arrays().gamma, init.arrays().gamma)


def test_it_solves_the_torch_fits_own_objective(npdec: NumpyDecoder, ict_decoder) -> None:
    """Independent expectation from torch: on noisy targets, the solution is a stationary point of the torch fit's
    landmark-stage objective (``objective.landmark_terms`` with the fit's weights, differentiated by autograd): its
    gradient there is a thousandth of the start's; and its energy is below what the torch fit's own landmark stage
    (60 Adam steps, the fit's learning rates) reaches from the same start."""
    import torch

    from facerecon.fit import FitConfig, FitTarget, fit
    from facerecon.objective import landmark_terms

    rng = np.random.default_rng(3)
    truth = _random_face(npdec, rng, 40.0)
    target = npdec.landmarks(truth) + rng.normal(0, 1.5, (1, 68, 2)).astype(np.float32)
    start = _random_face(npdec, np.random.default_rng(4), 30.0)
    res = refine_landmarks(npdec, start, target, iterations=30, tol=1e-12)
    w = FitConfig().weights
    tgt = torch.from_numpy(target)

    def energy_and_grad(c: Coefficients) -> tuple[float, float]:
        a = c.arrays()
        p = [torch.tensor(v, requires_grad=True) for v in (a.id, a.exp, a.angle, a.trans)]
        coeffs = Coefficients(p[0], p[1], torch.from_numpy(a.tex), p[2], torch.from_numpy(a.gamma), p[3])
        e = landmark_terms(ict_decoder, coeffs, tgt, None, w).total(w)
        e.backward()
        return float(e.detach()), float(torch.cat([q.grad.flatten() for q in p]).norm())

    e0, g0 = energy_and_grad(start)
    e1, g1 = energy_and_grad(res.coefficients)
    assert e1 < 0.5 * e0 and g1 < 1e-3 * g0, (e0, g0, e1, g1)
    a = start.arrays()
    box = FitTarget(image=torch.zeros(1, 3, 224, 224), landmarks=tgt)
    adam = fit(ict_decoder, None, box, init=Coefficients(*(torch.from_numpy(v) for v in a)),
               config=FitConfig(photo_steps=0))
    e_adam, _ = energy_and_grad(adam.coefficients.numpy())
    assert e1 <= e_adam, (e1, e_adam)




def test_frozen_groups_keep_their_values(npdec: NumpyDecoder) -> None:
    """A set's shared identity: with ``free`` = expression and pose only, the identity comes back unchanged while
    the landmarks still move towards the target."""
    rng = np.random.default_rng(5)
    truth = _random_face(npdec, rng, 10.0)
    target = npdec.landmarks(truth)
    start = _random_face(npdec, np.random.default_rng(6), 0.0)
    res = refine_landmarks(npdec, start, target, free=("exp", "angle", "trans"))
    np.testing.assert_array_equal(res.coefficients.arrays().id, start.arrays().id)
    assert res.error_end[0] < 0.7 * res.error_start[0]
    with pytest.raises(ValueError, match="free groups"):
        refine_landmarks(npdec, start, target, free=("tex",))


def test_the_fast_stage_hands_profiles_back_to_the_rnet(npdec: NumpyDecoder) -> None:
    """Past the blend's upper yaw the stage returns the R-Net's coefficients as they were; near frontal it is the
    plain landmark solve with the fast prior; in between it lies between the two."""
    from facerecon.npfit import BLEND_DEG, FAST_PRIOR, landmark_stage

    rng = np.random.default_rng(7)
    for yaw, kind in ((BLEND_DEG[1] + 5.0, "rnet"), (5.0, "solve"), (sum(BLEND_DEG) / 2, "between")):
        truth = _random_face(npdec, rng, yaw)
        target = npdec.landmarks(truth) + rng.normal(0, 2.0, (1, 68, 2)).astype(np.float32)
        start = _random_face(npdec, np.random.default_rng(8), yaw)
        got = landmark_stage(npdec, start, target).coefficients.arrays()
        plain = refine_landmarks(npdec, start, target, prior=FAST_PRIOR).coefficients.arrays()
        if kind == "rnet":
            np.testing.assert_array_equal(got.id, start.arrays().id)
        elif kind == "solve":
            np.testing.assert_allclose(got.id, plain.id, atol=1e-6)
        else:
            a, b, c = start.arrays().id, plain.id, got.id
            assert np.linalg.norm(c - a) < np.linalg.norm(b - a) and np.linalg.norm(c - b) < np.linalg.norm(b - a)


def test_the_prior_pulls_towards_its_centre(npdec: NumpyDecoder) -> None:
    """A coefficient prior far stronger than the landmark term leaves identity and expression at its centre: the
    mean face (``center="zero"``), the starting coefficients (``"start"``), or the mean identity with the starting
    expression (``"start_exp"``); only the pose follows the landmarks."""
    rng = np.random.default_rng(5)
    start = _random_face(npdec, rng, 15.0)
    target = npdec.landmarks(_random_face(npdec, rng, 20.0))
    c0 = start.arrays()
    for center, want_id, want_exp in (("zero", 0 * c0.id, 0 * c0.exp), ("start", c0.id, c0.exp),
                                      ("start_exp", 0 * c0.id, c0.exp)):
        res = refine_landmarks(npdec, start, target, prior=LandmarkPrior(coef=1e4, center=center))
        out = res.coefficients.arrays()
        np.testing.assert_allclose(out.id, want_id, atol=2e-3)
        np.testing.assert_allclose(out.exp, want_exp, atol=2e-3)
    with pytest.raises(ValueError, match="centre"):
        refine_landmarks(npdec, start, target, prior=LandmarkPrior(center="elsewhere"))
