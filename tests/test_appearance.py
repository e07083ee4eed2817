"""The brows, eyes and lips take their colours from the photo (#18 item 9): the model's hand-set tints gave pale
blue-grey brows, staring white eyes and, on a greyscale photo, cyan eyes. Checked on real photos against what the
photo itself shows, in pixel sets drawn from the reconstruction's own 68 landmarks (not from the regions the code
samples)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytestmark = pytest.mark.timeout(600)

LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def reconstructed(example_reconstructions: Any) -> Any:
    """``(name, grey) -> (photo, reconstruction)`` in the default mode (R-Net and the fit, whose fitted light the
    colours depend on), each made once (several checks read the same photo)."""

    def get(name: str, grey: bool = False) -> tuple[np.ndarray, Any]:
        img, recs = example_reconstructions(name, grey)
        return img, recs[0]

    return get


def _masks(lm: np.ndarray, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Photo pixel sets from 68 landmarks (iBUG): the eye openings, bands along the brows, the lips, two cheek
    discs."""
    iod = float(np.linalg.norm(lm[36] - lm[45]))

    def draw(points: np.ndarray, width: int = 0) -> np.ndarray:
        im = Image.new("L", size, 0)
        d = ImageDraw.Draw(im)
        pts = [tuple(p) for p in points.tolist()]
        if width:
            d.line(pts, fill=1, width=width)
        else:
            d.polygon(pts, fill=1)
        return np.asarray(im).astype(bool)

    band = max(2, round(0.05 * iod))
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    cheeks = np.zeros((size[1], size[0]), bool)
    for a, b in ((31, 2), (35, 14)):
        c = (lm[a] + lm[b]) / 2
        cheeks |= (xx - c[0]) ** 2 + (yy - c[1]) ** 2 < (0.12 * iod) ** 2
    return {"eyes": draw(lm[36:42]) | draw(lm[42:48]), "brows": draw(lm[17:22], band) | draw(lm[22:27], band),
            "lips": draw(lm[48:60]) & ~draw(lm[60:68]), "cheeks": cheeks}


def _chroma(pixels: np.ndarray) -> float:
    p = pixels.astype(np.float64)
    return float(np.median(p.max(axis=1) - p.min(axis=1)))


def _luma(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(pixels.astype(np.float64) @ LUMA)


@pytest.mark.parametrize("name", ["000006.jpg", "000031.jpg", "000050.jpg"])
def test_a_greyscale_photo_gives_grey_eyes_brows_and_lips(reconstructor: Any, reconstructed: Any, name: str
                                                           ) -> None:
    """The fitted light is blue-green on a greyscale photo (it turns the model's warm skin grey), which made the
    off-white sclera cyan and the brown brows blue-grey (median chroma 13-32 levels in the eyes, 8-30 in the
    brows); now the features are as grey as the photo."""
    img, r = reconstructed(name, grey=True)
    overlay = reconstructor.overlay(img, r)
    m = _masks(r.landmarks_photo, (img.shape[1], img.shape[0]))
    assert _chroma(overlay[m["eyes"]]) <= 5, _chroma(overlay[m["eyes"]])
    assert _chroma(overlay[m["brows"]]) <= 5, _chroma(overlay[m["brows"]])
    assert _chroma(overlay[m["lips"]]) <= 10, _chroma(overlay[m["lips"]])


@pytest.mark.parametrize("name", ["000006.jpg", "000037.jpg", "000050.jpg", "000055.jpg"])
def test_eyes_are_not_staring_white_and_brows_are_darker_than_the_skin(reconstructor: Any, reconstructed: Any,
                                                                       name: str) -> None:
    """The overlay's eye openings are no brighter than the photo's (their upper quartile of luma within the photo's
    90th percentile; the white sclera tint gave 200-255), and where the photo's brows are darker than its cheeks
    the overlay's are too (the pale brow tint was lighter than the brows of these photos)."""
    img, r = reconstructed(name)
    overlay = reconstructor.overlay(img, r)
    m = _masks(r.landmarks_photo, (img.shape[1], img.shape[0]))
    eyes_photo, eyes_overlay = _luma(img[m["eyes"]]), _luma(overlay[m["eyes"]])
    assert np.percentile(eyes_overlay, 75) <= np.percentile(eyes_photo, 90) + 15, (
        np.percentile(eyes_overlay, 75), np.percentile(eyes_photo, 90))
    brow_ratio = float(np.median(_luma(img[m["brows"]])) / np.median(_luma(img[m["cheeks"]])))
    assert brow_ratio < 0.95, f"{name}: the photo's brows are not darker than its cheeks ({brow_ratio:.2f})"
    ratio = float(np.median(_luma(overlay[m["brows"]])) / np.median(_luma(overlay[m["cheeks"]])))
    assert ratio < 0.9, ratio
    # and not blue: the brows' red minus blue follows the photo's (warm brown hair), within 25 levels
    rb = lambda a: float(np.median(a[:, 0].astype(np.float64) - a[:, 2]))  # noqa: E731
    assert abs(rb(overlay[m["brows"]]) - rb(img[m["brows"]])) < 25, (rb(overlay[m["brows"]]), rb(img[m["brows"]]))


def _obj_vertex_uvs(obj: str, n_vertices: int) -> np.ndarray:
    """The UV of each vertex of a textured OBJ (one of its corners' ``vt``)."""
    vts = np.array([[float(t) for t in line.split()[1:3]] for line in obj.splitlines() if line.startswith("vt ")])
    uv = np.full((n_vertices, 2), np.nan)
    for line in obj.splitlines():
        if line.startswith("f "):
            for corner in line.split()[1:]:
                v, t = corner.split("/")[:2]
                uv[int(v) - 1] = vts[int(t) - 1]
    return uv


def test_the_albedo_texture_takes_the_features_from_the_photo(reconstructor: Any, reconstructed: Any) -> None:
    """``texture=albedo`` on a greyscale photo: the visible eyeballs (the model's own eyeball parts) and the brows
    are grey in the texture (the sclera and brow tints were warm off-white and brown); on the colour photo the
    brows are darker than the skin of the cheeks."""
    from facerecon.appearance import feature_regions

    model = reconstructor.model
    regions = feature_regions(model)
    part = model.card.regions
    eyeballs = np.isin(model.extras["vertex_region"], [part["eyeball_left"], part["eyeball_right"]])
    for grey in (True, False):
        img, r = reconstructed("000050.jpg", grey)
        files = reconstructor.export_files(img, r, "obj", "albedo")
        tex = np.asarray(Image.open(io.BytesIO(files["texture.png"])).convert("RGB"))
        uv = _obj_vertex_uvs(files["mesh.obj"].decode(), model.n_vertices)
        ok = np.isfinite(uv).all(axis=1)
        h, w = tex.shape[:2]
        col = np.clip((uv[:, 0] * w).astype(np.int64), 0, w - 1)
        row = np.clip(((1.0 - uv[:, 1]) * h).astype(np.int64), 0, h - 1)
        facing = r.decoded.normals_world[0].numpy()[:, 2] > 0.5
        eyes = eyeballs & facing & ok
        brows = regions.core[regions.names.index("brows")] & ok
        cheeks = np.zeros(model.n_vertices, bool)
        xy, lm = r.vertices_photo()[:, :2], r.landmarks_photo
        for a, b in ((31, 2), (35, 14)):
            cheeks |= np.linalg.norm(xy - (lm[a] + lm[b]) / 2, axis=1) < 0.1 * np.linalg.norm(lm[36] - lm[45])
        cheeks &= facing & ok & ~eyeballs
        assert eyes.sum() > 50 and brows.sum() > 50 and cheeks.sum() > 20
        if grey:
            assert _chroma(tex[row[eyes], col[eyes]]) <= 4 and _chroma(tex[row[brows], col[brows]]) <= 4
        else:
            assert np.median(_luma(tex[row[brows], col[brows]])) < 0.8 * np.median(_luma(tex[row[cheeks], col[cheeks]]))
