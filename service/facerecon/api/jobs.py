"""The jobs a request runs on a worker thread: one photo or one set through the pipeline, encoded into the chosen
output."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

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
from facerecon.export import export_mesh
from facerecon.report import face_result, reconstruct_response, set_item
from facerecon.results import Reconstruction

if TYPE_CHECKING:  # the state module runs these jobs
    from facerecon.api.state import ReconstructorLike

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
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


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
    return face_result(r, index, expression_names=names, mesh=mesh, overlay=overlay)


def reconstruct_job(rec: ReconstructorLike, image: np.ndarray, opts: ReconstructOptions, fmt: str,
                    timings: dict[str, float], submitted: float, names: list[str], face_model: str) -> Output:
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
        body = png_bytes(out)
        timings["encode"] = (time.perf_counter() - t0) * 1000.0
    else:
        recs = rec.reconstruct(image, which=opts.faces, refine=opts.refine)
        faces = [_face_result(rec, r, i, image, opts, names) for i, r in enumerate(recs)]
        timings.update(_merge_face_timings(recs))
        t0 = time.perf_counter()
        response = reconstruct_response(face_model, recs[0].coefficients.layout, (image.shape[1], image.shape[0]),
                                        faces, timings)
        body = response.model_dump_json().encode()
        timings["encode"] = (time.perf_counter() - t0) * 1000.0
    headers["X-Face-Count"] = str(len(recs))
    headers["X-Reconstruction-Mode"] = str(recs[0].mode)
    return Output(body=body, media_type=media_type, headers=headers, timings=timings)


def reconstruct_set_job(rec: ReconstructorLike, images: list[np.ndarray], opts: SetOptions, fmt: str,
                        timings: dict[str, float], submitted: float, names: list[str], face_model: str) -> Output:
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
            overlay = EncodedFile.of(png_bytes(rec.overlay(image, r)), "png", "image/png")
            timings["render"] = timings.get("render", 0.0) + (time.perf_counter() - t0) * 1000.0
        items.append(set_item(r, i, expression_names=names, overlay=overlay))
    ident = result.identity.to_dict(0)
    t0 = time.perf_counter()
    response = SetResponse(
        face_model=face_model, layout=result.identity.layout, mode=mode, aggregation=result.aggregation,
        image_count=len(items), identity=IdentityCoefficients(id=ident["id"], tex=ident["tex"]), items=items,
        identity_mesh=None if mesh is None else EncodedFile.of(mesh, mesh_fmt, MEDIA_BY_FORMAT[mesh_fmt]),
        timings_ms={k: round(v, 2) for k, v in timings.items()},
    )
    body = response.model_dump_json().encode()
    timings["encode"] = (time.perf_counter() - t0) * 1000.0
    return Output(body=body, media_type="application/json", headers=headers, timings=timings)
