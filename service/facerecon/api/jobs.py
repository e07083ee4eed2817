"""The jobs a request runs on a worker thread: one photo or one set through the pipeline, encoded into the chosen
output."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from facerecon.api.forms import MEDIA_BY_FORMAT
from facerecon.api.schemas import (
    MESH_FORMATS,
    EncodedFile,
    FaceResult,
    IdentityCoefficients,
    ReconstructOptions,
    SetOptions,
    SetResponse,
)
from facerecon.export import export_mesh, metres_per_unit
from facerecon.imaging import DecodedPhoto
from facerecon.report import dense_map, face_result, reconstruct_response, set_item
from facerecon.results import Reconstruction

if TYPE_CHECKING:  # the state module runs these jobs
    from facerecon.api.state import ReconstructorLike
    from facerecon.api.workers import Ticket

log = logging.getLogger("facerecon.api")

# -- the jobs (run on a worker thread) ------------------------------------------------------------------------------
@dataclass
class Output:
    """A finished response body, built on the worker."""

    body: bytes
    media_type: str
    headers: dict[str, str]
    timings: dict[str, float]


def png_bytes(image: np.ndarray) -> bytes:
    """An overlay ``(H, W, 3) uint8`` as PNG (:func:`facerecon.render.overlay.encode_png`: about a third of
    Pillow's time at level 3, for a similar size)."""
    from facerecon.render.overlay import encode_png  # the renderer's module (torch): loaded with the first PNG

    return encode_png(image)


def server_timing(timings: dict[str, float]) -> str:
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


def _face_result(rec: ReconstructorLike, r: Reconstruction, index: int, image: np.ndarray,
                 opts: ReconstructOptions, names: list[str]) -> FaceResult:
    mesh = overlay = None
    if "mesh" in opts.include:
        mesh = EncodedFile.of(rec.export(r, opts.mesh_format), opts.mesh_format, MEDIA_BY_FORMAT[opts.mesh_format])
    if "overlay" in opts.include:
        overlay = EncodedFile.of(png_bytes(rec.overlay(image, r)), "png", "image/png")
    dense: dict[str, Any] = {}
    if "depth" in opts.include or "normals" in opts.include:
        maps = rec.maps(r)
        mpu = metres_per_unit(r.units)
        dense = {k: dense_map(maps, k, mpu) for k in ("depth", "normals") if k in opts.include}
    return face_result(r, index, expression_names=names, mesh=mesh, overlay=overlay,
                       vertices="vertices" in opts.include, **dense)


def _scale_headers(photo: DecodedPhoto) -> dict[str, str]:
    if photo.scale == 1.0:
        return {}
    return {"X-Photo-Scale": f"{photo.scale:.6g}", "X-Original-Size": "{}x{}".format(*photo.original_size)}


def reconstruct_job(rec: ReconstructorLike, photo: DecodedPhoto, opts: ReconstructOptions, fmt: str,
                    timings: dict[str, float], submitted: float, names: list[str], face_model: str, *,
                    ticket: Ticket, max_faces: int) -> Output:
    """One photo -> the chosen output (``timings`` holds the request's stages so far). The work stops at the next
    stage boundary once ``ticket`` is cancelled; ``faces=all`` reconstructs the ``max_faces`` largest faces."""
    timings["queue"] = (time.perf_counter() - submitted) * 1000.0
    image = photo.image
    ticket.check("detect")
    headers: dict[str, str] = _scale_headers(photo)
    media_type = MEDIA_BY_FORMAT[fmt]
    t0 = time.perf_counter()
    faces = rec.detect(image, opts.faces)
    detect_ms = (time.perf_counter() - t0) * 1000.0
    detected = len(faces)
    if opts.faces == "all":
        headers["X-Faces-Detected"] = str(detected)
        if detected > max_faces:
            headers["X-Faces-Limit"] = str(max_faces)
            faces = faces[:max_faces]
    if fmt in MESH_FORMATS:
        faces = faces[:1]  # a mesh file holds one face: the largest
    recs = rec.reconstruct(image, refine=opts.refine, faces=faces, checkpoint=ticket.check)
    for r in recs:  # detection ran once, here: each face's timings carry it, as when the pipeline detects
        r.timings.setdefault("detect", detect_ms)
    timings.update(_merge_face_timings(recs))
    ticket.check("encode")
    if fmt in MESH_FORMATS:
        files = rec.export_files(image, recs[0], fmt, opts.texture)  # type: ignore[arg-type]
        if len(files) > 1:  # a textured OBJ bundle
            from facerecon.export import to_zip

            body, media_type, name = to_zip(files), "application/zip", "face.zip"
        else:
            body, name = next(iter(files.values())), f"face.{fmt}"
        headers["Content-Disposition"] = f'inline; filename="{name}"'
        timings.update(_merge_face_timings(recs))
    elif fmt in ("depth", "normals"):
        body = rec.map_pngs(recs, (fmt,))[fmt]  # type: ignore[index]
        timings.update(_merge_face_timings(recs))
        if fmt == "depth":
            from facerecon.render.maps import DEPTH_SCALE

            headers["X-Depth-Scale"] = f"{DEPTH_SCALE:g}"
    elif fmt == "png":
        out = image
        for r in recs:
            out = rec.overlay(out, r)
        timings.update(_merge_face_timings(recs))
        t0 = time.perf_counter()
        body = png_bytes(out)
        timings["encode"] = (time.perf_counter() - t0) * 1000.0
    else:
        faces_out = []
        for i, r in enumerate(recs):
            ticket.check("encode")
            faces_out.append(_face_result(rec, r, i, image, opts, names))
        timings.update(_merge_face_timings(recs))
        t0 = time.perf_counter()
        response = reconstruct_response(face_model, recs[0].coefficients.layout, (image.shape[1], image.shape[0]),
                                        faces_out, timings)
        response.original_size = list(photo.original_size)
        response.scale = round(photo.scale, 6)
        response.faces_detected = detected if opts.faces == "all" else None
        body = response.model_dump_json().encode()
        timings["encode"] = (time.perf_counter() - t0) * 1000.0
    headers["X-Face-Count"] = str(len(recs))
    headers["X-Reconstruction-Mode"] = str(recs[0].mode)
    return Output(body=body, media_type=media_type, headers=headers, timings=timings)


def reconstruct_set_job(rec: ReconstructorLike, photos: list[DecodedPhoto], opts: SetOptions, fmt: str,
                        timings: dict[str, float], submitted: float, names: list[str], face_model: str, *,
                        ticket: Ticket) -> Output:
    """A set of photos of one person -> JSON or the identity mesh (stops at a stage boundary once ``ticket`` is
    cancelled)."""
    timings["queue"] = (time.perf_counter() - submitted) * 1000.0
    ticket.check("detect")
    images = [p.image for p in photos]
    result = rec.reconstruct_set(images, refine=opts.refine, checkpoint=ticket.check, on_missing=opts.on_missing)
    ticket.check("encode")
    timings.update({k: float(v) for k, v in result.timings.items()})
    mode = str(result.items[0].mode) if result.items else "fit"
    headers = {"X-Face-Count": str(len(result.items)), "X-Reconstruction-Mode": mode}
    if result.skipped:
        headers["X-Skipped-Photos"] = ",".join(map(str, result.skipped))
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
    for i, r in zip(result.indices, result.items, strict=True):
        image = images[i]
        overlay = None
        if "overlay" in opts.include:
            t0 = time.perf_counter()
            overlay = EncodedFile.of(png_bytes(rec.overlay(image, r)), "png", "image/png")
            timings["render"] = timings.get("render", 0.0) + (time.perf_counter() - t0) * 1000.0
        item = set_item(r, i, expression_names=names, overlay=overlay)
        if photos[i].scale != 1.0:
            item.original_size = list(photos[i].original_size)
            item.scale = round(photos[i].scale, 6)
        items.append(item)
    ident = result.identity.to_dict(0)
    t0 = time.perf_counter()
    response = SetResponse(
        face_model=face_model, layout=result.identity.layout, mode=mode, aggregation=result.aggregation,
        image_count=len(items), identity=IdentityCoefficients(id=ident["id"], tex=ident["tex"]), items=items,
        skipped=result.skipped,
        identity_mesh=None if mesh is None else EncodedFile.of(mesh, mesh_fmt, MEDIA_BY_FORMAT[mesh_fmt]),
        timings_ms={k: round(v, 2) for k, v in timings.items()},
    )
    body = response.model_dump_json().encode()
    timings["encode"] = (time.perf_counter() - t0) * 1000.0
    return Output(body=body, media_type="application/json", headers=headers, timings=timings)
