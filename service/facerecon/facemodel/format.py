"""The face-model file format: one self-describing ``.npz`` plus a JSON model card beside it.

``<name>.npz`` (written by :func:`save_face_model`, read with ``allow_pickle=False``; deterministic bytes, so the
same build gives the same checksum) holds these arrays (N vertices, F triangles):

=========================  ====================  ==========================================================
key                        dtype, shape          content
=========================  ====================  ==========================================================
``mean_shape``             float32 (N, 3)        mean shape, decimetres, model frame (x right, y up, z fwd)
``id_basis``               f16/f32 (K_id, N, 3)  identity basis, decimetres per unit coefficient
``exp_basis``              f16/f32 (K_exp, N, 3) expression basis, decimetres per unit coefficient
``mean_albedo``            float32 (N, 3)        mean albedo, linear RGB about [0, 1]
``albedo_basis``           f16/f32 (K_tex, N, 3) albedo basis per unit coefficient
``triangles``              int32 (F, 3)          0-based, counter-clockwise seen from outside
``point_buf``              int32 (N, P)          incident triangles per vertex, padded with F
``landmarks68``            int32 (68,)           vertex ids of the iBUG 68 landmarks
``standard_landmarks68``   float32 (68, 3)       the 68 standard 3D points the alignment uses
``face_mask``              uint8 (N,)            1 = vertex of the photometric-loss region
``front_triangles``        int32 (F2, 3)         triangles of that region (global vertex ids)
``skin_mask``              uint8 (N,)            1 = skin vertex (cheeks, nose, forehead) for albedo flatness
``card_json``              uint8 (bytes,)        the model card (UTF-8 JSON, see :class:`FaceModelCard`)
``uv_coords``  (optional)  float32 (T, 2)        texture coordinates, (0, 0) bottom left
``uv_triangles`` (opt.)    int32 (F, 3)          per-corner indices into ``uv_coords``
``vertex_region`` (opt.)   uint8 (N,)            part id per vertex; names in ``card.regions``
``mirror_index`` (opt.)    int32 (N,)            the vertex mirrored about x = 0 (symmetric models)
=========================  ====================  ==========================================================

``<name>.json`` is the same card plus ``file``, ``bytes`` and ``sha256`` of the npz; when present the loader
checks the checksum. Never pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from facerecon.cachefile import write_atomically
from facerecon.coefficients import CoefficientLayout
from facerecon.errors import ModelFileError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

REQUIRED_KEYS = (
    "mean_shape",
    "id_basis",
    "exp_basis",
    "mean_albedo",
    "albedo_basis",
    "triangles",
    "point_buf",
    "landmarks68",
    "standard_landmarks68",
    "face_mask",
    "front_triangles",
    "skin_mask",
    "card_json",
)
OPTIONAL_KEYS = ("uv_coords", "uv_triangles", "vertex_region", "mirror_index")


class Provenance(BaseModel):
    """Where a built model came from and how it was made."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="what the model was built from, in words")
    source_url: str | None = None
    source_commit: str | None = None
    source_files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256 of the input")
    builder: str = Field(description="module that built it")
    builder_version: str


class FaceModelCard(BaseModel):
    """What a face model is, its layout, licence and provenance. Stored inside the npz and beside it."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    description: str
    licence: str = Field(description="SPDX id or licence name of the model data")
    licence_notice: str = Field(description="the copyright/licence notice to keep with copies")
    redistributable: bool = Field(description="whether this file may be shipped with the project")
    units: str = "decimetre"
    frame: str = "right-handed; x to the viewer's right, y up, z towards the camera"
    layout: CoefficientLayout
    n_vertices: int
    n_triangles: int
    has_uvs: bool
    expression_names: list[str] = Field(default_factory=list)
    regions: dict[str, int] = Field(default_factory=dict, description="vertex_region value per part name")
    albedo: str = Field(description="what the albedo space is and where it comes from")
    storage: dict[str, str | float] = Field(default_factory=dict, description="dtypes and quantisation error")
    limits: list[str] = Field(default_factory=list)
    provenance: Provenance


@dataclass(frozen=True)
class FaceModelData:
    """The arrays of a face model as numpy (bases converted to float32) plus its card."""

    card: FaceModelCard
    arrays: Mapping[str, np.ndarray]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def get(self, key: str) -> np.ndarray | None:
        return self.arrays.get(key)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def save_face_model(path: Path, arrays: Mapping[str, np.ndarray], card: FaceModelCard) -> dict[str, object]:
    """Validate and write ``path`` (``.npz``) and its card ``path.with_suffix('.json')``.

    The zip entries are written in sorted order with a fixed timestamp, so identical inputs give identical bytes.
    Returns the side-car card dict (card + file, bytes, sha256).
    """
    path = Path(path)
    payload = dict(arrays)
    payload["card_json"] = np.frombuffer(card.model_dump_json(indent=None).encode(), dtype=np.uint8)
    validate_arrays(payload, card, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(payload):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(payload[key]), compresslevel=9)
    tmp.replace(path)
    sidecar = json.loads(card.model_dump_json())
    sidecar.update(file=path.name, bytes=path.stat().st_size, sha256=sha256_file(path))
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _expect(cond: bool, source: str, what: str) -> None:
    if not cond:
        raise ModelFileError(f"face model {source} is malformed: {what}")


def validate_arrays(arrays: Mapping[str, np.ndarray], card: FaceModelCard, source: str) -> None:
    """Check presence, dtypes, shapes, index ranges and finiteness; raise :class:`ModelFileError` otherwise."""
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    _expect(not missing, source, f"missing arrays {missing}")
    lay = card.layout
    n, f = card.n_vertices, card.n_triangles
    shapes = {
        "mean_shape": (n, 3),
        "id_basis": (lay.id, n, 3),
        "exp_basis": (lay.exp, n, 3),
        "mean_albedo": (n, 3),
        "albedo_basis": (lay.tex, n, 3),
        "triangles": (f, 3),
        "landmarks68": (68,),
        "standard_landmarks68": (68, 3),
        "face_mask": (n,),
        "skin_mask": (n,),
    }
    for key, shape in shapes.items():
        _expect(arrays[key].shape == shape, source, f"{key} has shape {arrays[key].shape}, expected {shape}")
    for key in ("mean_shape", "id_basis", "exp_basis", "mean_albedo", "albedo_basis", "standard_landmarks68"):
        a = arrays[key]
        _expect(a.dtype in (np.float16, np.float32), source, f"{key} must be float16/float32, not {a.dtype}")
        _expect(bool(np.isfinite(a).all()), source, f"{key} holds non-finite values")
    for key in ("triangles", "point_buf", "landmarks68", "front_triangles"):
        _expect(np.issubdtype(arrays[key].dtype, np.integer), source, f"{key} must be integer")
    pb = arrays["point_buf"]
    _expect(pb.ndim == 2 and pb.shape[0] == n, source, f"point_buf has shape {pb.shape}, expected ({n}, P)")
    _expect(0 <= pb.min() and pb.max() <= f, source, "point_buf indices out of range")
    for key in ("triangles", "front_triangles"):
        t = arrays[key]
        _expect(t.ndim == 2 and t.shape[1] == 3, source, f"{key} must be (F, 3)")
        _expect(t.size == 0 or (0 <= t.min() and t.max() < n), source, f"{key} indices out of range")
    lm = arrays["landmarks68"]
    _expect(0 <= lm.min() and lm.max() < n, source, "landmarks68 out of range")
    if card.has_uvs:
        _expect("uv_coords" in arrays and "uv_triangles" in arrays, source, "card says UVs but none stored")
        uv, uvt = arrays["uv_coords"], arrays["uv_triangles"]
        _expect(uv.ndim == 2 and uv.shape[1] == 2, source, "uv_coords must be (T, 2)")
        _expect(uvt.shape == (f, 3), source, f"uv_triangles must be ({f}, 3)")
        _expect(0 <= uvt.min() and uvt.max() < uv.shape[0], source, "uv_triangles out of range")
    if "vertex_region" in arrays:
        _expect(arrays["vertex_region"].shape == (n,), source, "vertex_region must be (N,)")
    if "mirror_index" in arrays:
        mi = arrays["mirror_index"]
        _expect(mi.shape == (n,) and 0 <= mi.min() and mi.max() < n, source, "mirror_index must be (N,) in range")


def read_card(path: Path) -> dict[str, object]:
    """The side-car JSON card of ``path`` (``.npz`` or ``.json``) without loading the arrays."""
    card_path = Path(path).with_suffix(".json")
    try:
        return json.loads(card_path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"model card {card_path} not found") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"model card {card_path} is unreadable: {exc}") from exc


def load_face_model(path: Path, *, verify_checksum: bool = True, cache_dir: Path | None = None) -> FaceModelData:
    """Read and validate a face-model npz; bases come back as float32.

    Args:
        cache_dir: where the arrays are kept uncompressed between starts (``<cache_dir>/facemodels/<sha256>.npz``,
            content-addressed by the shipped file's checksum): inflating the shipped model's 11 MB takes ~0.15 s
            of every start, reading the stored copy ~0.02 s. The copy is written atomically after validation, its
            members are CRC-checked on every read (a damaged copy is removed and the model read again); an
            unwritable ``cache_dir`` (or ``None``) means inflating each time.

    Raises:
        ModelFileError: the file is missing, truncated, not an npz, fails its side-car checksum, or any array is
            missing or inconsistent with the card. The message names the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"face model file {path} not found (build it with `facerecon models build`)")
    sidecar = path.with_suffix(".json")
    checksum: str | None = None
    if verify_checksum and sidecar.is_file():
        expected = read_card(path).get("sha256")
        checksum = sha256_file(path)
        if expected and expected != checksum:
            raise ModelFileError(
                f"face model {path} does not match its card {sidecar.name}: sha256 {checksum[:12]}… != "
                f"{str(expected)[:12]}… (the file is truncated, corrupt or was replaced; rebuild it)"
            )
    stored: Path | None = None
    if cache_dir is not None:
        stored = Path(cache_dir) / "facemodels" / f"{checksum or sha256_file(path)}.npz"
    arrays = _read_stored(stored) if stored is not None else None
    fresh = arrays is None
    if arrays is None:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as exc:
            raise ModelFileError(f"face model {path} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    raw = dict(arrays)
    if "card_json" not in arrays:
        raise ModelFileError(f"face model {path} is malformed: it holds no model card (card_json)")
    try:
        card = FaceModelCard.model_validate_json(arrays.pop("card_json").tobytes())
    except ValidationError as exc:
        raise ModelFileError(f"face model {path} has an invalid model card: {exc}") from exc
    if card.format_version != FORMAT_VERSION:
        raise ModelFileError(f"face model {path} has format version {card.format_version}, need {FORMAT_VERSION}")
    arrays["card_json"] = np.zeros(1, np.uint8)  # presence only, for validation
    validate_arrays(arrays, card, source=str(path))
    arrays.pop("card_json")
    for key in ("id_basis", "exp_basis", "albedo_basis"):
        arrays[key] = arrays[key].astype(np.float32)
    if fresh and stored is not None:
        _store(stored, raw)
    return FaceModelData(card=card, arrays=arrays)


def _read_stored(stored: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an uncompressed copy written by :func:`_store`, or None when there is none or it is damaged
    (zip CRC or format error: the copy is removed)."""
    if not stored.is_file():
        return None
    try:
        with np.load(stored, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as exc:
        logger.warning("stored face model %s is damaged (%s); reading the shipped file", stored, exc)
        with contextlib.suppress(OSError):
            stored.unlink()
        return None


def _store(stored: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` uncompressed to ``stored`` atomically (a temporary file renamed into place); an unwritable
    folder is logged and skipped."""
    try:
        write_atomically(stored, lambda fh: np.savez(fh, **arrays))
    except OSError as exc:
        logger.info("face model not stored uncompressed in %s (%s)", stored.parent, exc)


def build_point_buf(triangles: np.ndarray, n_vertices: int) -> np.ndarray:
    """``(N, P)`` int32 list of the triangles incident to each vertex, padded with ``F`` (the reference's
    ``point_buf`` convention, 0-based), P = the largest vertex degree."""
    f = triangles.shape[0]
    vert = triangles.reshape(-1).astype(np.int64)
    tri = np.repeat(np.arange(f, dtype=np.int64), 3)
    order = np.argsort(vert, kind="stable")
    vert, tri = vert[order], tri[order]
    counts = np.bincount(vert, minlength=n_vertices)
    p = int(counts.max())
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(vert.size) - starts[vert]
    buf = np.full((n_vertices, p), f, dtype=np.int32)
    buf[vert, slot] = tri
    return buf
