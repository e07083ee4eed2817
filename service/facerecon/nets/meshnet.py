"""A pretrained R-Net trunk: MediaPipe's 468-point face-mesh network, run as torch ops (training and export only).

Why this trunk: the face mesh (Kartynnik et al. 2019, "Real-time Facial Surface Geometry from Monocular Video on
Mobile GPUs"; MediaPipe, Apache-2.0) was trained to regress a dense 3D face surface from a face crop at every
pose, so its features already encode head pose, face shape and expression; it has 0.6 M parameters and runs in a
few milliseconds on one CPU thread. The project already ships it (``assets/mediapipe/face_landmark.onnx``, our own
op-by-op port of the ``.tflite``), so the pretrained weights are obtained offline and ported by this project.

:class:`MeshTrunk` reads that ONNX graph once (structure and weights) and executes its nodes with torch ops, so it
trains with autograd and exports back to ONNX. The graph's ops are few (``Conv`` with explicit pads, ``Relu`` /
``Min`` / ``Mul`` / ``Add`` = PReLU, ``MaxPool``, channel ``Pad``, ``Identity``); anything else raises
``NotImplementedError``. Conv weights/biases and PReLU slopes become parameters (names ``p.<onnx name>``).

Output: ``(B, feature_dim, 1, 1)`` like a ResNet trunk: the landmark branch's last ``(B, 128, 3, 3)`` activation
flattened (1,152 values) and the network's own 468 x 3 mesh coordinates (divided by the 192-px input size),
concatenated, then a linear layer to ``feature_dim`` (512) and a PReLU. Input: ``(B, 3, 192, 192)`` RGB in [0, 1]
(the face mesh's convention = the R-Net's, pixel / 255); :class:`facerecon.nets.rnet.ReconNet` resizes the 224
crop to 192 inside the network (``trunk_size=192``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MESH_INPUT", "MeshTrunk", "default_mesh_path"]

MESH_INPUT = 192
#: The landmark branch's last hidden activation (128 x 3 x 3) and the mesh output (1,404 = 468 x 3) in our ONNX port.
_FEATURE_TENSORS = ("prelu_254", "conv_305")


def default_mesh_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "mediapipe" / "face_landmark.onnx"


def _fuse_prelu(nodes: list[tuple[str, list[str], str, dict[str, Any]]]
                ) -> list[tuple[str, list[str], str, dict[str, Any]]]:
    """Replace each ``Add(Relu(x), Mul(Min(x, 0), slope))`` (our port's PReLU) by one ``PRelu(x, slope)`` node."""
    by_out = {out: (op, ins) for op, ins, out, _ in nodes}
    drop: set[str] = set()
    fused: dict[str, tuple[str, list[str], str, dict[str, Any]]] = {}
    for op, ins, out, _ in nodes:
        if op != "Add" or len(ins) != 2:
            continue
        a, b = (by_out.get(i) for i in ins)
        if a is None or b is None or a[0] != "Relu" or b[0] != "Mul":
            continue
        m = by_out.get(b[1][0])
        if m is None or m[0] != "Min" or m[1][0] != a[1][0]:
            continue
        fused[out] = ("PRelu", [a[1][0], b[1][1]], out, {})
        drop.update([ins[0], ins[1], b[1][0]])
    users = {i for _, ins, o, _ in nodes if o not in drop and o not in fused for i in ins}
    users |= {i for f in fused.values() for i in f[1]}
    keep = []
    for node in nodes:
        out = node[2]
        if out in fused:
            keep.append(fused[out])
        elif out in drop and out not in users:
            continue
        else:
            keep.append(node)
    return keep


def _prelu(x: Tensor, slope: Tensor) -> Tensor:
    """PReLU over channel axis 1 (``slope`` of C values, any shape). Exported to ONNX as ``relu(x) + slope
    min(x, 0)``: onnxruntime's PRelu kernel is several times slower on one thread (see detect/tflite_onnx.py)."""
    if torch.onnx.is_in_onnx_export():
        s = slope.reshape((-1,) + (1,) * (x.ndim - 2))
        return F.relu(x) + s * torch.clamp(x, max=0.0)
    return F.prelu(x, slope.reshape(-1))


def _pname(name: str) -> str:
    return "p_" + "".join(c if c.isalnum() else "_" for c in name)


class MeshTrunk(nn.Module):
    """The face mesh up to its last hidden layer + a learned 512-d projection (see the module docstring)."""

    def __init__(self, onnx_path: Path | None = None, feature_dim: int = 512) -> None:
        super().__init__()
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(onnx_path or default_mesh_path()))
        g = model.graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.input_name = g.input[0].name
        # keep only the nodes the feature tensors depend on
        producer = {o: n for n in g.node for o in n.output}
        need, stack = set(), list(_FEATURE_TENSORS)
        while stack:
            t = stack.pop()
            if t in need or t not in producer:
                continue
            need.add(t)
            stack.extend(producer[t].input)
        self.params = nn.ParameterDict()
        self._consts: dict[str, Any] = {}
        self._nodes: list[tuple[str, list[str], str, dict[str, Any]]] = []
        for n in g.node:
            if n.output[0] not in need:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type not in ("Conv", "Relu", "Min", "Mul", "Add", "MaxPool", "Pad", "Identity"):
                raise NotImplementedError(f"face-mesh op {n.op_type} is not supported by MeshTrunk")
            for i, name in enumerate(n.input):
                if name not in inits or _pname(name) in self.params or name in self._consts:
                    continue
                arr = inits[name]
                trainable = (n.op_type == "Conv") or (n.op_type == "Mul" and i == 1)
                if trainable:
                    self.params[_pname(name)] = nn.Parameter(torch.from_numpy(arr.astype("float32").copy()))
                elif arr.dtype.kind == "i":
                    self._consts[name] = [int(v) for v in arr.reshape(-1)]
                else:
                    self._consts[name] = float(arr.reshape(-1)[0])
            self._nodes.append((n.op_type, list(n.input), n.output[0], attrs))
        self._nodes = _fuse_prelu(self._nodes)
        hidden = 128 * 3 * 3 + 468 * 3
        self.project = nn.Linear(hidden, feature_dim)
        self.slope = nn.Parameter(torch.full((feature_dim,), 0.25))
        self.feature_dim = feature_dim

    def _value(self, env: dict[str, Tensor], name: str) -> Any:
        if name in env:
            return env[name]
        p = _pname(name)
        if p in self.params:
            return self.params[p]
        return self._consts[name]

    def mesh_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, 3, 192, 192)`` [0, 1] -> ``(hidden (B, 128, 3, 3), mesh (B, 1404, 1, 1) in input px)``."""
        env: dict[str, Tensor] = {self.input_name: x}
        for op, ins, out, attrs in self._nodes:
            a = self._value(env, ins[0])
            if op == "Conv":
                t, left, b, r = attrs.get("pads", [0, 0, 0, 0])
                if any((t, left, b, r)):
                    a = F.pad(a, (left, r, t, b))
                bias = self._value(env, ins[2]) if len(ins) > 2 else None
                y = F.conv2d(a, self._value(env, ins[1]), bias, stride=tuple(attrs.get("strides", [1, 1])),
                             dilation=tuple(attrs.get("dilations", [1, 1])), groups=int(attrs.get("group", 1)))
            elif op == "PRelu":  # fused relu(x) + slope * min(x, 0)
                y = _prelu(a, self._value(env, ins[1]))
            elif op == "Relu":
                y = F.relu(a)
            elif op == "Min":
                y = torch.clamp(a, max=self._value(env, ins[1]))
            elif op == "Mul":
                y = a * self._value(env, ins[1])
            elif op == "Add":
                y = a + self._value(env, ins[1])
            elif op == "MaxPool":
                if any(attrs.get("pads", [0])):
                    raise NotImplementedError("padded MaxPool")
                y = F.max_pool2d(a, tuple(attrs["kernel_shape"]), tuple(attrs["strides"]))
            elif op == "Pad":
                pads = self._value(env, ins[1])  # ONNX: begins of every axis, then ends (NCHW)
                nd = len(pads) // 2
                torch_pads: list[int] = []
                for axis in reversed(range(nd)):
                    torch_pads += [pads[axis], pads[axis + nd]]
                y = F.pad(a, torch_pads)
            else:  # Identity
                y = a
            env[out] = y
        return env[_FEATURE_TENSORS[0]], env[_FEATURE_TENSORS[1]]

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, 3, 192, 192)`` RGB [0, 1] -> ``(B, feature_dim, 1, 1)``."""
        hidden, mesh = self.mesh_features(x)
        f = torch.cat([torch.flatten(hidden, 1), torch.flatten(mesh, 1) * (1.0 / MESH_INPUT)], dim=1)
        return _prelu(self.project(f), self.slope)[:, :, None, None]
