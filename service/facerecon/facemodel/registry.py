"""Find installed face models: one sub-folder of the models directory per model, ``facemodel.npz`` + card."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from facerecon.errors import ModelFileError
from facerecon.facemodel.format import read_card

FACE_MODEL_FILE = "facemodel.npz"


class InstalledModel(BaseModel):
    """A face model found on disk, described by its side-car card (arrays not loaded)."""

    name: str
    path: Path
    card: dict[str, object]


def face_model_path(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / name / FACE_MODEL_FILE


def list_models(models_dir: Path) -> list[InstalledModel]:
    """Every ``<models_dir>/<name>/facemodel.npz`` with a readable card, sorted by name."""
    found = []
    for npz in sorted(Path(models_dir).glob(f"*/{FACE_MODEL_FILE}")):
        try:
            card = read_card(npz)
        except ModelFileError:
            continue
        found.append(InstalledModel(name=npz.parent.name, path=npz, card=card))
    return found


def resolve(models_dir: Path, name: str) -> Path:
    """Path of the installed model ``name``, or a :class:`ModelFileError` that says how to get it."""
    path = face_model_path(models_dir, name)
    if not path.is_file():
        have = ", ".join(m.name for m in list_models(models_dir)) or "none"
        hint = (
            "convert your licensed Basel files with `facerecon models build bfm ...` (see README)"
            if name == "bfm"
            else f"build it with `facerecon models build {name}`"
        )
        raise ModelFileError(f"face model '{name}' is not installed in {models_dir} (installed: {have}); {hint}")
    return path
