"""The torch-free decoder (the R-Net path): NumPy coefficients decode to what the torch decoder gives, on the
shipped face model, and NumPy coefficients behave as tensor ones do."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from facerecon import geometry
from facerecon.coefficients import CoefficientLayout, Coefficients
from facerecon.npdecode import NumpyDecoder, euler_to_rotation


def _random(layout: CoefficientLayout, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(batch, layout.total)).astype(np.float32) * 0.5
    s = layout.slices()
    v[:, s["angle"]] = rng.uniform(-0.7, 0.7, (batch, 3))  # up to 40 degrees each way
    v[:, s["trans"]] *= 0.4
    return v


def test_numpy_coefficients_round_trip_and_convert() -> None:
    lay = CoefficientLayout(id=5, exp=4, tex=3)
    v = np.random.default_rng(1).normal(size=(3, lay.total)).astype(np.float32)
    c = Coefficients.from_vector(v, lay)
    assert c.is_numpy and c.layout == lay and c.batch_size == 3
    assert np.array_equal(np.concatenate(c.arrays(), axis=1), v)
    assert np.array_equal(np.concatenate(Coefficients.cat([c.index(2), c.index(0)]).arrays(), axis=1), v[[2, 0]])
    assert Coefficients.cat([c.index(2), c.index(0)]).is_numpy
    # read as attributes, the groups are torch tensors over the same numbers, as for any coefficients
    assert isinstance(c.angle, torch.Tensor) and torch.equal(c.to_vector(), torch.from_numpy(v))
    t = c.to("cpu")
    assert not t.is_numpy and torch.equal(t.to_vector(), torch.from_numpy(v))
    assert np.array_equal(np.concatenate(t.numpy().arrays(), axis=1), v) and t.numpy().is_numpy
    assert c.to_dict(1) == t.to_dict(1) == Coefficients.from_dict(c.to_dict(1)).to_dict(0)
    with pytest.raises(AttributeError):
        c.id = t.id  # type: ignore[misc]


def test_numpy_coefficients_need_no_torch() -> None:
    """Made from an array, sliced, read as arrays and as JSON lists, decoded to landmarks and a mesh: torch is
    never imported (a fresh interpreter)."""
    code = (
        "import sys, numpy as np\n"
        "from facerecon.config import get_settings\n"
        "from facerecon.facemodel.registry import resolve\n"
        "from facerecon.facemodel.format import load_face_model\n"
        "from facerecon.coefficients import Coefficients\n"
        "from facerecon.npdecode import NumpyDecoder\n"
        "s = get_settings(); data = load_face_model(resolve(s.models_dir, s.face_model))\n"
        "c = Coefficients.from_vector(np.zeros((2, data.card.layout.total), np.float32), data.card.layout)\n"
        "d = NumpyDecoder.from_data(data)\n"
        "one = c.index(1); one.to_dict(); one.arrays(); d.landmarks(one); m = d.decode(one)\n"
        "print('torch' in sys.modules, m.vertices_world.shape[1] == data.card.n_vertices)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "True"]


def test_numpy_decode_equals_the_torch_decoder(ict_model, ict_decoder) -> None:
    nd = NumpyDecoder.from_model(ict_model)
    v = _random(ict_model.layout, 3, seed=0)
    c = Coefficients.from_vector(v, ict_model.layout)
    with torch.no_grad():
        ref = ict_decoder(c.to("cpu"))
        ref_lm = ict_decoder.landmarks(c.to("cpu")).numpy()
    assert c.is_numpy
    out = nd.decode(c)
    for name, atol in (("shape", 1e-5), ("vertices_world", 1e-5), ("vertices_cam", 1e-5), ("albedo", 1e-5),
                       ("rotation", 1e-6), ("vertices_2d", 2e-3), ("landmarks_2d", 2e-3), ("normals", 2e-3),
                       ("normals_world", 2e-3), ("colors", 2e-3)):
        got, want = getattr(out, name), getattr(ref, name).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)
    lm = nd.landmarks(c)
    np.testing.assert_allclose(lm, ref_lm, rtol=0, atol=2e-3)
    np.testing.assert_allclose(lm, out.landmarks_2d, rtol=0, atol=2e-3)
    # the landmarks move with the coefficients (a decoder that ignored them would pass the equalities above only
    # if the torch one did too)
    assert np.abs(lm[0] - lm[1]).max() > 1.0


def test_numpy_rotation_is_the_reference_convention() -> None:
    """Rz Ry Rx for column vectors: a pure yaw turns +z (towards the camera) towards +x."""
    r = euler_to_rotation(np.array([[0.0, np.pi / 2, 0.0]]))[0]
    np.testing.assert_allclose(r @ np.array([0.0, 0.0, 1.0]), [1.0, 0.0, 0.0], atol=1e-12)
    a = np.array([[0.3, -0.2, 0.1], [-0.5, 0.6, -0.4]])
    np.testing.assert_allclose(euler_to_rotation(a), geometry.euler_to_rotation(torch.from_numpy(a)).numpy(),
                               atol=1e-12)
    np.testing.assert_allclose(euler_to_rotation(a)[1] @ euler_to_rotation(a)[1].T, np.eye(3), atol=1e-12)


def test_numpy_decoder_refuses_another_layout(ict_model) -> None:
    nd = NumpyDecoder.from_model(ict_model)
    lay = CoefficientLayout(id=5, exp=4, tex=3)
    with pytest.raises(ValueError, match="layout"):
        nd.landmarks(Coefficients.from_vector(np.zeros((1, lay.total), np.float32), lay))


def test_coefficients_pickle_and_copy_keep_their_kind_and_values() -> None:
    """The batch engine's worker processes pickle results: NumPy coefficients stay NumPy, tensors stay tensors."""
    import copy
    import pickle

    lay = CoefficientLayout(id=5, exp=4, tex=3)
    v = np.random.default_rng(2).normal(size=(2, lay.total)).astype(np.float32)
    for c in (Coefficients.from_vector(v, lay), Coefficients.from_vector(torch.from_numpy(v.copy()), lay)):
        for other in (pickle.loads(pickle.dumps(c)), copy.deepcopy(c)):
            assert other.is_numpy == c.is_numpy
            assert np.array_equal(np.concatenate(other.arrays(), axis=1), v)
