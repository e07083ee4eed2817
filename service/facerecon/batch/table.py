"""The results table: one row per reconstructed face, or per photo that failed.

Columns (:data:`SCHEMA`; units in the names or below):

==========================  =======================================================================================
photo_id, face_id           stable ids (:mod:`facerecon.batch.inputs`); ``face_id`` is also the folder name
face_index, n_faces         the face's rank in the photo (0 = best) and how many faces were reconstructed
input_index                 position in the run's expanded inputs (the table is sorted by it, then face_index)
source, identity(_id)       where the photo was read; its set, if any
status                      ``ok`` or ``error``; errors carry ``error_code`` (``no_face``, ``corrupt_image``,
                            ``not_an_image``, ``image_too_large``, ``unreadable``, ``not_found``,
                            ``too_many_images``, ``worker_crashed``, ``internal``) and ``error_message``
face_model, mode            the face model's name; ``rnet``, ``rnet+lm``, ``rnet+fit`` or ``fit``
coef_<group>                the coefficients by name (float32 lists: id, exp, tex, angle (radians), gamma, trans)
pose_{pitch,yaw,roll}_deg   head pose, degrees
landmarks68                 68 x [x, y]: the reconstruction's landmarks in photo pixels (x right, y down)
box                         [x0, y0, x1, y1] detection box, photo pixels
detection_score, ...        detector score, landmark score (0..1), whether the detection is reliable
landmark_error_crop_px      mean reprojected-vs-detected landmark distance in the 224 crop, pixels
photo_width, photo_height   pixels
timings_ms                  stage -> milliseconds (:mod:`facerecon.batch.worker` says which; ``total`` per photo)
batch_faces                 faces in the R-Net batch (one ``estimate`` call) the face was part of
mesh_path, files            the mesh and every file written for the face, relative to the output folder
identity_mesh_path          a set's identity mesh, relative
run_id, worker, finished_at which run computed the row (a resumed run keeps earlier rows), host:pid, UTC time
==========================  =======================================================================================
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from facerecon.batch.storage import Store
from facerecon.coefficients import GROUPS

log = logging.getLogger(__name__)

PARTS_DIR = "parts"


class ResultRow(BaseModel):
    """One row of the results table (the boundary between the workers and the table)."""

    photo_id: str
    face_id: str | None = None
    face_index: int | None = None
    n_faces: int = 0
    input_index: int
    source: str
    identity: str | None = None
    identity_id: str | None = None
    status: Literal["ok", "error"]
    error_code: str | None = None
    error_message: str | None = None
    face_model: str | None = None
    mode: str | None = None
    coef_id: list[float] | None = None
    coef_exp: list[float] | None = None
    coef_tex: list[float] | None = None
    coef_angle: list[float] | None = None
    coef_gamma: list[float] | None = None
    coef_trans: list[float] | None = None
    pose_pitch_deg: float | None = None
    pose_yaw_deg: float | None = None
    pose_roll_deg: float | None = None
    landmarks68: list[list[float]] | None = Field(None, description="68 x [x, y], photo pixels, y down")
    box: list[float] | None = None
    detection_score: float | None = None
    landmark_score: float | None = None
    detection_reliable: bool | None = None
    landmark_error_crop_px: float | None = None
    photo_width: int | None = None
    photo_height: int | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    batch_faces: int | None = Field(None, description="faces in the estimate call (R-Net batch) this face was in")
    mesh_path: str | None = None
    files: list[str] = Field(default_factory=list)
    identity_mesh_path: str | None = None
    run_id: str
    worker: str
    finished_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


assert tuple(f"coef_{g}" for g in GROUPS) == tuple(k for k in ResultRow.model_fields if k.startswith("coef_"))


def _schema() -> Any:
    import pyarrow as pa

    f32 = pa.list_(pa.float32())
    fields = [
        ("photo_id", pa.string()), ("face_id", pa.string()), ("face_index", pa.int32()), ("n_faces", pa.int32()),
        ("input_index", pa.int64()), ("source", pa.string()), ("identity", pa.string()), ("identity_id", pa.string()),
        ("status", pa.string()), ("error_code", pa.string()), ("error_message", pa.string()),
        ("face_model", pa.string()), ("mode", pa.string()),
        *[(f"coef_{g}", f32) for g in GROUPS],
        ("pose_pitch_deg", pa.float64()), ("pose_yaw_deg", pa.float64()), ("pose_roll_deg", pa.float64()),
        ("landmarks68", pa.list_(pa.list_(pa.float64()))), ("box", pa.list_(pa.float64())),
        ("detection_score", pa.float64()), ("landmark_score", pa.float64()), ("detection_reliable", pa.bool_()),
        ("landmark_error_crop_px", pa.float64()), ("photo_width", pa.int32()), ("photo_height", pa.int32()),
        ("timings_ms", pa.map_(pa.string(), pa.float64())), ("batch_faces", pa.int32()), ("mesh_path", pa.string()),
        ("files", pa.list_(pa.string())), ("identity_mesh_path", pa.string()),
        ("run_id", pa.string()), ("worker", pa.string()), ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
    assert [n for n, _ in fields] == list(ResultRow.model_fields), "schema and ResultRow disagree"
    return pa.schema(fields)


_SCHEMA: Any = None


def schema() -> Any:
    """The pyarrow schema of the table (built on first use: pyarrow is imported lazily)."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = _schema()
    return _SCHEMA


def _arrow_value(name: str, value: Any) -> Any:
    if name == "timings_ms":
        return list(value.items())
    return value


def to_arrow(rows: Sequence[ResultRow | dict[str, Any]]) -> Any:
    """Rows (validated models or their ``model_dump()``) as a ``pyarrow.Table`` with :func:`schema`."""
    import pyarrow as pa

    dicts = [r.model_dump() if isinstance(r, ResultRow) else ResultRow.model_validate(r).model_dump() for r in rows]
    cols = {name: [_arrow_value(name, d[name]) for d in dicts] for name in ResultRow.model_fields}
    return pa.Table.from_pydict(cols, schema=schema())


def from_arrow(table: Any) -> list[dict[str, Any]]:
    """Table rows as plain dicts (``timings_ms`` back to a dict)."""
    rows = table.to_pylist()
    for r in rows:
        if isinstance(r.get("timings_ms"), list):
            r["timings_ms"] = dict(r["timings_ms"])
    return rows


# -- parts: the resume log ------------------------------------------------------------------------------------------
def write_part(store: Store, rel: str, rows: Sequence[ResultRow | dict[str, Any]]) -> None:
    """One part file, written whole (tmp + rename) so that a killed run never leaves half a part."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(to_arrow(rows), buf)
    store.write_atomic(rel, buf.getvalue())


def read_parts(store: Store) -> Any:
    """Every readable part under ``parts/`` as one table (a part that cannot be read, e.g. one a killed Ray writer
    left half-written, is skipped with a warning: its photos are simply not done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for rel in store.files(PARTS_DIR, ".parquet"):
        if ".tmp-" in rel:
            continue
        try:
            t = pq.read_table(store.path(rel), filesystem=store.fs)
            tables.append(t.select(schema().names).cast(schema()))
        except Exception as exc:  # truncated footer, foreign file: not ours to trust
            log.warning("skipping unreadable part %s: %s", rel, exc)
    if not tables:
        return schema().empty_table()
    return pa.concat_tables(tables)


def latest_rows(table: Any) -> Any:
    """For each photo, only the rows of the run that computed it last (a photo redone with ``--retry-failed``
    appears once)."""
    import pyarrow as pa

    if table.num_rows == 0:
        return table
    photo = table.column("photo_id").to_pylist()
    run = table.column("run_id").to_pylist()
    when = table.column("finished_at").to_pylist()
    best: dict[str, tuple[datetime, str]] = {}
    for p, r, w in zip(photo, run, when, strict=True):
        if p not in best or (w, r) > best[p]:
            best[p] = (w, r)
    chosen = {p: r for p, (_, r) in best.items()}
    mask = pa.array([chosen[p] == r for p, r in zip(photo, run, strict=True)])
    return table.filter(mask)


def done_photos(table: Any, retry_failed: bool) -> set[str]:
    """Photo ids that a rerun skips: every photo with a row, or only the successful ones with ``retry_failed``."""
    photo = table.column("photo_id").to_pylist()
    if not retry_failed:
        return set(photo)
    status = table.column("status").to_pylist()
    failed = {p for p, s in zip(photo, status, strict=True) if s != "ok"}
    return {p for p in photo if p not in failed}


def sort_rows(table: Any, order: dict[str, int]) -> Any:
    """Rows in the run's input order (photos of earlier runs not in this one go last, by id), faces by rank."""
    import pyarrow as pa

    photo = table.column("photo_id").to_pylist()
    face = [-1 if f is None else f for f in table.column("face_index").to_pylist()]
    keys = [(order.get(p, len(order)), p, f) for p, f in zip(photo, face, strict=True)]
    idx = sorted(range(len(keys)), key=keys.__getitem__)
    return table.take(pa.array(idx, type=pa.int64()))


def write_results(store: Store, table: Any, fmt: Literal["parquet", "jsonl"]) -> str:
    """Write the one results table (``results.parquet`` or ``results.jsonl``) atomically; returns its name."""
    name = f"results.{fmt}"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_atomic(name, buf.getvalue())
    else:
        lines = (json.dumps(_jsonable(r), separators=(",", ":")) for r in from_arrow(table))
        store.write_atomic(name, ("\n".join(lines) + ("\n" if table.num_rows else "")).encode("utf-8"))
    return name


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if isinstance(out.get("finished_at"), datetime):
        out["finished_at"] = out["finished_at"].isoformat()
    return out


def read_results(store: Store, fmt: Literal["parquet", "jsonl"]) -> list[dict[str, Any]]:
    """The results table written by :func:`write_results`, as dicts (for tests and small collections)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return from_arrow(pq.read_table(store.path("results.parquet"), filesystem=store.fs))
    data = store.read_bytes("results.jsonl") or b""
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def summarise(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts: photos ok / failed (by code), faces."""
    photos_ok: set[str] = set()
    failed: dict[str, str] = {}
    faces = 0
    for r in rows:
        if r["status"] == "ok":
            photos_ok.add(r["photo_id"])
            faces += 1
        else:
            failed[r["photo_id"]] = r["error_code"] or "error"
    codes: dict[str, int] = {}
    for c in failed.values():
        codes[c] = codes.get(c, 0) + 1
    return {"photos_ok": len(photos_ok), "photos_failed": len(failed), "faces": faces, "errors": codes}
