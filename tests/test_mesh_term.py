"""The dense face-mesh term: the shipped 468-point correspondence against independent evidence (the 68-point map
derived from manual labels, real photos), the term's projection and mirroring, the augmentation of extra points,
the targets on real crops, and a training run that logs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import facedata
from facerecon.coefficients import Coefficients
from facerecon.detect.facemesh import ibug68_map, mesh_to_ibug68
from facerecon.train import data as D
from facerecon.train.mesh import MeshTerm, crop_mesh_targets, load_correspondence

ROOT = Path(__file__).resolve().parents[1]
FACE_MODEL = ROOT / "models" / "ict" / "facemodel.npz"


@pytest.fixture(scope="module")
def corr() -> np.ndarray:
    return load_correspondence(FACE_MODEL)


def test_the_correspondence_agrees_with_the_manual_68_point_map(corr: np.ndarray) -> None:
    """The 468 -> vertex correspondence (derived from the mesh's own 3D shape) and the 468 -> 68 map (derived from
    HELEN's manual labels) must agree: the 68 map's mesh combination, taken on the marked vertices of the mean face,
    lands near the model's own landmark vertex for that iBUG point (inner 51; measured median 2.4 mm), and a
    shuffled correspondence lands tens of mm off."""
    data = np.load(FACE_MODEL)
    v = data["mean_shape"].astype(np.float64) * 100.0  # dm -> mm
    lm = data["landmarks68"]
    idx, w = ibug68_map()
    assert corr.shape == (468,) and (corr >= 0).sum() >= 400
    assert data["face_mask"][corr[corr >= 0]].all()

    def distances(c: np.ndarray) -> np.ndarray:
        out = []
        for j in range(17, 68):
            cj = c[idx[j]]
            if (cj[w[j] > 0] < 0).any():
                continue
            out.append(np.linalg.norm((v[cj] * w[j][:, None]).sum(0) - v[lm[j]]))
        return np.asarray(out)

    d = distances(corr)
    assert len(d) >= 40 and np.median(d) < 4.0 and d.max() < 10.0
    ok = corr >= 0
    shuffled = corr.copy()
    shuffled[ok] = np.random.default_rng(0).permutation(corr[ok])
    assert np.median(distances(shuffled)) > 20.0


def test_reconstructions_put_the_marked_vertices_on_the_mesh_points(corr: np.ndarray) -> None:
    """On held-out AFW photos the pipeline's reconstruction (``refine=false``) projects the marked vertices onto
    the detector's own mesh points: median distance ~1.4 % of the face box (NME units) against ~40 % shuffled."""
    from facerecon.pipeline import Reconstructor

    rec = Reconstructor()
    ok = corr >= 0
    shuffled = corr.copy()
    shuffled[ok] = np.random.default_rng(1).permutation(corr[ok])
    errs, errs_shuffled = [], []
    for a in facedata.every(facedata.afw_helen(("afw",)), 8):
        pil = Image.open(a.path).convert("RGB")
        det = rec.detector.boxes(pil)
        if len(det) == 0:
            continue
        j = int(np.argmin(np.linalg.norm((det.boxes[:, :2] + det.boxes[:, 2:]) / 2 - 0.5 - a.points.mean(0), axis=1)))
        pts, _ = rec.detector.mesh_points(pil, det)
        mesh = pts[j, :, :2] - 0.5  # pixel centres, as the reconstruction's
        face = [f for f in rec.detect(np.asarray(pil)) if np.allclose(f.box, det.boxes[j] - 0.5, atol=1.0)]
        r = rec.reconstruct(np.asarray(pil), refine=False, faces=face[:1] or None)[0]
        v = r.vertices_photo()[:, :2]
        errs.append(np.median(np.linalg.norm(v[corr[ok]] - mesh[ok], axis=1)) / a.box_norm)
        errs_shuffled.append(np.median(np.linalg.norm(v[shuffled[ok]] - mesh[ok], axis=1)) / a.box_norm)
    assert len(errs) >= 6
    assert np.median(errs) < 0.03 < 0.2 < np.median(errs_shuffled)


def test_the_term_projects_and_mirrors_the_marked_vertices(corr: np.ndarray) -> None:
    """Zero against its own projection; a flipped row reads the mirrored vertices, which for the mean face seen
    straight on (a left-right symmetric model) are the unflipped projections reflected about the principal point."""
    from facerecon.decoder import FaceDecoder
    from facerecon.facemodel import FaceModel

    dec = FaceDecoder(FaceModel.from_file(FACE_MODEL))
    term = MeshTerm(dec, corr)
    lay = dec.model.layout
    c = Coefficients.from_vector(torch.zeros(2, lay.total), lay)
    q = term.project(c)
    weight = torch.ones(2, 468)
    assert float(term.loss(c, q, weight)) == 0.0
    flipped = term.project(c, torch.tensor([False, True]))
    assert torch.equal(flipped[0], q[0])
    cx = dec.camera.intrinsics.cx
    ok = torch.from_numpy(corr >= 0)
    mirrored = torch.stack([2 * cx - q[1, :, 0], q[1, :, 1]], -1)
    assert torch.allclose(flipped[1][ok], mirrored[ok], atol=0.05)
    # one pixel off everywhere on the valid points: the loss is their share of the 468
    share = float(ok.float().mean())
    assert float(term.loss(c, q + torch.tensor([1.0, 0.0]), weight)) == pytest.approx(share, rel=1e-5)


def test_augment_moves_extra_points_like_the_landmarks() -> None:
    """Extra points go through the same similarity as the 68 landmarks, without the landmarks' re-indexing of a
    flipped row; the flip mask comes back."""
    rng = np.random.default_rng(4)
    lm = torch.from_numpy(rng.uniform(40, 180, (6, 68, 2)).astype(np.float32))
    img, skin, lw = torch.zeros(6, 3, 224, 224), torch.zeros(6, 1, 224, 224), torch.ones(6, 68)
    _, _, out, _, pts, flips = D.augment(img, skin, lm, np.random.default_rng(7), lm_weight=lw, points=lm.clone())
    assert flips.dtype == torch.bool and flips.any() and (~flips).any()
    for b in range(6):
        expect = out[b, torch.from_numpy(D.MIRROR_68)] if flips[b] else out[b]
        assert torch.allclose(pts[b], expect, atol=1e-4)


def test_mesh_targets_on_real_crops_match_their_landmarks(corr: np.ndarray, tmp_path: Path) -> None:
    """The mesh run again on aligned crops of real photos gives points whose 68-point reading (the shipped map)
    lies on the crops' own 68 landmarks (the detector's, from the whole photo): a few crop pixels; cached."""
    from facerecon.pipeline import Reconstructor

    rec = Reconstructor()
    crops, lms = [], []
    for p in sorted((facedata.EXAMPLES).glob("*.jpg"))[:6]:
        img = np.asarray(Image.open(p).convert("RGB"))
        prep = rec.prepare(img, rec.detect(img)[0])
        crops.append(prep.crop)
        lms.append(prep.lm68_crop)
    images, lm68 = np.stack(crops), np.stack(lms).astype(np.float32)
    t = crop_mesh_targets(images, lm68, corr, tmp_path)
    assert t.points.shape == (6, 468, 2) and t.weight.shape == (6, 468)
    err = np.linalg.norm(mesh_to_ibug68(t.points) - lm68, axis=-1)
    assert np.median(err) < 3.0
    assert (t.weight[:, corr < 0] == 0).all() and (t.weight[:, corr >= 0] > 0.5).all()  # frontal examples
    again = crop_mesh_targets(images, lm68, corr, tmp_path)  # from the cache
    assert np.array_equal(again.points, t.points) and len(list(tmp_path.glob("mesh468_*.npz"))) == 1
