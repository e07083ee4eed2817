"""What ``facerecon batch`` reads: the inputs given on the command line, expanded to photos with stable ids.

An input is one of:

* a **file**: taken as a photo whatever its suffix (a non-image gives an error row, ``not_an_image``);
* a **folder**: every file below it (recursively) whose suffix is an image type (:data:`IMAGE_SUFFIXES`);
* a **glob** (``photos/**/*.jpg``; ``**`` crosses folders): the matching files of an image type, and the image files
  below matching folders;
* a **manifest**, a ``.csv`` (with a header) or ``.jsonl``/``.ndjson`` file of rows ``path`` (required; relative
  paths are relative to the manifest's folder), ``id`` (optional: the photo's key instead of its path) and
  ``identity`` (optional: photos with the same identity are reconstructed as one set, as ``reconstruct --set``);
* any of the above as a **URI** that pyarrow's filesystems read (``s3://bucket/prefix/``, ``gs://...``,
  ``hdfs://...``; credentials as pyarrow takes them, e.g. ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
  ``AWS_REGION`` or ``~/.aws`` for S3).

An input that matches nothing becomes one error row (code ``not_found``), never an exception.

Stable ids: a photo's id is ``<sanitised stem>-<12 hex of sha256(key)>`` where the key is the manifest ``id`` when
given, else the photo's resolved absolute path (local) or its URI (remote). Two photos with the same file name in
different folders get different ids; the same photo gets the same id in every run (which is what resuming relies
on). Faces of ``--faces all`` are ``<photo id>_face<k>`` (k = 0 for the best face, by detection rank).
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from facerecon.errors import ImageTooLarge, InputError

log = logging.getLogger(__name__)

#: Suffixes a folder or glob expansion keeps (lower case); an explicitly named file is read whatever its suffix.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".mpo"}
)
MANIFEST_SUFFIXES: frozenset[str] = frozenset({".csv", ".jsonl", ".ndjson"})
_GLOB_CHARS = re.compile(r"[*?\[]")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ManifestRow(BaseModel):
    """One row of a manifest (CSV header or JSONL keys)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    path: str = Field(min_length=1, description="photo path or URI; relative paths are relative to the manifest")
    id: str | None = Field(None, description="the photo's key (default: its resolved path)")
    identity: str | None = Field(None, description="photos with the same identity form one set")

    @field_validator("id", "identity", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return str(v)


class PhotoRef(BaseModel):
    """One photo to reconstruct (or an input that failed before reading, ``error_code`` set)."""

    photo_id: str
    key: str = Field(description="what the id is derived from: manifest id, resolved path or URI")
    source: str = Field(description="where to read it: absolute local path or URI")
    input_index: int = Field(ge=0, description="position in the expanded input list (the table's order)")
    identity: str | None = None
    error_code: str | None = None
    error_message: str | None = None


class WorkUnit(BaseModel):
    """What one worker call handles: one photo, or the photos of one identity (a set)."""

    index: int = Field(ge=0)
    members: list[PhotoRef] = Field(min_length=1)
    identity: str | None = None
    identity_id: str | None = None

    @property
    def photo_ids(self) -> list[str]:
        return [m.photo_id for m in self.members]


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of ``text``: ``[A-Za-z0-9._-]``, no leading dot, at most ``limit`` characters."""
    s = _UNSAFE.sub("_", text).strip("._") or "photo"
    return s[:limit]


def short_hash(key: str, n: int = 12) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:n]


def photo_id_for(key: str, stem: str) -> str:
    """``<slug(stem)>-<sha256(key)[:12]>``: stable across runs, distinct for distinct keys."""
    return f"{slug(stem)}-{short_hash(key)}"


def identity_id_for(identity: str) -> str:
    return f"{slug(identity)}-{short_hash('identity:' + identity)}"


def face_id_for(photo_id: str, face_index: int, which: str) -> str:
    """The per-face folder name: the photo id for ``--faces largest``, ``<photo id>_face<k>`` for ``all``."""
    return photo_id if which == "largest" else f"{photo_id}_face{face_index}"


def is_uri(text: str) -> bool:
    return bool(_URI.match(text)) and not text.startswith("file://")


def _stem(location: str) -> str:
    name = location.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _local(text: str) -> str:
    return text[len("file://"):] if text.startswith("file://") else text


# -- reading --------------------------------------------------------------------------------------------------------
def read_source(source: str, max_bytes: int) -> bytes:
    """The bytes of one input (local path or URI), refusing files over ``max_bytes`` before reading them.

    Raises:
        ImageTooLarge: the file is larger than ``max_bytes``.
        OSError: missing, unreadable, a folder, or a remote read failure (pyarrow raises ``OSError`` subclasses).
    """
    if is_uri(source):
        from pyarrow import fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(source)
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{source}: not found")
        if info.size is not None and info.size > max_bytes:
            raise ImageTooLarge(f"{source} is {info.size} bytes, the limit is {max_bytes}", n_bytes=info.size)
        with filesystem.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    else:
        p = Path(_local(source))
        size = p.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(f"{p.name} is {size} bytes, the limit is {max_bytes}", n_bytes=size)
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{source} is more than {max_bytes} bytes", n_bytes=len(data))
    return bytes(data)


# -- expansion ------------------------------------------------------------------------------------------------------
class _Found(BaseModel):
    """An expanded input before ids: key, where to read it, the stem for its folder name, an identity."""

    key: str
    source: str
    stem: str
    identity: str | None = None
    error_code: str | None = None
    error_message: str | None = None


def _local_folder(folder: Path) -> list[_Found]:
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if _is_image_name(name):
                p = Path(root, name).resolve()
                out.append(_Found(key=str(p), source=str(p), stem=p.stem))
    return out


def _local_file(path: Path) -> _Found:
    p = path.resolve()
    return _Found(key=str(p), source=str(p), stem=p.stem)


def _remote(uri: str) -> list[_Found]:
    """A remote file, folder (recursive) or glob. pyarrow has no globbing: a glob lists below its fixed prefix and
    matches with :mod:`fnmatch` (where ``*`` also crosses ``/``)."""
    from pyarrow import fs as pafs

    scheme = uri.split("://", 1)[0]
    m = _GLOB_CHARS.search(uri)
    base_uri = uri if m is None else uri[: m.start()].rsplit("/", 1)[0]
    filesystem, base = pafs.FileSystem.from_uri(base_uri)
    pattern = None if m is None else base.rstrip("/") + uri[len(base_uri):]
    info = filesystem.get_file_info(base)
    if info.type == pafs.FileType.File and pattern is None:
        return [_Found(key=f"{scheme}://{info.path}", source=f"{scheme}://{info.path}", stem=_stem(info.path))]
    if info.type != pafs.FileType.Directory:
        return []
    out = []
    for f in sorted(filesystem.get_file_info(pafs.FileSelector(base, recursive=True)), key=lambda i: i.path):
        if f.type != pafs.FileType.File or not _is_image_name(f.path):
            continue
        if pattern is not None and not fnmatch.fnmatchcase(f.path, pattern):
            continue
        out.append(_Found(key=f"{scheme}://{f.path}", source=f"{scheme}://{f.path}", stem=_stem(f.path)))
    return out


def _read_text(location: str) -> str:
    if is_uri(location):
        from pyarrow import fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(location)
        with filesystem.open_input_stream(path) as f:
            return f.read().decode("utf-8-sig")
    return Path(_local(location)).read_text(encoding="utf-8-sig")


def _manifest(location: str) -> list[_Found]:
    """The rows of a CSV/JSONL manifest. A malformed manifest is a usage error (:class:`InputError`)."""
    text = _read_text(location)
    suffix = os.path.splitext(location)[1].lower()
    raw: list[dict[str, object]] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise InputError(f"{location}: a CSV manifest needs a header with a 'path' column (optional: id, identity)")
        raw = list(reader)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{location}:{n}: not JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise InputError(f"{location}:{n}: each line must be an object with a 'path'")
            raw.append(obj)
    base = location.rsplit("/", 1)[0] if is_uri(location) else str(Path(_local(location)).resolve().parent)
    out = []
    for n, obj in enumerate(raw, 1):
        try:
            row = ManifestRow.model_validate(obj)
        except ValidationError as exc:
            raise InputError(f"{location}: row {n}: {exc.errors()[0]['msg']} ({exc.errors()[0]['loc']})") from exc
        if is_uri(row.path):
            source = row.path
        elif is_uri(base):
            source = row.path if row.path.startswith("/") else f"{base}/{row.path}"
        else:
            source = str((Path(base) / _local(row.path)).resolve())
        key = row.id if row.id is not None else source
        out.append(_Found(key=key, source=source, stem=row.id or _stem(source), identity=row.identity))
    return out


def _expand_one(text: str) -> list[_Found]:
    if is_uri(text):
        if os.path.splitext(text)[1].lower() in MANIFEST_SUFFIXES:
            return _manifest(text)
        return _remote(text)
    local = _local(text)
    p = Path(local)
    if p.is_dir():
        return _local_folder(p)
    if p.is_file():
        if p.suffix.lower() in MANIFEST_SUFFIXES:
            return _manifest(str(p))
        return [_local_file(p)]
    if _GLOB_CHARS.search(local):
        out: list[_Found] = []
        for m in sorted(glob.glob(local, recursive=True)):
            mp = Path(m)
            if mp.is_dir():
                out.extend(_local_folder(mp))
            elif mp.is_file() and _is_image_name(m):
                out.append(_local_file(mp))
        return out
    return []


def expand_inputs(inputs: Sequence[str]) -> list[PhotoRef]:
    """Every photo the inputs name, in order (inputs in the order given, folders sorted), without duplicates.

    An input that names nothing gives one :class:`PhotoRef` with ``error_code="not_found"``. A folder or glob that
    holds no image gives a warning and nothing else.

    Raises:
        InputError: a malformed manifest.
    """
    refs: list[PhotoRef] = []
    seen: set[str] = set()
    for text in inputs:
        try:
            found = _expand_one(text)
            exists = bool(found) or _exists(text)
        except OSError as exc:
            found, exists = [], False
            log.error("%s: %s", text, exc)
        if not found:
            if exists:
                log.warning("%s: no photos of an image type in it", text)
                continue
            key = f"missing:{text}"
            found = [_Found(key=key, source=text, stem=_stem(text), error_code="not_found",
                            error_message=f"{text}: no such file, folder, glob match or URI")]
        for f in found:
            if f.key in seen:
                continue
            seen.add(f.key)
            refs.append(PhotoRef(photo_id=photo_id_for(f.key, f.stem), key=f.key, source=f.source,
                                 input_index=len(refs), identity=f.identity, error_code=f.error_code,
                                 error_message=f.error_message))
    return refs


def _exists(text: str) -> bool:
    if is_uri(text):
        return False
    local = _local(text)
    return Path(local).exists() or bool(_GLOB_CHARS.search(local) and glob.glob(local, recursive=True))


def make_units(refs: Iterable[PhotoRef]) -> list[WorkUnit]:
    """Group photos into work units: one per photo, or one per identity (a set; members in input order)."""
    units: list[WorkUnit] = []
    by_identity: dict[str, WorkUnit] = {}
    for ref in refs:
        if ref.identity is None or ref.error_code is not None:
            units.append(WorkUnit(index=len(units), members=[ref]))
            continue
        unit = by_identity.get(ref.identity)
        if unit is None:
            unit = WorkUnit(index=len(units), members=[ref], identity=ref.identity,
                            identity_id=identity_id_for(ref.identity))
            by_identity[ref.identity] = unit
            units.append(unit)
        else:
            unit.members.append(ref)
    return units
