"""``FaceReconClient`` (sync) and ``AsyncFaceReconClient`` (asyncio): twins over one shared core.

The core (:class:`_Core`) does everything that is not I/O: it turns a call into a request description, decides
whether and how long to wait before retrying, and turns a response into a typed result or a typed error. Each
twin only sends requests and sleeps, so the two cannot drift apart.

Retries: a 429 or 503 answer (``overloaded``, ``not_ready``) and a failed connection (nothing was sent) are
retried, up to ``RetryPolicy.max_attempts`` attempts in all. The wait is the service's ``Retry-After`` when it
gives one, else an exponential backoff; a ``Retry-After`` longer than ``RetryPolicy.max_wait`` is not waited
for: the error is raised at once, carrying ``retry_after``. Timeouts while the service computes are not
retried (the work may be done twice); raise the ``timeout`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import mimetypes
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar, Union

import httpx

from facerecon_client.errors import TransportError, error_from_response
from facerecon_client.models import (
    ImageResult,
    MeshResult,
    ModelInfo,
    Reconstruction,
    SetReconstruction,
)

__all__ = ["AsyncFaceReconClient", "FaceReconClient", "ImageInput", "MapKind", "OnMissing", "RetryPolicy", "Texture"]

#: A photo: its bytes, a path, or a binary file object.
ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike[str], IO[bytes]]  # noqa: UP007
MeshFormat = Literal["obj", "glb", "ply"]
#: ``none``: per-vertex colours; ``photo``: the photo's colours in a UV texture; ``albedo``: the fitted albedo.
Texture = Literal["none", "photo", "albedo"]
#: What a set does with a photo without a face: ``fail`` the whole set (the service's default) or ``skip`` it.
OnMissing = Literal["fail", "skip"]
Faces = Literal["largest", "all"]
Include = Literal["mesh", "overlay", "vertices", "depth", "normals"]
#: A per-pixel map of the photo: ``depth`` (16-bit grey PNG) or ``normals`` (RGB PNG).
MapKind = Literal["depth", "normals"]
SetInclude = Literal["mesh", "overlay"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 120.0
_MEDIA = {"obj": "model/obj", "glb": "model/gltf-binary", "ply": "application/ply", "json": "application/json",
          "png": "image/png"}


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry.

    Attributes:
        max_attempts: attempts in all, the first included (1 = never retry).
        max_wait: longest wait (seconds) the client accepts before one retry; a longer ``Retry-After`` ends the
            retries and raises.
        backoff: first wait when the service gives no ``Retry-After``; doubled after each attempt (capped by
            ``max_wait``).
        statuses: HTTP statuses worth retrying.
    """

    max_attempts: int = 3
    max_wait: float = 30.0
    backoff: float = 0.5
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))


@dataclass
class _Call(Generic[T]):
    """One API call, described without I/O."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    data: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": self.headers}
        if self.files:
            kwargs["files"] = self.files
            kwargs["data"] = self.data
        return kwargs


def _read_image(image: ImageInput, index: int = 0) -> tuple[str, bytes, str]:
    """``(filename, bytes, content type)`` of a photo given as bytes, a path or a binary file."""
    if isinstance(image, bytes | bytearray | memoryview):
        return f"photo{index}", bytes(image), "application/octet-stream"
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise TypeError("open the photo in binary mode ('rb')")
        name = Path(str(getattr(image, "name", f"photo{index}"))).name
        return name, data, mimetypes.guess_type(name)[0] or "application/octet-stream"
    raise TypeError(f"a photo must be bytes, a path or a binary file, not {type(image).__name__}")


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_timing(value: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (value or "").split(","):
        name, _, params = item.strip().partition(";")
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if name and k == "dur":
                with contextlib.suppress(ValueError):
                    out[name] = float(v)
    return out


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value and value.isdigit() else None


class _Core:
    """The I/O-free half shared by both clients."""

    def __init__(self, retry: RetryPolicy) -> None:
        self.retry = retry

    # -- responses -----------------------------------------------------------------------------------------------
    @staticmethod
    def check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content,
                                      _parse_retry_after(response.headers.get("retry-after")))
        return response

    def retry_delay(self, attempt: int, response: httpx.Response | None = None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to stop (then the caller raises)."""
        if attempt >= self.retry.max_attempts:
            return None
        if response is not None:
            if response.status_code not in self.retry.statuses:
                return None
            after = _parse_retry_after(response.headers.get("retry-after"))
            if after is not None:
                return after if after <= self.retry.max_wait else None
        return min(self.retry.max_wait, self.retry.backoff * 2 ** (attempt - 1))

    @staticmethod
    def retryable_transport_error(exc: httpx.TransportError) -> bool:
        """Only failures where the request surely never reached the service."""
        return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)

    # -- calls ---------------------------------------------------------------------------------------------------
    def reconstruct(self, image: ImageInput, *, faces: Faces, refine: bool | None, include: Iterable[Include],
                    mesh_format: MeshFormat) -> _Call[Reconstruction]:
        data = {"format": "json", "faces": faces, "include": ",".join(include), "mesh_format": mesh_format}
        return _Call("POST", "/v1/reconstruct", self._json(Reconstruction), data=_with_refine(data, refine),
                     files=[("image", _read_image(image))], headers={"Accept": "application/json"})

    def mesh(self, image: ImageInput, *, format: MeshFormat, faces: Faces, refine: bool | None,
             texture: Texture = "none") -> _Call[MeshResult]:
        data = _with_refine({"format": format, "faces": faces}, refine)
        accept = _MEDIA[format]
        if texture != "none":
            data["texture"] = texture
            if format == "obj":  # the OBJ, its MTL and its texture come as one zip
                accept = "application/zip, model/obj;q=0.5"
        return _Call("POST", "/v1/reconstruct", lambda r: self._mesh(r, format, texture), data=data,
                     files=[("image", _read_image(image))], headers={"Accept": accept})

    def overlay(self, image: ImageInput, *, faces: Faces, refine: bool | None, fmt: str = "png"
                ) -> _Call[ImageResult]:
        data = _with_refine({"format": fmt, "faces": faces}, refine)
        return _Call("POST", "/v1/reconstruct", self._image, data=data, files=[("image", _read_image(image))],
                     headers={"Accept": "image/png"})

    def reconstruct_set(self, images: Sequence[ImageInput], *, refine: bool | None, include: Iterable[SetInclude],
                        mesh_format: MeshFormat, on_missing: OnMissing = "fail") -> _Call[SetReconstruction]:
        data = _with_refine({"format": "json", "include": ",".join(include), "mesh_format": mesh_format,
                             "on_missing": on_missing}, refine)
        return _Call("POST", "/v1/reconstruct/set", self._json(SetReconstruction), data=data,
                     files=[("images", _read_image(im, i)) for i, im in enumerate(images)],
                     headers={"Accept": "application/json"})

    def identity_mesh(self, images: Sequence[ImageInput], *, format: MeshFormat, refine: bool | None,
                      on_missing: OnMissing = "fail") -> _Call[MeshResult]:
        return _Call("POST", "/v1/reconstruct/set", lambda r: self._mesh(r, format),
                     data=_with_refine({"format": format, "on_missing": on_missing}, refine),
                     files=[("images", _read_image(im, i)) for i, im in enumerate(images)],
                     headers={"Accept": _MEDIA[format]})

    def models(self) -> _Call[ModelInfo]:
        return _Call("GET", "/v1/models", self._json(ModelInfo))

    def health(self) -> _Call[bool]:
        return _Call("GET", "/healthz", lambda r: self.check(r).status_code == 200)

    # -- parsers -------------------------------------------------------------------------------------------------
    def _json(self, model: type[T]) -> Callable[[httpx.Response], T]:
        def parse(response: httpx.Response) -> T:
            return model.model_validate_json(self.check(response).content)  # type: ignore[attr-defined, no-any-return]

        return parse

    def _mesh(self, response: httpx.Response, fmt: str, texture: str = "none") -> MeshResult:
        r = self.check(response)
        skipped = r.headers.get("x-skipped-photos", "")
        return MeshResult(
            data=r.content, format=fmt, media_type=r.headers.get("content-type", _MEDIA[fmt]), texture=texture,
            skipped=[int(k) for k in skipped.split(",") if k.strip().isdigit()],
            face_count=_int_header(r, "x-face-count") or 1, faces_detected=_int_header(r, "x-faces-detected"),
            mode=r.headers.get("x-reconstruction-mode"), server_timing=_server_timing(r.headers.get("server-timing")),
        )

    def _image(self, response: httpx.Response) -> ImageResult:
        r = self.check(response)
        return ImageResult(
            data=r.content, media_type=r.headers.get("content-type", "image/png"),
            face_count=_int_header(r, "x-face-count") or 1, mode=r.headers.get("x-reconstruction-mode"),
            server_timing=_server_timing(r.headers.get("server-timing")),
            depth_scale=float(r.headers["x-depth-scale"]) if "x-depth-scale" in r.headers else None,
        )


def _with_refine(data: dict[str, str], refine: bool | None) -> dict[str, str]:
    if refine is not None:
        data["refine"] = "true" if refine else "false"
    return data


def _transport_error(exc: httpx.TransportError, base_url: str) -> TransportError:
    return TransportError(f"{type(exc).__name__} talking to {base_url}: {exc}")


# -- the sync twin --------------------------------------------------------------------------------------------------
class FaceReconClient:
    """Blocking client.

    Args:
        base_url: the service, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds for each request (httpx timeout: a float or an ``httpx.Timeout``); reconstruction with
            test-time fitting takes seconds on a CPU, more when the service is busy.
        retry: see :class:`RetryPolicy`.
        headers: sent with every request (e.g. an API gateway's key).
        transport: an httpx transport (tests: ``httpx.MockTransport``).
        sleep: how to wait between attempts (tests record it).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self._core = _Core(retry or RetryPolicy())
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)
        self._sleep = sleep

    def __enter__(self) -> FaceReconClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(call.method, call.path, **call.request_kwargs())
            except httpx.TransportError as exc:
                delay = self._core.retry_delay(attempt) if self._core.retryable_transport_error(exc) else None
                if delay is None:
                    raise _transport_error(exc, self.base_url) from exc
                self._sleep(delay)
                continue
            delay = self._core.retry_delay(attempt, response)
            if delay is None:
                return call.parse(response)
            self._sleep(delay)

    # -- API -----------------------------------------------------------------------------------------------------
    def health(self) -> bool:
        """``GET /healthz``: the process is up."""
        return self._send(self._core.health())

    def ready(self) -> bool:
        """``GET /readyz`` once, no retries: True when models are loaded and warmed up."""
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from exc
        return response.status_code == 200

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        """Poll ``/readyz`` until ready; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout} s")
            self._sleep(interval)

    def models(self) -> ModelInfo:
        """``GET /v1/models``: the face model card, device, renderer, limits."""
        return self._send(self._core.models())

    def reconstruct(self, image: ImageInput, *, faces: Faces = "largest", refine: bool | None = None,
                    include: Iterable[Include] = ("mesh",), mesh_format: MeshFormat = "obj") -> Reconstruction:
        """Reconstruct one photo: coefficients by name, landmarks, pose, the photo camera, and (``include``) the
        mesh bytes and the overlay PNG bytes, ``vertices`` (every vertex in photo px), ``depth`` and ``normals``
        (each face's maps as :class:`DenseMap` arrays) on each face."""
        return self._send(self._core.reconstruct(image, faces=faces, refine=refine, include=include,
                                                 mesh_format=mesh_format))

    def mesh(self, image: ImageInput, *, format: MeshFormat = "obj", faces: Faces = "largest",
             refine: bool | None = None, texture: Texture = "none") -> MeshResult:
        """The largest face's mesh file (OBJ, GLB or PLY). ``texture="photo"|"albedo"`` (OBJ or GLB only; the
        service answers 422 for PLY): a UV-textured mesh, a GLB with the texture inside or an OBJ bundle (a zip:
        :meth:`MeshResult.files`); ``"none"``: per-vertex colours."""
        return self._send(self._core.mesh(image, format=format, faces=faces, refine=refine, texture=texture))

    def overlay(self, image: ImageInput, *, faces: Faces = "largest", refine: bool | None = None) -> ImageResult:
        """The reconstruction drawn over the photo (PNG)."""
        return self._send(self._core.overlay(image, faces=faces, refine=refine))

    def map(self, image: ImageInput, kind: MapKind, *, faces: Faces = "largest", refine: bool | None = None
            ) -> ImageResult:
        """The depth map (``kind="depth"``: 16-bit grey PNG, value / ``depth_scale`` (10000) = metres along the
        camera's view axis, 0 = no surface) or the normal map (``"normals"``: RGB PNG, ``n = value / 127.5 - 1``,
        camera axes x right, y up, z towards the camera, 0 = no surface) at the photo's size; every face with
        ``faces="all"``. As arrays per face: ``reconstruct(include=("depth", "normals"))`` (:class:`DenseMap`)."""
        return self._send(self._core.overlay(image, faces=faces, refine=refine, fmt=kind))

    def reconstruct_set(self, images: Sequence[ImageInput], *, refine: bool | None = None,
                        include: Iterable[SetInclude] = ("mesh",), mesh_format: MeshFormat = "obj",
                        on_missing: OnMissing = "fail") -> SetReconstruction:
        """One identity from several photos of one person, with per-photo pose, expression and lighting.
        ``on_missing="skip"``: a photo without a face is left out (its position in ``skipped``; each item's
        ``index`` is its photo's position) instead of failing the set with :class:`NoFaceFound`."""
        return self._send(self._core.reconstruct_set(images, refine=refine, include=include,
                                                     mesh_format=mesh_format, on_missing=on_missing))

    def identity_mesh(self, images: Sequence[ImageInput], *, format: MeshFormat = "obj",
                      refine: bool | None = None, on_missing: OnMissing = "fail") -> MeshResult:
        """The identity mesh of a set of photos of one person (``on_missing`` as in :meth:`reconstruct_set`; the
        skipped photos in ``MeshResult.skipped``)."""
        return self._send(self._core.identity_mesh(images, format=format, refine=refine, on_missing=on_missing))


# -- the async twin -------------------------------------------------------------------------------------------------
class AsyncFaceReconClient:
    """The asyncio twin of :class:`FaceReconClient` (same arguments, same methods, awaited)."""

    def __init__(self, base_url: str, *, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, headers: dict[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self._core = _Core(retry or RetryPolicy())
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)
        self._sleep = sleep

    async def __aenter__(self) -> AsyncFaceReconClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(call.method, call.path, **call.request_kwargs())
            except httpx.TransportError as exc:
                delay = self._core.retry_delay(attempt) if self._core.retryable_transport_error(exc) else None
                if delay is None:
                    raise _transport_error(exc, self.base_url) from exc
                await self._sleep(delay)
                continue
            delay = self._core.retry_delay(attempt, response)
            if delay is None:
                return call.parse(response)
            await self._sleep(delay)

    # -- API -----------------------------------------------------------------------------------------------------
    async def health(self) -> bool:
        return await self._send(self._core.health())

    async def ready(self) -> bool:
        try:
            response = await self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from exc
        return response.status_code == 200

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout} s")
            await self._sleep(interval)

    async def models(self) -> ModelInfo:
        return await self._send(self._core.models())

    async def reconstruct(self, image: ImageInput, *, faces: Faces = "largest", refine: bool | None = None,
                          include: Iterable[Include] = ("mesh",), mesh_format: MeshFormat = "obj"
                          ) -> Reconstruction:
        return await self._send(self._core.reconstruct(image, faces=faces, refine=refine, include=include,
                                                       mesh_format=mesh_format))

    async def mesh(self, image: ImageInput, *, format: MeshFormat = "obj", faces: Faces = "largest",
                   refine: bool | None = None, texture: Texture = "none") -> MeshResult:
        return await self._send(self._core.mesh(image, format=format, faces=faces, refine=refine, texture=texture))

    async def overlay(self, image: ImageInput, *, faces: Faces = "largest", refine: bool | None = None
                      ) -> ImageResult:
        return await self._send(self._core.overlay(image, faces=faces, refine=refine))

    async def map(self, image: ImageInput, kind: MapKind, *, faces: Faces = "largest", refine: bool | None = None
                  ) -> ImageResult:
        return await self._send(self._core.overlay(image, faces=faces, refine=refine, fmt=kind))

    async def reconstruct_set(self, images: Sequence[ImageInput], *, refine: bool | None = None,
                              include: Iterable[SetInclude] = ("mesh",), mesh_format: MeshFormat = "obj",
                              on_missing: OnMissing = "fail") -> SetReconstruction:
        return await self._send(self._core.reconstruct_set(images, refine=refine, include=include,
                                                           mesh_format=mesh_format, on_missing=on_missing))

    async def identity_mesh(self, images: Sequence[ImageInput], *, format: MeshFormat = "obj",
                            refine: bool | None = None, on_missing: OnMissing = "fail") -> MeshResult:
        return await self._send(self._core.identity_mesh(images, format=format, refine=refine,
                                                         on_missing=on_missing))

