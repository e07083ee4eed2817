"""Tests of facerecon.align: the reference crop (reference.md section 6) to the pixel, its inverse, the photo
camera. Real-photo checks use ../shared/data/deep3d-examples and ../shared/assets/bfm-aux and skip without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facerecon.align import (
    CROP_SIZE,
    Alignment,
    align_face,
    fit_alignment,
    pos,
    resize_and_crop,
    standard_lm5,
)
from facerecon.geometry import Camera

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EXAMPLES = SHARED / "data" / "deep3d-examples"
LM3D_MAT = SHARED / "assets" / "bfm-aux" / "similarity_Lm3D_all.mat"

# The alignment parameters published in ../shared/data/deep3d-examples/README.md (computed there with the
# reference's own POS): file -> (w0, h0, sigma, tx, ty), to 4 / 2 decimals.
PUBLISHED = {
    "000002.jpg": (423, 594, 0.7294, 196.61, 355.06),
    "000006.jpg": (410, 594, 1.0218, 220.36, 401.32),
    "000007.jpg": (334, 500, 0.8374, 172.56, 272.52),
    "000031.jpg": (476, 500, 0.5560, 212.81, 222.27),
    "000033.jpg": (250, 262, 1.6169, 138.69, 150.94),
    "000037.jpg": (282, 352, 1.0515, 165.03, 159.98),
    "000050.jpg": (294, 255, 1.1788, 171.41, 135.90),
    "000055.jpg": (367, 452, 0.6740, 165.06, 215.53),
    "000114.jpg": (594, 499, 0.9495, 253.24, 324.11),
    "000125.jpg": (245, 327, 1.1658, 120.51, 204.49),
    "000126.jpg": (700, 873, 0.7442, 360.60, 682.58),
    "015259.jpg": (500, 491, 0.6541, 260.48, 246.18),
    "015270.jpg": (600, 857, 0.3984, 303.17, 396.15),
    "015309.jpg": (900, 1354, 0.2234, 400.73, 728.33),
    "015310.jpg": (322, 500, 1.0152, 172.15, 315.43),
    "015316.jpg": (1131, 1080, 0.3235, 577.25, 579.62),
    "015384.jpg": (500, 750, 0.6148, 245.27, 556.05),
    "vd006.png": (321, 341, 1.0003, 154.64, 188.47),
    "vd025.png": (450, 360, 0.7501, 230.41, 218.34),
    "vd026.png": (530, 620, 0.5171, 239.52, 304.76),
    "vd034.png": (390, 390, 0.9307, 178.35, 197.94),
    "vd051.png": (420, 510, 0.6845, 209.51, 182.68),
    "vd070.png": (580, 630, 0.5808, 331.07, 287.46),
    "vd092.png": (350, 370, 1.2839, 136.39, 200.35),
    "vd102.png": (480, 480, 0.9251, 153.86, 224.73),
}

# reference.md section 6.2: the 5 standard 3D points (float32)
STANDARD_TABLE = np.array(
    [
        [-0.311487, 0.290361, 0.133780],
        [0.309799, 0.289720, 0.131795],
        [0.003253, -0.046179, 0.552442],
        [-0.252169, -0.381339, 0.224057],
        [0.248466, -0.381282, 0.222358],
    ]
)

needs_examples = pytest.mark.skipif(
    not EXAMPLES.is_dir(), reason=f"reference example photos not found at {EXAMPLES}"
)
needs_lm3d = pytest.mark.skipif(not LM3D_MAT.is_file(), reason=f"{LM3D_MAT} not found")


@pytest.fixture(scope="module")
def lm3d5() -> np.ndarray:
    """The 5 standard points from similarity_Lm3D_all.mat, or the reference.md table when it is absent."""
    if LM3D_MAT.is_file():
        from scipy.io import loadmat

        return standard_lm5(loadmat(str(LM3D_MAT))["lm"])
    return STANDARD_TABLE.astype(np.float32)


def _example(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(photo RGB uint8 as the reference decodes it, reference 5 points y-down float32)."""
    img = np.asarray(Image.open(EXAMPLES / name).convert("RGB"))
    lm = np.loadtxt(EXAMPLES / "detections" / (Path(name).stem + ".txt")).astype(np.float32).reshape(-1, 2)
    return img, lm


def _reference_align(img: np.ndarray, lm_ydown: np.ndarray, lm3d: np.ndarray):
    """An independent transcription of PT util/preprocess.py (POS + resize_n_crop_img), with the NumPy 2
    fix of pitfall 1 (``float()`` of 1-element arrays). Returns (w, h, left, up, crop, lm_crop, sigma, t)."""
    pil = Image.fromarray(img)
    w0, h0 = pil.size
    lm = lm_ydown.astype(np.float32).copy()
    lm[:, -1] = h0 - 1 - lm[:, -1]
    xp, x = lm.transpose(), lm3d.transpose()
    npts = xp.shape[1]
    a = np.zeros([2 * npts, 8])
    a[0 : 2 * npts - 1 : 2, 0:3] = x.transpose()
    a[0 : 2 * npts - 1 : 2, 3] = 1
    a[1 : 2 * npts : 2, 4:7] = x.transpose()
    a[1 : 2 * npts : 2, 7] = 1
    b = np.reshape(xp.transpose(), [2 * npts, 1])
    k, _, _, _ = np.linalg.lstsq(a, b)
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    t = np.stack([k[3], k[7]], axis=0)
    s = 102.0 / s
    w = (w0 * s).astype(np.int32)
    h = (h0 * s).astype(np.int32)
    left = (w / 2 - 112.0 + float(((t[0] - w0 / 2) * s)[0])).astype(np.int32)
    up = (h / 2 - 112.0 + float(((h0 / 2 - t[1]) * s)[0])).astype(np.int32)
    crop = pil.resize((int(w), int(h)), resample=Image.BICUBIC).crop(
        (int(left), int(up), int(left) + 224, int(up) + 224)
    )
    lm_crop = np.stack([lm[:, 0] - t[0] + w0 / 2, lm[:, 1] - t[1] + h0 / 2], axis=1) * s
    lm_crop = lm_crop - np.reshape(np.array([(w / 2 - 112.0), (h / 2 - 112.0)]), [1, 2])
    return int(w), int(h), int(left), int(up), np.asarray(crop), lm_crop, float(s), t[:, 0]


def _explicit_hv_resize_crop(im: Image.Image, a: Alignment) -> np.ndarray:
    """Full resize as two explicit Pillow passes, horizontal first (what Pillow 6.2.1 does), then crop."""
    w0, h0 = im.size
    out = im.resize((a.w, h0), Image.BICUBIC) if a.w != w0 else im
    out = out.resize((a.w, a.h), Image.BICUBIC) if a.h != h0 else out
    return np.asarray(out.crop((a.left, a.up, a.left + CROP_SIZE, a.up + CROP_SIZE)))


# ----------------------------------------------------------------------------------------------------------
# standard points


@needs_lm3d
def test_standard_lm5_matches_reference_table(lm3d5: np.ndarray) -> None:
    assert lm3d5.shape == (5, 3)
    assert lm3d5.dtype == np.float32
    np.testing.assert_allclose(lm3d5, STANDARD_TABLE, atol=1e-6)


def test_standard_lm5_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError):
        standard_lm5(np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------------------
# the reference arithmetic on the reference photos


@needs_examples
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_alignment_matches_published_parameters(name: str, lm3d5: np.ndarray) -> None:
    """sigma, tx, ty agree with the README table; w, h, left, up are recomputed here by hand from the
    published formula (section 6.5) and must agree exactly."""
    w0, h0, sigma, tx, ty = PUBLISHED[name]
    lm = np.loadtxt(EXAMPLES / "detections" / (Path(name).stem + ".txt")).reshape(-1, 2)
    a = fit_alignment(lm, lm3d5, w0, h0)
    assert (a.w0, a.h0) == (w0, h0)
    assert a.sigma == pytest.approx(sigma, abs=6e-5)
    assert a.tx == pytest.approx(tx, abs=6e-3)
    assert a.ty == pytest.approx(ty, abs=6e-3)
    # by hand: trunc toward zero of the published expressions
    w, h = int(w0 * a.sigma), int(h0 * a.sigma)
    assert (a.w, a.h) == (w, h)
    assert a.left == int(np.trunc(w / 2 - 112 + (a.tx - w0 / 2) * a.sigma))
    assert a.up == int(np.trunc(h / 2 - 112 + (h0 / 2 - a.ty) * a.sigma))
    # plain Python scalars (NumPy 2 safe, JSON-ready)
    assert all(type(v) is int for v in (a.w0, a.h0, a.w, a.h, a.left, a.up))
    assert all(type(v) is float for v in (a.sigma, a.tx, a.ty))
    assert json.loads(json.dumps(a.to_dict()))["trans_params"] == list(a.trans_params)


@needs_examples
@needs_lm3d
def test_crop_is_the_reference_crop_to_the_pixel(lm3d5: np.ndarray) -> None:
    """Every example photo: same integers, identical crop bytes and the same crop landmarks as the
    transcription of the reference code (and the plain full resize, which Pillow runs horizontal-first here)."""
    for name in sorted(PUBLISHED):
        img, lm = _example(name)
        crop, a, lm_crop = align_face(img, lm, lm3d5)
        w, h, left, up, ref_crop, ref_lm, sigma, t = _reference_align(img, lm, lm3d5)
        assert (a.w, a.h, a.left, a.up) == (w, h, left, up), name
        assert a.sigma == sigma and a.tx == float(t[0]) and a.ty == float(t[1]), name
        assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
        assert np.array_equal(crop, ref_crop), name
        np.testing.assert_array_equal(lm_crop, ref_lm, err_msg=name)


@needs_examples
def test_crop_outside_the_photo_is_black(lm3d5: np.ndarray) -> None:
    img, lm = _example("vd025.png")  # up = -5: the crop starts 5 rows above the resized photo
    crop, a, _ = align_face(img, lm, lm3d5)
    assert a.up < 0
    assert not crop[: -a.up].any()
    assert crop[-a.up :].any()


def test_banded_resize_equals_two_pass_full_resize() -> None:
    """resize_and_crop == explicit horizontal-then-vertical full resize + crop, bit for bit, on random sizes,
    scales (down and up), crop positions (inside, straddling, outside) and modes RGB / L / F. Tall downscales
    are included: there Pillow >= 11's own resize runs the vertical pass first, the reference's Pillow did not."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(60):
        w0, h0 = (int(v) for v in rng.integers(3, 260, 2))
        sigma = float(rng.uniform(0.08, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 6.0))
        tx, ty = float(rng.uniform(-0.3, 1.3) * w0), float(rng.uniform(-0.3, 1.3) * h0)
        try:
            a = Alignment.from_params(w0, h0, sigma, tx, ty)
        except ValueError:
            continue
        rgb = rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8)
        for im in (
            Image.fromarray(rgb),
            Image.fromarray(rgb[:, :, 1].copy()),
            Image.fromarray(rgb[:, :, 2].astype(np.float32) * 0.37, mode="F"),
        ):
            assert np.array_equal(np.asarray(resize_and_crop(im, a)), _explicit_hv_resize_crop(im, a))
        checked += 1
    assert checked > 40


def test_frontal_points_land_on_the_standard_projection(lm3d5: np.ndarray) -> None:
    """Points that are an exact frontal scaled-orthographic view of the standard points (any scale and
    position) map to 102 * (X, Y) + 112 in the crop, up to the half pixel the truncation of w, h leaves."""
    rng = np.random.default_rng(3)
    std = lm3d5[:, :2].astype(np.float64) * 102.0 + 112.0
    for _ in range(20):
        w0, h0 = (int(v) for v in rng.integers(120, 1500, 2))
        s = float(rng.uniform(40, 600))
        t = np.array([rng.uniform(0, w0), rng.uniform(0, h0)])
        yup = s * lm3d5[:, :2].astype(np.float64) + t
        ydown = np.stack([yup[:, 0], h0 - 1 - yup[:, 1]], axis=1)
        a = fit_alignment(ydown, lm3d5, w0, h0)
        assert a.sigma == pytest.approx(102.0 / s, rel=1e-5)
        lm_crop = a.to_crop(ydown)
        assert np.abs(lm_crop - std).max() <= 0.5 + 1e-3


@needs_examples
def test_real_aligned_points_near_the_standard_projection(lm3d5: np.ndarray) -> None:
    """On real photos the aligned 5 points sit near the standard points' projection: within a few pixels for
    the near-frontal ones, and well inside the crop for all (pose and identity move them)."""
    std = lm3d5[:, :2].astype(np.float64) * 102.0 + 112.0
    for name in sorted(PUBLISHED):
        w0, h0 = PUBLISHED[name][:2]
        lm = np.loadtxt(EXAMPLES / "detections" / (Path(name).stem + ".txt")).reshape(-1, 2)
        lm_crop = fit_alignment(lm, lm3d5, w0, h0).to_crop(lm)
        mean_dist = float(np.linalg.norm(lm_crop - std, axis=1).mean())
        frontal = name in ("000055.jpg", "vd051.png", "vd092.png", "vd070.png", "000007.jpg")
        assert mean_dist < (6.0 if frontal else 16.0), (name, mean_dist)


# ----------------------------------------------------------------------------------------------------------
# inverse maps and the photo camera


def _some_alignments() -> list[Alignment]:
    return [
        Alignment.from_params(423, 594, 0.7294, 196.61, 355.06),
        Alignment.from_params(250, 262, 1.6169, 138.69, 150.94),
        Alignment.from_params(900, 1354, 0.2234, 400.73, 728.33),
        Alignment.from_params(450, 360, 0.7501, 230.41, 218.34),
    ]


def test_round_trip_photo_crop_photo() -> None:
    rng = np.random.default_rng(0)
    for a in _some_alignments():
        p = rng.uniform([0, 0], [a.w0, a.h0], size=(50, 2))
        np.testing.assert_allclose(a.to_photo(a.to_crop(p)), p, atol=1e-9)
        np.testing.assert_allclose(a.crop_pixels_to_photo(a.photo_to_crop_pixels(p)), p, atol=1e-9)


def test_continuous_map_within_two_crop_pixels_of_the_paste() -> None:
    """The trained landmark map (section 6.7) ignores the truncations; it stays within ~1 crop pixel of where
    the resize + crop really puts the content (bound 2 px for safety; measured max 1.66 on the examples)."""
    rng = np.random.default_rng(1)
    for a in _some_alignments():
        p = rng.uniform([0, 0], [a.w0, a.h0], size=(50, 2))
        cont = a.to_crop(p)
        cont_ydown = np.stack([cont[:, 0], 223.0 - cont[:, 1]], axis=1)
        exact = a.photo_to_crop_pixels(p)
        assert np.abs(cont_ydown - exact).max() < 2.0


def test_pixel_exact_map_follows_the_image_content() -> None:
    """A bright blob drawn in a photo appears in the crop where photo_to_crop_pixels puts it (sub-pixel),
    for a down- and an up-scale."""
    yy, xx = np.mgrid[0:300, 0:260].astype(np.float64)
    for sigma in (0.8, 1.7):
        cx, cy = 131.3, 147.6
        blob = 255.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 6.0**2))
        a = Alignment.from_params(260, 300, sigma, 130.0, 150.0)
        crop = np.asarray(resize_and_crop(Image.fromarray(blob.astype(np.float32), mode="F"), a))
        r, c = np.mgrid[0:224, 0:224]
        wsum = crop.sum()
        found = np.array([(crop * c).sum() / wsum, (crop * r).sum() / wsum])
        expected = a.photo_to_crop_pixels(np.array([[cx, cy]]))[0]
        np.testing.assert_allclose(found, expected, atol=0.05)


def test_photo_intrinsics_match_the_paste_chain() -> None:
    """Project camera points with the crop intrinsics, take them to crop pixel, resized pixel and photo pixel
    by the paste chain, then to the photo renderer frame; the photo intrinsics must give the same point."""
    cam = Camera()
    rng = np.random.default_rng(2)
    pts = np.stack([rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40), rng.uniform(8.5, 11.5, 40)], axis=1)
    for a in _some_alignments():
        k = cam.intrinsics
        u = k.fx * pts[:, 0] / pts[:, 2] + k.cx
        v_up = k.fy * pts[:, 1] / pts[:, 2] + k.cy
        col, row = u - 0.5, 224.0 - v_up - 0.5  # renderer pixel centres in the crop
        big_c, big_r = col + a.left, row + a.up  # resized photo pixel
        x = (big_c + 0.5) * a.w0 / a.w - 0.5  # photo pixel (PIL resize: edges at integers)
        y = (big_r + 0.5) * a.h0 / a.h - 0.5
        expected = np.stack([x + 0.5, a.h0 - (y + 0.5)], axis=1)  # photo renderer frame (y up)
        pk = a.photo_intrinsics(cam)
        got = np.stack(
            [pk.fx * pts[:, 0] / pts[:, 2] + pk.cx, pk.fy * pts[:, 1] / pts[:, 2] + pk.cy], axis=1
        )
        np.testing.assert_allclose(got, expected, atol=1e-9)
        assert (pk.width, pk.height) == (a.w0, a.h0)
        # the same chain through the public pixel map
        np.testing.assert_allclose(
            a.crop_pixels_to_photo(np.stack([col, row], axis=1)), np.stack([x, y], axis=1), atol=1e-9
        )
        # the brief's closed form, valid for the reference camera (size - center == center)
        assert pk.cx == pytest.approx((cam.center + a.left) * a.w0 / a.w)
        assert pk.cy == pytest.approx(a.h0 - (cam.center + a.up) * a.h0 / a.h)


def test_photo_intrinsics_reject_other_crop_size() -> None:
    with pytest.raises(ValueError):
        _some_alignments()[0].photo_intrinsics(Camera(size=256))


# ----------------------------------------------------------------------------------------------------------
# second arrays, API details, bad input


def test_from_params_round_trip() -> None:
    for a in _some_alignments():
        assert Alignment.from_params(*a.trans_params) == a


def test_pos_recovers_a_scaled_orthographic_camera(lm3d5: np.ndarray) -> None:
    x3 = lm3d5.astype(np.float64)
    yup = 250.0 * x3[:, :2] + np.array([300.0, 200.0])
    tx, ty, s = pos(yup, x3)
    assert (tx, ty, s) == pytest.approx((300.0, 200.0, 250.0))


def test_degenerate_landmarks_raise(lm3d5: np.ndarray) -> None:
    with pytest.raises(ValueError):
        fit_alignment(np.full((5, 2), 10.0), lm3d5, 100, 100)
    with pytest.raises(ValueError):
        fit_alignment(np.array([[1, 1], [1.01, 1], [1, 1.01], [1.01, 1.01], [1.005, 1.005]]), lm3d5, 4000, 3000)
    with pytest.raises(ValueError):
        fit_alignment(np.zeros((4, 2)), lm3d5, 100, 100)
    with pytest.raises(ValueError):
        align_face(np.zeros((10, 10), np.uint8), np.zeros((5, 2)), lm3d5)
