"""Large-pose synthesis from real photos (facerecon.train.large_pose): the turn keeps the head in place, a turn by
zero degrees reproduces the photo, the labels' landmarks are where the pipeline's own alignment puts them, and a
turned real photo looks turned to our detector (its independent yaw estimate), so the labels describe the pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import EXAMPLES, need_shared


@pytest.fixture(scope="module")
def source(reconstructor):
    """One real example photo through the public stages (R-Net + fit), its photo and its prepared face."""
    need_shared("data", "deep3d-examples")
    photo = np.asarray(Image.open(EXAMPLES / "000002.jpg").convert("RGB"))
    face = reconstructor.detect(photo)[0]
    prepared = reconstructor.prepare(photo, face)
    est = reconstructor.estimate([prepared], mode="rnet")
    return photo, prepared, est.coefficients


def _turned(coeffs, yaw_deg: float, pitch_deg: float | None = None):
    from facerecon.train.large_pose import LargePoseConfig, turn_head

    angle = coeffs.angle.clone()
    angle[:, 1] = math.radians(yaw_deg)
    if pitch_deg is not None:
        angle[:, 0] = math.radians(pitch_deg)
    return turn_head(coeffs, angle, LargePoseConfig().pivot)


def test_turn_keeps_the_pivot_and_sets_the_angle(reconstructor, source):
    from facerecon import geometry
    from facerecon.train.large_pose import LargePoseConfig

    _, _, coeffs = source
    turned = _turned(coeffs, 70.0, -15.0)
    pivot = torch.tensor(LargePoseConfig().pivot)
    before = geometry.euler_to_rotation(coeffs.angle)[0] @ pivot + coeffs.trans[0]
    after = geometry.euler_to_rotation(turned.angle)[0] @ pivot + turned.trans[0]
    assert torch.allclose(before, after, atol=1e-5)
    assert math.degrees(float(turned.angle[0, 1])) == pytest.approx(70.0)
    assert math.degrees(float(turned.angle[0, 0])) == pytest.approx(-15.0)
    assert torch.equal(turned.id, coeffs.id) and torch.equal(turned.exp, coeffs.exp)
    # a point away from the pivot does move
    tip = reconstructor.decoder(coeffs).vertices_world[0, reconstructor.model.landmarks68[30]]
    tip_t = reconstructor.decoder(turned).vertices_world[0, reconstructor.model.landmarks68[30]]
    assert float((tip - tip_t).norm()) > 0.3


def test_no_turn_reproduces_the_photo_and_its_landmarks(reconstructor, source):
    from facerecon.train.large_pose import render_turned

    photo, prepared, coeffs = source
    k = prepared.alignment.photo_intrinsics()
    with torch.no_grad():
        face = reconstructor.decoder(coeffs)
    tp = render_turned(photo, k, face, face, reconstructor.model.triangles, reconstructor.model.landmarks68,
                       reconstructor.renderer)
    assert tp.seen > 0.6  # most of the head's pixels were seen in the photo
    # the exact landmarks are where the rasteriser draws the landmark vertices: the decoder's crop point (u, v_up)
    # is crop pixel (u - 1/2, 223.5 - v_up) (render.base), whose content came from the photo position that the
    # actual resize + crop gives (Alignment.crop_pixels_to_photo, a second derivation of the photo camera)
    uv = reconstructor.decoder.landmarks(coeffs)[0].numpy().astype(np.float64)
    expected = prepared.alignment.crop_pixels_to_photo(np.stack([uv[:, 0] - 0.5, 223.5 - uv[:, 1]], axis=1))
    assert np.abs(tp.lm68 - expected).max() < 0.05
    # inside the face (the landmarks' hull, shrunk), the re-rendered photo is the photo
    lo, hi = expected[17:].min(axis=0), expected[17:].max(axis=0)
    c = (lo + hi) / 2
    r0, r1 = int(c[1] - 0.3 * (hi - lo)[1]), int(c[1] + 0.3 * (hi - lo)[1])
    c0, c1 = int(c[0] - 0.3 * (hi - lo)[0]), int(c[0] + 0.3 * (hi - lo)[0])
    diff = np.abs(tp.image[r0:r1, c0:c1].astype(float) - photo[r0:r1, c0:c1].astype(float))
    assert diff.mean() < 4.0, diff.mean()
    # and far from the head the photo is untouched
    assert np.array_equal(tp.image[:5, :5], photo[:5, :5])


@pytest.mark.parametrize("yaw", [-60.0, 45.0])
def test_turned_photo_reads_as_turned_to_the_detector(reconstructor, source, yaw):
    """Our detector (a different model: the face mesh's landmarks, its own pose estimate) sees the synthesised head
    turned the way its label says."""
    from facerecon.train.large_pose import render_turned

    photo, prepared, coeffs = source
    k = prepared.alignment.photo_intrinsics()
    turned = _turned(coeffs, yaw)
    with torch.no_grad():
        before, after = reconstructor.decoder(coeffs), reconstructor.decoder(turned)
    tp = render_turned(photo, k, before, after, reconstructor.model.triangles, reconstructor.model.landmarks68,
                       reconstructor.renderer)
    faces = reconstructor.detect(tp.image)
    assert faces, "the detector finds the turned face"
    face = faces[0]
    assert face.pose is not None
    src_yaw = reconstructor.detect(photo)[0].pose[1]
    assert abs(src_yaw) < 20
    assert np.sign(face.pose[1]) == np.sign(yaw)
    assert abs(face.pose[1] - yaw) < 20, (face.pose, yaw)
    # its landmarks lie on the label's (mean distance under 10 % of the face's size)
    size = float(np.sqrt(np.prod(np.ptp(tp.lm68, axis=0))))
    assert float(np.linalg.norm(face.lm68 - tp.lm68, axis=1).mean()) < 0.1 * size


def test_scaled_photo_keeps_the_projection(reconstructor, source):
    """A downscaled photo's intrinsics put the landmarks at the same place, scaled (pixel edges at integers)."""
    from facerecon.train.large_pose import project, scaled_photo

    photo, prepared, coeffs = source
    al = prepared.alignment
    small, k = scaled_photo(photo, al, 0.5 * 1.0 / al.sigma)  # half of the photo's resolution per crop pixel
    assert small.shape[1] < photo.shape[1]
    with torch.no_grad():
        v = reconstructor.decoder(coeffs).vertices_cam[0, reconstructor.model.landmarks68].numpy().astype(np.float64)
    col, row = project(v, k)
    col0, row0 = project(v, al.photo_intrinsics())
    sx, sy = small.shape[1] / photo.shape[1], small.shape[0] / photo.shape[0]
    assert np.allclose(col, (col0 + 0.5) * sx - 0.5, atol=1e-6)
    assert np.allclose(row, (row0 + 0.5) * sy - 0.5, atol=1e-6)
