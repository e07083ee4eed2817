"""Face models: the file format, the torch module, the registry and the builders (``ict``, ``bfm``)."""

from facerecon.facemodel.format import FaceModelCard, FaceModelData, load_face_model, save_face_model
from facerecon.facemodel.model import FaceModel

__all__ = ["FaceModel", "FaceModelCard", "FaceModelData", "load_face_model", "save_face_model"]
