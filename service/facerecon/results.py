"""What the pipeline's stages hand to each other and return: plain data, no behaviour beyond small views.

``DetectedFace`` (:mod:`facerecon.detect`) -> :class:`PreparedFace` (``Reconstructor.prepare``: the aligned crop
and its transform) -> :class:`Estimate` (``Reconstructor.estimate``: coefficients for a batch of prepared faces)
-> :class:`Reconstruction` (``Reconstructor.finish``: decoded, reprojected). A photo set gives a
:class:`SetReconstruction`. This module imports no stage, so every stage and every exporter can import it; it
imports no torch (the R-Net path's coefficients are NumPy arrays and decode with NumPy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np

from facerecon.align import Alignment
from facerecon.coefficients import Coefficients
from facerecon.detect.face import DetectedFace
from facerecon.geometry import Camera
from facerecon.npdecode import DecodedFace

__all__ = ["MODES", "Estimate", "Mode", "PreparedFace", "Reconstruction", "SetReconstruction"]

#: How coefficients are obtained: R-Net alone, R-Net then the fit's landmark stage solved with NumPy
#: (:func:`facerecon.npfit.landmark_stage`), R-Net then test-time fitting, fitting from the mean face.
Mode = Literal["rnet", "rnet+lm", "rnet+fit", "fit"]
MODES: tuple[Mode, ...] = ("rnet", "rnet+lm", "rnet+fit", "fit")


@dataclass
class PreparedFace:
    """One detected face aligned to the network's input.

    Attributes:
        face: the detection (photo px, y down).
        alignment: the 224-crop transform (reference alignment; recentred for turned faces).
        crop: ``(224, 224, 3) uint8`` RGB, row 0 at the top.
        lm68_crop: ``(68, 2) float64`` the detected 68 landmarks in crop px, **y up** (the landmark loss's frame).
        photo_size: ``(width, height)`` of the photo.
        timings: stage -> milliseconds so far (detect, align).
        skin: ``(224, 224) float`` P(skin) of the crop, computed by the estimate stage when a fit needs it.
    """

    face: DetectedFace
    alignment: Alignment
    crop: np.ndarray
    lm68_crop: np.ndarray
    photo_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    skin: np.ndarray | None = None


@dataclass
class Estimate:
    """Coefficients for a batch of prepared faces (one row per face, in the order given).

    Attributes:
        coefficients: batch of ``B``.
        mode: how they were obtained.
        aggregation: for a shared identity, how it was aggregated (``None`` otherwise).
        timings: stage -> milliseconds for the batch (rnet, cnet, skin, fit).
        fit_landmark_error: when a fit ran, the mean landmark error (crop px) of each face before and after it.
    """

    coefficients: Coefficients
    mode: Mode
    aggregation: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    fit_landmark_error: tuple[list[float], list[float]] | None = None


@dataclass
class Reconstruction:
    """One reconstructed face.

    Attributes:
        face: the detection (box, 5 and 68 landmarks in photo pixels, y down, confidences).
        alignment: the 224-crop transform (:meth:`Alignment.to_photo` maps crop points back).
        crop: ``(224, 224, 3)`` uint8 RGB aligned crop.
        coefficients: batch of one (NumPy-backed on the R-Net path, ``mode="rnet"``: torch tensors only when read).
        decoded: the decoded face (batch of one) as torch tensors, decoded on first use (the JSON and landmarks
            need only the 68 landmark vertices, so a reconstruction that is never exported or drawn never decodes
            its 15K-vertex mesh); ``decoded_arrays`` the same as NumPy arrays (what the exports write; for NumPy
            coefficients decoded without torch, and ``decoded`` then shares their memory on the CPU).
        decoder: coefficients -> torch :class:`DecodedFace` on the model's device.
        np_decoder: NumPy coefficients -> NumPy :class:`DecodedFace` (the torch-free path), or None.
        device: the torch decoder's device (``"cpu"``: ``decoded`` wraps ``decoded_arrays`` without a copy).
        landmarks_photo: ``(68, 2)`` float, the reconstruction's 68 landmarks reprojected into the photo (pixels,
            y down, integer = pixel centre).
        mode: ``"rnet"``, ``"rnet+fit"`` or ``"fit"``.
        landmark_error_px: mean distance (crop px) between the reprojected and the detected 68 landmarks.
        timings: stage -> milliseconds.
        photo_size: ``(width, height)``.
        units: the face model's length unit (``trans``, the decoded vertices, OBJ and PLY files); GLB is in metres.
    """

    face: DetectedFace
    alignment: Alignment
    crop: np.ndarray
    coefficients: Coefficients
    decoder: Callable[[Coefficients], DecodedFace] = field(repr=False, compare=False)
    landmarks_photo: np.ndarray
    mode: str
    landmark_error_px: float
    timings: dict[str, float] = field(default_factory=dict)
    photo_size: tuple[int, int] = (0, 0)
    units: str = "decimetre"
    camera: Camera = field(default_factory=Camera, repr=False)
    np_decoder: Callable[[Coefficients], DecodedFace] | None = field(default=None, repr=False, compare=False)
    device: str = "cpu"
    _decoded: DecodedFace | None = field(default=None, repr=False, compare=False)
    _decoded_np: DecodedFace | None = field(default=None, repr=False, compare=False)

    def photo_camera(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(K (3, 3), R (3, 3), t (3,))`` mapping the posed mesh (``decoded.vertices_world``, model units) onto the
        photo in OpenCV's convention (x right, y down, z forward; pixels y down, integer = pixel centre), exactly as
        ``landmarks_photo`` is mapped (:meth:`Alignment.to_photo`, the reference's inverse crop map).

        The crop camera gives ``u = f x / d + c``, ``v_up = f y / d + c`` with ``d = distance - z``; ``to_photo``
        is ``X = (u + w/2 - S/2) / sigma + tx - w0/2``, ``Y = (h0 - 1) - ((v_up + h/2 - S/2) / sigma + ty - h0/2)``.
        Composed, with camera coordinates ``(x, -y, d)``: ``fx = fy = f / sigma``, ``cx = (c + w/2 - S/2) / sigma +
        tx - w0/2``, ``cy = (h0 - 1) - (c + h/2 - S/2) / sigma - ty + h0/2``; ``R = diag(1, -1, -1)``,
        ``t = (0, 0, distance)``. (The overlay's pixel-exact resampling map differs by under about a pixel.)
        """
        a, cam = self.alignment, self.camera
        half = a.size / 2.0
        f = cam.focal / a.sigma
        cx = (cam.center + a.w / 2 - half) / a.sigma + a.tx - a.w0 / 2
        cy = (a.h0 - 1) - (cam.center + a.h / 2 - half) / a.sigma - a.ty + a.h0 / 2
        intr = np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
        return intr, np.diag([1.0, -1.0, -1.0]), np.array([0.0, 0.0, float(cam.distance)])

    def vertices_photo(self) -> np.ndarray:
        """``(N, 3)``: every vertex of the posed mesh as (x, y) photo px (y down) and its camera-space depth."""
        intr, rot, t = self.photo_camera()
        v = self.decoded_arrays.vertices_world[0].astype(np.float64)
        cam = v @ rot.T + t
        uv = cam @ intr.T
        return np.concatenate([uv[:, :2] / uv[:, 2:3], cam[:, 2:3]], axis=1)

    @property
    def decoded(self) -> DecodedFace:
        """The decoded face (batch of one) as torch tensors, computed once on first use (its time lands in
        ``timings["decode"]``); imports torch."""
        if self._decoded is None:
            import torch

            if self.coefficients.is_numpy and self.np_decoder is not None and self.device == "cpu":
                arrays = self.decoded_arrays
                self._decoded = DecodedFace(**{f.name: torch.from_numpy(getattr(arrays, f.name))
                                               for f in fields(DecodedFace)})
                return self._decoded
            t0 = time.perf_counter()
            coeffs = self.coefficients.to(self.device) if self.coefficients.is_numpy else self.coefficients
            with torch.no_grad():
                self._decoded = self.decoder(coeffs)
            self._add_time(t0)
        return self._decoded

    @property
    def decoded_arrays(self) -> DecodedFace:
        """The decoded face (batch of one) as NumPy float32 arrays, computed once: without torch for NumPy
        coefficients (``np_decoder``), else from :attr:`decoded`."""
        if self._decoded_np is None:
            if self._decoded is None and self.coefficients.is_numpy and self.np_decoder is not None:
                t0 = time.perf_counter()
                self._decoded_np = self.np_decoder(self.coefficients)
                self._add_time(t0)
            else:
                d = self.decoded
                self._decoded_np = DecodedFace(**{f.name: getattr(d, f.name).detach().cpu().numpy()
                                                  for f in fields(DecodedFace)})
        return self._decoded_np

    def _add_time(self, t0: float) -> None:
        self.timings["decode"] = self.timings.get("decode", 0.0) + (time.perf_counter() - t0) * 1000.0

    def pose_degrees(self) -> dict[str, float]:
        """``{"pitch", "yaw", "roll"}`` in degrees (``facerecon.geometry``'s convention: positive yaw turns the
        face towards the image's right)."""
        pitch, yaw, roll = np.degrees(self.coefficients.arrays().angle[0]).tolist()
        return {"pitch": pitch, "yaw": yaw, "roll": roll}


@dataclass
class SetReconstruction:
    """An image set of one person: one identity/albedo, per-image pose, expression and lighting.

    Attributes:
        items: one per photo used, in the order the photos were given.
        indices: the position of each item's photo among the photos given (``range(len(items))`` when none was
            skipped).
        skipped: positions of the photos left out for want of a face (``on_missing="skip"``).
    """

    items: list[Reconstruction]
    identity: Coefficients  # batch of one: aggregated id/tex, zero expression, frontal, ambient light
    aggregation: str
    timings: dict[str, float] = field(default_factory=dict)
    indices: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.indices:
            self.indices = list(range(len(self.items)))
