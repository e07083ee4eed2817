"""The JSON of a reconstruction, built once from the pipeline's typed results: the HTTP API answers it
(``format=json``), the CLI writes it (``coefficients.json``), batch jobs store it. Schemas:
:class:`facerecon.api.schemas.FaceResult` and :class:`~facerecon.api.schemas.ReconstructResponse` (pydantic, the
OpenAPI the service documents).

Conventions: points in photo pixels, x right, y down, integer = pixel centre; angles in the pose block in degrees
(``facerecon.geometry``: positive yaw turns the face towards the image's right), in the coefficients in radians;
meshes in the model's units (decimetres for the shipped models) for OBJ/PLY, metres for GLB (``units`` in every
face's JSON).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from facerecon.api.schemas import (
    AlignmentOut,
    CoefficientsOut,
    DenseMap,
    DetectionOut,
    EncodedFile,
    FaceResult,
    MeshUnits,
    PhotoCamera,
    Pose,
    ReconstructResponse,
    SetItem,
)
from facerecon.coefficients import CoefficientLayout
from facerecon.results import Reconstruction

if TYPE_CHECKING:  # the maps' module imports the renderer (torch); the JSON of a face needs neither
    from facerecon.render.maps import FaceMaps, MapKind

__all__ = ["dense_map", "face_result", "reconstruct_response", "set_item"]


def dense_map(maps: FaceMaps, kind: MapKind, metres_per_unit: float) -> DenseMap:
    """One face's depth (uint16, the depth PNG's encoding) or normals (float16) over its window, as
    :class:`DenseMap`."""
    from facerecon.render.maps import DEPTH_SCALE, depth_to_uint16

    if kind == "depth":
        arr: np.ndarray = depth_to_uint16(maps.depth, metres_per_unit).astype("<u2")
        dtype, scale = "uint16", DEPTH_SCALE
    else:
        arr = maps.normals.astype("<f2")
        dtype, scale = "float16", None
    h, w = maps.depth.shape
    return DenseMap(kind=kind, x0=maps.x0, y0=maps.y0, width=w, height=h, shape=list(arr.shape), dtype=dtype,
                    scale=scale, data=base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii"))


def face_result(rec: Reconstruction, index: int = 0, *, expression_names: Sequence[str] = (),
                mesh: EncodedFile | None = None, overlay: EncodedFile | None = None,
                vertices: bool = False, depth: DenseMap | None = None, normals: DenseMap | None = None
                ) -> FaceResult:
    """One face: coefficients by name, pose, both 68-landmark sets, the detection's confidences, the alignment,
    the photo-space camera, timings; ``mesh`` / ``overlay`` / ``depth`` / ``normals`` when the caller made them;
    every vertex projected into the photo with ``vertices``."""
    intr, rot, t = rec.photo_camera()
    camera = PhotoCamera(intrinsics=intr.tolist(), rotation=rot.tolist(), translation=t.tolist(),
                         width=int(rec.alignment.w0), height=int(rec.alignment.h0))
    verts = np.round(rec.vertices_photo(), 3).tolist() if vertices else None
    coeffs = rec.coefficients.to_dict()
    names = list(expression_names)
    exp = coeffs["exp"]
    return FaceResult(
        index=index,
        mode=rec.mode,
        box=[float(v) for v in rec.face.box],
        score=float(rec.face.score),
        detection=DetectionOut.of(rec.face),
        coefficients=CoefficientsOut(**coeffs),
        expressions=dict(zip(names, exp, strict=True)) if names and len(names) == len(exp) else None,
        pose_degrees=Pose(**rec.pose_degrees()),
        landmarks68=rec.landmarks_photo.tolist(),
        detected_landmarks68=rec.face.lm68.tolist(),
        landmark_error_crop_px=float(rec.landmark_error_px),
        alignment=AlignmentOut(**rec.alignment.to_dict()),
        timings_ms={k: round(float(v), 2) for k, v in rec.timings.items()},
        units=MeshUnits.of(rec.units),
        camera=camera,
        vertices_photo=verts,
        depth=depth,
        normals=normals,
        mesh=mesh,
        overlay=overlay,
    )


def set_item(rec: Reconstruction, index: int, *, expression_names: Sequence[str] = (),
             overlay: EncodedFile | None = None) -> SetItem:
    """One photo of a set: what varies between the photos of one person (the identity is the set's)."""
    f = face_result(rec, index, expression_names=expression_names)
    c = f.coefficients
    return SetItem(
        index=index, mode=f.mode, box=f.box, detection=f.detection, pose_degrees=f.pose_degrees, angle=c.angle,
        expression=c.exp, expressions=f.expressions, lighting=c.gamma, translation=c.trans,
        landmarks68=f.landmarks68, landmark_error_crop_px=f.landmark_error_crop_px, alignment=f.alignment,
        photo_size=list(rec.photo_size), units=f.units, overlay=overlay,
    )


def reconstruct_response(face_model: str, layout: CoefficientLayout, photo_size: tuple[int, int],
                         faces: Sequence[FaceResult], timings_ms: dict[str, float]) -> ReconstructResponse:
    """A photo's faces with the model they are coefficients of."""
    return ReconstructResponse(
        face_model=face_model, layout=layout, photo_size=list(photo_size), face_count=len(faces),
        faces=list(faces), timings_ms={k: round(float(v), 2) for k, v in timings_ms.items()},
    )
