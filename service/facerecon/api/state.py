"""What one app instance owns: settings, metrics, the inference pool, the reconstructor once loaded, readiness; and
the warm-up inference that runs before ``/readyz`` turns ready.

:class:`ReconstructorLike` is the whole contract between the HTTP layer and the engine
(:class:`facerecon.pipeline.Reconstructor`; tests inject stand-ins).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import anyio.to_thread
import numpy as np

from facerecon import __version__
from facerecon.api.errors import NotReady
from facerecon.api.guard import MemoryBudget, ShutdownGrace
from facerecon.api.jobs import png_bytes
from facerecon.api.metrics import Metrics
from facerecon.api.schemas import ServiceLimits
from facerecon.api.workers import InferencePool
from facerecon.config import Settings
from facerecon.errors import NoFaceFound
from facerecon.imaging import load_image
from facerecon.warmup import synthetic_face_photo

if TYPE_CHECKING:
    from facerecon.detect import DetectedFace, Which
    from facerecon.export import MeshData, MeshFormat, TextureChoice
    from facerecon.formats import OnMissing
    from facerecon.pipeline import Checkpoint
    from facerecon.render.maps import FaceMaps, MapKind
    from facerecon.results import Mode, Reconstruction, SetReconstruction

log = logging.getLogger("facerecon.api")

#: Retry-After while the models load.
NOT_READY_RETRY_S = 5


@runtime_checkable
class ReconstructorLike(Protocol):
    """What the app needs from :class:`facerecon.pipeline.Reconstructor` (tests inject stand-ins), in the
    pipeline's own types."""

    def detect(self, image: np.ndarray, which: Which = ...) -> list[DetectedFace]: ...

    def reconstruct(self, image: np.ndarray, *, which: Which = ..., refine: bool | None = ...,
                    faces: Sequence[DetectedFace] | None = ..., checkpoint: Checkpoint | None = ...
                    ) -> list[Reconstruction]: ...

    def reconstruct_set(self, images: Sequence[np.ndarray], *, refine: bool | None = ...,
                        checkpoint: Checkpoint | None = ..., on_missing: OnMissing = ...) -> SetReconstruction: ...

    def export(self, rec: Reconstruction, fmt: MeshFormat) -> bytes: ...

    def export_files(self, image: np.ndarray, rec: Reconstruction, fmt: MeshFormat,
                     texture: TextureChoice = ...) -> dict[str, bytes]: ...

    def overlay(self, image: np.ndarray, rec: Reconstruction) -> np.ndarray: ...

    def maps(self, rec: Reconstruction) -> FaceMaps: ...

    def map_pngs(self, recs: Sequence[Reconstruction], kinds: Sequence[MapKind] = ...) -> dict[MapKind, bytes]: ...

    def identity_mesh(self, rec: SetReconstruction) -> MeshData: ...

    def to_json(self, rec: Reconstruction, index: int = ...) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]: ...


ReconstructorSource = ReconstructorLike | Callable[[], ReconstructorLike]


# -- the service state ----------------------------------------------------------------------------------------------
class ServiceState:
    """Everything one app instance owns: settings, metrics, pool, the reconstructor once loaded, readiness."""

    def __init__(self, settings: Settings, source: ReconstructorSource | None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._source = source
        self.pool: InferencePool | None = None
        self.reconstructor: ReconstructorLike | None = None
        self.ready = False
        self.stage = "starting"  # starting -> loading -> warming up -> ready | failed
        self.error: str | None = None
        self.load_ms: float | None = None
        self.warmup_ms: float | None = None
        self.fit_warmup_ms: float | None = None
        self.warming: list[str] = []  # parts still warming up after readiness (``fit``)
        self.face_model: str | None = None
        self.expression_names: list[str] = []
        self.decode_limiter = anyio.CapacityLimiter(max(2, settings.workers))
        self.decode_budget = MemoryBudget(settings.decode_memory_bytes)
        self.grace = ShutdownGrace()
        self._loader: threading.Thread | None = None
        self.metrics.live(self.metrics.ready, lambda: 1.0 if self.ready else 0.0)
        self.metrics.live(self.metrics.decode_bytes, lambda: float(self.decode_budget.used))

    # lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        self.pool = InferencePool(s.workers, s.queue_size)
        pool = self.pool
        self.metrics.bind_pool(lambda: float(pool.waiting), lambda: float(pool.running), lambda: float(pool.admitted))
        log.info("inference pool: %d worker(s), queue %d", s.workers, s.queue_size)
        self._loader = threading.Thread(target=self._load, name="facerecon-load", daemon=True)
        self._loader.start()

    def begin_shutdown(self) -> None:
        """The server stops (SIGTERM): admit nothing more; what is still waiting or running when the grace period
        ends answers 503 ``shutting_down`` (call on the event loop)."""
        log.info("shutting down: no new requests; %.0f s for those in flight", self.settings.graceful_timeout_s)
        if self.pool is not None:
            self.pool.begin_shutdown()
        self.grace.begin(self.settings.graceful_timeout_s)

    def stop(self) -> None:
        self.metrics.close()
        if self.pool is not None:
            self.pool.close(timeout=self.settings.graceful_timeout_s)

    def _load(self) -> None:
        try:
            self.stage = "loading"
            t0 = time.perf_counter()
            source = self._source
            if source is None:
                from facerecon.pipeline import Reconstructor

                rec: ReconstructorLike = Reconstructor(self.settings)
            elif isinstance(source, ReconstructorLike):
                rec = source
            else:
                rec = source()
            self.load_ms = (time.perf_counter() - t0) * 1000.0
            info = rec.info()
            card = info.get("face_model") or {}
            self.face_model = str(card.get("name", "unknown")) if isinstance(card, dict) else str(card)
            self.expression_names = list(card.get("expression_names") or []) if isinstance(card, dict) else []
            self.metrics.set_model({
                "face_model": self.face_model, "device": info.get("device", ""), "renderer": info.get("renderer", ""),
                "default_mode": info.get("default_mode", ""), "version": info.get("version", __version__),
            })
            fit_later = self.settings.warmup and self.settings.warmup_fit_after_ready and _fits_later(rec)
            if self.settings.warmup:
                self.stage = "warming up"
                t0 = time.perf_counter()
                warm_up(rec, self.settings, rec.mode_for(False) if fit_later else None)  # type: ignore[attr-defined]
                self.warmup_ms = (time.perf_counter() - t0) * 1000.0
            self.reconstructor = rec
            if fit_later:
                self.warming = ["fit"]
            self.stage = "ready"
            self.ready = True
            log.info("ready: face model %s (load %.0f ms, warm-up %s%s)", self.face_model, self.load_ms,
                     "off" if self.warmup_ms is None else f"{self.warmup_ms:.0f} ms",
                     "; the fit warms up next" if fit_later else "")
            if fit_later:
                # the default mode's fit (torch, the renderer, the overlay) right after readiness; a request that
                # needs them meanwhile loads the same lazily built parts (under the engine's build lock) and waits
                t0 = time.perf_counter()
                warm_up(rec, self.settings)
                self.fit_warmup_ms = (time.perf_counter() - t0) * 1000.0
                self.warming = []
                log.info("fit warm-up done (%.0f ms)", self.fit_warmup_ms)
        except Exception as exc:
            self.ready = False
            self.stage = "failed"
            # The class name only: messages carry absolute paths of the host (models folder, ...); the log has all.
            self.error = type(exc).__name__
            log.exception("start-up failed; the service stays not ready")

    def require_ready(self) -> ReconstructorLike:
        rec = self.reconstructor
        if not self.ready or rec is None:
            raise self.not_ready()
        return rec

    def not_ready(self) -> NotReady:
        if self.stage == "failed":
            return NotReady(f"start-up failed ({self.error}; the server log says why)", retry_after=60,
                            stage=self.stage)
        return NotReady(f"the service is starting ({self.stage})", retry_after=NOT_READY_RETRY_S, stage=self.stage)

    def limits(self) -> ServiceLimits:
        s = self.settings
        return ServiceLimits(
            max_upload_bytes=s.max_upload_bytes, max_request_bytes=s.max_request_bytes,
            max_image_pixels=s.max_image_pixels, max_decoded_pixels=s.max_decoded_pixels,
            max_set_decoded_pixels=s.max_set_decoded_pixels, max_set_images=s.max_set_images,
            max_faces=s.max_faces, workers=s.workers, queue_size=s.queue_size,
            request_timeout_s=s.request_timeout_s,
        )


# -- warm-up --------------------------------------------------------------------------------------------------------
def _fits_later(rec: ReconstructorLike) -> bool:
    """Whether ``rec`` is the engine with an R-Net and a default mode that fits (its R-Net path can warm first)."""
    from facerecon.pipeline import Reconstructor

    return isinstance(rec, Reconstructor) and rec.rnet is not None and "fit" in rec.mode_for()


def warm_up(rec: ReconstructorLike, settings: Settings, mode: Mode | None = None) -> None:
    """Before ``/readyz`` turns ready: the engine runs each stage of ``mode`` (default: its default mode) once,
    cheaply (:func:`facerecon.warmup.warm_up_engine`: a short fit, not a whole one; no torch for the R-Net alone),
    on ``settings.warmup_image`` or a synthetic face photo; a stand-in reconstructor runs one whole
    inference through what it has (detection, estimate, export, overlay, JSON)."""
    from facerecon.pipeline import Reconstructor

    photo = None
    if settings.warmup_image is not None:
        photo = load_image(settings.warmup_image, max_bytes=settings.max_upload_bytes,
                           max_pixels=settings.max_image_pixels)
    if isinstance(rec, Reconstructor):
        from facerecon.warmup import warm_up_engine

        timings = warm_up_engine(rec, photo, mode)
        log.info("warm-up (mode %s): %s", mode or rec.mode_for(),
                 ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items()))
        return
    renderer = getattr(rec, "renderer", None)
    if renderer is not None and hasattr(renderer, "warmup"):
        renderer.warmup()
    if photo is None:  # a stand-in reconstructor: exercise what it has
        photo = (synthetic_face_photo(rec) if hasattr(rec, "decoder") and hasattr(rec, "overlay_triangles")
                 else np.full((64, 64, 3), 128, np.uint8))
    try:
        recs = rec.reconstruct(photo)
    except NoFaceFound:
        log.warning("warm-up: no face detected in the warm-up photo; only detection was warmed up")
        return
    rec.export(recs[0], "obj")
    png_bytes(rec.overlay(photo, recs[0]))
    rec.to_json(recs[0])
