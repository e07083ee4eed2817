"""Faces in a photo: boxes, 68 and 5 landmarks, confidences, at every pose (one interface, one default backend).

``FaceDetector`` (default): MediaPipe's BlazeFace detectors and 468-point face mesh (Apache-2.0), ported to ONNX
and run with onnxruntime (:mod:`.detector`). ``DlibDetector``: the former dlib HOG + 68-point backend, kept only
for comparisons (:mod:`.dlib_hog`; its landmark model carries iBUG 300-W's non-commercial terms).
"""

from __future__ import annotations

import threading

from facerecon.detect.detector import FaceDetector
from facerecon.detect.face import (
    LM5_FROM_68,
    DetectedFace,
    Which,
    lm68_to_lm5,
    select_faces,
)

__all__ = [
    "LM5_FROM_68",
    "DetectedFace",
    "FaceDetector",
    "Which",
    "default_detector",
    "lm68_to_lm5",
    "select_faces",
]

_default: FaceDetector | None = None
_default_lock = threading.Lock()


def default_detector() -> FaceDetector:
    """A process-wide :class:`FaceDetector` with default settings, loaded once on first use (thread-safe)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FaceDetector()
        return _default


def __getattr__(name: str) -> object:  # the dlib backend loads dlib only when asked for
    if name == "DlibDetector":
        from facerecon.detect.dlib_hog import DlibDetector

        return DlibDetector
    raise AttributeError(name)
