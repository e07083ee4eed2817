"""Turned faces: the R-Net's second look (``Reconstructor.second_pass``, ``settings.second_pass_yaw_deg``) and the
fit's yaw rules (the hidden jaw faded out, the targets faded towards the R-Net's own landmarks).

Expectations from outside the pipeline: CFP's manual fiducials on true profiles of held-out people (the gate and
the fade were chosen on training people), and the pipeline's own first pass for faces below the gate (left exactly
as they were).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval import facedata
from eval.rnet_pose import load, pick_face
from facerecon.train.data import cfp_to_ibug, is_validation_person
from tests.conftest import need_shared


def _profiles(n: int) -> list[facedata.Annotated]:
    need_shared("data", "faces-train", "cfp")
    items = [a for a in facedata.cfp("profile") if is_validation_person(f"cfp{a.path.parent.parent.name}")]
    return facedata.every(items, n)


def _nme(lm_photo: np.ndarray, a: facedata.Annotated) -> float:
    """The visible-side fiducials' error, in units of sqrt(box area) (as ``eval.rnet_pose``)."""
    table = cfp_to_ibug(a.points)
    src, dst = list(table), list(table.values())
    return float(np.linalg.norm(lm_photo[dst] - a.points[src], axis=1).mean() / a.box_norm)


def test_the_second_look_brings_profiles_closer_to_the_manual_fiducials(reconstructor) -> None:
    rec = reconstructor
    assert rec.rnet is not None and rec.settings.second_pass_yaw_deg == 50.0
    first, second, gated = [], [], 0
    for a in _profiles(144):  # every held-out profile: the gain is a few tenths of a point on average
        image = load(a.path)
        face = pick_face(rec, image, a.points)
        if face is None:
            continue
        prepared = [rec.prepare(image, face)]
        est = rec.estimate(prepared, refine=False)
        assert est.mode == "rnet+lm"
        again, est2 = rec.second_pass([image], prepared, est)
        first.append(_nme(rec.finish(prepared[0], est).landmarks_photo, a))
        second.append(_nme(rec.finish(again[0], est2).landmarks_photo, a))
        if again[0] is not prepared[0]:
            gated += 1
            assert "second pass" in est2.timings
            assert not np.array_equal(again[0].crop, prepared[0].crop)
            # the new crop is aligned by the R-Net's points, but its landmark targets are still the detector's
            np.testing.assert_allclose(again[0].alignment.to_photo(again[0].lm68_crop), face.lm68, atol=1e-3)
        else:
            assert est2 is est
    assert len(first) >= 130 and gated >= 60, (len(first), gated)
    print(f"{len(first)} profiles, {gated} looked at twice: {np.mean(first):.4f} -> {np.mean(second):.4f}")
    assert np.mean(second) < np.mean(first), (np.mean(first), np.mean(second))


@pytest.mark.parametrize("name", ["000002.jpg", "000031.jpg"])
def test_faces_below_the_gate_and_the_fitting_modes_are_left_as_they_were(reconstructor, name: str) -> None:
    from facerecon.imaging import load_image

    rec = reconstructor
    image = load_image(need_shared("data", "deep3d-examples", name))
    prepared = [rec.prepare(image, rec.detect(image)[0])]
    est = rec.estimate(prepared, refine=False)
    assert abs(np.degrees(float(est.coefficients.angle[0, 1]))) < rec.settings.second_pass_yaw_deg
    again, est2 = rec.second_pass([image], prepared, est)
    assert again[0] is prepared[0] and est2 is est
    # a fitted estimate is never re-done, whatever its yaw (the fit is the expensive part)
    fitted = rec.estimate(prepared, mode="rnet+fit")
    assert rec.second_pass([image], prepared, fitted)[1] is fitted


def test_the_fit_does_not_pull_profiles_back_towards_frontal(reconstructor) -> None:
    """On held-out profiles the R-Net sees at 50 degrees or more, the fit (the default mode) must not be worse than
    the R-Net it starts from. Before the yaw rules it was worse on 18 of the first 20 such photos (7.13 vs 5.86 %
    mean): it chased the detector's guess of the hidden side and turned the head back towards frontal."""
    rec = reconstructor
    rows = []
    for a in _profiles(144):
        image = load(a.path)
        face = pick_face(rec, image, a.points)
        if face is None:
            continue
        prepared = [rec.prepare(image, face)]
        est = rec.estimate(prepared, mode="rnet")
        if abs(math.degrees(float(est.coefficients.angle[0, 1]))) < 50:
            continue
        fitted = rec.estimate(prepared, mode="rnet+fit")
        rows.append((_nme(rec.finish(prepared[0], est).landmarks_photo, a),
                     _nme(rec.finish(prepared[0], fitted).landmarks_photo, a)))
        if len(rows) == 20:
            break
    r = np.asarray(rows)
    assert len(r) == 20
    print(f"R-Net {r[:, 0].mean():.4f}, R-Net + fit {r[:, 1].mean():.4f}, fit worse on {(r[:, 1] > r[:, 0]).sum()}")
    assert r[:, 1].mean() <= r[:, 0].mean()
    assert (r[:, 1] > r[:, 0]).mean() <= 0.5
