"""Face models: the file format, the torch module, the registry and the builders (``ict``, ``bfm``).

:class:`FaceModel` (the torch module) is loaded on first use, so the file format and the registry serve the
torch-free R-Net path."""

from __future__ import annotations

from typing import TYPE_CHECKING

from facerecon.facemodel.format import FaceModelCard, FaceModelData, load_face_model, save_face_model

if TYPE_CHECKING:
    from facerecon.facemodel.model import FaceModel

__all__ = ["FaceModel", "FaceModelCard", "FaceModelData", "load_face_model", "save_face_model"]


def __getattr__(name: str) -> object:
    if name == "FaceModel":
        from facerecon.facemodel.model import FaceModel

        return FaceModel
    raise AttributeError(name)
