"""Mesh writers: OBJ (per-vertex colours; UVs only in the textured bundle), binary PLY and binary glTF written
here with numpy (a few milliseconds for the ICT model, no trimesh import), and the textured variants (OBJ + MTL +
PNG bundle, GLB with the texture embedded through trimesh, a zip of a bundle).

Units: OBJ and PLY are written in the face model's units (:attr:`MeshData.units`, decimetres for the shipped
models, as the reference's OBJ); glTF's unit is the metre (glTF 2.0 section 3.4), so GLB vertices are converted to
metres. Frame: world space (posed ``R v + t``), x right, y up, z towards the camera (glTF's own axes). Faces are
1-based in OBJ as the format says.

The untextured OBJ carries no UVs: they would only point into a texture it does not have, the ICT model's own UVs
span two UDIM tiles (u up to 2) that most viewers wrap, and readers such as trimesh take UVs over vertex colours and
drop the colours. The textured exports write the repacked atlas UVs in [0, 1] (:mod:`facerecon.texture`).

Nothing here mutates its inputs; the textures themselves are made by :mod:`facerecon.texture`, the choice of files
for a request by ``Reconstructor.export_files``.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from facerecon import textfmt
from facerecon.formats import MESH_FORMATS, TEXTURE_CHOICES, MeshFormat, TextureChoice, TextureKind  # noqa: F401

if TYPE_CHECKING:
    import trimesh

#: File names of a textured OBJ bundle.
OBJ_NAME, MTL_NAME, PNG_NAME, MATERIAL_NAME = "mesh.obj", "mesh.mtl", "texture.png", "face"
MEDIA_TYPES: dict[str, str] = {"obj": "model/obj", "ply": "application/ply", "glb": "model/gltf-binary"}
#: Metres per unit of the length units a face model card may name.
METRES_PER_UNIT: dict[str, float] = {"metre": 1.0, "decimetre": 0.1, "centimetre": 0.01, "millimetre": 0.001}
#: The unit every GLB is written in.
GLB_UNITS = "metre"


def metres_per_unit(units: str) -> float:
    """Metres in one ``units`` (``"decimetre"`` -> 0.1).

    Raises:
        ValueError: a unit not in :data:`METRES_PER_UNIT`.
    """
    try:
        return METRES_PER_UNIT[units]
    except KeyError:
        raise ValueError(f"unknown length unit {units!r}; known: {sorted(METRES_PER_UNIT)}") from None


def file_units(model_units: str) -> dict[str, str]:
    """The length unit of each mesh format for a face model in ``model_units``: OBJ and PLY keep the model's, GLB
    is in metres."""
    return {fmt: GLB_UNITS if fmt == "glb" else model_units for fmt in MESH_FORMATS}


@dataclass(frozen=True)
class MeshData:
    """One mesh as numpy: vertices ``(N, 3)`` float in ``units``, faces ``(F, 3)`` int 0-based, colours ``(N, 3)``
    float in [0, 1] (clamped on output), optional UVs ``(T, 2)`` with per-corner indices ``(F, 3)``, optional unit
    vertex normals ``(N, 3)`` (written into the GLB)."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None = None
    uvs: np.ndarray | None = None
    uv_faces: np.ndarray | None = None
    normals: np.ndarray | None = None
    units: str = "decimetre"

    def __post_init__(self) -> None:
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"vertices must be (N, 3), got {self.vertices.shape}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"faces must be (F, 3), got {self.faces.shape}")
        if self.colors is not None and self.colors.shape != self.vertices.shape:
            raise ValueError("colors must be (N, 3) like vertices")
        if self.normals is not None and self.normals.shape != self.vertices.shape:
            raise ValueError("normals must be (N, 3) like vertices")
        if (self.uvs is None) != (self.uv_faces is None):
            raise ValueError("uvs and uv_faces go together")
        if self.uv_faces is not None and self.uv_faces.shape != self.faces.shape:
            raise ValueError("uv_faces must be (F, 3) like faces")
        metres_per_unit(self.units)

    def colors_uint8(self) -> np.ndarray | None:
        """The reference's ``uint8(clip(255 C))``."""
        if self.colors is None:
            return None
        return (np.clip(self.colors, 0.0, 1.0) * 255.0).astype(np.uint8)


def _rows(fmt: str, arr: np.ndarray) -> str:
    """``fmt`` applied to every row of a 2-D array by one ``%`` over the whole array (the text of ``np.savetxt``):
    the fallback for values :mod:`facerecon.textfmt` refuses (non-finite, huge)."""
    if arr.size == 0:
        return ""
    return ((fmt + "\n") * arr.shape[0]) % tuple(arr.ravel().tolist())


#: ``" %.6f" % (k / 255)`` for the 256 colour levels (OBJ colours are written as the reference does: uint8 / 255).
_LEVELS = textfmt.lookup_table([f" {k / 255.0:.6f}" for k in range(256)])


def _obj_vertices(v: np.ndarray, c8: np.ndarray | None) -> bytes:
    try:
        fields: list[textfmt.Field] = [b"v", *(textfmt.fixed6(v[:, k], lead=b" ") for k in range(3))]
    except ValueError:  # NaN, inf or huge coordinates: Python's own formatting
        if c8 is None:
            return _rows("v %.6f %.6f %.6f", v).encode()
        return _rows("v %.6f %.6f %.6f %.6f %.6f %.6f", np.hstack([v, c8.astype(np.float64) / 255.0])).encode()
    if c8 is not None:
        fields += [textfmt.lookup(c8[:, k], _LEVELS) for k in range(3)]
    return textfmt.rows(fields, len(v))


#: The ``f`` lines of recent topologies (``(faces, uv_faces)`` bytes -> text): a face model's triangles are the same
#: in every export, and comparing the key costs a fraction of formatting them again.
_FACE_TEXT: OrderedDict[bytes, bytes] = OrderedDict()
_FACE_TEXT_SIZE = 4
_FACE_TEXT_LOCK = threading.Lock()


def _obj_faces(f1: np.ndarray, t1: np.ndarray | None) -> bytes:
    key = f1.astype("<i8", copy=False).tobytes()
    if t1 is not None:
        key += b"/" + t1.astype("<i8", copy=False).tobytes()
    text = _FACE_TEXT.get(key)
    if text is None:
        text = _format_faces(f1, t1)
        with _FACE_TEXT_LOCK:
            _FACE_TEXT[key] = text
            while len(_FACE_TEXT) > _FACE_TEXT_SIZE:
                _FACE_TEXT.popitem(last=False)
    return text


def _format_faces(f1: np.ndarray, t1: np.ndarray | None) -> bytes:
    fields: list[textfmt.Field] = [b"f"]
    for k in range(3):
        fields.append(textfmt.integer(f1[:, k], lead=b" "))
        if t1 is not None:
            fields.append(textfmt.integer(t1[:, k], lead=b"/"))
    return textfmt.rows(fields, len(f1))


def _obj_uvs(uv: np.ndarray) -> bytes:
    try:
        return textfmt.rows([b"vt", textfmt.fixed6(uv[:, 0], b" "), textfmt.fixed6(uv[:, 1], b" ")], len(uv))
    except ValueError:
        return _rows("vt %.6f %.6f", uv).encode()


def to_obj(mesh: MeshData, *, mtl_name: str | None = None, material: str | None = None) -> bytes:
    """Wavefront OBJ text: ``v x y z [r g b]`` (colours as the reference writes them: uint8/255, ``%.6f``),
    ``vt`` and ``f v/vt`` when the mesh has UVs, optionally a ``mtllib``/``usemtl`` pair for a textured export.
    The same text as ``np.savetxt`` would write, formatted for the whole array at once (:mod:`facerecon.textfmt`)."""
    head = [f"# facerecon reconstruction; units: {mesh.units}s; y up, z towards the camera\n".encode()]
    if mtl_name:
        head.append(f"mtllib {mtl_name}\n".encode())
    body = [_obj_vertices(np.asarray(mesh.vertices, np.float64), mesh.colors_uint8())]
    f1 = np.asarray(mesh.faces, np.int64) + 1
    t1 = None
    if mesh.uvs is not None and mesh.uv_faces is not None:
        body.append(_obj_uvs(np.asarray(mesh.uvs, np.float64)))
        t1 = np.asarray(mesh.uv_faces, np.int64) + 1
    if material:
        body.append(f"usemtl {material}\n".encode())
    body.append(_obj_faces(f1, t1))
    return b"".join(head + body)


def to_ply(mesh: MeshData) -> bytes:
    """Binary little-endian PLY: float32 ``x y z`` and uchar ``red green blue alpha`` per vertex (alpha 255; white
    without colours), faces as ``uchar int`` lists; in the model's units."""
    n, nf = len(mesh.vertices), len(mesh.faces)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment facerecon reconstruction; units: {mesh.units}s; y up, z towards the camera\n"
        f"element vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {nf}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode()
    vert = np.empty(n, np.dtype([("xyz", "<f4", 3), ("rgba", "u1", 4)]))
    vert["xyz"] = mesh.vertices
    c8 = mesh.colors_uint8()
    vert["rgba"] = 255
    if c8 is not None:
        vert["rgba"][:, :3] = c8
    face = np.empty(nf, np.dtype([("n", "u1"), ("v", "<i4", 3)]))
    face["n"] = 3
    face["v"] = mesh.faces
    return header + vert.tobytes() + face.tobytes()


def _pad4(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def to_glb(mesh: MeshData) -> bytes:
    """Binary glTF 2.0 in metres: one mesh with ``POSITION`` (float32, converted from :attr:`MeshData.units`),
    ``NORMAL`` when the mesh has normals, ``COLOR_0`` (normalised uint8 RGBA) when it has colours, uint32 indices.
    No material: readers such as trimesh drop ``COLOR_0`` from a primitive that names one."""
    pos = (np.asarray(mesh.vertices, np.float64) * metres_per_unit(mesh.units)).astype("<f4")
    n = len(pos)
    views: list[bytes] = []
    accessors: list[dict[str, object]] = []
    attributes: dict[str, int] = {}

    def add(data: np.ndarray, accessor: dict[str, object]) -> int:
        views.append(np.ascontiguousarray(data).tobytes())
        accessors.append({"bufferView": len(views) - 1, **accessor})
        return len(accessors) - 1

    lo, hi = (pos.min(axis=0), pos.max(axis=0)) if n else (np.zeros(3), np.zeros(3))
    attributes["POSITION"] = add(pos, {"componentType": 5126, "count": n, "type": "VEC3",
                                       "min": [float(x) for x in lo], "max": [float(x) for x in hi]})
    if mesh.normals is not None:
        nrm = np.asarray(mesh.normals, np.float64)
        nrm = nrm / np.linalg.norm(nrm, axis=1, keepdims=True).clip(1e-12)
        attributes["NORMAL"] = add(nrm.astype("<f4"), {"componentType": 5126, "count": n, "type": "VEC3"})
    c8 = mesh.colors_uint8()
    if c8 is not None:
        rgba = np.concatenate([c8, np.full((n, 1), 255, np.uint8)], axis=1)
        attributes["COLOR_0"] = add(rgba, {"componentType": 5121, "normalized": True, "count": n, "type": "VEC4"})
    indices = add(np.asarray(mesh.faces).astype("<u4").reshape(-1),
                  {"componentType": 5125, "count": int(mesh.faces.size), "type": "SCALAR"})
    offsets, offset = [], 0
    for v in views:
        offsets.append(offset)
        offset += len(v) + (-len(v) % 4)
    targets = [34962] * (len(views) - 1) + [34963]  # ARRAY_BUFFER for attributes, ELEMENT_ARRAY_BUFFER for indices
    doc = {
        "asset": {"version": "2.0", "generator": "facerecon",
                  "extras": {"units": GLB_UNITS, "source_units": mesh.units}},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"name": "face", "mesh": 0}],
        "meshes": [{"name": "face", "primitives": [
            {"attributes": attributes, "indices": indices, "mode": 4}]}],
        "accessors": accessors,
        "bufferViews": [{"buffer": 0, "byteOffset": o, "byteLength": len(v), "target": t}
                        for o, v, t in zip(offsets, views, targets, strict=True)],
        "buffers": [{"byteLength": offset}],
    }
    json_chunk = _pad4(json.dumps(doc, separators=(",", ":")).encode(), b" ")
    bin_chunk = b"".join(_pad4(v, b"\0") for v in views)
    total = 12 + 8 + len(json_chunk) + 8 + len(bin_chunk)
    return b"".join([
        struct.pack("<4sII", b"glTF", 2, total),
        struct.pack("<I4s", len(json_chunk), b"JSON"), json_chunk,
        struct.pack("<I4s", len(bin_chunk), b"BIN\0"), bin_chunk,
    ])


def export_mesh(mesh: MeshData, fmt: MeshFormat) -> bytes:
    if fmt == "obj":
        return to_obj(mesh)
    if fmt == "ply":
        return to_ply(mesh)
    if fmt == "glb":
        return to_glb(mesh)
    raise ValueError(f"unknown mesh format {fmt!r}; use one of obj, ply, glb")


def load_mesh(data: bytes, fmt: MeshFormat) -> trimesh.Trimesh:
    """Read a mesh back exactly as written (no merging or reordering of vertices), with trimesh."""
    import trimesh

    return trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh", process=False)


# -- textured --------------------------------------------------------------------------------------------------


def _mtl(material: str, png_name: str) -> bytes:
    return (
        "# facerecon texture material\n"
        f"newmtl {material}\n"
        "Ka 1.000000 1.000000 1.000000\n"
        "Kd 1.000000 1.000000 1.000000\n"
        "Ks 0.000000 0.000000 0.000000\n"
        "d 1.0\n"
        "illum 1\n"
        f"map_Kd {png_name}\n"
    ).encode()


def textured_obj(mesh: MeshData, texture_png: bytes) -> dict[str, bytes]:
    """A textured OBJ bundle: ``mesh.obj`` (``mesh``'s vertices, its UVs, ``mtllib mesh.mtl`` / ``usemtl face``),
    ``mesh.mtl`` (``map_Kd texture.png``) and ``texture.png``. Write the files side by side, or :func:`to_zip` them.

    Args:
        mesh: vertices, faces and the texture atlas's ``uvs`` / ``uv_faces`` (no colours: the texture carries them).
        texture_png: the encoded texture.
    """
    if mesh.uvs is None:
        raise ValueError("a textured OBJ needs UVs")
    return {
        OBJ_NAME: to_obj(mesh, mtl_name=MTL_NAME, material=MATERIAL_NAME),
        MTL_NAME: _mtl(MATERIAL_NAME, PNG_NAME),
        PNG_NAME: texture_png,
    }


def split_seams(faces: np.ndarray, uv_faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One vertex per distinct (vertex, uv) corner pair, so nothing is merged across UV seams.

    Args:
        faces: ``(F, 3)`` vertex ids; uv_faces: ``(F, 3)`` UV ids.

    Returns:
        ``(vertex_of (M,), uv_of (M,), new_faces (F, 3))``: the new vertex m is vertex ``vertex_of[m]`` with UV
        ``uv_of[m]``.
    """
    pairs = np.stack([faces.reshape(-1), uv_faces.reshape(-1)], axis=1).astype(np.int64)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return uniq[:, 0], uniq[:, 1], inverse.reshape(-1, 3).astype(np.int64)


def textured_glb(mesh: MeshData, normals: np.ndarray, texture_rgb: np.ndarray) -> bytes:
    """Binary glTF 2.0 in metres with the texture embedded (PNG, ``baseColorTexture``, matte PBR material), the mesh
    split along UV seams (one glTF vertex per distinct (vertex, uv) pair), with the given normals.

    Args:
        mesh: vertices (in ``mesh.units``, converted to metres), faces, ``uvs`` / ``uv_faces`` (OBJ's bottom-left UV
            origin; trimesh writes glTF's top-left).
        normals: ``(N, 3)`` per-vertex normals (normalised here).
        texture_rgb: ``(H, W, 3) uint8``, row 0 at the top.
    """
    import PIL.Image
    import trimesh

    if mesh.uvs is None or mesh.uv_faces is None:
        raise ValueError("a textured GLB needs UVs")
    vertex_of, uv_of, faces = split_seams(mesh.faces, mesh.uv_faces)
    n = np.asarray(normals, np.float64)[vertex_of]
    n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)
    material = trimesh.visual.material.PBRMaterial(
        name=MATERIAL_NAME,
        baseColorTexture=PIL.Image.fromarray(texture_rgb),
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=1.0,
    )
    tm = trimesh.Trimesh(
        vertices=np.asarray(mesh.vertices, np.float64)[vertex_of] * metres_per_unit(mesh.units),
        faces=faces,
        vertex_normals=n,
        visual=trimesh.visual.TextureVisuals(uv=mesh.uvs[uv_of], material=material),
        process=False,
    )
    return trimesh.exchange.gltf.export_glb(tm, include_normals=True)


def to_zip(files: dict[str, bytes]) -> bytes:
    """A zip archive of ``{name: bytes}`` (deflated; PNGs stored as they are), names in the given order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            method = zipfile.ZIP_STORED if name.lower().endswith(".png") else zipfile.ZIP_DEFLATED
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=method)
    return buf.getvalue()
