"""The shipped ICT model: rebuilt from ../shared it equals the committed file; its landmarks sit on the right
features; at the reference camera it fills the crop as the BFM does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from scipy.spatial import ConvexHull

from facerecon.coefficients import Coefficients
from facerecon.facemodel import ict
from facerecon.facemodel.format import load_face_model

from .conftest import ICT_MODEL, REPO, need_shared


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = need_shared("assets", "ict-facekit-light")
    out = tmp_path_factory.mktemp("ict") / "facemodel.npz"
    ict.build(source, out)
    return out


def test_rebuild_matches_committed_file(rebuilt: Path) -> None:
    ours, shipped = load_face_model(rebuilt), load_face_model(ICT_MODEL)
    assert ours.card == shipped.card
    assert set(ours.arrays) == set(shipped.arrays)
    for key, value in shipped.arrays.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_bfm_landmark_centroid_constant() -> None:
    lm = scipy.io.loadmat(need_shared("assets", "bfm-aux", "similarity_Lm3D_all.mat"))["lm"].astype(np.float64)
    np.testing.assert_allclose(lm[17:].mean(0), ict.BFM_INNER_LANDMARK_CENTROID, atol=1e-8)


def test_card_licence_provenance_layout(ict_model) -> None:
    card = ict_model.card
    assert card.licence == "MIT" and card.redistributable
    assert "USC Institute for Creative Technologies" in card.licence_notice
    assert card.provenance.source_commit == ict.SOURCE_COMMIT
    assert (card.layout.id, card.layout.exp, card.layout.angle, card.layout.gamma, card.layout.trans) == (
        100, 53, 3, 27, 3)
    assert len(card.expression_names) == 53 and "jawOpen" in card.expression_names
    assert card.has_uvs and ict_model.extras["uv_triangles"].shape == (card.n_triangles, 3)
    assert float(card.storage["basis_max_abs_error_mm"]) < 0.05  # float16 storage costs < 0.05 mm


def test_landmarks_on_the_right_features(ict_model) -> None:
    lm = ict_model.mean_shape[ict_model.landmarks68].numpy()
    assert int(np.argmax(lm[:, 2])) == 30, "the nose tip is the most forward landmark"
    for a, b in ((36, 45), (39, 42), (0, 16), (48, 54), (17, 26)):  # mirror pairs across x = 0
        np.testing.assert_allclose(lm[a] * [-1, 1, 1], lm[b], atol=2e-3)
        assert lm[a, 0] < 0 < lm[b, 0], "landmark 36/0/48... is on the image left (viewer's left, x < 0)"
    assert np.abs(lm[[8, 27, 30, 33, 51, 57, 62, 66], 0]).max() < 1e-3  # midline
    assert lm[[51, 57, 62, 66], 1].max() < lm[33, 1] < lm[30, 1], "mouth below nose base below tip"
    assert lm[8, 1] == lm[:, 1].min(), "chin lowest"
    eyes = lm[36:48, 1].mean()
    assert lm[30, 1] < eyes < lm[17:27, 1].mean(), "eyes between nose and brows"


def test_mirror_index_and_masks(ict_model) -> None:
    shape = ict_model.mean_shape.numpy()
    mirror = ict_model.extras["mirror_index"]
    face = np.arange(9409)  # upstream face area
    err = np.abs(shape[mirror[face]] * [-1, 1, 1] - shape[face]).max()
    assert err < 1e-3  # < 0.1 mm
    skin = ict_model.skin_mask.numpy()
    assert 1000 < skin.sum() < ict_model.face_mask.numpy().sum()
    assert not skin[ict_model.landmarks68.numpy()[48:68]].any(), "lips are not skin"


def test_mean_face_fills_the_crop_like_the_bfm(ict_decoder) -> None:
    out = ict_decoder(Coefficients.zeros(ict_decoder.model.layout))
    lm2d = out.landmarks_2d[0].numpy()
    assert ((lm2d > 0) & (lm2d < 224)).all()
    face = out.vertices_2d[0, ict_decoder.model.face_mask].numpy()
    assert ((face > 0) & (face < 224)).all(), "the photometric face region lies inside the crop"
    area = ConvexHull(face).volume / 224**2
    assert 0.25 < area < 0.75, f"face region covers {area:.0%} of the crop"
    # The reference's 68 standard BFM points projected by the same camera: ICT's inner landmarks land within
    # a few pixels of them (same placement; ICT is ~5 % larger).
    path = need_shared("assets", "bfm-aux", "similarity_Lm3D_all.mat")
    bfm = scipy.io.loadmat(path)["lm"].astype(np.float64)
    d = 10.0 - bfm[:, 2]
    bfm2d = np.stack([1015 * bfm[:, 0] / d + 112, 1015 * bfm[:, 1] / d + 112], 1)
    err = np.linalg.norm(lm2d[17:] - bfm2d[17:], axis=1)
    assert np.median(err) < 6.0 and err.max() < 15.0, f"median {np.median(err):.1f}px max {err.max():.1f}px"


def test_works_without_shared(tmp_path: Path) -> None:
    """Deleting ../shared does not stop `facerecon models list` or the decoder."""
    env = {**os.environ, "FACERECON_SHARED_DIR": str(tmp_path / "no-shared")}
    listing = subprocess.run([sys.executable, "-m", "facerecon.cli", "models", "list"], env=env,
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "ict" in listing.stdout and "MIT" in listing.stdout and "id 100, exp 53" in listing.stdout
    code = (
        "import torch; from facerecon.facemodel import FaceModel; from facerecon.decoder import FaceDecoder;"
        "from facerecon.coefficients import Coefficients;"
        f"m = FaceModel.from_file(r'{ICT_MODEL}'); out = FaceDecoder(m)(Coefficients.zeros(m.layout));"
        "print(tuple(out.landmarks_2d.shape))"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "(1, 68, 2)" in run.stdout
    assert str(REPO.parent / "shared") not in run.stderr


def test_expression_moves_the_mouth(ict_model, ict_decoder) -> None:
    c = Coefficients.zeros(ict_model.layout)
    exp = torch.zeros(1, ict_model.layout.exp)
    exp[0, ict_model.card.expression_names.index("jawOpen")] = 1.0
    opened = ict_decoder(Coefficients(c.id, exp, c.tex, c.angle, c.gamma, c.trans))
    neutral = ict_decoder(c)
    gap = lambda out: float(out.landmarks_2d[0, 62, 1] - out.landmarks_2d[0, 66, 1])  # noqa: E731
    assert gap(opened) > gap(neutral) + 10, "jawOpen opens the inner lips by > 10 px"
