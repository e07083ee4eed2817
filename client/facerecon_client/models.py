"""Typed results (pydantic). Binary files the service embeds in JSON as base64 arrive here as ``bytes``.

Units and frames as the service documents them: photo pixels with y down, angles in degrees in ``pose``,
mesh units of the face model (decimetres for the shipped models). Unknown fields from a newer service are ignored.
"""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Alignment",
    "Coefficients",
    "DenseMap",
    "Face",
    "IdentityCoefficients",
    "ImageResult",
    "MeshResult",
    "ModelInfo",
    "PhotoCamera",
    "Pose",
    "Reconstruction",
    "SetItem",
    "SetReconstruction",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _unpack_files(data: Any, *names: str) -> Any:
    """``{"mesh": {"format": "obj", "data": "<base64>"}}`` -> ``{"mesh": b"...", "mesh_format": "obj"}``."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in names:
        value = data.get(name)
        if isinstance(value, dict) and "data" in value:
            data[name] = base64.b64decode(value["data"])
            data[f"{name}_format"] = value.get("format")
    return data


class Pose(_Model):
    """Head rotation, degrees: ``R = Rz(roll) Ry(yaw) Rx(pitch)`` on the model (x right, y up, z towards the
    camera). Positive pitch: the face turns down; positive yaw: towards the image's right (the person's left; the
    opposite of AFLW2000-3D / 300W-LP / BIWI's yaw); positive roll: counter-clockwise as the photo is viewed."""

    pitch: float
    yaw: float
    roll: float


class Coefficients(_Model):
    """The coefficient vector by group name: identity, expression, albedo, angle (radians), lighting (27 SH),
    translation."""

    id: list[float]
    exp: list[float]
    tex: list[float]
    angle: list[float]
    gamma: list[float]
    trans: list[float]


class Alignment(_Model):
    """The 224-pixel crop transform (the reference's ``trans_params`` = [w0, h0, sigma, tx, ty])."""

    w0: int
    h0: int
    sigma: float
    tx: float
    ty: float
    trans_params: list[float]


class PhotoCamera(_Model):
    """Maps the posed mesh (OBJ/PLY vertices) onto the photo, OpenCV's convention: ``(u, v, 1) ~ K (R v + t)``,
    photo px, x right, y down, integer = pixel centre (as ``landmarks68`` are mapped)."""

    intrinsics: list[list[float]] = Field(description="K, 3 x 3")
    rotation: list[list[float]] = Field(description="R, 3 x 3")
    translation: list[float] = Field(description="t, model units")
    width: int
    height: int

    def project(self, vertices: Any) -> list[tuple[float, float]]:
        """``(N, 3)`` mesh vertices (any nested sequence) -> N photo points ``(x, y)`` (plain Python, no numpy)."""
        k, r, t = self.intrinsics, self.rotation, self.translation
        out = []
        for v in vertices:
            c = [sum(r[i][j] * float(v[j]) for j in range(3)) + t[i] for i in range(3)]
            p = [sum(k[i][j] * c[j] for j in range(3)) for i in range(3)]
            out.append((p[0] / p[2], p[1] / p[2]))
        return out


class DenseMap(_Model):
    """One face's depth or normal map over its pixel window of the photo (``include=depth|normals``): element
    ``[r, c]`` is photo pixel ``(x0 + c, y0 + r)``, sampled at its centre, rendered with the face's ``camera``.

    Depth: ``uint16``, ``value / scale`` (10000) = metres along the camera's view axis (OpenCV camera z), 0 = no
    surface. Normals: ``float16`` unit ``(x, y, z)`` in camera axes x right, y up, z towards the camera, (0, 0, 0) =
    no surface."""

    kind: str
    x0: int
    y0: int
    width: int
    height: int
    shape: list[int]
    dtype: str
    scale: float | None = None
    data: bytes = Field(description="the raw little-endian array (decoded from base64)")

    @model_validator(mode="before")
    @classmethod
    def _decode(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("data"), str):
            data = {**data, "data": base64.b64decode(data["data"])}
        return data

    def array(self) -> Any:
        """The map as a numpy array of ``shape`` (``uint16`` or ``float16``; needs numpy)."""
        import numpy as np

        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)

    def metres(self) -> Any:
        """A depth map in metres, ``float32``, 0 where there is no surface (needs numpy)."""
        if self.kind != "depth" or not self.scale:
            raise ValueError("metres() is for a depth map")
        return self.array().astype("float32") / self.scale


class Face(_Model):
    """One reconstructed face of a photo."""

    index: int
    mode: str = Field(description="rnet, rnet+lm, rnet+fit or fit")
    box: list[float] = Field(description="(x0, y0, x1, y1), photo px")
    score: float | None = None
    coefficients: Coefficients
    expressions: dict[str, float] | None = Field(None, description="exp by blendshape name, when named")
    pose: Pose = Field(validation_alias="pose_degrees")
    landmarks68: list[tuple[float, float]] = Field(description="reprojected 68 landmarks, photo px, y down")
    detected_landmarks68: list[tuple[float, float]]
    landmark_error_crop_px: float
    alignment: Alignment
    camera: PhotoCamera | None = Field(None, description="projects the posed mesh onto the photo")
    vertices_photo: list[tuple[float, float, float]] | None = Field(
        None, description="every mesh vertex as photo (x, y) and camera depth, when asked for (include vertices)")
    depth: DenseMap | None = Field(None, description="the face's depth map, when asked for (include depth)")
    normals: DenseMap | None = Field(None, description="the face's normal map, when asked for (include normals)")
    timings_ms: dict[str, float] = Field(default_factory=dict)
    mesh: bytes | None = Field(None, description="the mesh file, when asked for (include mesh)")
    mesh_format: str | None = None
    overlay: bytes | None = Field(None, description="PNG of the face over the photo, when asked for")
    overlay_format: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _embedded_files(cls, data: Any) -> Any:
        return _unpack_files(data, "mesh", "overlay")


class Reconstruction(_Model):
    """``reconstruct()``: the faces of one photo (one unless ``faces="all"``), largest first."""

    face_model: str
    layout: dict[str, int]
    photo_size: tuple[int, int]
    face_count: int
    faces: list[Face]
    timings_ms: dict[str, float] = Field(default_factory=dict)

    @property
    def face(self) -> Face:
        """The largest face."""
        return self.faces[0]


class IdentityCoefficients(_Model):
    id: list[float]
    tex: list[float]


class SetItem(_Model):
    """Per-photo results of a set."""

    index: int
    mode: str
    box: list[float]
    pose: Pose = Field(validation_alias="pose_degrees")
    angle: list[float]
    expression: list[float]
    expressions: dict[str, float] | None = None
    lighting: list[float]
    translation: list[float]
    landmarks68: list[tuple[float, float]]
    landmark_error_crop_px: float
    alignment: Alignment
    photo_size: tuple[int, int]
    overlay: bytes | None = None
    overlay_format: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _embedded_files(cls, data: Any) -> Any:
        return _unpack_files(data, "overlay")


class SetReconstruction(_Model):
    """``reconstruct_set()``: one identity from several photos of one person."""

    face_model: str
    layout: dict[str, int]
    mode: str
    aggregation: str
    image_count: int
    identity: IdentityCoefficients
    items: list[SetItem]
    identity_mesh: bytes | None = None
    identity_mesh_format: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    skipped: list[int] = Field(default_factory=list, description="positions of the photos left out for want of a "
                                                                 "face (on_missing='skip')")

    @model_validator(mode="before")
    @classmethod
    def _embedded_files(cls, data: Any) -> Any:
        return _unpack_files(data, "identity_mesh")


class MeshResult(_Model):
    """A mesh file the service returned as the response body. A textured OBJ (``texture="photo"|"albedo"``) comes
    as a zip of ``mesh.obj``, ``mesh.mtl`` and ``texture.png`` (``media_type`` ``application/zip``): see
    :meth:`files`."""

    data: bytes
    format: str
    media_type: str
    texture: str = Field("none", description="`none` (per-vertex colours), `photo` or `albedo`")
    face_count: int = 1
    faces_detected: int | None = Field(None, description="faces in the photo, when faces='all' was asked")
    mode: str | None = None
    server_timing: dict[str, float] = Field(default_factory=dict, description="stage -> ms")
    skipped: list[int] = Field(default_factory=list, description="a set's photos left out for want of a face")

    @property
    def is_bundle(self) -> bool:
        """True for a textured OBJ: ``data`` is a zip of the OBJ, its MTL and its texture."""
        return self.media_type.split(";")[0].strip() == "application/zip"

    def files(self) -> dict[str, bytes]:
        """``{file name: bytes}``: the bundle's files for a textured OBJ (write them side by side: the OBJ names
        ``mesh.mtl``, which names ``texture.png``), else ``{"mesh.<format>": data}``."""
        if not self.is_bundle:
            return {f"mesh.{self.format}": self.data}
        import io
        import zipfile

        with zipfile.ZipFile(io.BytesIO(self.data)) as zf:
            return {name: zf.read(name) for name in zf.namelist()}


class ImageResult(_Model):
    """A PNG the service returned (the overlay, or a depth or normal map)."""

    data: bytes
    media_type: str
    face_count: int = 1
    mode: str | None = None
    server_timing: dict[str, float] = Field(default_factory=dict)
    depth_scale: float | None = Field(None, description="a depth map's values per metre (10000)")


class ModelInfo(_Model):
    """``GET /v1/models``."""

    version: str
    face_model: dict[str, Any]
    device: str
    renderer: str
    rnet: dict[str, Any] | None = None
    cnet: dict[str, Any] | None = None
    default_mode: str
    limits: dict[str, Any] = Field(default_factory=dict)
