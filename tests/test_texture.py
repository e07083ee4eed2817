"""Textured exports (:mod:`facerecon.texture`) on real photos: the bundles load with their textures, re-rendering the
textured mesh over the photo reproduces it, the confidence map is sensible, the albedo texture holds the albedo."""

from __future__ import annotations

import copy
import io
import json
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trimesh

from facerecon.errors import ExportNotSupported
from facerecon.export import MeshData, split_seams, to_zip
from facerecon.export import textured_glb as write_glb
from facerecon.export import textured_obj as write_obj
from facerecon.render import get_renderer
from facerecon.texture import (
    CONF_FILLED,
    CONF_MIRRORED,
    CONF_VISIBLE,
    Texture,
    albedo_texture,
    atlas_faces,
    photo_texture,
    push_pull,
    sample_texture,
    supports_texture,
    texture_atlas,
)
from tests.conftest import EXAMPLES

#: A nearly frontal photo (yaw about -1 degree) and a turned one (yaw about -15 degrees).
FRONTAL, TURNED = "000031.jpg", "000002.jpg"
SIZE = 1024
#: Share of the face-region texels (``face_mask`` triangles, which reach back to the ears) seen directly in the
#: frontal photo: measured 0.70 (the sides of the face, under the chin and the lips' inner parts are at grazing
#: angles or hidden; a 15-degree turn shows more of the near side than it hides of the far one).
MIN_FRONTAL_VISIBLE = 0.6
#: The same for the skin region (``skin_mask``: the photometric-loss region, cheeks, nose, forehead, chin).
MIN_FRONTAL_SKIN_VISIBLE = 0.9


# ----------------------------------------------------------------------------------------------------------------
# no photos needed


def test_push_pull_keeps_known_and_fills_the_rest() -> None:
    rng = np.random.default_rng(0)
    values = rng.random((37, 53, 3))
    known = rng.random((37, 53)) < 0.05
    out = push_pull(values, known)
    assert out.shape == values.shape and np.isfinite(out).all()
    np.testing.assert_allclose(out[known], values[known], atol=1e-6)
    lo, hi = values[known].min(axis=0), values[known].max(axis=0)
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all(), "a convex fill stays in the known range"
    const = push_pull(np.full((20, 30, 2), 7.0), np.eye(20, 30, dtype=bool))
    np.testing.assert_allclose(const, 7.0, atol=1e-5)


def test_atlas_is_one_non_overlapping_unit_square(ict_model) -> None:
    atlas = texture_atlas(ict_model)
    assert atlas.repacked, "ICT's UVs span two UDIM tiles and the eyeballs reuse tile 0"
    assert atlas.uvs.shape[1] == 2 and atlas.uv_faces.shape == tuple(ict_model.triangles.shape)
    assert atlas.uvs.min() >= 0.0 and atlas.uvs.max() <= 1.0
    boxes = []
    for c in range(len(atlas.chart_names)):
        pts = atlas.uvs[atlas.uv_faces[atlas.chart == c]].reshape(-1, 2)
        boxes.append((pts.min(axis=0), pts.max(axis=0)))
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            (lo1, hi1), (lo2, hi2) = boxes[i], boxes[j]
            assert (hi1 <= lo2).any() or (hi2 <= lo1).any(), f"charts {i} and {j} overlap"
    # the per-corner geometry is unchanged: every atlas UV belongs to one model vertex
    vertex_of, uv_of, faces = split_seams(ict_model.triangles.numpy(), atlas.uv_faces)
    assert len(np.unique(uv_of)) == len(uv_of) == len(atlas.uvs)
    np.testing.assert_array_equal(vertex_of[faces], ict_model.triangles.numpy())


def _mesh(rec, model, tex: Texture) -> MeshData:
    return MeshData(vertices=rec.decoded.vertices_world[0].cpu().numpy().astype(np.float64),
                    faces=model.triangles.cpu().numpy(), uvs=tex.atlas.uvs, uv_faces=tex.atlas.uv_faces)


def textured_obj(rec, model, tex: Texture) -> dict[str, bytes]:
    return write_obj(_mesh(rec, model, tex), tex.png())


def textured_glb(rec, model, tex: Texture) -> bytes:
    return write_glb(_mesh(rec, model, tex), rec.decoded.normals_world[0].cpu().numpy(), tex.image)


def test_a_model_without_uvs_is_refused(ict_model, reconstructor, cases) -> None:
    bare = copy.copy(ict_model)
    bare.extras = {k: v for k, v in ict_model.extras.items() if not k.startswith("uv_")}
    assert supports_texture(ict_model) and not supports_texture(bare)
    with pytest.raises(ValueError, match="no UV"):
        texture_atlas(bare)
    # the one export entry point refuses it with a typed 422, never a crash; and a texture in PLY likewise
    case = cases[TURNED]
    without_uvs = copy.copy(reconstructor)
    without_uvs._model, without_uvs.has_uvs = bare, bare.has_uvs  # what the engine reads of a model at start-up
    with pytest.raises(ExportNotSupported, match="no UVs") as exc:
        without_uvs.export_files(case.image, case.rec, "obj", "photo")
    assert exc.value.http_status == 422 and exc.value.code == "export_not_supported"
    with pytest.raises(ExportNotSupported, match="obj or glb"):
        reconstructor.export_files(case.image, case.rec, "ply", "albedo")
    assert set(without_uvs.export_files(case.image, case.rec, "ply")) == {"mesh.ply"}


# ----------------------------------------------------------------------------------------------------------------
# real photos


@dataclass
class Case:
    name: str
    image: np.ndarray
    rec: Any  # facerecon.pipeline.Reconstruction
    photo: Texture
    albedo: Texture
    seconds: float


@pytest.fixture(scope="module")
def cases(reconstructor, example_reconstructions) -> dict[str, Case]:
    out = {}
    for name in (FRONTAL, TURNED):
        image, (rec,) = example_reconstructions(name)
        cam = reconstructor.decoder.camera
        t0 = time.perf_counter()
        photo = photo_texture(rec, reconstructor.model, image, size=SIZE, camera=cam)
        t1 = time.perf_counter()
        albedo = albedo_texture(rec, reconstructor.model, size=SIZE)
        out[name] = Case(name, image, rec, photo, albedo, t1 - t0)
        print(f"\n{name}: yaw {rec.pose_degrees()['yaw']:.1f} deg; photo texture {t1 - t0:.2f} s "
              f"{ {k: round(v) for k, v in photo.timings.items()} } ms; albedo texture {albedo.timings} ms")
    return out


def _write(files: dict[str, bytes], folder: Path) -> Path:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder / "mesh.obj"


def _render_textured(reconstructor, rec, faces_uv: np.ndarray, uvs: np.ndarray, image: np.ndarray,
                     photo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a textured mesh at the photo's resolution: the face under each pixel and its barycentrics, the
    per-corner UVs ``uvs[faces_uv[f]]`` interpolated, the texture sampled there.

    Returns:
        ``(textured (H, W, 3) float, vertex colour (H, W, 3) float, skin (H, W) bool)``: the two renders in 0-255 and
        the visible pixels of ``skin_mask`` triangles.
    """
    model = reconstructor.model
    renderer = get_renderer("cpu")
    k = rec.alignment.photo_intrinsics(reconstructor.decoder.camera)
    raster = renderer.rasterize(rec.decoded.vertices_cam.cpu(), model.triangles.cpu(), k)
    tid = raster.triangle_id[0].numpy()
    bary = raster.barycentrics[0].numpy().astype(np.float64)
    skin_tri = model.skin_mask.cpu().numpy()[model.triangles.cpu().numpy()].all(axis=1)
    skin = tid >= 0
    skin[skin] = skin_tri[tid[skin]]
    f, b = tid[skin], bary[skin]
    corner_uv = uvs[faces_uv[f]]  # (P, 3, 2)
    uv = (b[:, :, None] * corner_uv).sum(axis=1)
    textured = np.zeros(photo.shape, np.float64)
    textured[skin] = sample_texture(image, uv)
    colors = torch.clamp(rec.decoded.colors, 0, 1)
    vc = renderer.interpolate(colors.cpu(), raster, model.triangles.cpu())[0].numpy().astype(np.float64) * 255.0
    return textured, vc, skin


def test_obj_bundle_loads_with_its_texture_and_reproduces_the_photo(reconstructor, cases, tmp_path: Path) -> None:
    model = reconstructor.model
    ratios = []
    for case in cases.values():
        files = textured_obj(case.rec, model, case.photo)
        assert set(files) == {"mesh.obj", "mesh.mtl", "texture.png"}
        text = files["mesh.obj"].decode()
        assert "mtllib mesh.mtl" in text and "usemtl face" in text
        assert "map_Kd texture.png" in files["mesh.mtl"].decode()
        folder = tmp_path / case.name
        folder.mkdir()
        mesh = trimesh.load(_write(files, folder), process=False)
        assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
        image = mesh.visual.material.image
        assert image is not None and image.size == (SIZE, SIZE)
        loaded = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(loaded, case.photo.image)
        # the loaded mesh keeps the face order and corner geometry; use ITS uvs and image for the re-render
        world = case.rec.decoded.vertices_world[0].cpu().numpy()
        assert len(mesh.faces) == len(model.triangles)
        np.testing.assert_allclose(mesh.vertices[mesh.faces], world[model.triangles.cpu().numpy()], atol=2e-6)
        textured, vc, skin = _render_textured(reconstructor, case.rec, np.asarray(mesh.faces),
                                              np.asarray(mesh.visual.uv), loaded, case.image)
        photo = case.image.astype(np.float64)
        err_tex = float(np.abs(textured[skin] - photo[skin]).mean())
        err_vc = float(np.abs(vc[skin] - photo[skin]).mean())
        ratios.append(err_tex / err_vc)
        print(f"\n{case.name}: mean abs error over {int(skin.sum())} visible skin pixels (0-255): textured "
              f"{err_tex:.2f}, vertex colour {err_vc:.2f} (ratio {err_tex / err_vc:.3f})")
        assert err_tex < 0.5 * err_vc
        assert err_tex < 4.0, "photo -> texture -> photo resampling should lose little"


def test_zip_bundle_round_trip(reconstructor, cases) -> None:
    case = cases[TURNED]
    files = textured_obj(case.rec, reconstructor.model, case.albedo)
    data = to_zip(files)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == list(files)
        for name, content in files.items():
            assert zf.read(name) == content


def test_glb_embeds_the_texture_with_gltf_uv_origin(reconstructor, cases) -> None:
    model = reconstructor.model
    case = cases[TURNED]
    glb = textured_glb(case.rec, model, case.photo)
    # the raw file: one embedded PNG image, TEXCOORD_0 with glTF's top-left origin (v' = 1 - v)
    assert glb[:4] == b"glTF"
    json_len = struct.unpack("<I", glb[12:16])[0]
    doc = json.loads(glb[20 : 20 + json_len])
    bin_start = 20 + json_len + 8
    assert doc["images"][0]["mimeType"] == "image/png" and "uri" not in doc["images"][0]
    prim = doc["meshes"][0]["primitives"][0]
    acc = doc["accessors"][prim["attributes"]["TEXCOORD_0"]]
    view = doc["bufferViews"][acc["bufferView"]]
    start = bin_start + view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    raw_uv = np.frombuffer(glb[start : start + 8 * acc["count"]], np.float32).reshape(-1, 2)
    atlas = case.photo.atlas
    vertex_of, uv_of, faces = split_seams(model.triangles.cpu().numpy(), atlas.uv_faces)
    np.testing.assert_allclose(raw_uv[:, 0], atlas.uvs[uv_of, 0], atol=1e-7)
    np.testing.assert_allclose(raw_uv[:, 1], 1.0 - atlas.uvs[uv_of, 1], atol=1e-6)
    # and trimesh reads it back: texture embedded, same pixels, same UVs, geometry split along seams only
    mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh", process=False)
    image = mesh.visual.material.baseColorTexture
    assert image is not None and image.size == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), case.photo.image)
    np.testing.assert_allclose(mesh.visual.uv, atlas.uvs[uv_of], atol=1e-6)
    world = case.rec.decoded.vertices_world[0].cpu().numpy()
    np.testing.assert_allclose(mesh.vertices, world[vertex_of] * 0.1, atol=1e-7)  # decimetres -> glTF's metres
    np.testing.assert_array_equal(mesh.faces, faces)


def test_confidence_map(reconstructor, cases) -> None:
    model = reconstructor.model
    faces = atlas_faces(model, SIZE)
    tris = model.triangles.cpu().numpy()
    face_tri = model.face_mask.cpu().numpy()[tris].all(axis=1)
    head_tri = np.isin(model.extras["vertex_region"][tris], [model.card.regions["head_neck"]]).all(axis=1)
    skin_tri = model.skin_mask.cpu().numpy()[tris].all(axis=1)
    face_texels = (faces >= 0) & face_tri[faces.clip(0)]
    skin_texels = (faces >= 0) & skin_tri[faces.clip(0)]
    head_texels = (faces >= 0) & head_tri[faces.clip(0)]
    # the texel over the nose tip (ICT landmark 30) is seen directly in both photos
    nose = int(model.landmarks68[30])
    f_nose = int(np.flatnonzero((tris == nose).any(axis=1))[0])
    for case in cases.values():
        conf = case.photo.confidence
        assert conf is not None and conf.shape == (SIZE, SIZE) and conf.dtype == np.uint8
        assert set(np.unique(conf).tolist()) <= {CONF_FILLED, CONF_MIRRORED, CONF_VISIBLE}
        assert (conf[~case.photo.coverage] == 0).all()
        in_face = case.photo.fractions(face_texels)
        in_skin = case.photo.fractions(skin_texels)
        in_head = case.photo.fractions(head_texels)
        overall = case.photo.fractions()
        print(f"\n{case.name}: skin-region texels {_pct(in_skin)}; face-region texels {_pct(in_face)}; "
              f"head/neck texels {_pct(in_head)}; "
              f"all texels {_pct(overall)}")
        nose_texels = conf[faces == f_nose]
        assert (nose_texels == CONF_VISIBLE).mean() > 0.5
        assert in_head["visible"] < in_face["visible"], "the back of the head is mostly not seen"
        assert in_head["filled"] > 0.3
    frontal = cases[FRONTAL].photo.fractions(face_texels)
    turned = cases[TURNED].photo.fractions(face_texels)
    frontal_skin = cases[FRONTAL].photo.fractions(skin_texels)
    assert frontal["visible"] > MIN_FRONTAL_VISIBLE
    assert frontal_skin["visible"] > MIN_FRONTAL_SKIN_VISIBLE
    assert turned["mirrored"] > 0.05 and turned["mirrored"] > 3 * frontal["mirrored"], (
        "the far cheek of a turned face is filled from the near one"
    )


def _pct(fr: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in fr.items())


def test_albedo_texture_holds_the_vertex_albedo(reconstructor, cases) -> None:
    model = reconstructor.model
    case = cases[FRONTAL]
    tex = case.albedo
    assert tex.image.shape == (SIZE, SIZE, 3) and tex.image.dtype == np.uint8 and tex.confidence is None
    atlas = tex.atlas
    vertex_of, uv_of, _ = split_seams(model.triangles.cpu().numpy(), atlas.uv_faces)
    albedo = np.clip(case.rec.decoded.albedo[0].cpu().numpy(), 0, 1)[vertex_of] * 255.0
    uv = atlas.uvs[uv_of].astype(np.float64)
    x = uv[:, 0] * SIZE - 0.5  # continuous texel coordinates, centres at integers
    y = (1.0 - uv[:, 1]) * SIZE - 0.5
    cx, cy = np.rint(x).astype(int), np.rint(y).astype(int)
    near = (np.abs(x - cx) < 0.1) & (np.abs(y - cy) < 0.1)
    near &= tex.coverage[cy.clip(0, SIZE - 1), cx.clip(0, SIZE - 1)]
    assert near.sum() >= 50, "enough texel centres coincide with vertices"
    idx = np.flatnonzero(near)
    got = tex.image[cy[idx], cx[idx]].astype(np.float64)
    diff = np.abs(got - albedo[idx])
    # interpolation tolerance: the texel centre is up to 0.14 texel from the vertex, inside a triangle over which the
    # albedo is linear; bound the change by that triangle's albedo gradient (per texel) times the offset, plus
    # rounding to uint8
    faces = atlas_faces(model, SIZE)[cy[idx], cx[idx]]
    assert (faces >= 0).all()
    corner_uv = atlas.uvs[atlas.uv_faces[faces]].astype(np.float64) * SIZE  # (P, 3, 2) texels
    corner_alb = np.clip(case.rec.decoded.albedo[0].cpu().numpy(), 0, 1)[model.triangles.cpu().numpy()[faces]] * 255
    edges = corner_uv[:, 1:] - corner_uv[:, :1]  # (P, 2, 2)
    rise = corner_alb[:, 1:] - corner_alb[:, :1]  # (P, 2, 3)
    grad = np.linalg.solve(edges, rise)  # (P, 2, 3): d albedo / d (x, y) in texels
    offset = np.hypot(x[idx] - cx[idx], y[idx] - cy[idx])
    bound = 0.51 + np.linalg.norm(grad, axis=1) * offset[:, None] * 1.01
    print(f"\nalbedo texture vs per-vertex albedo at {len(idx)} coinciding texels: mean {diff.mean():.2f}, "
          f"max {diff.max():.2f} (0-255); max excess over the interpolation bound {(diff - bound).max():.3f}")
    assert diff.mean() < 1.0
    assert (diff <= bound).all()
    # bilinear samples at every vertex's UV, away from chart borders, stay close as well
    sampled = sample_texture(tex.image, uv)
    assert np.median(np.abs(sampled - albedo)) < 2.0


def test_the_unseen_back_of_the_head_is_not_black(reconstructor) -> None:
    """The photo texture's back of the head (never seen, filled from the fitted model) used to be near black: the SH
    lighting fitted to the front falls to about zero there. It keeps at least part of the front's shading now."""
    import io

    import trimesh

    from facerecon.imaging import load_image

    image = load_image(EXAMPLES / "000002.jpg")
    rec = reconstructor.reconstruct(image, refine=False)[0]
    glb = reconstructor.export_files(image, rec, "glb", "photo")["mesh.glb"]
    mesh = next(iter(trimesh.load(io.BytesIO(glb), file_type="glb").geometry.values()))
    colours = mesh.visual.to_color().vertex_colors[:, :3].astype(np.float64)
    luma = colours @ np.array([0.299, 0.587, 0.114])
    nz = mesh.vertex_normals[:, 2]
    back, front = luma[nz < -0.7].mean(), luma[nz > 0.7].mean()
    print(f"\nluma: back of the head {back:.0f}, front {front:.0f}")
    assert back > 0.5 * front, (back, front)  # was 26 vs 132
