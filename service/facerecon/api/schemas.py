"""The HTTP API's pydantic models: the request options (multipart form fields) and every JSON response. They
generate the OpenAPI document users read (``/docs``, ``/openapi.json``), so every field says its units and frame.

Frames: photo coordinates are pixels, x right, **y down**, integer = pixel centre (as the engine). Angles are
degrees in the responses (the coefficient vector keeps the model's radians). Mesh units are the face model's
(decimetres for the shipped models).

Size: over 400 lines: it is the whole public JSON contract in one place (the OpenAPI document is generated from
it), mostly field declarations with their descriptions; splitting it would scatter one schema over files.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facerecon.coefficients import CoefficientLayout
from facerecon.facemodel.format import FaceModelCard
from facerecon.formats import MESH_FORMATS, MeshFormat, OnMissing, TextureChoice

if TYPE_CHECKING:
    from facerecon.detect.face import DetectedFace

__all__ = [
    "MESH_FORMATS",
    "AlignmentOut",
    "CoefficientsOut",
    "DenseMap",
    "EncodedFile",
    "ErrorBody",
    "ErrorResponse",
    "FaceResult",
    "HealthResponse",
    "IdentityCoefficients",
    "MeshFormat",
    "ModelsResponse",
    "OutputFormat",
    "PhotoCamera",
    "Pose",
    "ReadyResponse",
    "ReconstructOptions",
    "ReconstructResponse",
    "ServiceLimits",
    "SetItem",
    "SetOptions",
    "SetOutputFormat",
    "SetResponse",
]

OutputFormat = Literal["obj", "glb", "ply", "json", "png", "depth", "normals"]
SetOutputFormat = Literal["json", "obj", "glb", "ply"]
Include = Literal["mesh", "overlay", "vertices", "depth", "normals"]
SetInclude = Literal["mesh", "overlay"]
Point2 = Annotated[list[float], Field(min_length=2, max_length=2)]


# -- errors -------------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. `no_face`, `image_too_large`, `overloaded`",
                      examples=["no_face"])
    message: str = Field(description="what went wrong, for people", examples=["no face found in the photo"])
    details: dict[str, Any] = Field(default_factory=dict, description="code-specific facts (limits, indices, ...)")


class ErrorResponse(BaseModel):
    """Every error answer of the API has this shape (503s add a `Retry-After` header, in seconds)."""

    error: ErrorBody


# -- request options ----------------------------------------------------------------------------------------------
def _split_include(v: Any) -> Any:
    """``include`` as comma-separated text and/or repeated fields: ``"mesh,overlay"`` or ``["mesh", "overlay"]``."""
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v) if isinstance(v, list | tuple | set) else v
    if not isinstance(items, list):
        return v
    out: list[Any] = []
    for item in items:
        if isinstance(item, str):
            out.extend(p.strip() for p in item.split(",") if p.strip())
        else:
            out.append(item)
    return out


class ReconstructOptions(BaseModel):
    """Form fields of ``POST /v1/reconstruct`` (besides the `image` file)."""

    model_config = ConfigDict(extra="forbid")

    format: OutputFormat | None = Field(
        None, description="output: `obj` (default), `glb`, `ply`, `json`, `png` (the overlay), `depth` (the depth "
                          "map: 16-bit grey PNG, value / 10000 = metres, 0 = no surface) or `normals` (the normal "
                          "map: RGB PNG, n = value / 127.5 - 1, camera axes x right, y up, z towards the camera; "
                          "0 = no surface), both of the photo's size; overrides `Accept` (which names only the "
                          "first five: `image/png` is the overlay)")
    faces: Literal["largest", "all"] = Field(
        "largest", description="`largest` face, or `all` faces (JSON: every face; PNG: every face drawn; mesh "
                               "formats: the largest face's mesh, with `X-Faces-Detected` giving the count)")
    refine: bool | None = Field(
        None, description="test-time fitting after R-Net (default: the model's default mode; always on without "
                          "an R-Net)")
    include: list[Include] = Field(
        default_factory=list, description="JSON only: embed `mesh` and/or `overlay` (base64), e.g. `mesh,overlay`; "
                                          "`vertices`: every mesh vertex projected into the photo (`vertices_photo`); "
                                          "`depth` and/or `normals`: each face's depth / normal map as an array "
                                          "over its pixel window (`DenseMap`)")
    mesh_format: MeshFormat = Field("obj", description="format of a mesh embedded in JSON (`include=mesh`)")
    texture: TextureChoice = Field(
        "none", description="`obj`/`glb` only: a textured mesh, the `photo`'s colours or the fitted `albedo`, in a "
                            "UV texture (GLB: one file; OBJ: a zip of obj+mtl+png); `none` keeps vertex colours")

    _split = field_validator("include", mode="before")(_split_include)


class SetOptions(BaseModel):
    """Form fields of ``POST /v1/reconstruct/set`` (besides the `images` files)."""

    model_config = ConfigDict(extra="forbid")

    format: SetOutputFormat | None = Field(
        None, description="`json` (default) or the identity mesh itself as `obj`, `glb` or `ply`; overrides `Accept`")
    refine: bool | None = Field(None, description="test-time fitting after R-Net (see /v1/reconstruct)")
    include: list[SetInclude] = Field(
        default_factory=lambda: ["mesh"],
        description="JSON only: `mesh` (the identity mesh, default) and/or `overlay` (per photo); an empty value "
                    "embeds neither")
    mesh_format: MeshFormat = Field("obj", description="format of the identity mesh embedded in JSON")
    on_missing: OnMissing = Field(
        "fail", description="a photo without a face: `fail` the whole set (422 `no_face`, default) or `skip` it "
                            "(JSON `skipped`, header `X-Skipped-Photos`: its position; 422 when every photo is "
                            "skipped)")

    _split = field_validator("include", mode="before")(_split_include)


# -- reconstruction results ---------------------------------------------------------------------------------------
class EncodedFile(BaseModel):
    """A binary file embedded in JSON."""

    format: str = Field(description="`obj`, `glb`, `ply` or `png`")
    media_type: str = Field(description="its MIME type, e.g. `model/obj`")
    encoding: Literal["base64"] = "base64"
    data: str = Field(description="the file, base64 (RFC 4648, with padding)")

    @classmethod
    def of(cls, data: bytes, fmt: str, media_type: str) -> EncodedFile:
        return cls(format=fmt, media_type=media_type, data=base64.b64encode(data).decode("ascii"))


class CoefficientsOut(BaseModel):
    """The coefficient vector by group name (sizes in the model's `layout`)."""

    id: list[float] = Field(description="identity shape coefficients")
    exp: list[float] = Field(description="expression coefficients (blendshape weights for blendshape models)")
    tex: list[float] = Field(description="albedo coefficients")
    angle: list[float] = Field(description="(pitch, yaw, roll), radians, signs as `pose_degrees` (`Pose`)",
                               min_length=3, max_length=3)
    gamma: list[float] = Field(description="spherical-harmonics lighting, 27 values, channel-major R, G, B",
                               min_length=27, max_length=27)
    trans: list[float] = Field(description="translation (x, y, z), model units (`units.model`: decimetres for the "
                               "shipped models)",
                               min_length=3, max_length=3)


class MeshUnits(BaseModel):
    """The length unit of each output: the face model's for the coefficients' `trans` and the OBJ and PLY files
    (decimetres for the shipped models, as the reference's OBJ), metres for GLB (glTF's unit)."""

    model: str = Field(description="the face model's unit: `coefficients.trans`, OBJ and PLY vertices")
    obj: str = Field(description="unit of OBJ vertices")
    ply: str = Field(description="unit of PLY vertices")
    glb: Literal["metre"] = Field("metre", description="unit of GLB vertices (always metres)")

    @classmethod
    def of(cls, model_units: str) -> MeshUnits:
        from facerecon.export import file_units

        return cls(model=model_units, **file_units(model_units))


class Pose(BaseModel):
    """Head rotation in degrees: ``R = Rz(roll) Ry(yaw) Rx(pitch)`` applied to the face model in its frame (x to the
    viewer's right, y up, z towards the camera), ``v' = R v + t``; a frontal face is (0, 0, 0). Yaw has the
    opposite sign of AFLW2000-3D / 300W-LP / BIWI's (3DDFA, Hopenet): negate it to compare."""

    pitch: float = Field(description="rotation about x, degrees; positive: the face turns down (chin towards the "
                                     "chest)")
    yaw: float = Field(description="rotation about y, degrees; positive: the face turns towards the image's right "
                                   "(the person's own left); AFLW2000-3D / 300W-LP / BIWI count it the other way")
    roll: float = Field(description="rotation about z, degrees; positive: the head tilts counter-clockwise as the "
                                    "photo is viewed (its top towards the image's left)")


class PhotoCamera(BaseModel):
    """A pinhole camera that maps the posed mesh (the OBJ/PLY vertices, model units) onto the photo, in OpenCV's
    convention: ``p_cam = R v + t`` (x right, y down, z forward), ``(u, v, 1) ~ K p_cam`` in photo pixels, x right,
    y down, integer = pixel centre. ``R = diag(1, -1, -1)`` and ``t = (0, 0, distance)`` for the reference camera
    (it looks down the model's -z from z = distance); ``K`` folds in the 224 crop's alignment, mapping exactly as
    `landmarks68` are mapped (the overlay's pixel-exact resampling differs by under about a pixel)."""

    intrinsics: list[list[float]] = Field(description="K, 3 x 3", min_length=3, max_length=3)
    rotation: list[list[float]] = Field(description="R, 3 x 3 (model to camera)", min_length=3, max_length=3)
    translation: list[float] = Field(description="t, model units", min_length=3, max_length=3)
    width: int = Field(description="photo width, px")
    height: int = Field(description="photo height, px")


class AlignmentOut(BaseModel):
    """The 224-pixel crop transform (the reference's `trans_params` and the derived integers)."""

    w0: int = Field(description="photo width, px")
    h0: int = Field(description="photo height, px")
    sigma: float = Field(description="resize factor (resized px per photo px)")
    tx: float = Field(description="model origin x in the photo, px (y-up frame)")
    ty: float = Field(description="model origin y in the photo, px (y-up frame)")
    w: int = Field(description="resized photo width, px")
    h: int = Field(description="resized photo height, px")
    left: int = Field(description="crop left edge in the resized photo, px")
    up: int = Field(description="crop top edge in the resized photo, px")
    size: int = Field(description="crop side, px")
    trans_params: list[float] = Field(description="the reference's [w0, h0, sigma, tx, ty]")


class DetectionOut(BaseModel):
    """How sure the detector is of this face. A face that is not ``reliable`` was still reconstructed, but its
    result may be wrong (a weak detection, or landmarks the face mesh itself doubts, as on some true profiles)."""

    score: float = Field(description="detector confidence, 0-1 (BlazeFace)")
    landmark_score: float = Field(description="landmark confidence, 0-1 (the face mesh's face-presence output)")
    reliable: bool = Field(description="both confidences above their thresholds")
    warnings: list[str] = Field(description="why the face is not reliable (empty when it is)")
    pose_estimate: Pose | None = Field(None, description="head pose from the detector's 3D landmarks, degrees, in "
                                                         "`Pose`'s convention (its pitch reads about 10 degrees high)")

    @classmethod
    def of(cls, face: DetectedFace) -> DetectionOut:
        pose = None if face.pose is None else Pose(**dict(zip(("pitch", "yaw", "roll"), face.pose, strict=True)))
        return cls(score=face.score, landmark_score=face.landmark_score, reliable=face.reliable,
                   warnings=face.warnings, pose_estimate=pose)


class DenseMap(BaseModel):
    """A per-pixel map of one face over its pixel window of the photo, as a raw little-endian array in base64:
    ``numpy.frombuffer(base64.b64decode(data), dtype="<u2" or "<f2").reshape(shape)``. Element ``[r, c]`` is photo
    pixel ``(x0 + c, y0 + r)`` (x right, y down), sampled at its centre; the pixels outside the window have no
    surface of this face. Rendered with `camera`: the mesh vertex ``v`` lands on pixel ``round(K (R v + t))``, with
    the depth ``(R v + t)_z`` (`vertices_photo`). Only the overlay's region is drawn (the face, the eyes and the inner
    mouth: not the scalp, neck or back of the head); the nearest surface wins."""

    kind: Literal["depth", "normals"]
    x0: int = Field(description="photo column of the window's first column, px")
    y0: int = Field(description="photo row of the window's first row, px")
    width: int = Field(description="window width, px")
    height: int = Field(description="window height, px")
    shape: list[int] = Field(description="array shape: (height, width) for depth, (height, width, 3) for normals")
    dtype: Literal["uint16", "float16"] = Field(
        description="`uint16` (depth: value / `scale` = metres along the camera's view axis, 0 = no surface) or "
                    "`float16` (normals: unit (x, y, z), x right, y up, z towards the camera; (0, 0, 0) = no "
                    "surface; OpenCV's camera frame is (x, -y, -z))")
    byte_order: Literal["little"] = "little"
    scale: float | None = Field(None, description="depth values per metre (10000: units of 0.1 mm), as in the "
                                                  "depth PNG")
    encoding: Literal["base64"] = "base64"
    data: str = Field(description="the array's bytes, row-major, base64 (RFC 4648, with padding)")


class FaceResult(BaseModel):
    """One reconstructed face."""

    index: int = Field(description="0 = the largest face; faces are ordered by box area")
    mode: str = Field(description="`rnet`, `rnet+lm` (R-Net + the NumPy landmark stage, `refine=false`), `rnet+fit` "
                                  "or `fit` (test-time fitting from the mean face)")
    box: list[float] = Field(description="detector box (x0, y0, x1, y1), photo px, y down", min_length=4,
                             max_length=4)
    score: float | None = Field(None, description="detector confidence")
    detection: DetectionOut
    coefficients: CoefficientsOut
    expressions: dict[str, float] | None = Field(
        None, description="the `exp` coefficients by blendshape name, for models that name them")
    pose_degrees: Pose
    landmarks68: list[Point2] = Field(
        description="the reconstruction's 68 landmarks (iBUG order) reprojected into the photo, px, y down",
        min_length=68, max_length=68)
    detected_landmarks68: list[Point2] = Field(description="the detector's 68 landmarks, photo px, y down",
                                               min_length=68, max_length=68)
    landmark_error_crop_px: float = Field(description="mean distance between the two landmark sets, crop px")
    alignment: AlignmentOut
    timings_ms: dict[str, float] = Field(description="pipeline stage -> milliseconds for this face")
    units: MeshUnits = Field(description="length units of `coefficients.trans` and of each mesh format")
    camera: PhotoCamera = Field(description="projects the posed mesh (OBJ/PLY vertices) onto the photo")
    vertices_photo: list[list[float]] | None = Field(
        None, description="when `include=vertices`: every vertex of the posed mesh (OBJ order) as (x, y, depth): "
                          "photo px (x right, y down, integer = pixel centre) and the camera-space depth along the "
                          "view axis, model units (smaller = nearer)")
    depth: DenseMap | None = Field(None, description="this face's depth map over its window, when `include=depth`")
    normals: DenseMap | None = Field(None, description="this face's normal map over its window, when "
                                                       "`include=normals`")
    mesh: EncodedFile | None = Field(None, description="the posed mesh, when `include=mesh`")
    overlay: EncodedFile | None = Field(None, description="this face drawn over the photo (PNG), when "
                                                          "`include=overlay`")


class ReconstructResponse(BaseModel):
    """`POST /v1/reconstruct` as JSON: always a list of faces (one with `faces=largest`)."""

    face_model: str = Field(description="name of the face model")
    layout: CoefficientLayout = Field(description="sizes of the coefficient groups")
    photo_size: list[int] = Field(description="(width, height) of the decoded, EXIF-rotated photo, px: the frame of "
                                              "every coordinate in this answer", min_length=2, max_length=2)
    original_size: list[int] | None = Field(
        None, description="(width, height) of the photo as uploaded (EXIF-rotated), px; differs from `photo_size` "
                          "when a photo over `max_decoded_pixels` was downscaled at decode time",
        min_length=2, max_length=2)
    scale: float = Field(1.0, description="`photo_size` px per `original_size` px (divide coordinates by it to get "
                                          "original photo pixels)")
    face_count: int = Field(description="number of faces returned")
    faces_detected: int | None = Field(
        None, description="faces found with `faces=all`; more than `face_count` when over `max_faces` (the largest "
                          "`max_faces` are returned)")
    faces: list[FaceResult]
    timings_ms: dict[str, float] = Field(description="request stages -> milliseconds (upload, queue, pipeline, ...)")


class IdentityCoefficients(BaseModel):
    """The identity shared by every photo of a set."""

    id: list[float] = Field(description="identity shape coefficients")
    tex: list[float] = Field(description="albedo coefficients")


class SetItem(BaseModel):
    """Per-photo results of a set: what varies between photos of one person."""

    index: int = Field(description="position of the photo in the request")
    mode: str
    box: list[float] = Field(min_length=4, max_length=4, description="detector box, photo px, y down")
    detection: DetectionOut
    pose_degrees: Pose
    angle: list[float] = Field(description="(pitch, yaw, roll), radians, signs as `pose_degrees` (`Pose`)",
                               min_length=3, max_length=3)
    expression: list[float] = Field(description="`exp` coefficients")
    expressions: dict[str, float] | None = Field(None, description="`exp` by blendshape name, when named")
    lighting: list[float] = Field(description="`gamma`: 27 SH lighting coefficients", min_length=27, max_length=27)
    translation: list[float] = Field(description="`trans`, model units (`units.model`)", min_length=3, max_length=3)
    units: MeshUnits = Field(description="length units of `translation` and of each mesh format")
    landmarks68: list[Point2] = Field(description="reprojected 68 landmarks, photo px, y down", min_length=68,
                                      max_length=68)
    landmark_error_crop_px: float
    alignment: AlignmentOut
    photo_size: list[int] = Field(min_length=2, max_length=2, description="(width, height) of the decoded photo, px")
    original_size: list[int] | None = Field(None, min_length=2, max_length=2,
                                            description="(width, height) as uploaded, when downscaled at decode time")
    scale: float = Field(1.0, description="decoded px per uploaded px (a set shares `max_set_decoded_pixels`)")
    overlay: EncodedFile | None = Field(None, description="the face drawn over this photo, when `include=overlay`")


class SetResponse(BaseModel):
    """`POST /v1/reconstruct/set` as JSON."""

    face_model: str
    layout: CoefficientLayout
    mode: str = Field(description="`rnet`, `rnet+lm`, `rnet+fit` or `fit`")
    aggregation: str = Field(description="how the identity was combined (`shared-identity fit` or `mean`)")
    image_count: int = Field(description="photos the identity was made from (`items`)")
    identity: IdentityCoefficients
    items: list[SetItem]
    skipped: list[int] = Field(
        default_factory=list, description="positions (0-based, in the request) of the photos left out for want of a "
                                          "face, with `on_missing=skip`")
    identity_mesh: EncodedFile | None = Field(
        None, description="the identity's neutral, frontal mesh (default; omit with an empty `include`)")
    timings_ms: dict[str, float]


# -- service ------------------------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    face_model: str | None = None
    load_ms: float | None = Field(None, description="model loading time")
    warmup_ms: float | None = Field(None, description="warm-up inference time (before readiness)")
    warming: list[str] = Field(
        default_factory=list, description="parts still warming up after readiness: `fit` (torch, the renderer, "
                                          "overlays; `warmup_fit_after_ready`); requests that need them wait")
    fit_warmup_ms: float | None = Field(None, description="the fit's warm-up time, when it ran after readiness")


class ServiceLimits(BaseModel):
    max_upload_bytes: int = Field(description="largest photo file, bytes")
    max_request_bytes: int = Field(description="largest request body (a set's photos together), bytes")
    max_image_pixels: int = Field(description="largest photo accepted, width x height (more: 413)")
    max_decoded_pixels: int = Field(description="photos with more pixels are decoded downscaled to fit")
    max_set_decoded_pixels: int = Field(description="decoded pixels of a whole set, shared by its photos")
    max_set_images: int
    max_faces: int = Field(description="most faces reconstructed with `faces=all` (the largest ones)")
    workers: int
    queue_size: int
    request_timeout_s: float


class ModelsResponse(BaseModel):
    """`GET /v1/models`: the loaded model card and the backends serving it."""

    version: str = Field(description="facerecon version")
    face_model: FaceModelCard
    device: str = Field(description="torch device")
    renderer: str = Field(description="rasteriser backend")
    rnet: dict[str, Any] | None = Field(
        None, description="the installed R-Net (its card and ONNX Runtime execution providers), null when none")
    cnet: dict[str, Any] | None = Field(
        None, description="the installed C-Net for image sets (card, providers), null when none")
    default_mode: str = Field(description="`rnet+fit`, `rnet+lm` or `rnet` with an R-Net, else `fit` (fitting from "
                                          "the mean)")
    limits: ServiceLimits
