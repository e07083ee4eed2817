"""Network cards: what an exported R-Net / C-Net is, for serving (pydantic only; no onnx, no torch modules).

The card format is written by :mod:`facerecon.nets.onnx_io` (the exporter, training side) and read here by the
runtime (:mod:`facerecon.nets.runtime`): ``<kind>.json`` beside ``<kind>.onnx``, the :class:`NetworkCard` plus
``file``, ``bytes`` and ``sha256`` of the onnx file; the same card is embedded in the onnx metadata under
:data:`CARD_METADATA_KEY`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from facerecon.coefficients import CoefficientLayout
from facerecon.errors import ModelFileError
from facerecon.facemodel.format import read_card

__all__ = [
    "CARD_METADATA_KEY",
    "INPUT_SIZE",
    "NETWORK_FORMAT_VERSION",
    "OPSET",
    "CardInfo",
    "FaceModelRef",
    "ImageSpec",
    "NetworkCard",
    "NetworkProvenance",
    "OnnxInfo",
    "TensorSpec",
    "card_summary",
    "face_model_layout",
    "face_model_ref",
    "read_network_card",
]

#: Side of the networks' square RGB input (the reference's 224 crop).
INPUT_SIZE = 224
NETWORK_FORMAT_VERSION = 1
#: ONNX opset of the exported networks.
OPSET = 17
CARD_METADATA_KEY = "facerecon.card"


class ImageSpec(BaseModel):
    """How the ``image`` input must be prepared (the reference PyTorch convention, reference.md section 6.9)."""

    model_config = ConfigDict(extra="forbid")

    layout: str = "NCHW"
    size: int = INPUT_SIZE
    channel_order: Literal["RGB"] = "RGB"
    dtype: str = "float32"
    scale: str = "8-bit pixel value / 255, range [0, 1]"
    normalisation: str = "none (no mean/std subtraction)"
    crop: str = "the 224x224 crop of the reference alignment (reference.md section 6, PT align_img)"


class TensorSpec(BaseModel):
    """One named input or output; ``"batch"`` marks the dynamic axis."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | str]
    dtype: str = "float32"
    description: str = ""


class FaceModelRef(BaseModel):
    """The face model a network was trained against (its bases give the coefficients their meaning)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str | None = Field(None, description="sha256 of the face model's npz, when known")


class NetworkProvenance(BaseModel):
    """Where the weights came from and how they were trained."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="what the weights are, in words")
    source_url: str | None = None
    source_commit: str | None = None
    source_files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 of the input")
    datasets: list[str] = Field(default_factory=list)
    training: dict[str, str | int | float | bool] = Field(default_factory=dict, description="recipe, steps, losses")
    notes: list[str] = Field(default_factory=list)


class CardInfo(BaseModel):
    """What the caller of :func:`export_rnet` / :func:`export_cnet` tells the card; the rest is measured."""

    model_config = ConfigDict(extra="forbid")

    description: str
    face_model: FaceModelRef
    licence: str = Field(description="SPDX id or licence name of the weights")
    licence_notice: str = Field(description="notice to keep with copies, including data/face-model restrictions")
    redistributable: bool
    provenance: NetworkProvenance
    paired_rnet_sha256: str | None = Field(
        None, description="C-Net only: sha256 of the R-Net onnx whose features it was trained on"
    )


class OnnxInfo(BaseModel):
    """How the file was made."""

    model_config = ConfigDict(extra="forbid")

    exporter: str = "torch.onnx.export (legacy TorchScript exporter, dynamo=False)"
    opset: int = OPSET
    torch_version: str
    onnx_version: str
    facerecon_version: str
    weights_dtype: Literal["float32", "float16"] = "float32"
    max_abs_diff_vs_torch: float | None = Field(None, description="ORT vs torch on a random batch at export")


class NetworkCard(BaseModel):
    """What a network file is: kind, trunk, input spec, coefficient layout, face model, licence, provenance."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = NETWORK_FORMAT_VERSION
    kind: Literal["rnet", "cnet"]
    description: str
    backbone: str = Field(description="rnet: its trunk; cnet: the trunk of the R-Net whose features it takes")
    feature_dim: int = Field(description="size of the R-Net's pooled features")
    image: ImageSpec = Field(default_factory=ImageSpec)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layout: CoefficientLayout
    head_order: list[str] = Field(default_factory=list, description="rnet: the heads in output order")
    confidence: str | None = Field(None, description="cnet: how confidences are formed and used")
    face_model: FaceModelRef
    licence: str
    licence_notice: str
    redistributable: bool
    provenance: NetworkProvenance
    paired_rnet_sha256: str | None = None
    onnx: OnnxInfo
    # Side-car only (None in the copy embedded in the onnx file).
    file: str | None = None
    bytes: int | None = None
    sha256: str | None = None

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


def face_model_ref(face_model_npz: Path) -> FaceModelRef:
    """Name and sha256 of an installed face model, from its side-car card (the arrays are not read)."""
    card = read_card(Path(face_model_npz))
    sha = card.get("sha256")
    return FaceModelRef(name=str(card["name"]), sha256=str(sha) if sha else None)


def face_model_layout(face_model_npz: Path) -> CoefficientLayout:
    """The coefficient layout in a face model's side-car card."""
    card = read_card(Path(face_model_npz))
    try:
        return CoefficientLayout.model_validate(card["layout"])
    except (KeyError, ValidationError) as exc:
        raise ModelFileError(f"face model card of {face_model_npz} has no valid layout: {exc}") from exc


def read_network_card(card_path: Path) -> NetworkCard:
    """Parse and validate a network side-car card (``rnet.json`` / ``cnet.json``); :class:`ModelFileError` if not."""
    card_path = Path(card_path)
    try:
        raw = card_path.read_text()
    except FileNotFoundError:
        raise ModelFileError(f"network card {card_path} not found") from None
    except OSError as exc:
        raise ModelFileError(f"network card {card_path} is unreadable: {exc}") from exc
    try:
        card = NetworkCard.model_validate_json(raw)
    except ValidationError as exc:
        raise ModelFileError(f"network card {card_path} is invalid: {exc}") from exc
    if card.format_version != NETWORK_FORMAT_VERSION:
        raise ModelFileError(
            f"network card {card_path} has format version {card.format_version}, need {NETWORK_FORMAT_VERSION}"
        )
    if not card.file or not card.sha256 or card.bytes is None:
        raise ModelFileError(f"network card {card_path} lacks file/bytes/sha256 (it is not a side-car card)")
    return card


def card_summary(card: NetworkCard) -> str:
    """One line for logs."""
    return json.dumps(
        {
            "kind": card.kind,
            "backbone": card.backbone,
            "layout": card.layout.sizes(),
            "face_model": card.face_model.name,
            "sha256": (card.sha256 or "")[:12],
        }
    )
