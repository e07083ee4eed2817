"""The decoder: layout handling, batching, pose, projection, shading, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from facerecon import geometry
from facerecon.coefficients import BFM_LAYOUT, CoefficientLayout, Coefficients


def test_layout_slices_match_the_reference_257() -> None:
    s = BFM_LAYOUT.slices()
    assert BFM_LAYOUT.total == 257
    assert (s["id"], s["exp"], s["tex"], s["angle"], s["gamma"], s["trans"]) == (
        slice(0, 80), slice(80, 144), slice(144, 224), slice(224, 227), slice(227, 254), slice(254, 257))


def test_coefficients_round_trip() -> None:
    lay = CoefficientLayout(id=5, exp=4, tex=3)
    v = torch.randn(2, lay.total)
    c = Coefficients.from_vector(v, lay)
    assert torch.equal(c.to_vector(), v)
    assert torch.equal(Coefficients.from_dict(c.to_dict(1)).to_vector(), v[1:2])
    with pytest.raises(ValueError, match="coefficient vector"):
        Coefficients.from_vector(torch.zeros(2, lay.total + 1), lay)


def test_zero_coefficients_give_the_mean_face(ict_model, ict_decoder) -> None:
    out = ict_decoder(Coefficients.zeros(ict_model.layout, batch=2))
    torch.testing.assert_close(out.shape[1], ict_model.mean_shape)
    torch.testing.assert_close(out.vertices_world, out.shape)
    torch.testing.assert_close(out.colors, ict_model.mean_albedo[None].expand(2, -1, -1) * 0.8 * 0.886227,
                               rtol=1e-5, atol=1e-6)
    assert (out.vertices_cam[..., 2] > 9.0).all() and (out.vertices_cam[..., 2] < 12.0).all()  # back of the head


def test_layout_mismatch_is_refused(ict_decoder) -> None:
    with pytest.raises(ValueError, match="layout"):
        ict_decoder(Coefficients.zeros(BFM_LAYOUT))


def test_batch_entries_are_independent(ict_model, ict_decoder) -> None:
    torch.manual_seed(0)
    v = torch.randn(3, ict_model.layout.total) * 0.3
    batch = ict_decoder(Coefficients.from_vector(v, ict_model.layout))
    single = ict_decoder(Coefficients.from_vector(v[1:2], ict_model.layout))
    # float32 products in a batch of 3 and of 1 round differently (seen: 3e-5 on one of 47K colour values);
    # 1e-4 is 40 times below one 8-bit level
    torch.testing.assert_close(batch.colors[1:2], single.colors, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch.landmarks_2d[1:2], single.landmarks_2d, rtol=1e-5, atol=1e-4)


def test_pose_projection_and_landmarks(ict_model, ict_decoder) -> None:
    c = Coefficients.zeros(ict_model.layout)
    angle = torch.tensor([[0.1, -0.4, 0.05]])
    trans = torch.tensor([[0.2, -0.1, 0.5]])
    posed = ict_decoder(Coefficients(c.id, c.exp, c.tex, angle, c.gamma, trans))
    r = geometry.euler_to_rotation(angle)[0]
    world = ict_model.mean_shape @ r.T + trans[0]
    torch.testing.assert_close(posed.vertices_world[0], world)
    lm = world[ict_model.landmarks68]
    d = 10.0 - lm[:, 2]
    expected = torch.stack([1015 * lm[:, 0] / d + 112, 1015 * lm[:, 1] / d + 112], dim=1)
    torch.testing.assert_close(posed.landmarks_2d[0], expected)
    # Negative yaw turns the face to the viewer's left: the nose tip moves left of the eye midpoint.
    nose_u = posed.landmarks_2d[0, 30, 0]
    eyes_u = posed.landmarks_2d[0, [36, 45], 0].mean()
    assert nose_u < eyes_u - 5
    # Normals rotate with the face and stay unit length.
    torch.testing.assert_close(posed.normals_world[0], posed.normals[0] @ r.T)
    assert torch.allclose(posed.normals_world.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_normals_point_outward_on_the_face(ict_model, ict_decoder) -> None:
    out = ict_decoder(Coefficients.zeros(ict_model.layout))
    nose_tip = ict_model.landmarks68[30]
    assert out.normals[0, nose_tip, 2] > 0.9
    face = ict_model.face_mask
    assert (out.normals[0, face, 2] > 0).float().mean() > 0.85


def test_gradients_reach_every_group(ict_model, ict_decoder) -> None:
    v = torch.zeros(1, ict_model.layout.total, requires_grad=True)
    out = ict_decoder(Coefficients.from_vector(v, ict_model.layout))
    (out.landmarks_2d.sum() + out.colors.sum()).backward()
    assert v.grad is not None
    for name, sl in ict_model.layout.slices().items():
        assert v.grad[0, sl].abs().sum() > 0, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")
def test_cuda_matches_cpu(ict_model, ict_decoder) -> None:
    from facerecon.decoder import FaceDecoder

    v = torch.randn(2, ict_model.layout.total) * 0.3
    cpu = ict_decoder(Coefficients.from_vector(v, ict_model.layout))
    gpu_dec = FaceDecoder(ict_model.to("cuda"))
    gpu = gpu_dec(Coefficients.from_vector(v.cuda(), ict_model.layout))
    torch.testing.assert_close(gpu.colors.cpu(), cpu.colors, rtol=1e-4, atol=1e-4)
    ict_model.to("cpu")


def test_camera_constants() -> None:
    cam = geometry.Camera()
    assert cam.focal / cam.center == pytest.approx(9.0625)
    assert math.degrees(2 * math.atan(112 / 1015)) == pytest.approx(cam.fov_degrees)


def test_landmark_only_decoding_equals_the_full_decode(ict_model, ict_decoder) -> None:
    torch.manual_seed(1)
    c = Coefficients.from_vector(torch.randn(2, ict_model.layout.total) * 0.3, ict_model.layout)
    torch.testing.assert_close(ict_decoder.landmarks(c), ict_decoder(c).landmarks_2d, rtol=1e-5, atol=1e-4)
