"""ONNX export of the R-Net and C-Net with their model cards (training side; the card types live in
:mod:`facerecon.nets.cards` so that serving never imports onnx).

Each network is one self-contained ``<kind>.onnx`` (torch's legacy TorchScript exporter, ``dynamo=False``, opset
17, BatchNorm folded, a dynamic batch axis) plus a JSON card ``<kind>.json`` beside it, as for face models
(:mod:`facerecon.facemodel.format`): the :class:`NetworkCard` plus ``file``, ``bytes`` and ``sha256`` of the onnx file.
The same card (without those three fields) is also embedded in the onnx file's metadata (key ``facerecon.card``),
so a file that lost its side-car still says what it is (:func:`read_embedded_card`).

Inputs and outputs (``batch`` is dynamic; C = the trunk's feature size; K = the face model's layout):

=======  ==============================================  ===================================================
network  inputs                                          outputs
=======  ==============================================  ===================================================
rnet     ``image`` (batch, 3, 224, 224) float32          ``coeffs`` (batch, K.total), ``features`` (batch, C)
cnet     ``image`` (batch, 3, 224, 224), ``features``    ``conf_id`` (batch, K.id), ``conf_tex`` (batch, K.tex)
         (batch, C) float32
=======  ==============================================  ===================================================

``image`` is always RGB, 8-bit pixel / 255 in [0, 1], no mean/std normalisation, the reference's 224 crop.

Weights are float32. ``weights_fp16=True`` stores every large initializer as float16 followed by a ``Cast`` to
float32 (the graph still computes in float32, so the CPU provider runs it): the file halves, the outputs move by
about the float16 rounding of the weights (measured and recorded in the card; see :func:`export_rnet`).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

import facerecon
from facerecon.errors import ModelFileError
from facerecon.facemodel.format import sha256_file
from facerecon.nets.cards import (
    CARD_METADATA_KEY,
    INPUT_SIZE,
    OPSET,
    CardInfo,
    NetworkCard,
    OnnxInfo,
    TensorSpec,
)
from facerecon.nets.cnet import ConfidenceNet
from facerecon.nets.rnet import ReconNet

__all__ = ["export_cnet", "export_rnet", "read_embedded_card"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)

#: Initializers with fewer elements stay float32 under ``weights_fp16`` (biases, BN-folded vectors).
_FP16_MIN_ELEMENTS = 1024


class _RNetExport(nn.Module):
    def __init__(self, net: ReconNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.forward_with_features(image)


def _weights_to_fp16(model: onnx.ModelProto) -> None:
    """Store large float32 initializers as float16 + a leading ``Cast`` back to float32 (in place)."""
    graph = model.graph
    casts = []
    keep = []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if init.data_type != TensorProto.FLOAT or arr.size < _FP16_MIN_ELEMENTS:
            keep.append(init)
            continue
        half_name = f"{init.name}__fp16"
        keep.append(numpy_helper.from_array(arr.astype(np.float16), half_name))
        casts.append(helper.make_node("Cast", [half_name], [init.name], to=TensorProto.FLOAT, name=f"{half_name}_cast"))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    card: NetworkCard,
    weights_fp16: bool,
) -> NetworkCard:
    """Export ``module(*args)``, embed the card, check parity with torch, write the side-car. Returns the card."""
    import onnxruntime as ort  # only needed at export/serving time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter is chosen on purpose (one self-contained file, no onnxscript); hush its notices.
            warnings.filterwarnings(
                "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
            )
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            expected = [t.numpy() for t in module(*args)]
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        if weights_fp16:
            _weights_to_fp16(proto)
        card.onnx.weights_dtype = "float16" if weights_fp16 else "float32"
        onnx.checker.check_model(proto)
        # Parity on the export batch, then embed the card (with the measured difference) and save.
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(output_names, {n: a.numpy() for n, a in zip(input_names, args, strict=True)})
        diff = max(float(np.max(np.abs(g - e))) if e.size else 0.0 for g, e in zip(got, expected, strict=True))
        card.onnx.max_abs_diff_vs_torch = diff
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, {CARD_METADATA_KEY: card.model_dump_json()})
        proto.producer_name = "facerecon"
        proto.producer_version = facerecon.__version__
        proto.doc_string = card.description
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        module.train(was_training)
    card.file, card.bytes, card.sha256 = path.name, path.stat().st_size, sha256_file(path)
    sidecar = path.with_suffix(".json")
    sidecar.with_name(sidecar.name + ".tmp").write_text(card.model_dump_json(indent=2) + "\n")
    os.replace(sidecar.with_name(sidecar.name + ".tmp"), sidecar)
    log.info("exported %s (%s, %.1f MB, max |ORT - torch| %.2e)", path, card.kind, card.bytes / 1e6, diff)
    return card


def _on_cpu(model: M) -> M:
    """``model`` itself when on the CPU, else a CPU copy (the caller's model stays where it is)."""
    if all(t.device.type == "cpu" for t in model.state_dict().values()):
        return model
    return copy.deepcopy(model).cpu()


def _onnx_info() -> OnnxInfo:
    return OnnxInfo(
        torch_version=torch.__version__, onnx_version=onnx.__version__, facerecon_version=facerecon.__version__
    )


def export_rnet(
    model: ReconNet, path: Path, card_info: CardInfo, *, weights_fp16: bool = False, batch: int = 1
) -> NetworkCard:
    """Export an R-Net to ``path`` (``rnet.onnx``) and its card to ``path.with_suffix('.json')``.

    Inputs ``image (batch, 3, 224, 224)``; outputs ``coeffs (batch, layout.total)``, ``features (batch, C)``.
    The model is exported in eval mode on the CPU (its mode is restored afterwards); ``batch`` is only the size of
    the random tracing input (the axis is dynamic). The card records the max |ORT - torch| on that input
    (about 1e-7 for float32 weights). Returns the side-car card.
    """
    model = _on_cpu(model)
    lay = model.layout
    card = NetworkCard(
        kind="rnet",
        description=card_info.description,
        backbone=model.backbone_name,
        feature_dim=model.feature_dim,
        inputs=[
            TensorSpec(
                name="image",
                shape=["batch", 3, INPUT_SIZE, INPUT_SIZE],
                description="RGB, pixel / 255 in [0, 1], no normalisation",
            )
        ],
        outputs=[
            TensorSpec(
                name="coeffs",
                shape=["batch", lay.total],
                description="coefficient vector in layout order (id, exp, tex, angle, gamma, trans)",
            ),
            TensorSpec(
                name="features",
                shape=["batch", model.feature_dim],
                description="globally average-pooled trunk features (C-Net input)",
            ),
        ],
        layout=lay,
        head_order=["id", "exp", "tex", "angle", "gamma", "trans_xy", "trans_z"],
        face_model=card_info.face_model,
        licence=card_info.licence,
        licence_notice=card_info.licence_notice,
        redistributable=card_info.redistributable,
        provenance=card_info.provenance,
        onnx=_onnx_info(),
    )
    image = torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    wrapper = _RNetExport(model).train(model.training)  # so restoring the mode after export restores the model's
    return _export(wrapper, (image,), path, ["image"], ["coeffs", "features"], card, weights_fp16)


def export_cnet(
    model: ConfidenceNet,
    path: Path,
    card_info: CardInfo,
    *,
    backbone: str,
    weights_fp16: bool = False,
    batch: int = 1,
) -> NetworkCard:
    """Export a C-Net to ``path`` (``cnet.onnx``) and its card beside it.

    Inputs ``image (batch, 3, 224, 224)``, ``features (batch, feature_dim)``; outputs ``conf_id (batch, K_id)``,
    ``conf_tex (batch, K_tex)``. ``backbone`` names the trunk of the R-Net whose features it takes; set
    ``card_info.paired_rnet_sha256`` to tie it to that R-Net file. Returns the side-car card.
    """
    model = _on_cpu(model)
    lay = model.layout
    card = NetworkCard(
        kind="cnet",
        description=card_info.description,
        backbone=backbone,
        feature_dim=model.feature_dim,
        inputs=[
            TensorSpec(
                name="image",
                shape=["batch", 3, INPUT_SIZE, INPUT_SIZE],
                description="RGB, pixel / 255 in [0, 1], no normalisation",
            ),
            TensorSpec(
                name="features",
                shape=["batch", model.feature_dim],
                description="the paired R-Net's `features` output for the same image",
            ),
        ],
        outputs=[
            TensorSpec(name="conf_id", shape=["batch", lay.id], description="positive confidence per id coefficient"),
            TensorSpec(
                name="conf_tex", shape=["batch", lay.tex], description="positive confidence per albedo coefficient"
            ),
        ],
        layout=lay,
        confidence=(
            f"exp({model.max_log_conf:g} * tanh(logit / {model.max_log_conf:g})); set aggregate = "
            "sum_j c_j * a_j / sum_j c_j per coefficient; untrained = 1 everywhere = mean pooling"
        ),
        face_model=card_info.face_model,
        licence=card_info.licence,
        licence_notice=card_info.licence_notice,
        redistributable=card_info.redistributable,
        provenance=card_info.provenance,
        paired_rnet_sha256=card_info.paired_rnet_sha256,
        onnx=_onnx_info(),
    )
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=gen)
    features = torch.rand(batch, model.feature_dim, generator=gen)
    return _export(model, (image, features), path, ["image", "features"], ["conf_id", "conf_tex"], card, weights_fp16)


def read_embedded_card(onnx_path: Path) -> NetworkCard:
    """The card stored inside an exported onnx file's metadata (no side-car needed)."""
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        return NetworkCard.model_validate_json(props[CARD_METADATA_KEY])
    except KeyError:
        raise ModelFileError(f"{onnx_path} carries no facerecon card in its metadata") from None
    except Exception as exc:  # onnx raises assorted types (OSError, DecodeError, ...) for bad files
        raise ModelFileError(f"{onnx_path} is not a readable facerecon network ({type(exc).__name__}: {exc})") from exc
