"""The HTTP routes (FastAPI ``APIRouter``): reconstruct, reconstruct/set, health, readiness, models, with their
OpenAPI descriptions; each route reads the form, decodes off the loop, runs its job on the pool and responds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from facerecon.api.errors import (
    RequestTimedOut,
    RequestValidationFailed,
    Unavailable,
    UploadTimedOut,
)
from facerecon.api.forms import (
    MEDIA_BY_FORMAT,
    Form,
    Upload,
    discard_body,
    field_error,
    negotiate,
    parse_options,
    read_form,
)
from facerecon.api.guard import guarded, release_free_memory
from facerecon.api.jobs import Output, reconstruct_job, reconstruct_set_job, server_timing
from facerecon.api.schemas import (
    MESH_FORMATS,
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    ReadyResponse,
    ReconstructOptions,
    ReconstructResponse,
    SetOptions,
    SetResponse,
)
from facerecon.api.state import ServiceState
from facerecon.api.workers import Ticket
from facerecon.config import Settings
from facerecon.errors import ImageTooLarge, InputError, TooManyImages
from facerecon.formats import texture_format_problem
from facerecon.imaging import DecodedPhoto, ImageProbe, decode_photo, probe_image

log = logging.getLogger("facerecon.api")

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
        503: "`overloaded` (every slot taken: requests reading, decoding, queued or running), `not_ready` or "
             "`shutting_down`; retry after `Retry-After` seconds",
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
    "X-Reconstruction-Mode": {"description": "`rnet`, `rnet+lm`, `rnet+fit` or `fit`", "schema": {"type": "string"}},
    "Server-Timing": {"description": "milliseconds per stage (`name;dur=ms`, ...)", "schema": {"type": "string"}},
}


def _multipart_body(options: type[BaseModel], file_field: str, many: int | None, description: str
                    ) -> dict[str, Any]:
    """OpenAPI requestBody for our hand-parsed multipart forms (the file field plus the options model).

    A form field is sent or left out, never ``null``: the options' ``X | None`` fields are documented as ``X``
    (absent = the default); a file has at least one byte (an empty one is refused)."""
    schema = options.model_json_schema()
    binary = {"type": "string", "format": "binary", "minLength": 1}
    file_schema: dict[str, Any] = (
        {**binary, "description": description} if many is None
        else {"type": "array", "items": binary, "minItems": 1, "maxItems": many, "description": description})
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [file_field],
        "properties": {file_field: file_schema, **{k: _not_null(v) for k, v in schema.get("properties", {}).items()}},
    }}}}}


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    """``{"anyOf": [X, {"type": "null"}], "default": null, ...}`` -> ``X`` with the other keys (no null default)."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    if "anyOf" not in prop or len(branches) != 1:
        return prop
    out = {k: v for k, v in prop.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**branches[0], **out}


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
                             warmup_ms=state.warmup_ms, warming=list(state.warming),
                             fit_warmup_ms=state.fit_warmup_ms)

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
            "every face in PNG, up to `max_faces` (the largest; `X-Faces-Detected` gives the count found and "
            "`X-Faces-Limit` is set when some were left out); mesh formats hold the largest face. `format=depth` "
            "and `format=normals` answer the depth map (16-bit grey PNG, value / 10000 = metres along the camera's "
            "view axis, 0 = no surface) and the normal map (RGB PNG, n = value / 127.5 - 1, unit normals in camera "
            "axes x right, y up, z towards the camera, 0 = no surface) at the photo's size, every face with "
            "`faces=all` (the nearest surface wins), rendered with each face's `camera`; as arrays in the JSON: "
            "`include=depth,normals` (`DenseMap`). A photo over "
            "`max_decoded_pixels` is downscaled at decode time: every coordinate is then in the decoded photo's "
            "frame (`photo_size`; `scale` and `X-Photo-Scale` give the factor)."),
        responses={
            200: {"description": "the mesh, the JSON result, the overlay PNG or the depth / normal map PNG",
                  "headers": {
                **_RESULT_HEADERS,
                "X-Faces-Detected": {"description": "faces detected, with `faces=all`",
                                     "schema": {"type": "integer"}},
                "X-Faces-Limit": {"description": "`max_faces`, when more faces were found than returned",
                                  "schema": {"type": "integer"}},
                "X-Photo-Scale": {"description": "decoded px per uploaded px, when the photo was downscaled",
                                  "schema": {"type": "number"}},
                "X-Depth-Scale": {"description": "with `format=depth`: PNG values per metre (10000)",
                                  "schema": {"type": "number"}}},
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

        async def work(ticket: Ticket, body_read: asyncio.Event) -> Output:
            form = await _read(request, deadline, file_field="image", max_files=1,
                               max_file_bytes=s.max_upload_bytes, too_many=lambda n: RequestValidationFailed(
                                   "send exactly one photo in `image` (use /v1/reconstruct/set for several)",
                                   **field_error("image", "exactly one file expected", "too_many_files")))
            body_read.set()
            timings["read"] = (time.perf_counter() - t_start) * 1000.0
            opts = parse_options(ReconstructOptions, form.fields)
            fmt = opts.format or negotiate(request.headers.get("accept"), ("obj", "glb", "ply", "json", "png"), "obj")
            if (problem := texture_format_problem(opts.texture, fmt)) is not None:  # refused before any work
                raise RequestValidationFailed(
                    problem, **field_error("texture", "a texture needs the obj or glb format", "texture_format"))
            if not form.files:
                raise RequestValidationFailed("the photo is missing: send it as the multipart file field `image`",
                                              **field_error("image", "field required", "missing"))
            photo = await _decode(state, form.files.pop(), deadline, timings, s.max_decoded_pixels)
            submitted = time.perf_counter()
            try:
                result = await state.pool.run(  # type: ignore[union-attr]
                    lambda: reconstruct_job(rec, photo, opts, fmt, timings, submitted, state.expression_names,
                                            state.face_model or "unknown", ticket=ticket, max_faces=s.max_faces),
                    timeout=max(0.001, deadline - time.perf_counter()), ticket=ticket,
                )
            finally:
                await _after_large(state, photo.image.size)
            return result.value

        return _respond(state, await _serve(state, request, deadline, work), t_start)

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

        async def work(ticket: Ticket, body_read: asyncio.Event) -> Output:
            form = await _read(request, deadline, file_field="images", max_files=limit,
                               max_file_bytes=s.max_upload_bytes, max_body_bytes=s.max_request_bytes,
                               too_many=lambda n: TooManyImages(
                                   f"more than {limit} photos in a set; the limit is {limit}", limit=limit))
            body_read.set()
            timings["read"] = (time.perf_counter() - t_start) * 1000.0
            opts = parse_options(SetOptions, form.fields)
            fmt = opts.format or negotiate(request.headers.get("accept"), ("json", "obj", "glb", "ply"), "json")
            if not form.files:
                raise RequestValidationFailed("no photos: send them as multipart file fields `images`",
                                              **field_error("images", "at least one file required", "missing"))
            # the set shares its decoded pixels: each photo gets its part (never more than a single photo's limit)
            share = max(1, min(s.max_decoded_pixels, s.max_set_decoded_pixels // len(form.files)))
            photos: list[DecodedPhoto] = []
            for i, upload in enumerate(form.files):
                try:
                    photos.append(await _decode(state, upload, deadline, timings, share))
                except InputError as exc:
                    exc.details.setdefault("index", i)
                    exc.message = f"photo {i + 1} of the set: {exc.message}"
                    raise
                upload.data = bytearray()  # the encoded bytes are not needed any more
            submitted = time.perf_counter()
            try:
                result = await state.pool.run(  # type: ignore[union-attr]
                    lambda: reconstruct_set_job(rec, photos, opts, fmt, timings, submitted, state.expression_names,
                                                state.face_model or "unknown", ticket=ticket),
                    timeout=max(0.001, deadline - time.perf_counter()), ticket=ticket,
                )
            finally:
                await _after_large(state, sum(p.image.size for p in photos))
            return result.value

        return _respond(state, await _serve(state, request, deadline, work), t_start)

    return router


async def _read(request: Request, deadline: float, **kwargs: Any) -> Form:
    try:
        with anyio.fail_after(max(0.001, deadline - time.perf_counter())):
            return await read_form(request, **kwargs)
    except TimeoutError:
        raise UploadTimedOut("the upload did not finish within the request deadline") from None


async def _serve(state: ServiceState, request: Request, deadline: float,
                 work: Callable[[Ticket, asyncio.Event], Awaitable[Output]]) -> Output:
    """Admission first (503 at once, before the body is read), then ``work`` guarded against the end of the
    shutdown grace and, once the body is read, the client's disconnect; the slot is freed whatever happens."""
    try:
        ticket = state.pool.admit(deadline)  # type: ignore[union-attr]
    except Unavailable:
        await discard_body(request)
        raise
    body_read = asyncio.Event()
    try:
        return await guarded(lambda: work(ticket, body_read), ticket=ticket, grace=state.grace,
                             receive=request.receive, body_read=body_read)
    finally:
        ticket.release()


async def _decode(state: ServiceState, upload: Upload, deadline: float, timings: dict[str, float],
                  max_decoded_pixels: int) -> DecodedPhoto:
    """Header first (limits, the decode's memory), then the decode itself once the memory budget has room."""
    s = state.settings
    t0 = time.perf_counter()
    data = upload.data

    def probe() -> ImageProbe:
        return probe_image(data, max_bytes=s.max_upload_bytes, max_pixels=s.max_image_pixels,
                           max_decoded_pixels=max_decoded_pixels)

    def decode() -> DecodedPhoto:
        return decode_photo(data, max_bytes=s.max_upload_bytes, max_pixels=s.max_image_pixels,
                            max_decoded_pixels=max_decoded_pixels)

    try:
        with anyio.fail_after(max(0.001, deadline - t0)):
            header = await anyio.to_thread.run_sync(probe, limiter=state.decode_limiter)
            if header.decode_bytes > s.max_decode_bytes:
                mib = 1024 * 1024
                raise ImageTooLarge(
                    f"decoding this {header.format} of {header.width} x {header.height} would need about "
                    f"{header.decode_bytes // mib} MiB (limit {s.max_decode_bytes // mib} MiB): only JPEG photos are "
                    "decoded downscaled; send a JPEG or a smaller image")
            async with state.decode_budget.hold(header.decode_bytes):
                photo = await anyio.to_thread.run_sync(decode, limiter=state.decode_limiter)
                if header.scale_factor > 1:  # a full-size image was decoded and dropped: give its pages back
                    await anyio.to_thread.run_sync(release_free_memory, limiter=state.decode_limiter)
    except TimeoutError:
        raise RequestTimedOut("decoding the photo did not finish within the request deadline") from None
    timings["image"] = timings.get("image", 0.0) + (time.perf_counter() - t0) * 1000.0
    return photo


#: Decoded bytes above which a request's end hands the freed heap back to the system (:func:`release_free_memory`).
TRIM_AFTER_BYTES = 8 * 1024 * 1024


async def _after_large(state: ServiceState, decoded_bytes: int) -> None:
    """After a request over large photos, give its freed memory back (glibc keeps it in the threads' arenas)."""
    if decoded_bytes >= TRIM_AFTER_BYTES:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(release_free_memory, limiter=state.decode_limiter)


def _respond(state: ServiceState, out: Output, t_start: float) -> Response:
    state.metrics.observe_stages(out.timings)
    total = (time.perf_counter() - t_start) * 1000.0
    headers = {**out.headers, "Server-Timing": server_timing({**out.timings, "total": total})}
    return Response(out.body, media_type=out.media_type, headers=headers)
