"""The reference input alignment (reference.md section 6), its inverse and the photo-resolution camera.

Frames (reference.md section 1):

* **photo, y down**: x = column, y = row, 0-based, integer = pixel centre. Detections and API points.
* **photo, y up**: ``y_up = h0 - 1 - y``. The POS fit and the translation ``t`` live here.
* **crop, y up**: the 224 x 224 network input, ``(u, v_up)``; projection and landmark loss live here; for landmark
  arithmetic integers are pixel centres (``row = 223 - v_up``). The rasteriser puts the centre of crop pixel
  (c, r) at ``u = c + 0.5, v_up = 223.5 - r`` (half a pixel apart, as in the reference).

The alignment, exactly as Deep3DFaceRecon_pytorch ``util/preprocess.py::align_img`` (PT @ 9167c71):

1. 5 photo points to y up in float32 (``H - 1 - y``), as the reference does after ``np.loadtxt(...).astype(float32)``.
2. POS: ordinary least squares (``np.linalg.lstsq``, no ``rcond``) for ``k`` in R^8 with
   ``x_i = k1 X_i + k2 Y_i + k3 Z_i + k4`` and ``y_i = k5 X_i + k6 Y_i + k7 Z_i + k8``;
   ``s = (|k1..k3| + |k5..k7|) / 2`` (photo px per dm), ``t = (k4, k8)``.
3. ``sigma = 102 / s``; ``w = trunc(w0 sigma)``, ``h = trunc(h0 sigma)``,
   ``left = trunc(w/2 - 112 + (tx - w0/2) sigma)``, ``up = trunc(h/2 - 112 + (h0/2 - ty) sigma)`` (trunc = toward
   zero, as ``astype(np.int32)``; ``w/2``, ``h/2`` are real).
4. Resize the whole photo to ``(w, h)`` with PIL BICUBIC, crop ``(left, up, left + 224, up + 224)``, black outside.
5. Crop landmarks by the continuous map ``x_c = (x - tx + w0/2) sigma - (w/2 - 112)``,
   ``y_c = (y_up - ty + h0/2) sigma - (h/2 - 112)`` (ignores the truncations: up to about a pixel off the image
   content; the weights were trained with it, keep it).

All arithmetic uses plain Python floats/ints (NumPy 2 safe, reference.md section 16 pitfall 1).

Step 4, exactly and without the memory blow-up (:func:`resize_and_crop`). Resizing the *whole* photo by
``sigma`` can be huge (a small face in a large photo gives ``sigma`` > 1), so only the crop's pixels are computed.
Pillow resamples separably: a horizontal pass rounded to uint8, then a vertical pass. We run the two passes as two
Pillow calls with the *same* filter geometry as the full resize: the horizontal pass on only the photo rows that
the crop's output rows read (at full output width), then the vertical pass on only the crop's columns. This is
bit-identical to ``resize((w, h), BICUBIC).crop(...)`` with the horizontal pass first, which is what the
reference's Pillow 6.2.1 always does. Pillow >= 11 runs the vertical pass first when the height shrinks more than
twice as much as the width (photos taller than about 2:1 being downscaled), which moves some pixels by one grey
level; doing the passes ourselves keeps the reference's order on every Pillow version. The tests check the result
against the plain full resize on the reference photos and against explicit two-pass full resizes on random sizes.

Size: over 400 lines because the reference's exact crop arithmetic, its inverse maps, the bit-exact two-pass resize
and the turned-face crop must agree with each other; splitting them would scatter one convention over several files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from facerecon.geometry import Camera, Intrinsics
from facerecon.landmarks import lm68_to_lm5

__all__ = [
    "CROP_SIZE",
    "MAX_RESIZED_SIDE",
    "RESCALE_FACTOR",
    "Alignment",
    "align_face",
    "fit_alignment",
    "pos",
    "resize_and_crop",
    "standard_lm5",
    "turned_alignment",
]

#: Side of the network input crop, pixels.
CROP_SIZE = 224
#: Photo pixels per decimetre after resizing (``sigma = RESCALE_FACTOR / s``).
RESCALE_FACTOR = 102.0

#: Largest accepted resized side (``w``, ``h``): beyond it the face would be a few pixels wide.
MAX_RESIZED_SIDE = 1 << 17

# Pillow's BICUBIC filter support (``Resample.c``: bicubic_filter support 2.0)
_BICUBIC_SUPPORT = 2.0


def standard_lm5(lm3d_68: np.ndarray) -> np.ndarray:
    """The 5 standard 3D points from 68 3D landmarks (reference ``load_lm3d``).

    Args:
        lm3d_68: ``(68, 3)`` model-space landmarks (decimetres, y up), iBUG order. For the BFM this is
            ``similarity_Lm3D_all.mat['lm']`` (float32); for another face model, its own 68 landmark vertices.

    Returns:
        ``(5, 3)`` in the input dtype: ``mean(36, 39), mean(42, 45), 30, 48, 54`` (0-based), i.e. image-left eye,
        image-right eye, nose tip, image-left and image-right mouth corner.
    """
    lm = np.asarray(lm3d_68)
    if lm.shape != (68, 3):
        raise ValueError(f"expected (68, 3) 3D landmarks, got {lm.shape}")
    return lm68_to_lm5(lm)


def pos(lm2d_yup: np.ndarray, lm3d: np.ndarray) -> tuple[float, float, float]:
    """POS fit of a scaled orthographic camera (reference ``POS``).

    Args:
        lm2d_yup: ``(N, 2)`` photo points, **y up**, pixels.
        lm3d: ``(N, 3)`` matching model points, decimetres.

    Returns:
        ``(tx, ty, s)``: the y-up photo position of the model origin and the scale in photo px per dm.
    """
    xp = np.asarray(lm2d_yup)
    x = np.asarray(lm3d)
    n = xp.shape[0]
    if xp.shape != (n, 2) or x.shape != (n, 3) or n < 4:
        raise ValueError(f"need matching (N, 2) and (N, 3) points with N >= 4, got {xp.shape} and {x.shape}")
    a = np.zeros((2 * n, 8))
    a[0 : 2 * n - 1 : 2, 0:3] = x
    a[0 : 2 * n - 1 : 2, 3] = 1
    a[1 : 2 * n : 2, 4:7] = x
    a[1 : 2 * n : 2, 7] = 1
    b = np.reshape(xp, (2 * n, 1))  # x0, y0, x1, y1, ...
    k = np.linalg.lstsq(a, b)[0]
    s = (float(np.linalg.norm(k[0:3])) + float(np.linalg.norm(k[4:7]))) / 2.0
    return float(k[3, 0]), float(k[7, 0]), s


def _trunc(v: float) -> int:
    """Cast toward zero, as NumPy's ``astype(np.int32)`` (negative values round up)."""
    if not math.isfinite(v) or abs(v) >= 2**31:
        raise ValueError(f"alignment value out of range: {v}")
    return int(v)


@dataclass(frozen=True)
class Alignment:
    """The reference crop transform of one face in one photo.

    Attributes:
        w0, h0: photo width and height, pixels.
        sigma: resize factor ``102 / s`` (resized px per photo px).
        tx, ty: y-up photo position (pixels) of the model origin from the POS fit.
        w, h: resized photo size, ``trunc(w0 sigma)``, ``trunc(h0 sigma)``.
        left, up: top-left of the 224 crop in resized pixels (may be negative or past the edge: black there).
        size: crop side (224).

    ``trans_params`` gives the reference's ``[w0, h0, sigma, tx, ty]``.
    """

    w0: int
    h0: int
    sigma: float
    tx: float
    ty: float
    w: int
    h: int
    left: int
    up: int
    size: int = CROP_SIZE

    @classmethod
    def from_params(cls, w0: int, h0: int, sigma: float, tx: float, ty: float) -> Alignment:
        """Rebuild from ``trans_params`` with the reference's truncations (step 3 of the module docstring)."""
        w0, h0, sigma, tx, ty = int(w0), int(h0), float(sigma), float(tx), float(ty)
        half = CROP_SIZE / 2.0
        w = _trunc(w0 * sigma)
        h = _trunc(h0 * sigma)
        if w < 1 or h < 1 or max(w, h) > MAX_RESIZED_SIDE:
            raise ValueError(
                f"implausible alignment: the photo would be resized to {w} x {h} (sigma {sigma}); "
                "the landmarks are degenerate or the face is a few pixels wide"
            )
        left = _trunc(w / 2 - half + (tx - w0 / 2) * sigma)
        up = _trunc(h / 2 - half + (h0 / 2 - ty) * sigma)
        return cls(w0=w0, h0=h0, sigma=sigma, tx=tx, ty=ty, w=w, h=h, left=left, up=up)

    @property
    def trans_params(self) -> tuple[float, float, float, float, float]:
        """The reference's ``[w0, h0, sigma, tx, ty]``."""
        return (float(self.w0), float(self.h0), self.sigma, self.tx, self.ty)

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Photo points to crop points by the reference's continuous map (section 6.7).

        Args:
            points: ``(N, 2)`` photo pixels, **y down**.

        Returns:
            ``(N, 2) float64`` crop pixels, **y up** (``row = 223 - v_up`` for landmark arithmetic).
        """
        p = _points(points)
        return self._yup_to_crop(p[:, 0], (self.h0 - 1) - p[:, 1])

    def _yup_to_crop(self, x: np.ndarray, y_up: np.ndarray) -> np.ndarray:
        half = self.size / 2.0
        xc = (x.astype(np.float64) - self.tx + self.w0 / 2) * self.sigma - (self.w / 2 - half)
        yc = (y_up.astype(np.float64) - self.ty + self.h0 / 2) * self.sigma - (self.h / 2 - half)
        return np.stack([xc, yc], axis=1)

    def to_photo(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_crop` (section 6.8).

        Args:
            points: ``(N, 2)`` crop pixels, **y up** (e.g. projected 68 landmarks).

        Returns:
            ``(N, 2) float64`` photo pixels, **y down**.
        """
        p = _points(points)
        half = self.size / 2.0
        x = (p[:, 0] + (self.w / 2 - half)) / self.sigma + self.tx - self.w0 / 2
        y_up = (p[:, 1] + (self.h / 2 - half)) / self.sigma + self.ty - self.h0 / 2
        return np.stack([x, (self.h0 - 1) - y_up], axis=1)

    def crop_pixels_to_photo(self, points: np.ndarray) -> np.ndarray:
        """Crop pixel positions to photo positions through the actual resize + crop (pixel-exact paste).

        Crop pixel (c, r) is resized pixel (c + left, r + up); PIL's resize samples resized pixel centre
        ``C + 0.5`` at photo coordinate ``(C + 0.5) w0 / w`` (edges at integers), so a crop position (c, r) with
        integer pixel centres lands at ``x = (c + left + 0.5) w0 / w - 0.5``, ``y = (r + up + 0.5) h0 / h - 0.5``.
        This is where the crop's *image content* comes from; :meth:`to_photo` (the trained landmark map) differs
        from it by up to about a pixel.

        Args:
            points: ``(N, 2)`` crop (column, row), **y down**, integer = pixel centre.

        Returns:
            ``(N, 2) float64`` photo pixels, **y down**, integer = pixel centre.
        """
        p = _points(points)
        x = (p[:, 0] + self.left + 0.5) * (self.w0 / self.w) - 0.5
        y = (p[:, 1] + self.up + 0.5) * (self.h0 / self.h) - 0.5
        return np.stack([x, y], axis=1)

    def photo_to_crop_pixels(self, points: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`crop_pixels_to_photo`: photo (y down) to crop (column, row) (y down)."""
        p = _points(points)
        c = (p[:, 0] + 0.5) * (self.w / self.w0) - 0.5 - self.left
        r = (p[:, 1] + 0.5) * (self.h / self.h0) - 0.5 - self.up
        return np.stack([c, r], axis=1)

    def photo_intrinsics(self, camera: Camera | None = None) -> Intrinsics:
        """Camera intrinsics at the photo's resolution, for drawing the reconstruction over the photo.

        The crop camera maps camera point ``(x, y, d)`` to ``u = f x/d + c``, ``v_up = f y/d + c`` with the
        rasteriser's pixel centres at ``u = col + 0.5``, ``v_up = S - (row + 0.5)`` (S = 224). Crop pixel
        (col, row) is resized pixel (col + left, row + up), and resized pixel centre ``C + 0.5`` samples the photo
        at ``(C + 0.5) w0 / w`` (PIL, pixel edges at integers). Composing, with photo pixel centres at
        ``u' = X + 0.5``, ``v'_up = h0 - (Y + 0.5)``:

        * ``u' = (u + left) w0 / w``  =>  ``fx = f w0 / w``, ``cx = (c + left) w0 / w``
        * ``v'_up = h0 - (S - v_up + up) h0 / h``  =>  ``fy = f h0 / h``, ``cy = h0 - (S - c + up) h0 / h``

        For the reference camera ``S - c = c = 112``, giving ``cy = h0 - (c + up) h0 / h``. ``fx != fy`` in
        general (the truncations of w and h make the two scales differ slightly).

        Args:
            camera: the crop camera (default :class:`~facerecon.geometry.Camera`); its ``size`` must be the
                crop size.

        Returns:
            :class:`~facerecon.geometry.Intrinsics` of size ``w0 x h0``, y up, same pixel-centre convention.
        """
        cam = camera if camera is not None else Camera()
        if cam.size != self.size:
            raise ValueError(f"camera size {cam.size} differs from the crop size {self.size}")
        kx = self.w0 / self.w
        ky = self.h0 / self.h
        return Intrinsics(
            fx=cam.focal * kx,
            fy=cam.focal * ky,
            cx=(cam.center + self.left) * kx,
            cy=self.h0 - (self.size - cam.center + self.up) * ky,
            width=self.w0,
            height=self.h0,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``trans_params``."""
        d = asdict(self)
        d["trans_params"] = list(self.trans_params)
        return d


def fit_alignment(lm5_photo: np.ndarray, lm3d5: np.ndarray, width: int, height: int) -> Alignment:
    """POS fit and the reference's crop arithmetic, without touching pixels.

    Args:
        lm5_photo: ``(5, 2)`` photo pixels, **y down** (cast to float32 as the reference reads them).
        lm3d5: ``(5, 3)`` standard 3D points (decimetres), e.g. :func:`standard_lm5`.
        width, height: photo size ``w0, h0``.
    """
    lm = np.array(lm5_photo, dtype=np.float32)
    if lm.shape != (5, 2):
        raise ValueError(f"lm5_photo must be (5, 2), got {lm.shape}")
    if not np.all(np.isfinite(lm)):
        raise ValueError("lm5_photo has non-finite values")
    lm[:, 1] = height - 1 - lm[:, 1]  # y up, in float32 like the reference
    tx, ty, s = pos(lm, np.asarray(lm3d5, dtype=np.float32))
    if not (math.isfinite(s) and s > 1e-6):
        raise ValueError(f"degenerate 5-point landmarks (POS scale {s})")
    return Alignment.from_params(width, height, RESCALE_FACTOR / s, tx, ty)


#: Yaw (degrees) from which a turned face's crop is recentred, and the yaw at which the recentring is complete.
TURN_START, TURN_FULL = 20.0, 45.0
#: Zoom-out of the crop of a fully turned face (the resize factor is multiplied by ``1 - TURN_ZOOM``).
TURN_ZOOM = 0.15
#: Where the visible face's centre sits relative to the 68 landmarks' box centre on a full profile, in units of the
#: box height: towards the back of the head (x, against the facing direction) and down (y): the ear and the
#: lower jaw contour lie outside the 68 landmarks. Median over the CFP profiles' manual fiducials (1,729 photos).
TURN_OFFSET = (0.087, 0.045)


def turned_alignment(alignment: Alignment, lm68_photo: np.ndarray, yaw_degrees: float) -> Alignment:
    """The reference crop, recentred and widened for a turned face; unchanged below ``TURN_START`` degrees.

    The reference centres the crop on the projected model origin, which on a profile sits near the cheek: the ear
    and the back of the jaw fall off one side and the chin off the bottom (on the CFP profiles, all 30 manual
    fiducials were inside the reference crop for 82 % of the photos). With the turn ``r`` ramping from 0 at
    ``TURN_START`` to 1 at ``TURN_FULL`` degrees of yaw, the centre moves by ``r`` towards the visible face's centre
    (the 68 landmarks' box centre moved by :data:`TURN_OFFSET` towards the ear and the chin) and the resize factor
    shrinks by ``TURN_ZOOM r``; frontal faces keep the exact reference crop (``python -m eval.detection`` prints
    the share of CFP photos whose fiducials all fall inside the crop, for both).

    Args:
        alignment: the reference alignment (:func:`fit_alignment`).
        lm68_photo: ``(68, 2)`` photo pixels, y down, 3D-aware (the hidden side placed).
        yaw_degrees: the face's estimated yaw.
    """
    r = float(np.clip((abs(float(yaw_degrees)) - TURN_START) / (TURN_FULL - TURN_START), 0.0, 1.0))
    if r == 0.0:
        return alignment
    lm = np.asarray(lm68_photo, dtype=np.float64)
    cx, cy = (lm.min(axis=0) + lm.max(axis=0)) / 2
    height = float(lm[:, 1].max() - lm[:, 1].min())
    cx -= math.copysign(TURN_OFFSET[0], float(yaw_degrees)) * height  # positive yaw looks to the image's right
    cy += TURN_OFFSET[1] * height
    a = alignment
    tx = a.tx + (float(cx) - a.tx) * r
    ty = a.ty + ((a.h0 - 1 - float(cy)) - a.ty) * r
    return Alignment.from_params(a.w0, a.h0, a.sigma * (1.0 - TURN_ZOOM * r), tx, ty)


def resize_and_crop(image: Image.Image | np.ndarray, alignment: Alignment) -> Image.Image:
    """The reference's ``image.resize((w, h), BICUBIC).crop((left, up, left + 224, up + 224))`` (black
    outside), computing only the pixels inside the crop, with the horizontal pass first (module docstring).

    Args:
        image: ``w0 x h0`` PIL image of mode ``L``, ``RGB`` or ``F`` (or an array that ``Image.fromarray``
            turns into one of those).
        alignment: the transform.

    Returns:
        ``224 x 224`` PIL image, same mode; row 0 at the top.
    """
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if im.mode not in ("L", "RGB", "F"):
        raise ValueError(f"unsupported image mode {im.mode!r} (use L, RGB or F)")
    a = alignment
    if im.size != (a.w0, a.h0):
        raise ValueError(f"image is {im.size}, the alignment expects {(a.w0, a.h0)}")
    size = a.size
    out = Image.new(im.mode, (size, size), 0)
    c0, c1 = max(a.left, 0), min(a.left + size, a.w)
    r0, r1 = max(a.up, 0), min(a.up + size, a.h)
    if c0 >= c1 or r0 >= r1:
        return out
    # photo rows read by the vertical filter for resized rows [r0, r1) (Pillow precompute_coeffs)
    y_first, y_last = _source_rows(a.h0, a.h, r0, r1)
    band = im.crop((0, y_first, a.w0, y_last))
    hpass = band.resize((a.w, y_last - y_first), resample=Image.BICUBIC)  # horizontal pass only
    hpass = hpass.crop((c0, 0, c1, y_last - y_first))
    tall = Image.new(im.mode, (c1 - c0, a.h0), 0)  # rows outside the band are never read
    tall.paste(hpass, (0, y_first))
    vpass = tall.resize((c1 - c0, a.h), resample=Image.BICUBIC)  # vertical pass only
    out.paste(vpass.crop((0, r0, c1 - c0, r1)), (c0 - a.left, r0 - a.up))
    return out


def align_face(
    image: np.ndarray,
    lm5_photo: np.ndarray,
    lm3d5: np.ndarray,
    camera: Camera | None = None,
    *,
    lm68_photo: np.ndarray | None = None,
    yaw_degrees: float | None = None,
    pil: Image.Image | None = None,
) -> tuple[np.ndarray, Alignment, np.ndarray]:
    """Align one face as the reference does (recentred for a turned face, :func:`turned_alignment`, when its 68
    landmarks and yaw are given).

    Args:
        image: ``(H, W, 3) uint8`` RGB photo, y down.
        lm5_photo: ``(5, 2)`` photo pixels, **y down** (image-left eye, image-right eye, nose, image-left and
            image-right mouth corner), e.g. :attr:`~facerecon.detect.DetectedFace.lm5`.
        lm3d5: ``(5, 3)`` standard 3D points, from :func:`standard_lm5`.
        camera: the crop camera; only its size is checked (must be 224).
        lm68_photo, yaw_degrees: a turned face's 68 landmarks (photo px, y down) and estimated yaw.
        pil: ``image`` as an ``RGB`` Pillow image when the caller has one (saves a copy of the photo).

    Returns:
        ``(crop, alignment, lm_crop)``: ``(224, 224, 3) uint8`` RGB crop (row 0 at the top); the
        :class:`Alignment`; ``(5, 2) float64`` crop landmarks, **y up** (reference section 6.7).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    if camera is not None and camera.size != CROP_SIZE:
        raise ValueError(f"camera size must be {CROP_SIZE}, got {camera.size}")
    h0, w0 = img.shape[:2]
    alignment = fit_alignment(lm5_photo, lm3d5, w0, h0)
    if lm68_photo is not None and yaw_degrees is not None:
        alignment = turned_alignment(alignment, lm68_photo, yaw_degrees)
    if pil is None or pil.mode != "RGB" or pil.size != (w0, h0):
        pil = Image.fromarray(img)
    crop = np.asarray(resize_and_crop(pil, alignment))
    # the reference maps its float32 y-up points; do the same so lm_crop matches it bit for bit
    lm = np.asarray(lm5_photo, dtype=np.float32)
    lm_crop = alignment._yup_to_crop(lm[:, 0], np.float32(h0 - 1) - lm[:, 1])
    return crop, alignment, lm_crop


def _source_rows(h0: int, h: int, r0: int, r1: int) -> tuple[int, int]:
    """Photo rows ``[first, last)`` that Pillow's BICUBIC vertical pass reads for output rows ``[r0, r1)``
    (with a 2-row safety margin; extra rows are real photo rows, so the margin cannot change the result)."""
    scale = h0 / h
    support = _BICUBIC_SUPPORT * max(scale, 1.0)
    first = math.floor((r0 + 0.5) * scale - support) - 2
    last = math.ceil((r1 - 0.5) * scale + support) + 2
    return max(first, 0), min(last, h0)


def _points(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got {p.shape}")
    return p
