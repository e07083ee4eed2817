"""The HTTP app: a thin shell over :class:`facerecon.pipeline.Reconstructor`.

``create_app(settings, reconstructor)`` builds a FastAPI app whose lifespan starts the inference pool and loads the
reconstructor in a background thread, then runs one warm-up inference, so the process answers ``/healthz`` at
once and ``/readyz`` turns 200 only when a request would be served at full speed.

A request's path: the multipart body is read **as it streams in**, with the byte limits enforced per file while
reading (and the whole body rejected up front from ``Content-Length``); the options are validated by a pydantic
model; the photo is decoded on a small thread pool (:func:`facerecon.imaging.decode_image`: format, pixel limit,
EXIF); the reconstruction and the output encoding run as one job on the bounded
:class:`~facerecon.api.workers.InferencePool`; the handler awaits it without blocking the event loop. Every error
is a typed exception mapped to the one JSON shape by :mod:`facerecon.api.errors`.

Output negotiation (``POST /v1/reconstruct``): the ``format`` form field wins, else the ``Accept`` header
(``model/obj``, ``model/gltf-binary``, ``application/ply``, ``application/json``, ``image/png``; ``*/*`` or none
gives the default, OBJ); an ``Accept`` naming none of them is 406. ``faces=all`` with a mesh format returns the
largest face's mesh and says how many faces were detected in ``X-Faces-Detected`` (a mesh file holds one face;
use JSON with ``include=mesh`` for every face's mesh).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.to_thread
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import Response

from facerecon import __version__
from facerecon.api.errors import (
    MalformedRequest,
    NotAcceptable,
    NotReady,
    RequestTimedOut,
    RequestValidationFailed,
    UnsupportedMediaType,
    UploadTimedOut,
    install_error_handlers,
    validation_details,
)
from facerecon.api.metrics import Metrics, MetricsMiddleware
from facerecon.api.page import page_router
from facerecon.api.schemas import (
    MESH_FORMATS,
    DetectionOut,
    EncodedFile,
    ErrorResponse,
    FaceResult,
    HealthResponse,
    IdentityCoefficients,
    ModelsResponse,
    ReadyResponse,
    ReconstructOptions,
    ReconstructResponse,
    ServiceLimits,
    SetItem,
    SetOptions,
    SetResponse,
)
from facerecon.api.workers import InferencePool
from facerecon.config import Settings, get_settings
from facerecon.errors import FaceReconError, ImageTooLarge, InputError, NoFaceFound, TooManyImages
from facerecon.export import MEDIA_TYPES, export_mesh
from facerecon.imaging import decode_image, load_image

__all__ = ["ReconstructorLike", "ServiceState", "create_app", "synthetic_face_photo"]

log = logging.getLogger("facerecon.api")

#: Room for multipart headers, boundaries and the option fields beyond the image bytes.
FORM_OVERHEAD_BYTES = 256 * 1024
#: Largest non-file form field (the options are a few bytes).
MAX_FIELD_BYTES = 16 * 1024
MAX_FIELDS = 32
#: After rejecting an upload early, read and discard at most this much of the rest, nothing kept (a bounded
#: "lingering close", as nginx does): closing a socket with unread data makes the kernel send a reset, and a client
#: still sending may then lose the error response. A few socket buffers' worth is enough.
DRAIN_MAX_BYTES = 16 * 1024 * 1024
DRAIN_MAX_SECONDS = 3.0
#: Retry-After while the models load.
NOT_READY_RETRY_S = 5

MEDIA_BY_FORMAT: dict[str, str] = {**MEDIA_TYPES, "json": "application/json", "png": "image/png"}
_ACCEPT_ALIASES: dict[str, str] = {
    "model/obj": "obj", "text/plain": "obj", "model/gltf-binary": "glb", "application/ply": "ply",
    "model/ply": "ply", "application/json": "json", "image/png": "png",
}
_WILDCARD_DEFAULTS: dict[str, str] = {"model/*": "obj", "image/*": "png", "application/*": "json"}

M = TypeVar("M", bound=BaseModel)


@runtime_checkable
class ReconstructorLike(Protocol):
    """What the app needs from :class:`facerecon.pipeline.Reconstructor` (tests inject fakes)."""

    def reconstruct(self, image: np.ndarray, *, which: Any = ..., refine: bool | None = ...) -> list[Any]: ...

    def reconstruct_set(self, images: Sequence[np.ndarray], *, refine: bool | None = ...) -> Any: ...

    def export(self, rec: Any, fmt: Any) -> bytes: ...

    def export_files(self, image: np.ndarray, rec: Any, fmt: Any, texture: Any = ...) -> dict[str, bytes]: ...

    def overlay(self, image: np.ndarray, rec: Any) -> np.ndarray: ...

    def identity_mesh(self, rec: Any) -> Any: ...

    def to_json(self, rec: Any) -> dict[str, Any]: ...

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
        self.face_model: str | None = None
        self.expression_names: list[str] = []
        self.decode_limiter = anyio.CapacityLimiter(max(2, settings.workers))
        self._loader: threading.Thread | None = None
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    # lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        self.pool = InferencePool(s.workers, s.queue_size)
        pool = self.pool
        self.metrics.bind_pool(lambda: float(pool.waiting), lambda: float(pool.running))
        log.info("inference pool: %d worker(s), queue %d", s.workers, s.queue_size)
        self._loader = threading.Thread(target=self._load, name="facerecon-load", daemon=True)
        self._loader.start()

    def stop(self) -> None:
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
            if self.settings.warmup:
                self.stage = "warming up"
                t0 = time.perf_counter()
                warm_up(rec, self.settings)
                self.warmup_ms = (time.perf_counter() - t0) * 1000.0
            self.reconstructor = rec
            self.stage = "ready"
            self.ready = True
            log.info("ready: face model %s (load %.0f ms, warm-up %s)", self.face_model, self.load_ms,
                     "off" if self.warmup_ms is None else f"{self.warmup_ms:.0f} ms")
        except Exception as exc:
            self.stage = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed; the service stays not ready")

    def require_ready(self) -> ReconstructorLike:
        rec = self.reconstructor
        if not self.ready or rec is None:
            raise self.not_ready()
        return rec

    def not_ready(self) -> NotReady:
        if self.stage == "failed":
            return NotReady(f"start-up failed: {self.error}", retry_after=60, stage=self.stage)
        return NotReady(f"the service is starting ({self.stage})", retry_after=NOT_READY_RETRY_S, stage=self.stage)

    def limits(self) -> ServiceLimits:
        s = self.settings
        return ServiceLimits(
            max_upload_bytes=s.max_upload_bytes, max_image_pixels=s.max_image_pixels,
            max_set_images=s.max_set_images, workers=s.workers, queue_size=s.queue_size,
            request_timeout_s=s.request_timeout_s,
        )


# -- warm-up --------------------------------------------------------------------------------------------------------
def synthetic_face_photo(rec: Any, size: int = 320) -> np.ndarray:
    """A photo the detector finds a face in, made from the face model alone: the mean face, lit from the front and
    above (plain ambient light is too flat for a HOG detector), over a dark grey background, ``(size, size, 3)``
    uint8. Needs a real :class:`~facerecon.pipeline.Reconstructor` (its decoder and renderer)."""
    import torch

    from facerecon.coefficients import Coefficients
    from facerecon.geometry import Intrinsics
    from facerecon.render.overlay import overlay_on_photo

    c = Coefficients.zeros(rec.model.layout, 1, rec.device)
    gamma = c.gamma.clone()
    for ch in range(3):  # SH bands 1 (y) and 2 (z): light from above and in front
        gamma[0, ch * 9 + 2] = 0.3
        gamma[0, ch * 9 + 3] = 0.3
    c = Coefficients(c.id, c.exp, c.tex, c.angle, gamma, c.trans)
    with torch.no_grad():
        decoded = rec.decoder(c)
    f = rec.decoder.camera.focal * size / rec.decoder.camera.size * 0.6
    intrinsics = Intrinsics(f, f, size / 2, size / 2, size, size)
    background = np.full((size, size, 3), 60, np.uint8)
    return overlay_on_photo(background, decoded.vertices_cam, rec.overlay_triangles, decoded.colors.clamp(0, 1),
                            intrinsics, renderer=rec.renderer)


def warm_up(rec: ReconstructorLike, settings: Settings) -> None:
    """One inference through every stage a request uses (detection, alignment, fitting/R-Net, decoding, export,
    overlay), on ``settings.warmup_image`` or :func:`synthetic_face_photo`."""
    renderer = getattr(rec, "renderer", None)
    if renderer is not None and hasattr(renderer, "warmup"):
        renderer.warmup()
    if settings.warmup_image is not None:
        photo = load_image(settings.warmup_image, max_bytes=settings.max_upload_bytes,
                           max_pixels=settings.max_image_pixels)
    elif hasattr(rec, "decoder") and hasattr(rec, "overlay_triangles"):
        photo = synthetic_face_photo(rec)
    else:  # a stand-in reconstructor: exercise what it has
        photo = np.full((64, 64, 3), 128, np.uint8)
    try:
        recs = rec.reconstruct(photo)
    except NoFaceFound:
        log.warning("warm-up: no face detected in the warm-up photo; only detection was warmed up")
        return
    rec.export(recs[0], "obj")
    _png_bytes(rec.overlay(photo, recs[0]))
    rec.to_json(recs[0])


# -- reading the upload ---------------------------------------------------------------------------------------------
@dataclass
class Upload:
    """One uploaded file, held in memory (its size is bounded while it streams in)."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Form:
    files: list[Upload]
    fields: dict[str, list[str]]


def _field_error(loc: str, msg: str, kind: str) -> dict[str, Any]:
    return {"errors": [{"loc": ["form", loc], "msg": msg, "type": kind}]}


class _MultipartCollector:
    """python-multipart callbacks that keep the files of one field and the small text fields, enforcing
    ``max_files`` (``too_many(n)`` builds the error) and ``max_file_bytes`` per file as bytes arrive."""

    def __init__(self, file_field: str, max_files: int, max_file_bytes: int,
                 too_many: Callable[[int], FaceReconError]) -> None:
        self.file_field = file_field
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.too_many = too_many
        self.files: list[Upload] = []
        self.fields: dict[str, list[str]] = {}
        self._n_fields = 0
        self._part: Upload | None = None
        self._is_file = False
        self._headers: dict[bytes, bytes] = {}
        self._hname = bytearray()
        self._hvalue = bytearray()

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }

    def _on_part_begin(self) -> None:
        self._part = None
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._hname).lower()] = bytes(self._hvalue)
        self._hname.clear()
        self._hvalue.clear()

    def _on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in opts:
            raise MalformedRequest("a multipart part has no name (Content-Disposition: form-data; name=...)")
        name = opts[b"name"].decode("utf-8", "replace")
        filename = opts[b"filename"].decode("utf-8", "replace") if b"filename" in opts else None
        ctype = self._headers.get(b"content-type")
        self._is_file = name == self.file_field or filename is not None
        if self._is_file:
            if name != self.file_field:
                raise RequestValidationFailed(
                    f"unexpected file field {name!r}; send photos as {self.file_field!r}",
                    **_field_error(name, f"unexpected file; photos go in {self.file_field!r}", "extra_forbidden"),
                )
            if len(self.files) + 1 > self.max_files:
                raise self.too_many(len(self.files) + 1)
        else:
            self._n_fields += 1
            if self._n_fields > MAX_FIELDS:
                raise RequestValidationFailed(f"more than {MAX_FIELDS} form fields", **_field_error(
                    name, "too many form fields", "too_many_fields"))
        self._part = Upload(name=name, filename=filename, content_type=ctype.decode("latin-1") if ctype else None)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None:
            return
        n = len(part.data) + (end - start)
        if self._is_file and n > self.max_file_bytes:
            raise ImageTooLarge(
                f"image {len(self.files) + 1} is over the limit of {self.max_file_bytes} bytes",
                max_bytes=self.max_file_bytes, index=len(self.files), check="upload stream",
            )
        if not self._is_file and n > MAX_FIELD_BYTES:
            raise RequestValidationFailed(f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes",
                                          **_field_error(part.name, "value too long", "string_too_long"))
        part.data += data[start:end]

    def _on_part_end(self) -> None:
        part = self._part
        if part is None:
            return
        if self._is_file:
            self.files.append(part)
        else:
            self.fields.setdefault(part.name, []).append(part.data.decode("utf-8", "replace"))
        self._part = None


class _Body:
    """The request body as raw ASGI messages (not ``request.stream()``, so it can be drained after an error)."""

    def __init__(self, request: Request) -> None:
        self._receive = request.receive
        self.done = False
        self.received = 0

    async def chunk(self) -> bytes | None:
        """The next piece of the body, ``None`` at its end."""
        while not self.done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.done = True
                raise MalformedRequest("the client disconnected before the upload was complete")
            body: bytes = message.get("body", b"")
            self.done = not message.get("more_body", False)
            self.received += len(body)
            if body:
                return body
        return None

    async def drain(self) -> None:
        """Read and discard the rest, bounded in bytes and time (the error response then reaches the client)."""
        limit = self.received + DRAIN_MAX_BYTES
        with anyio.move_on_after(DRAIN_MAX_SECONDS):
            try:
                while not self.done and self.received < limit:
                    await self.chunk()
            except FaceReconError:
                pass


async def read_form(request: Request, *, file_field: str, max_files: int, max_file_bytes: int,
                    too_many: Callable[[int], FaceReconError]) -> Form:
    """Stream a ``multipart/form-data`` body into memory with every limit enforced before it is exceeded.

    Raises:
        UnsupportedMediaType: not multipart/form-data.
        MalformedRequest: no boundary, a broken body, a client that went away.
        ImageTooLarge: ``Content-Length`` above ``max_files * max_file_bytes`` plus the form overhead (before
            reading anything), or a file past ``max_file_bytes`` while streaming.
        RequestValidationFailed / ``too_many(n)``: unexpected files, too many files or fields.
    """
    mtype, params = parse_options_header(request.headers.get("content-type", ""))
    if mtype != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"send the photo as multipart/form-data (field {file_field!r}), not {mtype.decode('latin-1') or 'nothing'}",
            expected="multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("multipart/form-data without a boundary parameter")
    max_body = max_files * max_file_bytes + FORM_OVERHEAD_BYTES
    body = _Body(request)
    try:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise ImageTooLarge(
                f"the request body is {int(declared)} bytes; the limit is {max_body} "
                f"({max_files} x {max_file_bytes} bytes of images plus {FORM_OVERHEAD_BYTES} for the form)",
                n_bytes=int(declared), max_body_bytes=max_body, max_bytes=max_file_bytes, check="content-length",
            )
        collector = _MultipartCollector(file_field, max_files, max_file_bytes, too_many)
        try:
            parser = MultipartParser(boundary, collector.callbacks())
        except FormParserError as exc:
            raise MalformedRequest(f"bad multipart boundary: {exc}") from exc
        while (chunk := await body.chunk()) is not None:
            if body.received > max_body:
                raise ImageTooLarge(f"the request body is over the limit of {max_body} bytes",
                                    max_body_bytes=max_body, max_bytes=max_file_bytes, check="body stream")
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise MalformedRequest(f"malformed multipart body: {exc}") from exc
        parser.finalize()
    except FaceReconError:
        if not body.done and request.headers.get("expect", "").lower() != "100-continue":
            await body.drain()
        raise
    return Form(files=collector.files, fields=collector.fields)


def parse_options(model: type[M], fields: dict[str, list[str]]) -> M:
    """Validate the form's text fields with ``model`` (repeated fields arrive as lists); errors are 422."""
    data: dict[str, Any] = {k: v[0] if len(v) == 1 else v for k, v in fields.items()}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = validation_details(list(exc.errors()))
        for e in details["errors"]:
            e["loc"] = ["form", *e["loc"]]
        raise RequestValidationFailed("invalid form fields", **details) from None


def negotiate(accept: str | None, allowed: Sequence[str], default: str) -> str:
    """The output format from an ``Accept`` header (q-values honoured, ties in header order)."""
    if not accept or not accept.strip():
        return default
    ranked: list[tuple[float, int, str]] = []
    for i, item in enumerate(accept.split(",")):
        parts = [p.strip() for p in item.split(";")]
        mtype = parts[0].lower()
        q = 1.0
        for p in parts[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if mtype and q > 0:
            ranked.append((-q, i, mtype))
    for _, _, mtype in sorted(ranked):
        fmt = _ACCEPT_ALIASES.get(mtype)
        if fmt in allowed:
            return fmt
        if mtype == "*/*":
            return default
        wild = _WILDCARD_DEFAULTS.get(mtype)
        if wild in allowed:
            return wild
    raise NotAcceptable(
        f"none of the types in Accept can be produced; use one of "
        f"{', '.join(MEDIA_BY_FORMAT[f] for f in allowed)} (or the `format` form field)",
        accept=accept[:200], available=[MEDIA_BY_FORMAT[f] for f in allowed],
    )


# -- the jobs (run on a worker thread) ------------------------------------------------------------------------------
@dataclass
class Output:
    """A finished response body, built on the worker."""

    body: bytes
    media_type: str
    headers: dict[str, str]
    timings: dict[str, float]


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items())


def _merge_face_timings(recs: Sequence[Any]) -> dict[str, float]:
    """Per-stage totals over the faces of one photo (detection ran once, every face copies its time)."""
    out: dict[str, float] = {}
    for i, r in enumerate(recs):
        for k, v in r.timings.items():
            if k == "detect" and i > 0:
                continue
            out[k] = out.get(k, 0.0) + float(v)
    return out


def _expressions(names: list[str], exp: list[float]) -> dict[str, float] | None:
    return dict(zip(names, exp, strict=True)) if names and len(names) == len(exp) else None


def _face_result(rec: ReconstructorLike, r: Any, index: int, image: np.ndarray, opts: ReconstructOptions,
                 names: list[str]) -> FaceResult:
    mesh = overlay = None
    if "mesh" in opts.include:
        mesh = EncodedFile.of(rec.export(r, opts.mesh_format), opts.mesh_format, MEDIA_BY_FORMAT[opts.mesh_format])
    if "overlay" in opts.include:
        overlay = EncodedFile.of(_png_bytes(rec.overlay(image, r)), "png", "image/png")
    d = rec.to_json(r)
    return FaceResult(
        index=index, mode=d["mode"], box=d["box"], score=float(getattr(r.face, "score", 0.0)),
        detection=DetectionOut.of(d["detection"]),
        coefficients=d["coefficients"], expressions=_expressions(names, d["coefficients"]["exp"]),
        pose_degrees=d["pose_degrees"], landmarks68=d["landmarks68"], detected_landmarks68=d["detected_landmarks68"],
        landmark_error_crop_px=d["landmark_error_crop_px"], alignment=d["alignment"],
        timings_ms={k: round(v, 2) for k, v in d["timings_ms"].items()}, mesh=mesh, overlay=overlay,
    )


def reconstruct_job(rec: ReconstructorLike, image: np.ndarray, opts: ReconstructOptions, fmt: str,
                    timings: dict[str, float], submitted: float, names: list[str]) -> Output:
    """One photo -> the chosen output (``timings`` holds the request's stages so far)."""
    timings["queue"] = (time.perf_counter() - submitted) * 1000.0
    headers: dict[str, str] = {}
    media_type = MEDIA_BY_FORMAT[fmt]
    if fmt in MESH_FORMATS:
        if opts.faces == "all":
            detect = getattr(rec, "detect", None)
            if detect is not None:
                t0 = time.perf_counter()
                headers["X-Faces-Detected"] = str(len(detect(image, "all")))
                timings["detect_all"] = (time.perf_counter() - t0) * 1000.0
        recs = rec.reconstruct(image, which="largest", refine=opts.refine)
        files = rec.export_files(image, recs[0], fmt, opts.texture)  # type: ignore[arg-type]
        if len(files) > 1:  # a textured OBJ bundle
            from facerecon.export import to_zip

            body, media_type, name = to_zip(files), "application/zip", "face.zip"
        else:
            body, name = next(iter(files.values())), f"face.{fmt}"
        headers["Content-Disposition"] = f'inline; filename="{name}"'
        timings.update(_merge_face_timings(recs))
    elif fmt == "png":
        recs = rec.reconstruct(image, which=opts.faces, refine=opts.refine)
        out = image
        for r in recs:
            out = rec.overlay(out, r)
        timings.update(_merge_face_timings(recs))
        t0 = time.perf_counter()
        body = _png_bytes(out)
        timings["encode"] = (time.perf_counter() - t0) * 1000.0
    else:
        recs = rec.reconstruct(image, which=opts.faces, refine=opts.refine)
        faces = [_face_result(rec, r, i, image, opts, names) for i, r in enumerate(recs)]
        timings.update(_merge_face_timings(recs))
        first = rec.to_json(recs[0])
        t0 = time.perf_counter()
        response = ReconstructResponse(
            face_model=first["face_model"], layout=first["layout"], photo_size=[image.shape[1], image.shape[0]],
            face_count=len(faces), faces=faces, timings_ms={k: round(v, 2) for k, v in timings.items()},
        )
        body = response.model_dump_json().encode()
        timings["encode"] = (time.perf_counter() - t0) * 1000.0
    headers["X-Face-Count"] = str(len(recs))
    headers["X-Reconstruction-Mode"] = str(recs[0].mode)
    return Output(body=body, media_type=media_type, headers=headers, timings=timings)


def reconstruct_set_job(rec: ReconstructorLike, images: list[np.ndarray], opts: SetOptions, fmt: str,
                        timings: dict[str, float], submitted: float, names: list[str]) -> Output:
    """A set of photos of one person -> JSON or the identity mesh."""
    timings["queue"] = (time.perf_counter() - submitted) * 1000.0
    result = rec.reconstruct_set(images, refine=opts.refine)
    timings.update({k: float(v) for k, v in result.timings.items()})
    mode = str(result.items[0].mode) if result.items else "fit"
    headers = {"X-Face-Count": str(len(result.items)), "X-Reconstruction-Mode": mode}
    mesh_fmt = fmt if fmt in MESH_FORMATS else opts.mesh_format
    mesh: bytes | None = None
    if fmt in MESH_FORMATS or "mesh" in opts.include:
        t0 = time.perf_counter()
        mesh = export_mesh(rec.identity_mesh(result), mesh_fmt)  # type: ignore[arg-type]
        timings["export"] = (time.perf_counter() - t0) * 1000.0
    if fmt in MESH_FORMATS:
        assert mesh is not None
        headers["Content-Disposition"] = f'inline; filename="identity.{fmt}"'
        return Output(body=mesh, media_type=MEDIA_BY_FORMAT[fmt], headers=headers, timings=timings)
    items = []
    for i, (image, r) in enumerate(zip(images, result.items, strict=True)):
        overlay = None
        if "overlay" in opts.include:
            t0 = time.perf_counter()
            overlay = EncodedFile.of(_png_bytes(rec.overlay(image, r)), "png", "image/png")
            timings["render"] = timings.get("render", 0.0) + (time.perf_counter() - t0) * 1000.0
        d = rec.to_json(r)
        c = d["coefficients"]
        items.append(SetItem(
            index=i, mode=d["mode"], box=d["box"], detection=DetectionOut.of(d["detection"]),
            pose_degrees=d["pose_degrees"], angle=c["angle"],
            expression=c["exp"], expressions=_expressions(names, c["exp"]), lighting=c["gamma"],
            translation=c["trans"], landmarks68=d["landmarks68"], landmark_error_crop_px=d["landmark_error_crop_px"],
            alignment=d["alignment"], photo_size=d["photo_size"], overlay=overlay,
        ))
    first = rec.to_json(result.items[0])
    ident = result.identity.to_dict(0)
    t0 = time.perf_counter()
    response = SetResponse(
        face_model=first["face_model"], layout=first["layout"], mode=mode, aggregation=result.aggregation,
        image_count=len(items), identity=IdentityCoefficients(id=ident["id"], tex=ident["tex"]), items=items,
        identity_mesh=None if mesh is None else EncodedFile.of(mesh, mesh_fmt, MEDIA_BY_FORMAT[mesh_fmt]),
        timings_ms={k: round(v, 2) for k, v in timings.items()},
    )
    body = response.model_dump_json().encode()
    timings["encode"] = (time.perf_counter() - t0) * 1000.0
    return Output(body=body, media_type="application/json", headers=headers, timings=timings)


# -- routes ---------------------------------------------------------------------------------------------------------
def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "`corrupt_image` (truncated or broken file), `malformed_request` (broken multipart)",
        406: "`not_acceptable`: the Accept header names no available output",
        408: "`upload_timeout`: the upload did not finish within the request deadline",
        413: "`image_too_large`: too many bytes (per file or in all) or too many pixels",
        415: "`not_an_image` (unsupported or non-image file) or `unsupported_media_type` (body not multipart)",
        422: "`no_face`, `too_many_images`, `validation_error` (missing/unknown/invalid fields)",
        503: "`overloaded` (every worker busy, queue full) or `not_ready`; retry after `Retry-After` seconds",
        504: "`timeout`: the request took longer than the service's deadline",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for c in codes:
        out[c] = {"model": ErrorResponse, "description": text[c]}
        if c == 503:
            out[c]["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    return out


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_RESULT_HEADERS = {
    "X-Face-Count": {"description": "faces in this response", "schema": {"type": "integer"}},
    "X-Reconstruction-Mode": {"description": "`rnet`, `rnet+fit` or `fit`", "schema": {"type": "string"}},
    "Server-Timing": {"description": "milliseconds per stage (`name;dur=ms`, ...)", "schema": {"type": "string"}},
}


def _multipart_body(options: type[BaseModel], file_field: str, many: int | None, description: str
                    ) -> dict[str, Any]:
    """OpenAPI requestBody for our hand-parsed multipart forms (the file field plus the options model)."""
    schema = options.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    file_schema: dict[str, Any] = (
        {**binary, "description": description} if many is None
        else {"type": "array", "items": binary, "minItems": 1, "maxItems": many, "description": description})
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [file_field],
        "properties": {file_field: file_schema, **schema.get("properties", {})},
    }}}}}


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", response_model=HealthResponse, tags=["service"],
                summary="Liveness: 200 while the process runs")
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @router.get("/readyz", response_model=ReadyResponse, tags=["service"], responses=_error_responses(503),
                summary="Readiness: 200 once models are loaded and warmed up, else 503 `not_ready`")
    async def readyz(request: Request) -> ReadyResponse:
        state = _state(request)
        if not state.ready:
            raise state.not_ready()
        return ReadyResponse(ready=True, face_model=state.face_model, load_ms=state.load_ms,
                             warmup_ms=state.warmup_ms)

    @router.get("/metrics", tags=["service"], summary="Prometheus metrics (text format)",
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(request: Request) -> Response:
        body, ctype = _state(request).metrics.render()
        return Response(body, media_type=ctype)

    @router.get("/v1/models", response_model=ModelsResponse, tags=["models"], responses=_error_responses(503),
                summary="The loaded face model's card, the device, the renderer and the R-Net status")
    async def models(request: Request) -> ModelsResponse:
        state = _state(request)
        info = state.require_ready().info()
        return ModelsResponse(**info, limits=state.limits())

    @router.post(
        "/v1/reconstruct", tags=["reconstruction"], response_model=ReconstructResponse,
        summary="Reconstruct the face(s) of one photo",
        description=(
            "Multipart form with one file `image` (JPEG, PNG, WebP, BMP, TIFF, GIF, PPM). The output is chosen by "
            "the `format` field, else by `Accept`; default OBJ. `faces=all` returns every face in JSON and draws "
            "every face in PNG; mesh formats hold the largest face (`X-Faces-Detected` gives the count)."),
        responses={
            200: {"description": "the mesh, the JSON result or the overlay PNG", "headers": {
                **_RESULT_HEADERS,
                "X-Faces-Detected": {"description": "faces detected, with `faces=all` and a mesh format",
                                     "schema": {"type": "integer"}}},
                  "content": {MEDIA_BY_FORMAT[f]: _BINARY for f in ("obj", "glb", "ply", "png")}},
            **_error_responses(400, 406, 408, 413, 415, 422, 503, 504),
        },
        openapi_extra=_multipart_body(ReconstructOptions, "image", None, "the photo"),
    )
    async def reconstruct(request: Request) -> Response:
        state = _state(request)
        rec = state.require_ready()
        s = state.settings
        t_start = time.perf_counter()
        deadline = t_start + s.request_timeout_s
        timings: dict[str, float] = {}
        form = await _read(request, deadline, file_field="image", max_files=1, max_file_bytes=s.max_upload_bytes,
                           too_many=lambda n: RequestValidationFailed(
                               "send exactly one photo in `image` (use /v1/reconstruct/set for several)",
                               **_field_error("image", "exactly one file expected", "too_many_files")))
        timings["read"] = (time.perf_counter() - t_start) * 1000.0
        opts = parse_options(ReconstructOptions, form.fields)
        fmt = opts.format or negotiate(request.headers.get("accept"), ("obj", "glb", "ply", "json", "png"), "obj")
        if opts.texture != "none" and fmt not in ("obj", "glb"):
            raise RequestValidationFailed(
                f"texture={opts.texture} needs format=obj or glb, not {fmt}",
                **_field_error("texture", "a texture needs the obj or glb format", "texture_format"))
        if not form.files:
            raise RequestValidationFailed("the photo is missing: send it as the multipart file field `image`",
                                          **_field_error("image", "field required", "missing"))
        image = await _decode(state, form.files[0], deadline, timings)
        submitted = time.perf_counter()
        result = await state.pool.run(  # type: ignore[union-attr]
            lambda: reconstruct_job(rec, image, opts, fmt, timings, submitted, state.expression_names),
            timeout=max(0.001, deadline - time.perf_counter()),
        )
        return _respond(state, result.value, t_start)

    @router.post(
        "/v1/reconstruct/set", tags=["reconstruction"], response_model=SetResponse,
        summary="One identity from several photos of one person",
        description=(
            "Multipart form with several files `images` (at most `max_set_images`, see /v1/models). JSON (default): "
            "the aggregated identity coefficients, per-photo pose, expression, lighting and landmarks, and the "
            "identity mesh (base64, `mesh_format`). `format=obj|glb|ply` returns the identity mesh itself."),
        responses={
            200: {"description": "the JSON result or the identity mesh", "headers": _RESULT_HEADERS,
                  "content": {MEDIA_BY_FORMAT[f]: _BINARY for f in MESH_FORMATS}},
            **_error_responses(400, 406, 408, 413, 415, 422, 503, 504),
        },
        openapi_extra=_multipart_body(SetOptions, "images", settings.max_set_images, "photos of one person"),
    )
    async def reconstruct_set(request: Request) -> Response:
        state = _state(request)
        rec = state.require_ready()
        s = state.settings
        t_start = time.perf_counter()
        deadline = t_start + s.request_timeout_s
        timings: dict[str, float] = {}
        limit = s.max_set_images
        form = await _read(request, deadline, file_field="images", max_files=limit, max_file_bytes=s.max_upload_bytes,
                           too_many=lambda n: TooManyImages(
                               f"more than {limit} photos in a set; the limit is {limit}", limit=limit))
        timings["read"] = (time.perf_counter() - t_start) * 1000.0
        opts = parse_options(SetOptions, form.fields)
        fmt = opts.format or negotiate(request.headers.get("accept"), ("json", "obj", "glb", "ply"), "json")
        if not form.files:
            raise RequestValidationFailed("no photos: send them as multipart file fields `images`",
                                          **_field_error("images", "at least one file required", "missing"))
        images = []
        for i, upload in enumerate(form.files):
            try:
                images.append(await _decode(state, upload, deadline, timings))
            except InputError as exc:
                exc.details.setdefault("index", i)
                exc.message = f"photo {i + 1} of the set: {exc.message}"
                raise
        submitted = time.perf_counter()
        result = await state.pool.run(  # type: ignore[union-attr]
            lambda: reconstruct_set_job(rec, images, opts, fmt, timings, submitted, state.expression_names),
            timeout=max(0.001, deadline - time.perf_counter()),
        )
        return _respond(state, result.value, t_start)

    return router


async def _read(request: Request, deadline: float, **kwargs: Any) -> Form:
    try:
        with anyio.fail_after(max(0.001, deadline - time.perf_counter())):
            return await read_form(request, **kwargs)
    except TimeoutError:
        raise UploadTimedOut("the upload did not finish within the request deadline") from None


async def _decode(state: ServiceState, upload: Upload, deadline: float, timings: dict[str, float]) -> np.ndarray:
    s = state.settings
    t0 = time.perf_counter()
    data = bytes(upload.data)
    try:
        with anyio.fail_after(max(0.001, deadline - t0)):
            image = await anyio.to_thread.run_sync(
                lambda: decode_image(data, max_bytes=s.max_upload_bytes, max_pixels=s.max_image_pixels),
                limiter=state.decode_limiter,
            )
    except TimeoutError:
        raise RequestTimedOut("decoding the photo did not finish within the request deadline") from None
    timings["image"] = timings.get("image", 0.0) + (time.perf_counter() - t0) * 1000.0
    return image


def _respond(state: ServiceState, out: Output, t_start: float) -> Response:
    state.metrics.observe_stages(out.timings)
    total = (time.perf_counter() - t_start) * 1000.0
    headers = {**out.headers, "Server-Timing": _server_timing({**out.timings, "total": total})}
    return Response(out.body, media_type=out.media_type, headers=headers)


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
    )
    app.state.service = state
    app.include_router(build_router(settings))
    app.include_router(page_router())
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # added last = outermost
    return app
