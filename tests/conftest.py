"""Shared fixtures: the repository's models, the shared assets folder beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACERECON_SHARED_DIR", REPO.parent / "shared"))
MODELS = REPO / "models"
ICT_MODEL = MODELS / "ict" / "facemodel.npz"
EXAMPLES = SHARED / "data" / "deep3d-examples"


def need_shared(*parts: str) -> Path:
    """The path under ``../shared``, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared assets folder beside the repository)")
    return path


@pytest.fixture(scope="session")
def ict_model():
    from facerecon.facemodel import FaceModel

    return FaceModel.from_file(ICT_MODEL)


@pytest.fixture(scope="session")
def ict_decoder(ict_model):
    from facerecon.decoder import FaceDecoder

    return FaceDecoder(ict_model)
