"""The one entry point: photo(s) -> reconstruction(s). The CLI, the HTTP app, the evaluations, the benchmarks and
the training data preparation all run these same public stages:

``detect(image) -> [DetectedFace]``, ``prepare(image, face) -> PreparedFace`` (the aligned 224 crop),
``estimate([PreparedFace], mode=...) -> Estimate`` (coefficients for the batch: R-Net, C-Net for a set, fitting),
``finish(prepared, estimate, i) -> Reconstruction`` (decoded, reprojected); :meth:`Reconstructor.reconstruct` and
:meth:`Reconstructor.reconstruct_set` are a few lines over them. Outputs: :meth:`Reconstructor.export_files` (every
mesh format, textured or not), :meth:`Reconstructor.overlay`, :meth:`Reconstructor.map_pngs` (depth and normal
maps), :meth:`Reconstructor.to_json`. Each stage is timed
(milliseconds, in ``Reconstruction.timings``).

Modes: with a trained R-Net installed for the face model (``models/<name>/rnet.json``), R-Net predicts and
``refine`` adds test-time fitting from its prediction (``rnet+fit``); without ``refine`` the fit's landmark stage is
solved with NumPy in a few milliseconds (``rnet+lm``, :mod:`facerecon.npfit`; ``fast_landmarks=false``: the R-Net
alone, ``rnet``); without an R-Net, fitting from the mean face is the quality path
(the alignment already places the mean face on the photo) and this is said at start-up, never silently.

Torch: on the CPU nothing imports it: the R-Net path (``refine=False``: detection, alignment, R-Net, the landmark
stage, the 68 landmarks, the JSON, mesh exports) runs on NumPy and onnxruntime (:class:`~facerecon.npdecode.
NumpyDecoder`), the fit on the fused engine's NumPy/numba kernels (:mod:`facerecon.fused`) and the overlay on the
CPU rasteriser's kernels over NumPy arrays (:func:`facerecon.render.raster.rasterize_arrays`). Torch, the torch face
model and the renderer load on first use, each once, for what needs them (textures, maps, the autograd fit, a GPU
device, a face model given as a torch module); ``tests/test_imports.py`` checks the import graph.

Size: over 400 lines because it is the one place the stages are composed (four stages, the set path, and the outputs
that need the engine's model and renderer); each stage's work lives in its own module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from facerecon import __version__
from facerecon.align import align_face
from facerecon.coefficients import Coefficients
from facerecon.config import Settings, get_settings, network_cache_dir, onnx_threads, resolve_device
from facerecon.detect import DetectedFace, FaceDetector, Which, select_faces
from facerecon.errors import ExportNotSupported, FaceReconError, NoFaceFound, TooManyImages
from facerecon.export import (
    MeshData,
    MeshFormat,
    TextureChoice,
    TextureKind,
    export_mesh,
    metres_per_unit,
    textured_glb,
    textured_obj,
)
from facerecon.facemodel.format import FaceModelCard, FaceModelData, load_face_model
from facerecon.facemodel.registry import resolve
from facerecon.formats import OnMissing, texture_format_problem
from facerecon.landmarks import lm68_to_lm5
from facerecon.nets.runtime import OnnxNet, check_pair
from facerecon.npdecode import DecodedFace, NumpyDecoder
from facerecon.npfit import FREE, blend_back, landmark_stage, turned_weights
from facerecon.results import Estimate, Mode, PreparedFace, Reconstruction, SetReconstruction

if TYPE_CHECKING:  # torch and what needs it load on first use: the R-Net path (refine=False) runs without them
    import torch

    from facerecon.appearance import FeatureColours, FeatureRegions
    from facerecon.decoder import FaceDecoder
    from facerecon.facemodel import FaceModel
    from facerecon.fitconfig import FitConfig, FitResult
    from facerecon.fused import FusedObjective
    from facerecon.render.base import Renderer
    from facerecon.render.maps import FaceMaps, MapKind

log = logging.getLogger(__name__)


__all__ = [
    "Checkpoint",
    "Estimate",
    "PreparedFace",
    "Reconstruction",
    "Reconstructor",
    "SetReconstruction",
    "prepare_face",
]


def _load_networks(settings: Settings) -> tuple[OnnxNet | None, OnnxNet | None]:
    """The R-Net (and C-Net) installed beside the face model, or None when there is no ``rnet.json``.

    A card that exists but whose network is missing, corrupt or for another face model is a start-up error
    (:class:`ModelFileError`), never a silent fallback.
    """
    npz = resolve(settings.models_dir, settings.face_model)
    nets: list[OnnxNet | None] = []
    for kind in ("rnet", "cnet"):
        card = npz.parent / f"{kind}.json"
        if not settings.use_networks or not card.is_file():
            nets.append(None)
            continue
        nets.append(OnnxNet.for_face_model(  # type: ignore[arg-type]
            npz, kind, device=settings.device, intra_op_threads=onnx_threads(settings),
            cache_dir=network_cache_dir(settings)))
    rnet, cnet = nets
    if rnet is None and cnet is not None:
        log.warning("a C-Net without an R-Net is unused")
        cnet = None
    if rnet is not None and cnet is not None:
        check_pair(rnet, cnet)
    return rnet, cnet


def _net_info(net: OnnxNet | None) -> dict[str, Any] | None:
    if net is None:
        return None
    return {"card": net.card.model_dump(mode="json"), "providers": net.providers}


def _overlay_triangles_of(triangles: np.ndarray, face_mask: np.ndarray, vertex_region: np.ndarray | None,
                          regions: dict[str, int]) -> np.ndarray:
    """:func:`_overlay_triangles` from the face model's arrays: ``(F', 3)`` int64, no torch."""
    keep = np.asarray(face_mask).astype(bool)
    if vertex_region is not None:
        inner = [v for k, v in regions.items() if k.startswith(("eyeball", "eye_socket", "mouth_socket"))]
        keep = keep | np.isin(vertex_region, inner)
    tris = np.asarray(triangles, np.int64)
    return tris[keep[tris].all(axis=1)]


def _overlay_triangles(model: FaceModel) -> torch.Tensor:
    """The triangles drawn over a photo: the photometric face region plus the eyes and the inner mouth (the scalp,
    neck and back of the head would paint over hair and collar); :func:`_overlay_triangles_of` of a torch model."""
    import torch

    tris = _overlay_triangles_of(model.triangles.cpu().numpy(), model.face_mask.cpu().numpy(),
                                 model.extras.get("vertex_region"), model.card.regions or {})
    return torch.from_numpy(tris).to(model.triangles.device)


def prepare_face(image: np.ndarray, face: DetectedFace, lm3d5: np.ndarray, pil: Image.Image | None = None,
                 guide: tuple[np.ndarray, float] | None = None) -> PreparedFace:
    """:meth:`Reconstructor.prepare` for a face model's 5 standard 3D points ``lm3d5`` (training data preparation
    uses it without a Reconstructor); ``pil``: the photo as an RGB Pillow image when the caller has one.

    ``guide``: ``(68 landmarks in photo px (y down), yaw in degrees)`` to align by instead of the detection's (the
    R-Net's own, for its second pass); the crop's ``lm68_crop`` stays the detector's points."""
    timings: dict[str, float] = {}
    with _timed(timings, "align"):
        try:
            if guide is not None:
                lm68, yaw = np.asarray(guide[0], np.float64), float(guide[1])
                lm5 = lm68_to_lm5(lm68)
            else:
                lm68, lm5 = face.lm68, face.lm5
                yaw = face.pose[1] if face.pose is not None else None
            crop, alignment, _ = align_face(image, lm5, lm3d5, lm68_photo=lm68, yaw_degrees=yaw, pil=pil)
        except ValueError as exc:
            raise NoFaceFound(f"the face found cannot be aligned: {exc}") from exc
        lm68_crop = alignment.to_crop(face.lm68)
    return PreparedFace(face=face, alignment=alignment, crop=crop, lm68_crop=lm68_crop,
                        photo_size=(int(image.shape[1]), int(image.shape[0])), timings=timings)


#: A stage-boundary hook (:meth:`Reconstructor.reconstruct`): called with the next stage's name; raising stops there.
Checkpoint = Callable[[str], None]


def _at(checkpoint: Checkpoint | None, stage: str) -> None:
    if checkpoint is not None:
        checkpoint(stage)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1000.0


class Reconstructor:
    """Holds the loaded models once; thread-safe for concurrent calls, which run in parallel (with a renderer that
    is not thread-safe, the fit and texture stages take turns)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        face_model: FaceModel | None = None,
        detector: FaceDetector | None = None,
        renderer: Renderer | None = None,
        fit_config: FitConfig | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        _limit_blas_threads(self.settings.torch_threads)
        # Loaded now: the face model's arrays (NumPy), the detector and the networks (onnxruntime). Loaded on first
        # use, each once: torch, the torch face model and decoder, the renderer (the fit, overlays, textures, maps),
        # so the R-Net path (refine=False: JSON, landmarks, mesh exports) never imports torch.
        self._build_lock = threading.RLock()
        self._device: torch.device | None = None
        self._model: FaceModel | None = face_model
        self._decoder: FaceDecoder | None = None
        self._renderer: Renderer | None = renderer
        self._fit_config: FitConfig | None = fit_config
        self._overlay_triangles: torch.Tensor | None = None
        self._overlay_triangles_np: np.ndarray | None = None
        self._fused: FusedObjective | None = None
        self._feature_regions: FeatureRegions | None = None
        self._lock_: AbstractContextManager[Any] | None = None
        self.data: FaceModelData | None = None
        if face_model is None:
            self.data = load_face_model(resolve(self.settings.models_dir, self.settings.face_model),
                                        cache_dir=network_cache_dir(self.settings))
            self.card: FaceModelCard = self.data.card
            self.np_decoder = NumpyDecoder.from_data(self.data)
            self.has_uvs = self.data.get("uv_coords") is not None
            self.lm3d5 = lm68_to_lm5(self.data["standard_landmarks68"].astype(np.float64)).astype(np.float32)
        else:
            self._torch_setup()
            self.card = face_model.card
            self.np_decoder = NumpyDecoder.from_model(face_model)
            self.has_uvs = face_model.has_uvs
            self.lm3d5 = face_model.standard_lm5
        self.detector = detector or FaceDetector()
        self.rnet, self.cnet = _load_networks(self.settings)
        log.info(
            "reconstructor ready: face model %s, device %s, renderer %s, R-Net %s",
            self.card.name, self._device_name(), self._renderer_name(),
            "installed" if self.rnet is not None else "not installed (test-time fitting from the mean face)",
        )

    # -- what loads on first use -------------------------------------------------------------------------------
    def _torch_setup(self) -> None:
        """Import torch and apply the thread setting (once; every torch-using part calls this first)."""
        if self._device is not None:
            return
        with self._build_lock:
            if self._device is not None:
                return
            import torch

            if self.settings.torch_threads > 0:
                # Multi-threaded CPU reductions and scatters sum in a varying order; over a few dozen optimiser
                # steps that moves a fit by ~1 %. One thread makes every reconstruction bit-reproducible (requests
                # run concurrently in the service's workers instead).
                torch.set_num_threads(self.settings.torch_threads)
            device = resolve_device(self.settings.device)
            if device.type != "cpu" and self._renderer is None:
                # a GPU renderer is chosen (and warmed up) before anything lands on the device: when it cannot be
                # used the CPU renderer serves instead, and torch with it (render.usable_renderer)
                from facerecon.render import usable_renderer

                self._renderer, device = usable_renderer(self.settings.renderer, device)
            self._device = device

    @property
    def device(self) -> torch.device:
        """The torch device (imports torch)."""
        self._torch_setup()
        return self._device  # type: ignore[return-value]

    def _device_name(self) -> str:
        """The device's name without importing torch where that is certain: ``cpu`` when the setting says so or
        the installed torch is a CPU build."""
        if self._device is not None:
            return str(self._device)
        if _cpu_only(self.settings):
            return "cpu"
        return str(self.device)

    @property
    def model(self) -> FaceModel:
        """The face model as a torch module on :attr:`device` (over the same arrays as :attr:`np_decoder`)."""
        if self._model is None:
            with self._build_lock:
                if self._model is None:
                    from facerecon.facemodel.model import FaceModel

                    self._torch_setup()
                    self._model = FaceModel(self.data).to(self._device)  # type: ignore[arg-type]
        return self._model

    @property
    def decoder(self) -> FaceDecoder:
        """The torch decoder (the fit, overlays, textures)."""
        if self._decoder is None:
            with self._build_lock:
                if self._decoder is None:
                    from facerecon.decoder import FaceDecoder

                    self._decoder = FaceDecoder(self.model)
        return self._decoder

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            with self._build_lock:
                if self._renderer is None:
                    from facerecon.render import usable_renderer

                    self._torch_setup()
                    if self._renderer is None:
                        self._renderer, self._device = usable_renderer(self.settings.renderer, self._device)
        return self._renderer

    def _renderer_name(self) -> str:
        if self._renderer is not None:
            return self._renderer.name
        if self.settings.renderer != "auto":
            return self.settings.renderer
        return "cpu" if self._device_name() == "cpu" else self.renderer.name

    @property
    def fit_config(self) -> FitConfig:
        if self._fit_config is None:
            from facerecon.fitconfig import FitConfig

            self._fit_config = FitConfig()
        return self._fit_config

    @property
    def overlay_triangles(self) -> torch.Tensor:
        if self._overlay_triangles is None:
            with self._build_lock:
                if self._overlay_triangles is None:
                    self._overlay_triangles = _overlay_triangles(self.model)
        return self._overlay_triangles

    @property
    def torch_free(self) -> bool:
        """Whether the fit and the overlay run without torch: a CPU device, the CPU renderer and the face model's
        arrays (loaded from its file; a face model given as a torch module keeps the torch paths)."""
        return self.data is not None and self._device_name() == "cpu" and self._renderer_name() == "cpu"

    @property
    def overlay_triangles_array(self) -> np.ndarray:
        """:attr:`overlay_triangles` as a NumPy ``(F, 3)`` int64 array, from the face model's arrays (no torch)."""
        if self._overlay_triangles_np is None:
            with self._build_lock:
                if self._overlay_triangles_np is None:
                    if self.data is None:
                        self._overlay_triangles_np = self.overlay_triangles.cpu().numpy()
                    else:
                        d = self.data
                        self._overlay_triangles_np = _overlay_triangles_of(
                            d["triangles"], d["face_mask"], d.get("vertex_region"), self.card.regions or {})
        return self._overlay_triangles_np

    @property
    def fused_objective(self) -> FusedObjective:
        """The fused fit engine's objective for this face model (:mod:`facerecon.fused`), built once from the face
        model's arrays (no torch)."""
        if self._fused is None:
            from facerecon.fused import MODEL_ARRAYS, FusedObjective

            with self._build_lock:
                if self._fused is None:
                    arrays = ({k: self.data[k] for k in MODEL_ARRAYS} if self.data is not None
                              else {k: getattr(self.model, k).detach().cpu().numpy() for k in MODEL_ARRAYS})
                    self._fused = FusedObjective(arrays, self.card.layout.id, self.np_decoder.camera)
        return self._fused

    @property
    def feature_regions(self) -> FeatureRegions:
        """The brows, eyes, lips and inner mouth of the face model (:func:`facerecon.appearance.feature_regions`)."""
        if self._feature_regions is None:
            from facerecon.appearance import feature_regions, feature_regions_of

            with self._build_lock:
                if self._feature_regions is None:
                    d = self.data
                    self._feature_regions = (
                        feature_regions(self.model) if d is None else
                        feature_regions_of(d["mean_shape"], d["triangles"], d["landmarks68"], self.card.regions or {},
                                           d.get("vertex_region")))
        return self._feature_regions

    def feature_colours(self, rec: Reconstruction) -> FeatureColours:
        """``rec``'s lit colours and albedo with the brows, eyes, lips and inner mouth coloured from the photo
        (:mod:`facerecon.appearance`: the model's hand-set tints gave pale blue-grey brows, white eyes and, on a
        greyscale photo, cyan eyes); for the overlay and the textures."""
        from facerecon.appearance import feature_colours

        if self.torch_free:
            with _timed(rec.timings, "features"):
                return feature_colours(rec, self.feature_regions, self.overlay_triangles_array, None,
                                       self.np_decoder.camera)
        with _timed(rec.timings, "features"), self._lock:
            return feature_colours(rec, self.feature_regions, self.overlay_triangles, self.renderer,
                                   self.decoder.camera)

    @property
    def _lock(self) -> AbstractContextManager[Any]:
        """What the renderer's users hold: onnxruntime sessions, torch decoding and autograd and the CPU rasteriser
        (stateless numba kernels) are safe from several threads at once, so concurrent requests share nothing but
        the read-only models; a renderer that keeps a device context (nvdiffrast) serialises the fits and textures
        that use it."""
        if self._lock_ is None:
            with self._build_lock:
                if self._lock_ is None:
                    safe = getattr(self.renderer, "thread_safe", False)
                    self._lock_ = contextlib.nullcontext() if safe else threading.Lock()
        return self._lock_

    # -- information -------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "face_model": self.card.model_dump(mode="json"),
            "device": self._device_name(),
            "renderer": self._renderer_name(),
            "rnet": _net_info(self.rnet),
            "cnet": _net_info(self.cnet),
            "default_mode": self.mode_for(),
        }

    # -- stages ------------------------------------------------------------------------------------------------
    def mode_for(self, refine: bool | None = None) -> Mode:
        """The mode a request gets: ``rnet+fit`` (or with ``refine=False`` ``rnet+lm``, ``rnet`` when the setting
        ``fast_landmarks`` is off) with an R-Net, else ``fit``; ``refine=None`` takes the service setting."""
        if self.rnet is None:
            return "fit"
        refine = self.settings.refine if refine is None else refine
        if refine:
            return "rnet+fit"
        return "rnet+lm" if self.settings.fast_landmarks else "rnet"

    def detect(self, image: np.ndarray | Image.Image, which: Which = "largest") -> list[DetectedFace]:
        """Faces to reconstruct, best first (:func:`~facerecon.detect.select_faces`); ``image`` as the detector
        takes it (an array, or the photo as an RGB Pillow image).

        Raises:
            NoFaceFound: none in the photo.
        """
        faces = select_faces(self.detector.detect(image, which), which)
        if not faces:
            raise NoFaceFound("no face found in the photo")
        return faces

    def prepare(self, image: np.ndarray, face: DetectedFace, pil: Image.Image | None = None) -> PreparedFace:
        """The aligned 224 crop of one face (the reference alignment, recentred for a turned face), its 68
        landmarks in crop pixels (y up); ``pil``: ``image`` as an RGB Pillow image when the caller has one.

        Raises:
            NoFaceFound: the face cannot be aligned (degenerate landmarks, or a face a few pixels wide).
        """
        return prepare_face(image, face, self.lm3d5, pil)

    def estimate(self, prepared: Sequence[PreparedFace], *, mode: Mode | None = None, refine: bool | None = None,
                 share_identity: bool = False, fit_config: FitConfig | None = None) -> Estimate:
        """Coefficients for a batch of prepared faces (one R-Net call for the whole batch).

        Args:
            prepared: one or more faces (from one photo, several photos, or a set of one person).
            mode: ``rnet``, ``rnet+fit`` or ``fit``; default :meth:`mode_for` ``(refine)``.
            share_identity: the faces are one person: identity and albedo are aggregated (C-Net confidences when
                installed, else the mean) and a fit shares them; otherwise each face is fitted on its own, exactly
                as it would be alone.
            fit_config: the fit's settings for this call (default: the engine's ``fit_config``).

        Raises:
            FaceReconError: an R-Net mode without an installed R-Net.
        """
        if not prepared:
            raise ValueError("estimate needs at least one prepared face")
        mode = mode or self.mode_for(refine)
        if mode != "fit" and self.rnet is None:
            raise FaceReconError(f"mode {mode!r} needs an installed R-Net")
        if share_identity and len(prepared) > 1:
            # One person's faces in a canonical order (by the crops' and landmarks' bytes): the aggregation's sums
            # and the shared fit's sums and optimiser steps follow the batch order, so the identity would otherwise
            # move slightly with the order the photos came in. The rows go back in the order given.
            order = sorted(range(len(prepared)), key=lambda k: hashlib.sha1(
                np.ascontiguousarray(prepared[k].crop).tobytes()
                + np.ascontiguousarray(prepared[k].lm68_crop).tobytes()).digest())
            if order != list(range(len(prepared))):
                est = self.estimate([prepared[k] for k in order], mode=mode, share_identity=True,
                                    fit_config=fit_config)
                back = sorted(range(len(order)), key=lambda j: order[j])  # the row of each face, as given
                err = est.fit_landmark_error
                return Estimate(Coefficients.cat([est.coefficients.index(j) for j in back]), est.mode,
                                est.aggregation, est.timings,
                                None if err is None else ([err[0][j] for j in back], [err[1][j] for j in back]))
        timings: dict[str, float] = {}
        images = np.stack([p.crop for p in prepared])
        init: Coefficients | None = None
        aggregation = None
        if mode != "fit":
            with _timed(timings, "rnet"):
                x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
                out = self.rnet.run(x)  # type: ignore[union-attr]
                # NumPy coefficients: the R-Net path stays torch-free (tensors are made if a later stage reads them)
                init = Coefficients.from_vector(np.asarray(out["coeffs"], np.float32), self.card.layout)
                if self._device_name() != "cpu":
                    init = init.to(self.device)
            if share_identity:
                with _timed(timings, "cnet"):
                    init, aggregation = self._aggregate(init, x, out)
        if mode == "rnet+lm":
            with _timed(timings, "landmark fit"):
                # a set's shared identity stays shared: only expression and pose follow each photo's landmarks
                res = landmark_stage(self.np_decoder, init.numpy(),  # type: ignore[union-attr]
                                     np.stack([p.lm68_crop for p in prepared]),
                                     free=("exp", "angle", "trans") if share_identity else FREE)
            coeffs = res.coefficients if self._device_name() == "cpu" else res.coefficients.to(self.device)
            return Estimate(coeffs, mode, aggregation, timings, (res.error_start, res.error_end))
        if mode == "rnet":
            return Estimate(init, mode, aggregation, timings)  # type: ignore[arg-type]
        from facerecon.skin import REFERENCE_GMM

        # the fused engine on NumPy arrays shares nothing mutable: torch-free fits run in parallel
        with contextlib.nullcontext() if self._fits_torch_free(fit_config) else self._lock:
            with _timed(timings, "skin"):
                for p in prepared:
                    if p.skin is None:
                        p.skin = REFERENCE_GMM.probability(p.crop)
            with _timed(timings, "fit"):
                if share_identity or len(prepared) == 1:
                    results = [self._fit(prepared, init, share_identity, fit_config)]
                else:
                    results = [self._fit([p], None if init is None else init.index(i), False, fit_config)
                               for i, p in enumerate(prepared)]
            coeffs = Coefficients.cat([r.coefficients for r in results])
            errors = ([float(e) for r in results for e in r.landmark_error_start],
                      [float(e) for r in results for e in r.landmark_error_end])
            if share_identity:
                aggregation = (aggregation + ", then shared-identity fit") if aggregation else "shared-identity fit"
        return Estimate(coeffs, mode, aggregation, timings, errors)

    def finish(self, prepared: PreparedFace, estimate: Estimate, index: int = 0) -> Reconstruction:
        """Row ``index`` of ``estimate`` for ``prepared``: the reconstruction with its 68 landmarks reprojected into
        the photo (only the landmark vertices are decoded here, with NumPy for the R-Net's coefficients; the mesh
        is decoded when first used)."""
        timings = {**prepared.timings, **estimate.timings}
        coeffs = estimate.coefficients.index(index)
        with _timed(timings, "landmarks"):
            if coeffs.is_numpy:
                lm_crop = self.np_decoder.landmarks(coeffs)[0].astype(np.float64)
            else:
                import torch

                with torch.no_grad():
                    lm_crop = self.decoder.landmarks(coeffs)[0].cpu().numpy().astype(np.float64)
        err = float(np.linalg.norm(lm_crop - prepared.lm68_crop, axis=1).mean())
        return Reconstruction(
            face=prepared.face, alignment=prepared.alignment, crop=prepared.crop, coefficients=coeffs,
            decoder=self._decode, np_decoder=self.np_decoder.decode, device=self._device_name(),
            landmarks_photo=prepared.alignment.to_photo(lm_crop), mode=estimate.mode, landmark_error_px=err,
            timings=timings, photo_size=prepared.photo_size, units=self.card.units, camera=self.np_decoder.camera,
        )

    def second_pass(self, images: Sequence[np.ndarray], prepared: Sequence[PreparedFace], estimate: Estimate,
                    pils: Sequence[Image.Image | None] | None = None) -> tuple[list[PreparedFace], Estimate]:
        """The R-Net's second look at the faces it saw turned by at least ``settings.second_pass_yaw_deg``: each is
        re-aligned by the reference alignment from the R-Net's own 68 landmarks and yaw (a profile's crop then
        centres on the face the network sees, not on the detector's guess of the hidden side) and predicted again,
        all in one batch; the other faces keep their rows. Only the R-Net modes (``rnet``, ``rnet+lm``) of faces
        reconstructed on their own (not a set's shared identity).

        Args:
            images: the photo of each face (``(H, W, 3) uint8``), in ``prepared``'s order.
            pils: the same photos as RGB Pillow images, where the caller has them.

        Returns:
            ``(prepared, estimate)``, with the re-aligned faces and their new rows in place (pass both on to
            :meth:`finish`).
        """
        gate = self.settings.second_pass_yaw_deg
        out = list(prepared)
        if not gate or estimate.mode not in ("rnet", "rnet+lm") or estimate.aggregation is not None:
            return out, estimate
        coeffs = estimate.coefficients.numpy()
        yaw = np.degrees(coeffs.arrays().angle[:, 1].astype(np.float64))
        turned = [i for i in range(len(out)) if abs(yaw[i]) >= gate]
        if not turned:
            return out, estimate
        t: dict[str, float] = {}
        with _timed(t, "second pass"):
            lm_crop = self.np_decoder.landmarks(Coefficients.cat([coeffs.index(i) for i in turned])).astype(np.float64)
            again: list[int] = []
            for k, i in enumerate(turned):
                guide = (out[i].alignment.to_photo(lm_crop[k]), float(yaw[i]))
                try:
                    p2 = prepare_face(images[i], out[i].face, self.lm3d5, None if pils is None else pils[i], guide)
                except NoFaceFound:
                    continue  # the first look stands
                p2.timings = {**out[i].timings, "align": out[i].timings.get("align", 0.0)
                              + p2.timings.get("align", 0.0)}
                out[i] = p2
                again.append(i)
            if not again:
                return out, estimate
            est2 = self.estimate([out[i] for i in again], mode=estimate.mode)
        rows = [estimate.coefficients.index(j) for j in range(len(out))]
        for k, i in enumerate(again):
            rows[i] = est2.coefficients.index(k)
        err = estimate.fit_landmark_error
        if err is not None and est2.fit_landmark_error is not None:
            err = (list(err[0]), list(err[1]))
            for k, i in enumerate(again):
                err[0][i], err[1][i] = est2.fit_landmark_error[0][k], est2.fit_landmark_error[1][k]
        timings = {**estimate.timings, "second pass": t["second pass"]}
        return out, Estimate(Coefficients.cat(rows), estimate.mode, estimate.aggregation, timings, err)

    def _decode(self, coeffs: Coefficients) -> DecodedFace:
        """The torch decode (:class:`~facerecon.decoder.FaceDecoder` on :attr:`device`)."""
        return self.decoder(coeffs)

    def _aggregate(self, per_image: Coefficients, x: np.ndarray, out: dict[str, np.ndarray]
                   ) -> tuple[Coefficients, str]:
        """One identity and albedo for the batch: C-Net confidence-weighted, else the plain mean."""
        if per_image.is_numpy:  # the same weighted mean (nets.cnet.aggregate) in NumPy
            a = per_image.arrays()
            if self.cnet is not None:
                conf = self.cnet.run(x, out["features"])
                c_id, c_tex = np.asarray(conf["conf_id"], np.float32), np.asarray(conf["conf_tex"], np.float32)
                how = "C-Net confidence-weighted mean"
            else:
                c_id, c_tex, how = np.ones_like(a.id), np.ones_like(a.tex), "mean"
            b = per_image.batch_size
            id_agg = (c_id * a.id).sum(axis=0, keepdims=True) / c_id.sum(axis=0, keepdims=True)
            tex_agg = (c_tex * a.tex).sum(axis=0, keepdims=True) / c_tex.sum(axis=0, keepdims=True)
            return Coefficients(np.repeat(id_agg, b, 0), a.exp, np.repeat(tex_agg, b, 0), a.angle, a.gamma,
                                a.trans), how
        import torch

        from facerecon.nets.cnet import aggregate_set

        if self.cnet is not None:
            conf = self.cnet.run(x, out["features"])
            c_id = torch.from_numpy(conf["conf_id"]).to(self.device)
            c_tex = torch.from_numpy(conf["conf_tex"]).to(self.device)
            how = "C-Net confidence-weighted mean"
        else:
            c_id, c_tex = torch.ones_like(per_image.id), torch.ones_like(per_image.tex)
            how = "mean"
        return aggregate_set(per_image, c_id, c_tex), how

    def _fits_torch_free(self, config: FitConfig | None) -> bool:
        """A fit with ``config`` runs on the fused engine's NumPy path (:attr:`torch_free`, not the autograd engine)."""
        return self.torch_free and (config or self.fit_config).engine != "autograd"

    def _fit(self, prepared: Sequence[PreparedFace], init: Coefficients | None, share_identity: bool,
             config: FitConfig | None = None) -> FitResult:
        cfg = config or self.fit_config
        if share_identity != cfg.share_identity:
            cfg = replace(cfg, share_identity=share_identity)
        lm, lm_w = self._fit_landmarks(prepared, init)
        if self._fits_torch_free(cfg) and (init is None or init.is_numpy):
            from facerecon.fused import FusedTarget, fit_numpy
            from facerecon.skin import skin_attention

            image = np.stack([p.crop for p in prepared]).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
            skin = skin_attention(np.stack([p.skin for p in prepared])[:, None].astype(np.float32))
            return fit_numpy(self.fused_objective, self.np_decoder, FusedTarget(image, lm, skin, lm_w), init, cfg)
        return self._fit_torch(prepared, init, cfg, lm, lm_w)

    def _fit_landmarks(self, prepared: Sequence[PreparedFace], init: Coefficients | None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The fit's landmark targets ``(B, 68, 2)`` float32 crop px and weights ``(B, 68)``, by each face's yaw
        (the R-Net's, else the detector's estimate) as in the fast path: the hidden half of the jaw contour faded
        out (:func:`facerecon.npfit.turned_weights`) and the detector's points faded towards the R-Net's own
        projected landmarks (:func:`facerecon.npfit.blend_back`). Without them the fit chased the detector's guess
        of a profile's hidden side and turned the head back towards frontal (held-out CFP profiles: R-Net alone
        7.0 %, R-Net + fit 9.5 %)."""
        lm = np.stack([p.lm68_crop for p in prepared]).astype(np.float64)
        if init is None:
            yaw = np.array([p.face.pose[1] if p.face.pose is not None else 0.0 for p in prepared], np.float64)
            return lm.astype(np.float32), turned_weights(self.np_decoder, yaw)
        c = init.numpy()
        yaw = np.degrees(c.arrays().angle[:, 1].astype(np.float64))
        k = blend_back(yaw)[:, None, None]
        if k.any():
            lm = (1 - k) * lm + k * self.np_decoder.landmarks(c).astype(np.float64)
        return lm.astype(np.float32), turned_weights(self.np_decoder, yaw)

    def _fit_torch(self, prepared: Sequence[PreparedFace], init: Coefficients | None, cfg: FitConfig,
                   lm_targets: np.ndarray, lm_weights: np.ndarray) -> FitResult:
        import torch

        from facerecon.fit import FitTarget, fit
        from facerecon.skin import skin_attention

        self._torch_setup()
        threads = self.settings.torch_threads
        if threads > 0 and torch.get_num_threads() != threads:
            # torch's thread count belongs to each OS thread (OpenMP): _torch_setup set it in the thread that first
            # used torch (a server worker's warm-up, say), and a thread already running then kept torch's default.
            # With several threads the fit's reductions sum in a varying order, and over its steps a set's identity
            # moved by 0.3-7 % between two identical calls; every thread that fits runs on the setting.
            torch.set_num_threads(threads)
        image = torch.from_numpy(np.stack([p.crop for p in prepared])).permute(0, 3, 1, 2).float().div(255.0)
        lm = torch.from_numpy(lm_targets).float()
        skin = skin_attention(torch.from_numpy(np.stack([p.skin for p in prepared]))[:, None].float())
        lm_w = torch.from_numpy(np.asarray(lm_weights, np.float32)).to(self.device)
        target = FitTarget(image=image.to(self.device), landmarks=lm.to(self.device), skin=skin.to(self.device),
                           landmark_weights=lm_w)
        return fit(self.decoder, self.renderer, target, init=init, config=cfg)

    # -- one photo ---------------------------------------------------------------------------------------------
    def reconstruct(self, image: np.ndarray, *, which: Which = "largest", refine: bool | None = None,
                    faces: Sequence[DetectedFace] | None = None, checkpoint: Checkpoint | None = None
                    ) -> list[Reconstruction]:
        """Reconstruct the best face (or all faces) of one RGB photo ``(H, W, 3) uint8``.

        Args:
            faces: faces already found in ``image`` by :meth:`detect` (e.g. the service's capped selection), to
                reconstruct instead of detecting again (``which`` is then unused).
            checkpoint: called with the name of each stage before it starts (``prepare``, ``estimate``,
                ``finish``); it may raise to stop the work there (the service cancels a request that way).

        Raises:
            NoFaceFound: no face in the photo.
        """
        t: dict[str, float] = {}
        # one Pillow copy of the photo for the detector and the alignment
        pil = Image.fromarray(image) if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 else None
        if faces is None:
            with _timed(t, "detect"):
                faces = self.detect(image if pil is None else pil, which)
        _at(checkpoint, "prepare")
        prepared = [self.prepare(image, f, pil) for f in faces]
        for p in prepared:
            p.timings.update(t)
        _at(checkpoint, "estimate")
        est = self.estimate(prepared, refine=refine)
        prepared, est = self.second_pass([image] * len(prepared), prepared, est, [pil] * len(prepared))
        _at(checkpoint, "finish")
        return [self.finish(p, est, i) for i, p in enumerate(prepared)]

    # -- a set of photos of one person -------------------------------------------------------------------------
    def reconstruct_set(self, images: Sequence[np.ndarray], *, refine: bool | None = None,
                        checkpoint: Checkpoint | None = None, on_missing: OnMissing = "fail") -> SetReconstruction:
        """One identity from several photos of one person (the best face of each); ``checkpoint`` as in
        :meth:`reconstruct` (``detect`` before each photo, then ``estimate`` and ``finish``).

        Args:
            on_missing: what a photo without a (usable) face does: ``"fail"`` the whole set, or ``"skip"`` it
                (the result's ``skipped`` lists the positions of those photos, ``indices`` those of ``items``).

        Raises:
            TooManyImages: more photos than ``settings.max_set_images``, or none.
            NoFaceFound: a photo without a face (the message names its position), or, with ``skip``, no photo with
                one.
        """
        if len(images) > self.settings.max_set_images:
            raise TooManyImages(f"{len(images)} photos in a set; the limit is {self.settings.max_set_images}")
        if not images:
            raise TooManyImages("an image set needs at least one photo")
        # (the estimate takes a set's faces in a canonical order: the identity does not depend on the photos')
        prepared: list[PreparedFace] = []
        kept: list[int] = []
        skipped: list[int] = []
        for k in range(len(images)):
            _at(checkpoint, "detect")
            t: dict[str, float] = {}
            try:
                with _timed(t, "detect"):
                    try:
                        face = self.detect(images[k], "largest")[0]
                    except NoFaceFound:
                        raise NoFaceFound(f"no face found in photo {k + 1} of the set", index=k) from None
                p = self.prepare(images[k], face)
            except NoFaceFound as exc:
                if on_missing == "fail":
                    exc.details.setdefault("index", k)
                    raise
                log.info("set: photo %d skipped (%s)", k + 1, exc.message)
                skipped.append(k)
                continue
            p.timings.update(t)
            prepared.append(p)
            kept.append(k)
        if not prepared:
            raise NoFaceFound(f"no face found in any of the {len(images)} photos of the set",
                              skipped=sorted(skipped))
        _at(checkpoint, "estimate")
        est = self.estimate(prepared, refine=refine, share_identity=True)
        _at(checkpoint, "finish")
        coeffs = est.coefficients
        a, lay = coeffs.arrays(), self.card.layout
        zero = Coefficients.from_vector(np.zeros((1, lay.total), np.float32), lay).arrays()
        identity = Coefficients(a.id.mean(0, keepdims=True), zero.exp, a.tex.mean(0, keepdims=True),
                                zero.angle, zero.gamma, zero.trans)
        if not coeffs.is_numpy:  # torch coefficients (a GPU engine) keep their device
            identity = identity.to(self.device)
        return SetReconstruction(items=[self.finish(p, est, i) for i, p in enumerate(prepared)], identity=identity,
                                 aggregation=est.aggregation or "", timings=dict(est.timings),
                                 indices=kept, skipped=skipped)

    # -- outputs -----------------------------------------------------------------------------------------------
    def mesh(self, decoded: DecodedFace, *, colors: Literal["lit", "albedo"] = "lit", uv: bool = False) -> MeshData:
        """The posed mesh in world space in the model's units (dm), as the reference's OBJ, with the decoder's
        normals; the model's own UVs only with ``uv=True`` (the vertex-colour exports carry none: ICT's span two UDIM
        tiles, and readers such as trimesh take UVs over the colours). ``decoded``: NumPy arrays
        (:attr:`Reconstruction.decoded_arrays`) or torch tensors."""
        has_uv = uv and self.has_uvs
        return MeshData(
            vertices=_array(decoded.vertices_world[0]),
            faces=self.np_decoder.triangles,
            colors=_array((decoded.colors if colors == "lit" else decoded.albedo)[0]),
            uvs=self._extra("uv_coords") if has_uv else None,
            uv_faces=self._extra("uv_triangles") if has_uv else None,
            normals=_array(decoded.normals_world[0]),
            units=self.card.units,
        )

    def _extra(self, key: str) -> np.ndarray:
        """A face-model array no decoding needs (UVs, regions): from the file's arrays, else the torch model's."""
        return np.asarray(self.data[key]) if self.data is not None else self.model.extras[key]

    def export(self, rec: Reconstruction, fmt: MeshFormat) -> bytes:
        """The mesh with per-vertex colours in one file (OBJ/PLY in the model's units, GLB in metres); without
        torch for the R-Net's coefficients."""
        with _timed(rec.timings, "export"):
            return export_mesh(self.mesh(rec.decoded_arrays), fmt)

    def export_files(self, image: np.ndarray, rec: Reconstruction, fmt: MeshFormat,
                     texture: TextureChoice = "none", size: int = 1024) -> dict[str, bytes]:
        """Every mesh output, by one rule for the CLI, the API and batch jobs: ``{file name: bytes}``.

        ``texture="none"``: ``{"mesh.<fmt>"}``, per-vertex colours. ``texture="photo"|"albedo"``: a textured OBJ
        bundle (``mesh.obj``, ``mesh.mtl``, ``texture.png``) or a GLB with the texture embedded.

        Raises:
            ExportNotSupported: a texture with ``ply``, or a texture on a face model without UVs (a 422).
        """
        if texture == "none":
            return {f"mesh.{fmt}": self.export(rec, fmt)}
        if (problem := texture_format_problem(texture, fmt)) is not None:
            raise ExportNotSupported(problem, field="texture")
        if not self.has_uvs:
            raise ExportNotSupported(f"the face model {self.card.name!r} has no UVs: texture={texture} is not "
                                     "available (use texture=none for per-vertex colours)", field="texture")
        return self._export_textured(image, rec, fmt, texture, size=size)  # type: ignore[arg-type]

    def _export_textured(self, image: np.ndarray, rec: Reconstruction, fmt: Literal["obj", "glb"],
                        kind: TextureKind = "photo", size: int = 1024) -> dict[str, bytes]:
        """A textured mesh: ``{"mesh.obj", "mesh.mtl", "texture.png"}`` for OBJ, ``{"mesh.glb"}`` for GLB.

        ``kind="photo"``: the photo's colours sampled into the UV map where visible (mirrored/filled elsewhere);
        ``"albedo"``: the fitted model's de-lit albedo. Needs a face model with UVs (:meth:`export_files` checks
        that, and is the entry point).
        """
        from facerecon.texture import make_texture

        colours = self.feature_colours(rec)
        with _timed(rec.timings, "texture"), self._lock:
            tex = make_texture(rec, self.model, image, kind, size=size, camera=self.decoder.camera,
                               renderer=self.renderer, colours=colours)
        with _timed(rec.timings, "export"):
            arrays = rec.decoded_arrays
            mesh = MeshData(vertices=arrays.vertices_world[0].astype(np.float64), faces=self.np_decoder.triangles,
                            uvs=tex.atlas.uvs, uv_faces=tex.atlas.uv_faces, units=self.card.units)
            if fmt == "obj":
                return textured_obj(mesh, tex.png())
            normals = arrays.normals_world[0].astype(np.float64)
            return {"mesh.glb": textured_glb(mesh, normals, tex.image)}

    def identity_mesh(self, rec: SetReconstruction) -> MeshData:
        if rec.identity.is_numpy:
            return self.mesh(self.np_decoder.decode(rec.identity))
        import torch

        with torch.no_grad():
            return self.mesh(self.decoder(rec.identity))

    def overlay(self, image: np.ndarray, rec: Reconstruction) -> np.ndarray:
        """The shaded reconstruction composited over the photo, at the photo's resolution, ``(H, W, 3) uint8``
        (:attr:`torch_free`: the CPU raster kernels on the NumPy decode; else torch and the renderer, on first use)."""
        from facerecon.render.overlay import overlay_on_photo

        if self.torch_free:
            lit = np.clip(self.feature_colours(rec).lit, 0.0, 1.0)
            with _timed(rec.timings, "render"):
                return overlay_on_photo(image, rec.decoded_arrays.vertices_cam, self.overlay_triangles_array, lit,
                                        rec.alignment.photo_intrinsics(self.np_decoder.camera))
        import torch

        renderer, triangles = self.renderer, self.overlay_triangles
        colours = torch.from_numpy(self.feature_colours(rec).lit).to(rec.decoded.colors.device)[None]
        with _timed(rec.timings, "render"):
            return overlay_on_photo(
                image, rec.decoded.vertices_cam, triangles,
                colours.clamp(0, 1), rec.alignment.photo_intrinsics(self.np_decoder.camera),
                renderer=renderer,
            )

    def maps(self, rec: Reconstruction) -> FaceMaps:
        """The face's depth and normal maps over the photo pixels it covers, rendered with the JSON's photo camera
        (:mod:`facerecon.render.maps`: depth in model units, normals in camera axes x right, y up, z towards the
        camera; the overlay's triangles)."""
        from facerecon.render.maps import render_maps

        intr, _, _ = rec.photo_camera()
        with _timed(rec.timings, "maps"), self._lock:
            return render_maps(rec.decoded.vertices_cam, rec.decoded.normals_world, self.overlay_triangles, intr,
                               rec.photo_size, self.renderer)

    def map_pngs(self, recs: Sequence[Reconstruction], kinds: Sequence[MapKind] = ("depth", "normals")
                 ) -> dict[MapKind, bytes]:
        """``{kind: PNG}``: the depth and/or normal map of every face in ``recs`` over the whole photo (one raster
        per face for both), the nearest surface winning where faces overlap
        (:func:`facerecon.render.maps.depth_png` / ``normals_png``)."""
        from facerecon.render.maps import composite, depth_png, normals_png

        maps = composite([self.maps(r) for r in recs], recs[0].photo_size)
        with _timed(recs[0].timings, "encode_maps"):
            return {k: depth_png(maps, metres_per_unit(self.card.units)) if k == "depth" else normals_png(maps)
                    for k in kinds}

    def to_json(self, rec: Reconstruction, index: int = 0) -> dict[str, Any]:
        """One face as the API's JSON answers it (:func:`facerecon.report.face_result`: coefficients by name, pose,
        landmarks in photo pixels, the detection's confidences, alignment, timings), with the face model, its
        layout and the photo size; what ``facerecon reconstruct`` writes as ``coefficients.json``."""
        from facerecon.report import face_result

        names = list(self.card.expression_names or [])
        doc = face_result(rec, index, expression_names=names).model_dump(mode="json", exclude_none=True)
        return {"face_model": self.card.name, "layout": self.card.layout.model_dump(),
                "photo_size": list(rec.photo_size), **doc}


def _array(x: Any) -> np.ndarray:
    """A decoded array as NumPy (a tensor is detached and moved to the CPU)."""
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


@functools.cache
def _limit_blas_threads(threads: int) -> None:
    """Cap the BLAS library NumPy links (OpenBLAS) at ``threads`` for the whole process (0: leave its default, one
    per core). Its products (the fit's albedo Gram matrix, the NumPy decode's basis products) otherwise each start a
    thread per core: with two service workers on two cores the threads spin against each other, and two workers
    served fewer photos a second than one (0.90x, default mode, concurrency 2; 1.90x capped)."""
    if threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")


def _cpu_only(settings: Settings) -> bool:
    """Whether ``settings`` run everything on the CPU (the device setting, or ``auto`` with a CPU build of torch),
    without importing torch."""
    return settings.device == "cpu" or (settings.device == "auto" and _cpu_only_torch())


@functools.lru_cache(maxsize=1)
def _cpu_only_torch() -> bool:
    """The installed torch is a CPU build (its version says ``+cpu``), read from its metadata without importing it
    (once: reading the metadata takes about a millisecond): ``device=auto`` then means the CPU."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "+cpu" in version("torch")
    except PackageNotFoundError:
        return True
