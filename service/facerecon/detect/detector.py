"""The default face detector: BlazeFace boxes, the 468-point face mesh, 68 and 5 landmarks, at every pose and size.

Stages (all networks on onnxruntime, see :mod:`~facerecon.detect.blazeface` and :mod:`~facerecon.detect.facemesh`):

1. **boxes**: BlazeFace short range on the whole photo (letterboxed to 128); full range on the whole photo (192)
   when the photo is large enough to hold faces short range cannot see; on a photo whose longer side exceeds
   ``tile_above`` px, full range also on overlapping tiles of ``tile`` px, so faces down to about 40 px in a
   12-megapixel group photo are found (:meth:`FaceDetector.boxes`); boxes of the passes are merged by IoU.
2. **landmarks**: the face mesh on a crop around each box (rotated to level the eyes), then once more on a crop
   from its own points where that crop differs; every face of the photo runs in one batched call per pass.
3. **68 / 5 points**: the 68 iBUG points from the mesh by the shipped correspondence, the reference's 5 points
   from the 68 (:func:`~facerecon.detect.face.lm68_to_lm5`), a pose estimate from the 3D points.

Scores: ``score`` is the detector's, ``landmark_score`` the mesh's face-presence confidence; faces below either
threshold are returned but flagged (:attr:`DetectedFace.reliable`), and :func:`select_faces` ranks reliable faces
first. The mesh's presence score is low on about one true profile in ten (the mesh was made for faces up to
moderate yaw), so a low landmark score flags a face, it does not drop it.

Speed (``bench/bench_preprocess.py``, one thread): about 5-7 ms for a 640-px photo with one face.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

from facerecon.detect.blazeface import BlazeFace, Detections, merge_passes
from facerecon.detect.face import (
    MIN_LANDMARK_SCORE,
    DetectedFace,
    Which,
    as_rgb_uint8,
    make_face,
    select_faces,
)
from facerecon.detect.facemesh import FaceMesh, Roi, estimate_pose, mesh_to_ibug68
from facerecon.nets.session import Device

__all__ = ["FaceDetector"]

#: A box smaller than this share of the photo's longer side is one only the full-range / tiled passes find; it is
#: kept only when the face mesh is confident (a false box there, e.g. a galaxy in the Hubble deep field, passes
#: the second look of :meth:`FaceDetector._verified` as easily as a true profile does).
SMALL_FACE = 0.1

#: A short-range detection this confident is final: ``which="largest"`` stops at it, and ``"all"`` keeps its box
#: as found rather than averaging it with the other passes' (which moved the mesh's crop and so the landmarks by
#: a few pixels: one face, two reconstructions). Below it the full-range and tile passes' boxes are averaged in
#: (MediaPipe's weighted NMS), which helps the borderline faces (a small face beside a large false box: NME 0.103
#: from the short-range box at 0.62, below 0.1 averaged). The 25 example photos' faces score 0.84-0.99.
SURE_SCORE = 0.8

logger = logging.getLogger(__name__)


class FaceDetector:
    """Find every face with 68 and 5 landmarks (see the module docstring).

    Args:
        device: onnxruntime device (``auto``/``cpu``/``cuda``).
        intra_op_threads: onnxruntime threads per network (1 keeps one request on one core).
        min_face: the smallest face (px) the passes are chosen to find.
        tile_above: photos with a longer side above this also get the tiled full-range pass (0 disables it).
        tile: tile side in photo px for that pass (overlap ``tile // 4``; a 40 px face is ~6 % of it).
        refine: run the face mesh a second time on the crop its first points give (MediaPipe's tracking ROI)
            when that crop differs from the first by more than ``refine_change`` (see :meth:`mesh_points`).
        zoom_out: when no pass finds a face, short range runs once more on the photo shrunk into a canvas this
            many times its size (faces that fill the photo); 1 disables it.
        verify_score: a box whose landmarks are not confident is kept only if a second look at it scores this
            (see :meth:`_verified`).
        min_score: BlazeFace score threshold (MediaPipe's 0.5).

    Thread safety: onnxruntime sessions may be run from several threads at once; the detector holds no other
    mutable state, so one instance may be shared.
    """

    def __init__(
        self,
        *,
        device: Device = "auto",
        intra_op_threads: int = 1,
        min_face: int = 40,
        tile_above: int = 800,
        tile: int = 640,
        refine: bool = True,
        refine_change: float = 0.05,
        zoom_out: float = 2.0,
        verify_score: float = 0.65,
        min_score: float = 0.5,
    ) -> None:
        self.short = BlazeFace("short", device=device, intra_op_threads=intra_op_threads)
        self.full = BlazeFace("full", device=device, intra_op_threads=intra_op_threads)
        self.mesh = FaceMesh(device=device, intra_op_threads=intra_op_threads)
        self.min_face = int(min_face)
        self.tile_above = int(tile_above)
        self.tile = int(tile)
        self.refine = bool(refine)
        self.refine_change = float(refine_change)
        self.zoom_out = float(zoom_out)
        self.verify_score = float(verify_score)
        self.min_score = float(min_score)
        self.providers = self.mesh.providers
        logger.info("face detector: BlazeFace short/full range + 468-point face mesh on %s", self.providers)

    # -- boxes ---------------------------------------------------------------------------------------------
    def boxes(self, image: Image.Image, which: Which = "all") -> Detections:
        """Every face box in the photo (continuous photo coordinates), from all passes, merged.

        Passes, by the photo's longer side L (faces the short-range network finds are at least ~10 % of L, the
        full-range one ~3 %; measured on real faces pasted at known sizes): short range always; full range on
        the whole photo when L > ``4 * min_face`` (a ``min_face`` face is then below 10 %); full range on tiles of
        ``tile`` px when L > ``tile_above``. With ``which="largest"`` and a sure short-range face (score at least
        :data:`SURE_SCORE`), the other passes are skipped: any face they could add is smaller than the one found.
        """
        short = self.short.detect(image, self.min_score)
        w, h = image.size
        side = max(w, h)
        if which == "largest" and len(short) and float(short.scores.max()) >= SURE_SCORE:
            return short
        parts = [short]
        if side > 4 * self.min_face:
            parts.append(self.full.detect(image, self.min_score))
        if self.tile_above and side > self.tile_above:
            parts.extend(self._tiles(image))
        # boxes of several passes: the short range's sure faces as found (so that "largest" above and "all" give
        # such a face the same box and landmarks), the rest grouped by overlap and weighted as MediaPipe does
        det = parts[0] if len(parts) == 1 else merge_passes(parts[0], parts[1:], SURE_SCORE)
        if len(det) == 0 and self.zoom_out > 1:
            det = self._zoomed_out(image)
        return det

    def _zoomed_out(self, image: Image.Image) -> Detections:
        """Short range on the photo centred on a black canvas ``zoom_out`` times its size: a face that fills a
        tight crop (CFP's head crops, a selfie) is too large for the network's anchors until it is smaller."""
        w, h = image.size
        cw, ch = round(w * self.zoom_out), round(h * self.zoom_out)
        ox, oy = (cw - w) // 2, (ch - h) // 2
        canvas = Image.new("RGB", (cw, ch))
        canvas.paste(image, (ox, oy))
        return self.short.detect(canvas, self.min_score).shifted(-ox, -oy)

    def _tiles(self, image: Image.Image) -> list[Detections]:
        """Full range on overlapping ``tile`` px tiles (overlap a quarter), batched through the network."""
        w, h = image.size
        t = min(self.tile, max(w, h))
        step = max(1, t - t // 4)
        tensors, offsets = [], []
        for y0 in _starts(h, t, step):
            for x0 in _starts(w, t, step):
                tile = image.crop((x0, y0, min(x0 + t, w), min(y0 + t, h)))
                tensor, scale, px, py = self.full.letterbox(tile)
                tensors.append(tensor)
                offsets.append((x0, y0, tile.size, scale, px, py))
        out: list[Detections] = []
        for start in range(0, len(tensors), 16):
            reg, logits = self.full.run(np.stack(tensors[start : start + 16]))
            for j in range(reg.shape[0]):
                x0, y0, size, scale, px, py = offsets[start + j]
                det = self.full.decode(reg[j], logits[j], self.min_score)
                if len(det):
                    out.append(self.full.to_photo(det, size, scale, px, py).shifted(x0, y0))
        return out

    def _verified(self, image: Image.Image, box: np.ndarray) -> bool:
        """A second look at a box whose landmarks are not confident (the mesh rejects about one true profile in
        ten, and every false box): short range on square crops of 2 and 3 times the box and on the 2x crop
        mirrored must find a face scoring at least ``verify_score`` somewhere. The threshold was set on the CFP
        profiles and the 26 no-face photos of ``eval.detection``: the false boxes BlazeFace finds there (a colour
        wheel, a coffee cup, the Shepp-Logan phantom) score at most 0.62 on the second look, true profiles whose
        mesh doubts them at least 0.66 in 70 of 71 cases (600 profiles)."""
        x0, y0, x1, y1 = (float(v) for v in box)
        cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
        best = 0.0
        for k, flip in ((2.0, False), (3.0, False), (2.0, True)):
            half = side * k / 2
            crop = image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
            if flip:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            det = self.short.detect(crop, 0.3)
            if len(det):
                best = max(best, float(det.scores.max()))
            if best >= self.verify_score:
                return True
        return False

    # -- landmarks -----------------------------------------------------------------------------------------
    def mesh_points(self, image: Image.Image, det: Detections) -> tuple[np.ndarray, np.ndarray]:
        """Mesh points ``(N, 468, 3)`` (continuous photo px, z smaller = nearer) and scores ``(N,)`` per box.

        The mesh runs on the crop the detection gives; where the crop its own points give differs by more than
        ``refine_change`` (centre shift or half the size change, as a share of the crop; or ``100 x`` that in
        degrees of rotation), it runs again on that crop. On AFW/HELEN test this re-runs a third of the faces and
        keeps the NME of always re-running (3.14 vs 3.12 %, once only: 3.19 %); on CFP profiles two thirds.
        """
        rois = [Roi.from_detection(det.boxes[i], det.keypoints[i, :2]) for i in range(len(det))]
        pts, scores = self.mesh.landmarks(image, rois)
        if self.refine and len(rois):
            again = [(i, r2) for i, r2 in enumerate(Roi.from_points(p) for p in pts) if _changed(rois[i], r2,
                                                                                             self.refine_change)]
            if again:
                p2, s2 = self.mesh.landmarks(image, [r for _, r in again])
                for k, (i, _) in enumerate(again):
                    pts[i], scores[i] = p2[k], s2[k]
        return pts, scores

    def detect(self, image: np.ndarray | Image.Image, which: Which = "all") -> list[DetectedFace]:
        """Find every face with its landmarks.

        Args:
            image: ``(H, W, 3) uint8`` RGB (or ``(H, W)`` uint8 grey), y down; or that photo already as an ``RGB``
                Pillow image (the pipeline makes one per photo for detection and alignment).
            which: ``"largest"`` lets the detector skip the small-face passes once a confident face is found
                (the result is still every face found, ranked; the caller picks the first).

        Returns:
            Faces ranked by :func:`select_faces` (reliable first, then by box area); an empty list when there is
            none (never raises for that).
        """
        pil = image if isinstance(image, Image.Image) and image.mode == "RGB" else Image.fromarray(as_rgb_uint8(image))
        det = self.boxes(pil, which)
        if len(det) == 0:
            return []
        pts, lscores = self.mesh_points(pil, det)
        faces = []
        side = max(pil.size)
        for i in range(len(det)):
            if lscores[i] < MIN_LANDMARK_SCORE:
                # a box the mesh doubts: a small one (only the small-face passes see it) is dropped, a large one
                # needs a second look (true profiles are often doubted by the mesh; false boxes always are)
                bw, bh = det.boxes[i, 2:] - det.boxes[i, :2]
                if max(bw, bh) < SMALL_FACE * side or not self._verified(pil, det.boxes[i]):
                    continue
            p = pts[i].astype(np.float64)
            lm = mesh_to_ibug68(p)
            depth = -(lm[:, 2] - lm[:, 2].mean())
            box = det.boxes[i].astype(np.float64) - np.array([0.5, 0.5, 1.5, 1.5])  # continuous -> inclusive centres
            faces.append(
                make_face(
                    tuple(box.tolist()),
                    float(det.scores[i]),
                    (lm[:, :2] - 0.5).astype(np.float32),
                    landmark_score=float(lscores[i]),
                    lm68_depth=depth.astype(np.float32),
                    pose=estimate_pose(p),
                    backend="blazeface+facemesh",
                )
            )
        return select_faces(_dedupe(faces), "all")


def _changed(a: Roi, b: Roi, limit: float) -> bool:
    shift = math.hypot(a.cx - b.cx, a.cy - b.cy) / a.size
    resize = abs(b.size / a.size - 1.0)
    turn = math.degrees(abs((b.angle - a.angle + math.pi) % (2 * math.pi) - math.pi))
    return shift > limit or resize > 2 * limit or turn > 100 * limit


def _dedupe(faces: list[DetectedFace], iou: float = 0.5) -> list[DetectedFace]:
    """One face per head: boxes from different passes (a tile's partial box, the whole photo's) can give two
    meshes of one face; keep the higher-scoring one when their landmark boxes overlap by more than ``iou``."""
    kept: list[DetectedFace] = []
    boxes: list[np.ndarray] = []
    for f in sorted(faces, key=lambda f: (f.landmark_score, f.score), reverse=True):
        b = np.concatenate([f.lm68.min(0), f.lm68.max(0)])
        if any(_box_iou(b, k) > iou for k in boxes):
            continue
        kept.append(f)
        boxes.append(b)
    return kept


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


