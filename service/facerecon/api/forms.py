"""Reading a request: the multipart body as it streams in (byte limits per file enforced while reading, the whole
body refused up front from ``Content-Length``), the option fields into a pydantic model, and output negotiation
(``format`` field, else ``Accept``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from facerecon.api.errors import (
    MalformedRequest,
    NotAcceptable,
    RequestValidationFailed,
    UnsupportedMediaType,
    validation_details,
)
from facerecon.errors import FaceReconError, ImageTooLarge
from facerecon.export import MEDIA_TYPES

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

MEDIA_BY_FORMAT: dict[str, str] = {**MEDIA_TYPES, "json": "application/json", "png": "image/png",
                                   "depth": "image/png", "normals": "image/png"}
_ACCEPT_ALIASES: dict[str, str] = {
    "model/obj": "obj", "text/plain": "obj", "model/gltf-binary": "glb", "application/ply": "ply",
    "model/ply": "ply", "application/json": "json", "image/png": "png",
}
_WILDCARD_DEFAULTS: dict[str, str] = {"model/*": "obj", "image/*": "png", "application/*": "json"}

M = TypeVar("M", bound=BaseModel)


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


def field_error(loc: str, msg: str, kind: str) -> dict[str, Any]:
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
                    **field_error(name, f"unexpected file; photos go in {self.file_field!r}", "extra_forbidden"),
                )
            if len(self.files) + 1 > self.max_files:
                raise self.too_many(len(self.files) + 1)
        else:
            self._n_fields += 1
            if self._n_fields > MAX_FIELDS:
                raise RequestValidationFailed(f"more than {MAX_FIELDS} form fields", **field_error(
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
                                          **field_error(part.name, "value too long", "string_too_long"))
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


async def discard_body(request: Request) -> None:
    """Read and drop what is left of a request refused before its body was read (bounded as :meth:`_Body.drain`),
    so the error response reaches a client that is still sending; nothing is kept."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return  # the client waits for our answer before it sends the body
    if request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers:
        return
    await _Body(request).drain()


async def read_form(request: Request, *, file_field: str, max_files: int, max_file_bytes: int,
                    too_many: Callable[[int], FaceReconError], max_body_bytes: int | None = None) -> Form:
    """Stream a ``multipart/form-data`` body into memory with every limit enforced before it is exceeded.

    Raises:
        UnsupportedMediaType: not multipart/form-data.
        MalformedRequest: no boundary, a broken body (also one that ends before its closing boundary), a client
            that went away.
        ImageTooLarge: ``Content-Length`` above ``max_files * max_file_bytes`` (or ``max_body_bytes``) plus the
            form overhead (before reading anything), or a file past ``max_file_bytes`` while streaming.
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
    max_body = min(max_files * max_file_bytes, max_body_bytes or max_files * max_file_bytes) + FORM_OVERHEAD_BYTES
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
        if parser.state != MultipartState.END:
            raise MalformedRequest("the multipart body ends before its closing boundary (--boundary--)",
                                   received_bytes=body.received)
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
