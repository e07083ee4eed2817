"""The HTTP app: a thin shell over :class:`facerecon.pipeline.Reconstructor`, laid out as FastAPI's "bigger
applications": :mod:`~facerecon.api.forms` (reading a request: streaming multipart, limits, options, negotiation),
:mod:`~facerecon.api.jobs` (what runs on a worker: pipeline + output encoding), :mod:`~facerecon.api.state` (the
instance's settings, pool, reconstructor, readiness, warm-up; the engine contract), :mod:`~facerecon.api.routes`
(the endpoints), :mod:`~facerecon.api.errors`, :mod:`~facerecon.api.metrics`; this module composes them.

``create_app(settings, reconstructor)`` builds a FastAPI app whose lifespan starts the inference pool and loads the
reconstructor in a background thread, then runs one warm-up inference, so the process answers ``/healthz`` at
once and ``/readyz`` turns 200 only when a request would be served at full speed.

A request's path: the multipart body is read **as it streams in**, with the byte limits enforced per file while
reading (and the whole body rejected up front from ``Content-Length``); the options are validated by a pydantic
model; the photo is decoded on a small thread pool (:func:`facerecon.imaging.decode_image`: format, pixel limit,
EXIF); the reconstruction and the output encoding run as one job on the bounded
:class:`~facerecon.api.workers.InferencePool`; the handler awaits it without blocking the event loop. Every error
is a typed exception mapped to the one JSON shape by :mod:`facerecon.api.errors`.

Bounds (issue #19): a request gets its inference slot before its body is read (503 at once otherwise); the body is
read within ``max_request_bytes``; photos are decoded downscaled to ``max_decoded_pixels`` (a set shares
``max_set_decoded_pixels``) under a memory budget for all decodes in flight (``decode_memory_bytes``); a job whose
client left, whose deadline passed or whose shutdown grace ended is dropped from the queue or stopped at its next
stage boundary (:mod:`~facerecon.api.guard`); ``faces=all`` reconstructs at most ``max_faces``. Connections are
bounded by :mod:`~facerecon.api.http` (header and keep-alive timeouts, a connection cap); ``allowed_hosts`` and
``cors_origins`` by :mod:`~facerecon.api.hosts`.

Output negotiation (``POST /v1/reconstruct``): the ``format`` form field wins, else the ``Accept`` header
(``model/obj``, ``model/gltf-binary``, ``application/ply``, ``application/json``, ``image/png``; ``*/*`` or none
gives the default, OBJ); an ``Accept`` naming none of them is 406. ``faces=all`` with a mesh format returns the
largest face's mesh and says how many faces were detected in ``X-Faces-Detected`` (a mesh file holds one face;
use JSON with ``include=mesh`` for every face's mesh).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from facerecon import __version__
from facerecon.api.errors import install_error_handlers
from facerecon.api.hosts import install_host_checks
from facerecon.api.metrics import MetricsMiddleware
from facerecon.api.page import docs_router, page_router
from facerecon.api.routes import build_router
from facerecon.api.state import ReconstructorLike, ReconstructorSource, ServiceState, synthetic_face_photo
from facerecon.config import Settings, get_settings

__all__ = ["ReconstructorLike", "ServiceState", "create_app", "synthetic_face_photo"]

log = logging.getLogger("facerecon.api")

# -- the factory ----------------------------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, reconstructor: ReconstructorSource | None = None) -> FastAPI:
    """The FastAPI app.

    Args:
        settings: default :func:`facerecon.config.get_settings` (``FACERECON_*`` environment).
        reconstructor: a ready :class:`~facerecon.pipeline.Reconstructor` (or stand-in), or a zero-argument
            factory that builds one (called on the loader thread; ``/readyz`` is 503 until it returns and the
            warm-up is done). Default: ``Reconstructor(settings)``.
    """
    settings = settings or get_settings()
    state = ServiceState(settings, reconstructor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.stop)

    app = FastAPI(
        title="facerecon",
        version=__version__,
        summary="3D face reconstruction from photos (Deng et al. 2019, Deep3DFaceRecon)",
        description=(
            "Upload a photo, get the 3D face: a mesh (OBJ, glTF binary, PLY), the model coefficients by name, "
            "68 landmarks, the head pose and an overlay. Every error is `{\"error\": {\"code\", \"message\", "
            "\"details\"}}`."),
        lifespan=lifespan,
        default_response_class=JSONResponse,
        docs_url=None, redoc_url=None, openapi_url=None,  # served by docs_router, with local assets
    )
    app.state.service = state
    app.include_router(build_router(settings))
    app.include_router(docs_router())
    app.include_router(page_router())
    install_error_handlers(app)
    install_host_checks(app, settings)  # allowed hosts and CORS, inside the metrics
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # added last = outermost
    return app
