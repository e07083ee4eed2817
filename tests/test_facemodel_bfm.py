"""The Basel Face Model converter on synthetic stand-ins of the licensed files (``tests/fixtures_bfm.py``).

The expected values are computed here independently of ``facerecon.facemodel.bfm``: the vertex selection from
``select_vertex_id.mat`` (the composed selection the reference's TF README documents), the expression rows by
looking those BFM09 ids up in ``trimIndex``, the raw bytes of ``Exp_Pca.bin`` with numpy offsets.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from facerecon.cli import main as cli_main
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.errors import ModelFileError
from facerecon.facemodel import FaceModel, bfm, load_face_model

from .conftest import need_shared
from .fixtures_bfm import (
    BFM_VERTICES,
    EXP_VERTICES,
    packaged_aux_dir,
    select_ids,
    synthetic_exp_pca,
    synthetic_morphable_model,
    write_exp_pca,
    write_morphable_model,
    write_v73_stub,
)

N, F = 35_709, 70_789
AUX_NAMES = {
    "BFM_exp_idx.mat",
    "BFM_front_idx.mat",
    "facemodel_info.mat",
    "select_vertex_id.mat",
    "similarity_Lm3D_all.mat",
    "std_exp.txt",
    "LICENSE",
    "README.md",
}
#: Every variable the packaged .mat files may hold; all but ``lm`` are integer indices or 0/1 masks.
AUX_VARIABLES = {
    "BFM_exp_idx.mat": {"trimIndex"},
    "BFM_front_idx.mat": {"idx"},
    "select_vertex_id.mat": {"select_id"},
    "facemodel_info.mat": {"tri", "point_buf", "keypoints", "frontmask2", "frontmask2_idx", "tri_mask2", "skinmask"},
    "similarity_Lm3D_all.mat": {"lm"},
}


def aux_mat(name: str) -> dict[str, np.ndarray]:
    return scipy.io.loadmat(packaged_aux_dir() / name)


# ---------------------------------------------------------------------------------------------------------------
# Session fixtures: the synthetic licensed files (written once) and one build through the CLI.


@pytest.fixture(scope="session")
def bfm_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("bfm_inputs")
    variables = synthetic_morphable_model(seed=0)
    mean, pcs = synthetic_exp_pca(seed=1)
    return {
        "mat": write_morphable_model(root / "01_MorphableModel.mat", variables),
        "bin": write_exp_pca(root / "Exp_Pca.bin", mean, pcs),
        "variables": variables,
        "exp_pcs": pcs,
    }


@pytest.fixture(scope="session")
def built(bfm_inputs: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bfm_model") / "bfm" / "facemodel.npz"
    rc = cli_main(["models", "build", "bfm", "--bfm", str(bfm_inputs["mat"]), "--exp", str(bfm_inputs["bin"]),
                   "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def model_arrays(built: Path) -> dict[str, np.ndarray]:
    return dict(load_face_model(built).arrays)


# ---------------------------------------------------------------------------------------------------------------
# The packaged index files.


def test_packaged_aux_byte_identical_to_shared() -> None:
    shared = need_shared("assets", "bfm-aux")
    for name in AUX_NAMES - {"README.md"}:
        assert (packaged_aux_dir() / name).read_bytes() == (shared / name).read_bytes(), name


def test_packaged_aux_holds_no_basel_data() -> None:
    folder = packaged_aux_dir()
    assert {p.name for p in folder.iterdir()} == AUX_NAMES
    for path in folder.iterdir():
        assert path.stat().st_size < 1_000_000, path.name
    for name, allowed in AUX_VARIABLES.items():
        listing = scipy.io.whosmat(folder / name)
        assert {var for var, _, _ in listing} == allowed, name
        mat = scipy.io.loadmat(folder / name)
        for var in allowed - {"lm"}:
            a = mat[var]
            assert np.array_equal(a, np.round(a)), f"{name}:{var} is not an index/mask array"
            assert a.size <= 8 * N  # point_buf is the largest
    assert aux_mat("similarity_Lm3D_all.mat")["lm"].shape == (68, 3)
    assert np.loadtxt(folder / "std_exp.txt").shape == (79,)
    readme = (folder / "README.md").read_text()
    assert "9167c7136aebef0c54d3ac74f4b0396222a491c1" in readme and "MIT" in readme
    for name in AUX_NAMES - {"README.md"}:
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert digest in readme, f"README lacks the sha256 of {name}"


def test_index_composition_equals_select_vertex_id() -> None:
    index = bfm.load_index()
    assert np.array_equal(index.shape_vertices, select_ids())
    trim = aux_mat("BFM_exp_idx.mat")["trimIndex"].astype(np.int64).ravel() - 1
    assert np.array_equal(trim[index.exp_vertices], select_ids())


def test_index_from_shared_equals_packaged() -> None:
    shared = need_shared("assets", "bfm-aux")
    a, b = bfm.load_index(), bfm.load_index(shared)
    for key in ("shape_vertices", "exp_vertices", "triangles", "point_buf", "front_triangles", "skin_mask"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert a.files == b.files


# ---------------------------------------------------------------------------------------------------------------
# The built model.


def test_card(built: Path, bfm_inputs: dict[str, object]) -> None:
    sidecar = json.loads(built.with_suffix(".json").read_text())
    card = load_face_model(built).card
    assert card.name == "bfm" and sidecar["name"] == "bfm"
    assert card.redistributable is False
    assert card.licence == bfm.LICENCE
    assert "Basel" in card.licence and "Guo" in card.licence
    assert (card.layout.id, card.layout.exp, card.layout.tex, card.layout.total) == (80, 64, 80, 257)
    assert (card.n_vertices, card.n_triangles, card.has_uvs) == (N, F, False)
    assert card.storage["basis_dtype"] == "float32"
    files = card.provenance.source_files
    for key in ("mat", "bin"):
        path = Path(str(bfm_inputs[key]))
        assert files[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    for name in (*bfm.AUX_FILES, bfm.AUX_CHECK_FILE):
        assert files[name] == hashlib.sha256((packaged_aux_dir() / name).read_bytes()).hexdigest()
    assert card.provenance.source_commit == "9167c7136aebef0c54d3ac74f4b0396222a491c1"
    assert sidecar["sha256"] == hashlib.sha256(built.read_bytes()).hexdigest()


def test_dtypes_and_shapes(model_arrays: dict[str, np.ndarray]) -> None:
    a = model_arrays
    for key, shape in (("mean_shape", (N, 3)), ("id_basis", (80, N, 3)), ("exp_basis", (64, N, 3)),
                       ("mean_albedo", (N, 3)), ("albedo_basis", (80, N, 3))):
        assert a[key].shape == shape and a[key].dtype == np.float32, key
    assert "uv_coords" not in a and "uv_triangles" not in a


def test_mean_shape_is_selected_scaled_and_recentred(
    model_arrays: dict[str, np.ndarray], bfm_inputs: dict[str, object]
) -> None:
    mu = bfm_inputs["variables"]["shapeMU"].astype(np.float64).reshape(BFM_VERTICES, 3)
    sel = select_ids()
    raw_dm = mu[sel] / 1e5
    centroid = raw_dm.mean(0)
    built = model_arrays["mean_shape"].astype(np.float64)
    for v in (0, 1, 2216, 17_000, 35_708):
        np.testing.assert_allclose(built[v], raw_dm[v] - centroid, atol=2e-6)
    np.testing.assert_allclose(built, raw_dm - centroid, atol=2e-6)
    np.testing.assert_allclose(built.mean(0), 0.0, atol=1e-6)


def test_bases_match_fixture_at_hand_computed_rows(
    model_arrays: dict[str, np.ndarray], bfm_inputs: dict[str, object]
) -> None:
    var = bfm_inputs["variables"]
    sel = select_ids()
    verts = np.array([0, 7, 2215, 8191, 20_000, 35_708])
    rows = (3 * sel[verts][:, None] + np.arange(3)).ravel()  # x, y, z of each selected BFM09 vertex
    # Identity: shapePC * shapeEV, first 80, micrometres -> dm.
    expected = var["shapePC"][rows, :80].astype(np.float64) * var["shapeEV"][:80, 0] / 1e5
    got = model_arrays["id_basis"][:, verts].reshape(80, -1).T
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    # Albedo: texPC * texEV, first 80, and texMU, / 255.
    expected = var["texPC"][rows, :80].astype(np.float64) * var["texEV"][:80, 0] / 255.0
    got = model_arrays["albedo_basis"][:, verts].reshape(80, -1).T
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    expected = var["texMU"][rows, 0].astype(np.float64) / 255.0
    np.testing.assert_allclose(model_arrays["mean_albedo"][verts].ravel(), expected, rtol=1e-6)
    # Expression: the BFM09 ids looked up in trimIndex give the rows of the 53,215-vertex basis.
    trim = aux_mat("BFM_exp_idx.mat")["trimIndex"].astype(np.int64).ravel() - 1
    exp_v = np.searchsorted(trim, sel[verts])
    assert np.array_equal(trim[exp_v], sel[verts])
    raw = np.fromfile(Path(str(bfm_inputs["bin"])), dtype="<f4", offset=4 + 4 * 3 * EXP_VERTICES)
    pcs = raw.reshape(79, 3 * EXP_VERTICES)
    std = np.loadtxt(packaged_aux_dir() / "std_exp.txt")
    exp_rows = (3 * exp_v[:, None] + np.arange(3)).ravel()
    expected = pcs[:64, exp_rows].T.astype(np.float64) * std[:64] / 1e5
    got = model_arrays["exp_basis"][:, verts].reshape(64, -1).T
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_all_selected_bases_match(model_arrays: dict[str, np.ndarray], bfm_inputs: dict[str, object]) -> None:
    """The whole identity basis, against a selection built from ``select_vertex_id.mat`` alone."""
    var = bfm_inputs["variables"]
    rows = (3 * select_ids()[:, None] + np.arange(3)).ravel()
    expected = (var["shapePC"][rows, :80] * var["shapeEV"][:80, 0] / 1e5).astype(np.float32)
    np.testing.assert_array_equal(model_arrays["id_basis"].reshape(80, -1), expected.T)


def test_topology(model_arrays: dict[str, np.ndarray]) -> None:
    info = aux_mat("facemodel_info.mat")
    tri = model_arrays["triangles"]
    assert tri.shape == (F, 3)
    assert np.array_equal(tri, info["tri"].astype(np.int64) - 1)
    assert tri.min() == 0 and tri.max() == N - 1
    # point_buf: padding 70790 (1-based) -> F (0-based, the appended zero normal); the rest are incident faces.
    pb = model_arrays["point_buf"]
    assert pb.shape == (N, 8)
    raw = info["point_buf"].astype(np.int64)
    assert np.array_equal(pb == F, raw == F + 1)
    assert int((pb == F).sum()) == 73_305
    v, s = np.nonzero(pb < F)
    assert (tri[pb[v, s]] == v[:, None]).any(axis=1).all()
    assert ((pb < F).sum(1) >= 1).all()
    # Front triangles: tri_mask2 mapped through frontmask2_idx; every one is a mesh triangle, same winding.
    front = model_arrays["front_triangles"]
    assert front.shape == (54_681, 3)
    def key(t: np.ndarray) -> np.ndarray:
        return (t[:, 0].astype(np.int64) * N + t[:, 1]) * N + t[:, 2]

    windings = np.concatenate([key(np.roll(tri, r, axis=1)) for r in range(3)])
    assert np.isin(key(front), windings).all()
    pt_bug = info["tri_mask2"].astype(np.int64) - 1  # PT's use: local ids taken as global (reference.md 16.2)
    assert int(np.isin(key(pt_bug), windings).sum()) < 40_000
    idx = info["frontmask2_idx"].astype(np.int64).ravel() - 1
    assert set(np.unique(front)) <= set(idx.tolist())
    # Masks and landmarks.
    assert model_arrays["face_mask"].dtype == np.uint8 and int(model_arrays["face_mask"].sum()) == 27_660
    assert np.array_equal(np.flatnonzero(model_arrays["face_mask"]), np.sort(idx))
    assert np.array_equal(model_arrays["skin_mask"], info["skinmask"].ravel().astype(np.uint8))
    assert int(model_arrays["skin_mask"].sum()) == 9_642
    lm = model_arrays["landmarks68"]
    assert np.array_equal(lm, info["keypoints"].ravel().astype(np.int64) - 1)
    assert lm[0] == 16_644 and lm[30] == 8_192


def test_standard_landmarks_unshifted_and_in_model_frame(model_arrays: dict[str, np.ndarray]) -> None:
    lm = aux_mat("similarity_Lm3D_all.mat")["lm"]
    assert np.array_equal(model_arrays["standard_landmarks68"], lm)
    # The fixture puts the landmark vertices at lm in the re-centred frame: the model moved, lm did not.
    np.testing.assert_allclose(model_arrays["mean_shape"][model_arrays["landmarks68"]], lm, atol=1e-5)


def test_decodes_with_face_model_and_decoder(built: Path, model_arrays: dict[str, np.ndarray]) -> None:
    model = FaceModel.from_file(built)
    assert model.layout.total == 257 and model.n_vertices == N and not model.has_uvs
    decoder = FaceDecoder(model)
    with torch.no_grad():
        zero = decoder(Coefficients.zeros(model.layout))
        np.testing.assert_allclose(zero.shape[0].numpy(), model_arrays["mean_shape"], atol=1e-7)
        gen = torch.Generator().manual_seed(0)
        vec = torch.randn(2, 257, generator=gen) * 0.5
        vec[:, 224:227] *= 0.2  # modest pose
        vec[:, 254:257] = 0.0
        coeffs = Coefficients.from_vector(vec, model.layout)
        out = decoder(coeffs)
    a = model_arrays
    c = vec[0].double().numpy()
    shape = (a["mean_shape"] + np.tensordot(c[:80], a["id_basis"], 1) + np.tensordot(c[80:144], a["exp_basis"], 1))
    np.testing.assert_allclose(out.shape[0].numpy(), shape, atol=1e-4)
    albedo = a["mean_albedo"] + np.tensordot(c[144:224], a["albedo_basis"], 1)
    np.testing.assert_allclose(out.albedo[0].numpy(), albedo, atol=1e-4)
    for t in (out.vertices_2d, out.normals, out.colors, out.landmarks_2d):
        assert torch.isfinite(t).all()
    assert out.landmarks_2d.shape == (2, 68, 2)


# ---------------------------------------------------------------------------------------------------------------
# Malformed inputs: clear ModelFileErrors.


def _small_model(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    """BFM09-shaped variables of zeros with 80 components (the fewest the converter takes, so the files stay
    small), with ``changes`` (None drops the variable)."""
    rows = 3 * BFM_VERTICES
    v: dict[str, np.ndarray] = {
        "shapeMU": np.zeros((rows, 1), np.float32),
        "shapePC": np.zeros((rows, 80), np.float32),
        "shapeEV": np.ones((80, 1)),
        "texMU": np.zeros((rows, 1), np.float32),
        "texPC": np.zeros((rows, 80), np.float32),
        "texEV": np.ones((80, 1)),
    }
    for key, value in changes.items():
        if value is None:
            v.pop(key)
        else:
            v[key] = value
    return v


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shapePC": None}, "lacks shapePC; is this the Basel Face Model 2009 file?"),
        ({"texEV": None}, "lacks texEV"),
        ({"shapeMU": np.zeros((1000, 1), np.float32)}, "shapeMU has shape (1000, 1)"),
        ({"texPC": np.zeros((3 * 53_215, 80), np.float32)}, "texPC has shape (159645, 80)"),
        ({"shapePC": np.zeros((3 * BFM_VERTICES, 50), np.float32), "shapeEV": np.ones((50, 1))},
         "at least 80 components"),
        ({"shapeEV": np.ones((100, 1))}, "shapeEV has shape (100, 1)"),
    ],
)
def test_malformed_morphable_model(
    tmp_path: Path, bfm_inputs: dict[str, object], changes: dict[str, np.ndarray | None], message: str
) -> None:
    mat = write_morphable_model(tmp_path / "01_MorphableModel.mat", _small_model(**changes))
    with pytest.raises(ModelFileError) as err:
        bfm.build(mat, Path(str(bfm_inputs["bin"])), tmp_path / "out.npz")
    assert message in str(err.value)
    assert not (tmp_path / "out.npz").exists()


def test_not_a_mat_file(tmp_path: Path, bfm_inputs: dict[str, object]) -> None:
    exp = Path(str(bfm_inputs["bin"]))
    junk = tmp_path / "01_MorphableModel.mat"
    junk.write_bytes(b"not a MATLAB file at all" * 20)
    with pytest.raises(ModelFileError, match="not a readable MATLAB v5 file"):
        bfm.build(junk, exp, tmp_path / "out.npz")
    with pytest.raises(ModelFileError, match=r"v7\.3"):
        bfm.build(write_v73_stub(tmp_path / "v73.mat"), exp, tmp_path / "out.npz")
    with pytest.raises(ModelFileError, match="not found"):
        bfm.build(tmp_path / "missing.mat", exp, tmp_path / "out.npz")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_mat_file(tmp_path: Path, bfm_inputs: dict[str, object], compress: bool) -> None:
    full = write_morphable_model(tmp_path / "full.mat", _small_model(), compress=compress).read_bytes()
    cut = tmp_path / "01_MorphableModel.mat"
    cut.write_bytes(full[: len(full) * 2 // 3])
    with pytest.raises(ModelFileError, match="is truncated"):
        bfm.build(cut, Path(str(bfm_inputs["bin"])), tmp_path / "out.npz")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"truncate_to": 4 + 4 * 3 * EXP_VERTICES + 1000}, "is truncated"),
        ({"truncate_to": 2}, "empty or truncated"),
        ({"exp_dim": 50}, "declares 50 components, expected 79"),
    ],
)
def test_malformed_exp_pca(
    tmp_path: Path, bfm_inputs: dict[str, object], kwargs: dict[str, int], message: str
) -> None:
    mean, pcs = np.zeros(3 * EXP_VERTICES, np.float32), bfm_inputs["exp_pcs"]
    exp = write_exp_pca(tmp_path / "Exp_Pca.bin", mean, pcs, **kwargs)
    with pytest.raises(ModelFileError, match=message):
        bfm.build(Path(str(bfm_inputs["mat"])), exp, tmp_path / "out.npz")


def test_missing_exp_pca(tmp_path: Path, bfm_inputs: dict[str, object]) -> None:
    with pytest.raises(ModelFileError, match=r"Exp_Pca\.bin"):
        bfm.build(Path(str(bfm_inputs["mat"])), tmp_path / "Exp_Pca.bin", tmp_path / "out.npz")


def test_bad_aux_dir(tmp_path: Path) -> None:
    aux = tmp_path / "aux"
    aux.mkdir()
    with pytest.raises(ModelFileError, match=r"BFM_exp_idx\.mat not found"):
        bfm.load_index(aux)
    for name in bfm.AUX_FILES:
        (aux / name).write_bytes((packaged_aux_dir() / name).read_bytes())
    assert bfm.load_index(aux).front_triangles.shape == (54_681, 3)  # select_vertex_id.mat is optional
    scipy.io.savemat(aux / "BFM_front_idx.mat", {"idx": np.arange(1, 101, dtype=np.float32)[:, None]})
    with pytest.raises(ModelFileError, match=r"idx has shape \(100, 1\)"):
        bfm.load_index(aux)
    scipy.io.savemat(aux / "BFM_front_idx.mat", {"other": np.zeros(3)})
    with pytest.raises(ModelFileError, match="lacks the variable idx"):
        bfm.load_index(aux)


def test_aux_cross_check_catches_mixed_files(tmp_path: Path) -> None:
    aux = tmp_path / "aux"
    aux.mkdir()
    for name in (*bfm.AUX_FILES, bfm.AUX_CHECK_FILE):
        (aux / name).write_bytes((packaged_aux_dir() / name).read_bytes())
    sel = select_ids() + 1
    sel[5] = sel[6]
    scipy.io.savemat(aux / bfm.AUX_CHECK_FILE, {"select_id": sel.astype(np.float64)[:, None]})
    with pytest.raises(ModelFileError, match="index files disagree"):
        bfm.load_index(aux)


# ---------------------------------------------------------------------------------------------------------------
# Mirror index helper.


def test_mirror_index_on_symmetric_and_random_points() -> None:
    rng = np.random.default_rng(3)
    half = rng.uniform(0.05, 1.0, (500, 3))
    sym = np.concatenate([half, half * np.array([-1.0, 1.0, 1.0])])
    idx, p95 = bfm.mirror_index(sym)
    assert idx is not None and p95 < 1e-9
    assert np.array_equal(idx[:500], np.arange(500, 1000)) and np.array_equal(idx[idx], np.arange(1000))
    idx, _ = bfm.mirror_index(rng.normal(0.0, 1.0, (1000, 3)))
    assert idx is None
