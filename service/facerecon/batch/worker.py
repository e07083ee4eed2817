"""One worker's job, the same for every engine: work units in, their face folders written, their table rows out.

A :class:`UnitProcessor` holds one :class:`~facerecon.pipeline.Reconstructor` (loaded once per process or Ray
actor) and takes a batch of units at a time. Single photos go through the pipeline's public stages so the batch
shares one R-Net call: every photo is read, decoded, detected and aligned (``detect``, ``prepare``), then all their
faces go through one ``estimate`` (R-Net on the whole batch; with fitting, each face is still fitted on its own,
exactly as alone), then each is ``finish``-ed and written. A set (the photos of one identity) is one
``reconstruct_set``.

It never raises for a photo: a typed error of the pipeline becomes a row with its code and message, a file system
error a row with code ``unreadable``, anything else a row with code ``internal`` (and a logged traceback).

Timings per row (``timings_ms``, milliseconds): the photo's own stages (``read_file``, ``decode_image``, ``detect``,
``align``, ``decode``, ``export``/``texture``; ``outputs``: export, overlay and JSON; ``write``: storing the files),
the batch's ``rnet``/``cnet``/``skin``/``fit`` (for all ``batch_faces`` faces of the call), and ``total``: the
photo's own stages plus its share of the batch's estimate (a set: the set's time over its photos).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from facerecon.batch.inputs import PhotoRef, WorkUnit, face_id_for, read_source
from facerecon.batch.storage import Store
from facerecon.batch.table import ResultRow
from facerecon.errors import FaceReconError, NoFaceFound

log = logging.getLogger(__name__)


class WorkConfig(BaseModel):
    """What every worker needs to know (sent to each process or actor once, as JSON)."""

    out: str = Field(description="the output folder: local path (absolute) or URI")
    run_id: str
    format: Literal["obj", "ply", "glb"] = "obj"
    texture: Literal["none", "photo", "albedo"] = "none"
    faces: Literal["largest", "all"] = "largest"
    refine: bool = Field(description="test-time fitting after R-Net (resolved from FACERECON_REFINE by the driver)")
    overlay: bool = False


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class _Photo:
    """A photo on its way through the batch: its reference, image and prepared faces, or its error row."""

    def __init__(self, ref: PhotoRef, unit: WorkUnit) -> None:
        self.ref, self.unit = ref, unit
        self.image: Any = None
        self.prepared: list[Any] = []
        self.timings: dict[str, float] = {}
        self.own_ms = 0.0  # time spent on this photo alone
        self.rows: list[ResultRow] = []


class UnitProcessor:
    """Reconstructs work units with one :class:`Reconstructor` and writes their outputs under ``config.out``."""

    def __init__(self, config: WorkConfig, reconstructor: Any = None) -> None:
        from facerecon.config import get_settings
        from facerecon.pipeline import Reconstructor

        self.config = config
        self.settings = get_settings()
        self.rec = reconstructor if reconstructor is not None else Reconstructor(self.settings)
        self.store = Store(config.out)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    # -- rows ----------------------------------------------------------------------------------------------------
    def _error(self, ref: PhotoRef, unit: WorkUnit, code: str, message: str, timings: dict[str, float]) -> ResultRow:
        return ResultRow(
            photo_id=ref.photo_id, input_index=ref.input_index, source=ref.source, identity=unit.identity,
            identity_id=unit.identity_id, status="error", error_code=code, error_message=message,
            timings_ms=timings, run_id=self.config.run_id, worker=self.worker,
        )

    def _error_of(self, ref: PhotoRef, unit: WorkUnit, exc: BaseException, timings: dict[str, float]) -> ResultRow:
        if isinstance(exc, FaceReconError):
            return self._error(ref, unit, exc.code, exc.message, timings)
        if isinstance(exc, OSError):
            return self._error(ref, unit, "unreadable", f"{type(exc).__name__}: {exc}", timings)
        log.error("%s: unexpected failure", ref.source, exc_info=exc)
        return self._error(ref, unit, "internal", f"{type(exc).__name__}: {exc}", timings)

    def failed_row(self, ref: PhotoRef, unit: WorkUnit, exc: BaseException) -> ResultRow:
        """The row of a photo whose whole batch failed outside the per-photo guards (code ``internal``)."""
        return self._error(ref, unit, "internal", f"{type(exc).__name__}: {exc}", {})

    def _face_row(self, ref: PhotoRef, unit: WorkUnit, k: int, n: int, image: Any, face: Any,
                  timings: dict[str, float], identity_mesh: str | None, batch_faces: int) -> ResultRow:
        """Write one face's folder (mesh files as :meth:`Reconstructor.export_files` gives them, coefficients.json,
        overlay.png with ``--overlay``) and return its row."""
        cfg = self.config
        face_id = face_id_for(ref.photo_id, k, "largest" if unit.identity else cfg.faces)
        folder = f"faces/{face_id}"
        t0 = time.perf_counter()
        files = dict(self.rec.export_files(image, face, cfg.format, cfg.texture))
        if cfg.overlay:
            from facerecon.render.overlay import encode_png

            files["overlay.png"] = encode_png(self.rec.overlay(image, face))
        doc = self.rec.to_json(face)
        files["coefficients.json"] = json.dumps(doc, indent=1).encode("utf-8")
        t1 = time.perf_counter()
        for name, data in files.items():
            self.store.write_bytes(f"{folder}/{name}", data)
        row_timings = {**doc["timings_ms"], **timings, "outputs": (t1 - t0) * 1000.0, "write": _ms(t1)}
        det, pose, coefs = doc["detection"], doc["pose_degrees"], doc["coefficients"]
        return ResultRow(
            photo_id=ref.photo_id, face_id=face_id, face_index=k, n_faces=n, input_index=ref.input_index,
            source=ref.source, identity=unit.identity, identity_id=unit.identity_id, status="ok",
            face_model=doc["face_model"], mode=doc["mode"],
            **{f"coef_{g}": v for g, v in coefs.items()},
            pose_pitch_deg=pose["pitch"], pose_yaw_deg=pose["yaw"], pose_roll_deg=pose["roll"],
            landmarks68=doc["landmarks68"], box=doc["box"], detection_score=det["score"],
            landmark_score=det["landmark_score"], detection_reliable=det["reliable"],
            landmark_error_crop_px=doc["landmark_error_crop_px"], photo_width=doc["photo_size"][0],
            photo_height=doc["photo_size"][1], timings_ms=row_timings, batch_faces=batch_faces,
            mesh_path=f"{folder}/mesh.{cfg.format}",  # a textured OBJ has mesh.mtl and texture.png beside it
            files=sorted(f"{folder}/{name}" for name in files), identity_mesh_path=identity_mesh,
            run_id=cfg.run_id, worker=self.worker,
        )

    def _load(self, ref: PhotoRef, timings: dict[str, float]) -> Any:
        from facerecon.imaging import decode_image

        t0 = time.perf_counter()
        data = read_source(ref.source, self.settings.max_upload_bytes)
        timings["read_file"] = _ms(t0)
        t1 = time.perf_counter()
        image = decode_image(data, max_bytes=self.settings.max_upload_bytes, max_pixels=self.settings.max_image_pixels)
        timings["decode_image"] = _ms(t1)
        return image

    # -- units ---------------------------------------------------------------------------------------------------
    def process(self, unit: WorkUnit) -> list[dict[str, Any]]:
        """One unit (see :meth:`process_batch`)."""
        return self.process_batch([unit])

    def process_batch(self, units: Sequence[WorkUnit]) -> list[dict[str, Any]]:
        """Reconstruct units; rows as ``ResultRow.model_dump()`` dicts, in unit order (never raises for a photo)."""
        singles = [u for u in units if u.identity is None]
        rows_of: dict[int, list[ResultRow]] = {}
        for u in units:
            if u.identity is not None:
                rows_of[u.index] = self._set(u)
        for photo in self._photos(singles):
            rows_of.setdefault(photo.unit.index, []).extend(photo.rows)
        now = datetime.now(UTC)
        out: list[dict[str, Any]] = []
        for u in units:
            for r in rows_of.get(u.index, []):
                r.finished_at = now
                out.append(r.model_dump())
        return out

    def _photos(self, units: Sequence[WorkUnit]) -> list[_Photo]:
        """Single photos: detect and align each, one ``estimate`` for every face of the batch, finish and write."""
        photos = [_Photo(u.members[0], u) for u in units]
        ready: list[_Photo] = []
        for ph in photos:
            t0 = time.perf_counter()
            if ph.ref.error_code is not None:
                ph.rows = [self._error(ph.ref, ph.unit, ph.ref.error_code, ph.ref.error_message or "", {})]
                continue
            try:
                ph.image = self._load(ph.ref, ph.timings)
                t_det = time.perf_counter()
                faces = self.rec.detect(ph.image, self.config.faces)
                ph.timings["detect"] = _ms(t_det)
                ph.prepared = [self.rec.prepare(ph.image, f) for f in faces]
                for p in ph.prepared:
                    p.timings.update(ph.timings)
                ready.append(ph)
            except Exception as exc:
                ph.rows = [self._error_of(ph.ref, ph.unit, exc, {**ph.timings, "total": _ms(t0)})]
            ph.own_ms += _ms(t0)
        if not ready:
            return photos
        prepared = [p for ph in ready for p in ph.prepared]
        t_est = time.perf_counter()
        try:
            estimate = self.rec.estimate(prepared, refine=self.config.refine)
            # the R-Net's second look at turned faces, batched over the photos too (as a single photo gets it)
            images = [ph.image for ph in ready for _ in ph.prepared]
            prepared, estimate = self.rec.second_pass(images, prepared, estimate)  # type: ignore[arg-type]
            at = 0
            for ph in ready:
                ph.prepared, at = prepared[at: at + len(ph.prepared)], at + len(ph.prepared)
        except Exception as exc:  # not one photo's fault: every photo of the call fails alike
            for ph in ready:
                ph.rows = [self._error_of(ph.ref, ph.unit, exc, dict(ph.timings))]
            return photos
        est_ms_per_face = _ms(t_est) / len(prepared)
        index = 0
        for ph in ready:
            t0 = time.perf_counter()
            n = len(ph.prepared)
            try:
                rows = []
                for k, p in enumerate(ph.prepared):
                    face = self.rec.finish(p, estimate, index + k)
                    rows.append(self._face_row(ph.ref, ph.unit, k, n, ph.image, face, {}, None, len(prepared)))
                ph.own_ms += _ms(t0)
                total = ph.own_ms + est_ms_per_face * n
                for r in rows:
                    r.timings_ms["total"] = total
                ph.rows = rows
            except Exception as exc:
                ph.rows = [self._error_of(ph.ref, ph.unit, exc, dict(ph.timings))]
            index += n
            ph.image, ph.prepared = None, []  # free the photo before the next is written
        return photos

    def _set(self, unit: WorkUnit) -> list[ResultRow]:
        """The photos of one identity as one set: one identity mesh; a photo that fails is an error row and the
        set goes on without it."""
        from facerecon.export import export_mesh

        t_start = time.perf_counter()
        rows: dict[str, ResultRow] = {}
        loaded: list[tuple[PhotoRef, Any, dict[str, float]]] = []
        for ref in unit.members:
            timings: dict[str, float] = {}
            if ref.error_code is not None:
                rows[ref.photo_id] = self._error(ref, unit, ref.error_code, ref.error_message or "", timings)
                continue
            try:
                loaded.append((ref, self._load(ref, timings), timings))
            except Exception as exc:
                rows[ref.photo_id] = self._error_of(ref, unit, exc, timings)
        while loaded:
            try:
                result = self.rec.reconstruct_set([im for _, im, _ in loaded], refine=self.config.refine)
            except NoFaceFound as exc:
                bad = exc.details.get("index")
                if not isinstance(bad, int):  # not attributable to one photo: the whole set fails
                    for ref, _, t in loaded:
                        rows[ref.photo_id] = self._error_of(ref, unit, exc, t)
                    break
                ref, _, t = loaded.pop(bad)
                rows[ref.photo_id] = self._error(ref, unit, exc.code, "no face found in the photo", t)
                continue
            except Exception as exc:
                for ref, _, t in loaded:
                    rows[ref.photo_id] = self._error_of(ref, unit, exc, t)
                break
            ident = f"identities/{unit.identity_id}/identity.{self.config.format}"
            try:
                self.store.write_bytes(ident, export_mesh(self.rec.identity_mesh(result), self.config.format))
                for (ref, image, t), item in zip(loaded, result.items, strict=True):
                    rows[ref.photo_id] = self._face_row(ref, unit, 0, 1, image, item, t, ident, len(loaded))
                total = _ms(t_start) / len(loaded)
                for ref, _, _ in loaded:
                    rows[ref.photo_id].timings_ms["total"] = total
            except Exception as exc:
                for ref, _, t in loaded:
                    rows[ref.photo_id] = self._error_of(ref, unit, exc, t)
            break
        return [rows[m.photo_id] for m in unit.members]
