"""The pretrained R-Net trunk (MediaPipe's face mesh run as torch ops): same numbers as onnxruntime on the shipped
ONNX port, trainable, exported without onnxruntime's slow PRelu kernel, and a fresh R-Net on it predicts the mean
face."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from facerecon.facemodel import FaceModel
from facerecon.nets.meshnet import MESH_INPUT, MeshTrunk, default_mesh_path
from facerecon.nets.rnet import ReconNet

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = Path("/work/shared/data/deep3d-examples")


@pytest.fixture(scope="module")
def trunk() -> MeshTrunk:
    return MeshTrunk().eval()


def _face_crops() -> np.ndarray:
    """Two real photos' centre squares at 192 px, ``(2, 3, 192, 192)`` [0, 1]."""
    out = []
    for name in sorted(p.name for p in EXAMPLES.glob("*.jpg"))[:2]:
        im = Image.open(EXAMPLES / name).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((MESH_INPUT, MESH_INPUT), Image.BILINEAR)
        out.append(np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out)


def test_trunk_matches_onnxruntime_on_the_shipped_face_mesh(trunk: MeshTrunk) -> None:
    x = _face_crops()
    sess = ort.InferenceSession(str(default_mesh_path()), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})
    mesh_ref = next(r for r in ref if r.shape[1] == 1404).reshape(2, -1)
    with torch.no_grad():
        _, mesh = trunk.mesh_features(torch.from_numpy(x))
    assert np.abs(mesh.numpy().reshape(2, -1) - mesh_ref).max() < 1e-3 * np.abs(mesh_ref).max()


def test_every_prelu_of_the_port_is_fused(trunk: MeshTrunk) -> None:
    """Our ONNX port writes each PReLU as relu + slope * min(x, 0): 4 nodes. The trunk runs one PRelu for each
    (the graph's Relu/Min nodes all belong to such patterns)."""
    g = onnx.load(str(default_mesh_path())).graph
    n_min = sum(n.op_type == "Min" for n in g.node)
    ops = [op for op, *_ in trunk._nodes]
    assert "Min" not in ops and "Relu" not in ops
    # the face-flag branch is not needed for the features, so the trunk holds fewer PReLUs than the graph
    assert 0 < ops.count("PRelu") <= n_min


def test_trunk_trains(trunk: MeshTrunk) -> None:
    t = MeshTrunk().train()
    x = torch.from_numpy(_face_crops())
    y = t(x)
    assert y.shape == (2, 512, 1, 1)
    y.square().mean().backward()
    grads = [p.grad for p in t.params.values()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_fresh_facemesh_rnet_is_the_mean_face_and_exports_without_prelu() -> None:
    model = FaceModel.from_file(ROOT / "models" / "ict" / "facemodel.npz")
    net = ReconNet(model.layout, "facemesh", trunk_size=192).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert float(net(x).abs().max()) == 0.0
        for h in net.final_layers:
            h.weight.normal_(0, 0.01)
        ref = net(x).numpy()
    f = io.BytesIO()
    torch.onnx.export(net, (x,), f, input_names=["image"], output_names=["coeffs"], opset_version=17, dynamo=False)
    g = onnx.load_from_string(f.getvalue()).graph
    assert "PRelu" not in {n.op_type for n in g.node}
    out = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4


def test_facemesh_trunk_needs_its_input_size() -> None:
    model = FaceModel.from_file(ROOT / "models" / "ict" / "facemodel.npz")
    with pytest.raises(ValueError, match="192"):
        ReconNet(model.layout, "facemesh", trunk_size=112)
