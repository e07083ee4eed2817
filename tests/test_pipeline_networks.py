"""The pipeline with networks installed beside the face model: R-Net, R-Net + fitting, C-Net aggregation, and
a broken install refused at start-up."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facerecon.config import Settings
from facerecon.errors import ModelFileError
from facerecon.imaging import load_image
from facerecon.nets.cards import CardInfo, NetworkProvenance, face_model_ref
from facerecon.nets.cnet import ConfidenceNet
from facerecon.nets.onnx_io import export_cnet, export_rnet
from facerecon.nets.rnet import ReconNet
from tests.conftest import ICT_MODEL, need_shared


def _info(npz: Path, **extra: object) -> CardInfo:
    return CardInfo(description="test network (random trunk, small random heads)", face_model=face_model_ref(npz),
                    licence="MIT", licence_notice="test", redistributable=True,
                    provenance=NetworkProvenance(source="tests/test_pipeline_networks.py"), **extra)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    folder = root / "ict"
    folder.mkdir()
    for suffix in (".npz", ".json"):
        shutil.copy(ICT_MODEL.with_suffix(suffix), folder / f"facemodel{suffix}")
    npz = folder / "facemodel.npz"
    from facerecon.facemodel.format import load_face_model

    lay = load_face_model(npz).card.layout
    torch.manual_seed(0)
    rnet = ReconNet(lay, backbone="resnet18").eval()
    with torch.no_grad():  # small heads: a plausible, non-trivial prediction near the mean face
        for head in rnet.final_layers:
            head.weight.normal_(0.0, 1e-4)
    card = export_rnet(rnet, folder / "rnet.onnx", _info(npz))
    cnet = ConfidenceNet(lay, rnet.feature_dim).eval()
    with torch.no_grad():
        for p in cnet.parameters():
            p.normal_(0.0, 0.01)
    export_cnet(cnet, folder / "cnet.onnx", _info(npz, paired_rnet_sha256=card.sha256), backbone="resnet18")
    return root


@pytest.fixture(scope="module")
def reconstructor(models_dir: Path):
    from facerecon.pipeline import Reconstructor

    return Reconstructor(Settings(models_dir=models_dir))


def test_modes_with_an_installed_rnet(reconstructor) -> None:
    image = load_image(need_shared("data", "deep3d-examples", "000031.jpg"))
    assert reconstructor.rnet is not None and reconstructor.rnet.providers == ["CPUExecutionProvider"]
    fast = reconstructor.reconstruct(image, refine=False)[0]
    refined = reconstructor.reconstruct(image, refine=True)[0]
    prepared = reconstructor.prepare(image, reconstructor.detect(image)[0])
    alone = reconstructor.finish(prepared, reconstructor.estimate([prepared], mode="rnet"))
    assert alone.mode == "rnet" and "landmark fit" not in alone.timings
    assert fast.mode == "rnet+lm" and "fit" not in fast.timings and {"rnet", "landmark fit"} <= set(fast.timings)
    assert refined.mode == "rnet+fit"
    # both refinements follow the detector's landmarks more closely than the R-Net's own estimate
    assert fast.landmark_error_px < 0.9 * alone.landmark_error_px
    assert refined.landmark_error_px < alone.landmark_error_px
    info = reconstructor.info()
    assert info["rnet"]["providers"] == ["CPUExecutionProvider"] and info["default_mode"] == "rnet+fit"


def test_set_uses_the_cnet(reconstructor) -> None:
    lfw = need_shared("data", "faces-train", "lfw")
    photos = [load_image(p) for p in sorted(lfw.glob("Adam_Sandler_*.jpg"))[:3]]
    result = reconstructor.reconstruct_set(photos, refine=False)
    assert result.aggregation.startswith("C-Net")
    ids = np.stack([it.coefficients.id[0].numpy() for it in result.items])
    assert np.allclose(ids, ids[0])
    # The shipped C-Net's confidences are nearly uniform (its weighted mean matches the plain mean to ~1e-7 here),
    # so prove the wiring with confidences that are not: a stand-in C-Net that trusts the first photo 9x more
    # (recognised by its crop: the estimate takes a set's faces in its own canonical order).
    prepared = [reconstructor.prepare(p, reconstructor.detect(p)[0]) for p in photos]
    own = np.stack([reconstructor.estimate([q], mode="rnet").coefficients.id[0].numpy() for q in prepared])
    weights = np.array([9.0, 1.0, 1.0], np.float32)[:, None]
    first = prepared[0].crop.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)

    class Skewed:
        def run(self, images: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
            w = np.array([[9.0 if np.array_equal(im, first) else 1.0] for im in images], np.float32)
            assert w.sum() == 9.0 + len(images) - 1, "the first photo's crop is in the batch once"
            k_id, k_tex = reconstructor.model.layout.id, reconstructor.model.layout.tex
            return {"conf_id": np.repeat(w, k_id, 1), "conf_tex": np.repeat(w, k_tex, 1)}

    skewed = copy.copy(reconstructor)
    skewed.cnet = Skewed()
    est = skewed.estimate(prepared, mode="rnet", share_identity=True)
    expected = (weights * own).sum(0) / weights.sum()
    np.testing.assert_allclose(est.coefficients.id[0].numpy(), expected, rtol=1e-4, atol=1e-7)
    assert np.abs(own.mean(0) - expected).max() > 0.05 * np.abs(expected).max()  # a plain mean would fail here


def test_a_broken_network_is_a_start_up_error(models_dir: Path, tmp_path: Path) -> None:
    from facerecon.pipeline import Reconstructor

    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    onnx = broken / "ict" / "rnet.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    with pytest.raises(ModelFileError):
        Reconstructor(Settings(models_dir=broken))
    onnx.unlink()
    with pytest.raises(ModelFileError, match=r"not found|missing"):
        Reconstructor(Settings(models_dir=broken))
