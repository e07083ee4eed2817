"""Converter of the Basel Face Model 2009 into the reference's front face model (``BFM_model_front.mat``).

The user brings the two licensed files; this module never ships their data and neither does its output:

* ``01_MorphableModel.mat`` (Basel Face Model 2009, University of Basel licence): MATLAB v5, with ``shapeMU``
  ``(160470, 1)``, ``shapePC`` ``(160470, 199)``, ``shapeEV`` ``(199, 1)``, ``texMU``, ``texPC``, ``texEV`` (the same
  shapes), ``tl`` ``(106466, 3)`` and others. 160,470 = 3 x 53,490 vertices, xyz interleaved; shapes in micrometres,
  texture RGB 0-255.
* ``Exp_Pca.bin`` (Guo et al., "CNN-based real-time dense face reconstruction", github.com/Juyong/3DFace,
  CoarseData): little-endian int32 ``exp_dim`` (79), 3 x 53,215 float32 (mean; unused, as in the reference), then
  3 x 79 x 53,215 float32 principal components, one component after the other (reshape ``(79, 159645)``; the
  reference transposes to ``(159645, 79)``). Micrometres per unit of the un-normalised component.

and the reference's small MIT index files (the packaged copies in ``facerecon/assets/bfm``, or ``aux_dir``; see
``../shared/assets/bfm-aux/README.md``). :func:`build` reproduces ``transferBFM09`` of the reference followed by
what the PyTorch reference's ``ParametricFaceModel`` does on load (reference.md sections 3.1, 3.2), in the
reference's own arithmetic order and dtypes:

=========================  ================================================================================
array (N = 35,709)         from
=========================  ================================================================================
``mean_shape`` (N, 3)      ``shapeMU`` / 1e5 (dm) at ``index_shape``, minus its own centroid (float32 mean)
``id_basis`` (80, N, 3)    ``shapePC * shapeEV`` (first 80) / 1e5 at ``index_shape``
``exp_basis`` (64, N, 3)   ``Exp_Pca.bin`` PCs * ``std_exp.txt`` (first 64) / 1e5 at ``index_exp``
``mean_albedo`` (N, 3)     ``texMU`` at ``index_shape``, / 255 (PT's ``compute_texture(normalize=True)``)
``albedo_basis`` (80,N,3)  ``texPC * texEV`` (first 80) at ``index_shape``, / 255
``triangles`` (F, 3)       ``facemodel_info.mat`` ``tri`` - 1 (F = 70,789)
``point_buf`` (N, 8)       ``point_buf`` - 1; the padding 70,790 becomes F, the reference's appended zero normal
``landmarks68`` (68,)      ``keypoints`` - 1
``face_mask`` (N,)         1 at ``frontmask2_idx`` - 1 (27,660 vertices)
``front_triangles``        ``frontmask2_idx[tri_mask2 - 1] - 1``: 54,681 triangles in global vertex ids. The
                           indices of ``tri_mask2`` are local to ``frontmask2_idx`` (TF maps them so; PT does
                           not, reference.md section 16, pitfall 2)
``skin_mask`` (N,)         ``skinmask`` (9,642 vertices)
``standard_landmarks68``   ``similarity_Lm3D_all.mat`` ``lm``, unchanged
=========================  ================================================================================

``index_exp = idx - 1`` from ``BFM_front_idx.mat`` (35,709 entries into the 53,215 expression vertices) and
``index_shape = (trimIndex - 1)[index_exp]`` with ``trimIndex`` from ``BFM_exp_idx.mat`` (53,215 entries into the
53,490 BFM09 vertices): the reference's variable names are swapped relative to the file names. The composition must
equal ``select_vertex_id.mat`` (checked when that file is present).

**Frame of the standard landmarks.** ``lm`` is used without a shift: the reference's alignment (reference.md
section 6, steps 3-7) puts the point that POS fits to the *origin of the landmarks' frame* at the crop centre
(112, 112), which is where a face with zero translation projects the *origin of the model frame*; PT loads the
face model with ``recenter=True``, so the trained network can only be consistent if ``lm`` is in the re-centred
frame. The numbers agree: the 68 points are symmetric about x = 0 (mean x 0.0007 dm) and their mean lies 1.3 cm in
front of and 0.8 cm below the origin, as expected of the inner-face points relative to the centroid of a mesh that
reaches back to the ears and up the forehead. :func:`build` measures the distance between
``lm`` and the 68 landmark vertices of the user's re-centred mean shape, stores it in the card and warns if their
centroids are more than 3 cm apart (which would mean a wrong input file).

**Mirror index.** Stored only when the re-centred mean shape is symmetric enough for the nearest mirrored vertex to
mean something (95 % of vertices within 2 mm of their mirror image and 90 % of pairs mutual); otherwise omitted.

Size: over 400 lines: the reference's ``transferBFM09`` conversion from the user's licensed files is one recipe
(index files, selection, expression basis, masks, card), tested as a whole on fixtures in the exact formats.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError
from scipy.spatial import cKDTree

from facerecon import __version__
from facerecon.coefficients import CoefficientLayout
from facerecon.errors import ModelFileError
from facerecon.facemodel.format import FaceModelCard, Provenance, save_face_model, sha256_file

log = logging.getLogger(__name__)

#: Vertices of BFM09, of the expression basis of Guo et al., and of the reference's front face model.
BFM_VERTICES = 53_490
EXP_VERTICES = 53_215
N_VERTICES = 35_709
N_TRIANGLES = 70_789
#: Vertices and triangles of the photometric-loss region (``frontmask2_idx``, ``tri_mask2``).
N_FACE_VERTICES = 27_660
N_FRONT_TRIANGLES = 54_681
#: Components of ``Exp_Pca.bin`` (and of ``std_exp.txt``).
EXP_DIM = 79
#: Components kept: identity, expression, albedo (the reference's 257 layout).
K_ID, K_EXP, K_TEX = 80, 64, 80
#: BFM09 micrometres -> decimetres (the reference: "unify the scale to decimeter").
MICROMETRES_PER_DM = 1e5

MORPHABLE_VARIABLES = ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV")
#: Index files the conversion reads, and the optional cross-check.
AUX_FILES = (
    "BFM_exp_idx.mat",
    "BFM_front_idx.mat",
    "facemodel_info.mat",
    "similarity_Lm3D_all.mat",
    "std_exp.txt",
)
AUX_CHECK_FILE = "select_vertex_id.mat"

AUX_SOURCE_URL = "https://github.com/sicxu/Deep3DFaceRecon_pytorch"
AUX_SOURCE_COMMIT = "9167c7136aebef0c54d3ac74f4b0396222a491c1"
BFM_URL = "https://faces.dmi.unibas.ch/bfm/"
EXP_URL = "https://github.com/Juyong/3DFace"
LICENCE = "Basel Face Model 2009 licence (non-commercial research); expression basis: Guo et al. licence"
LICENCE_NOTICE = (
    "Derived from the Basel Face Model 2009 (P. Paysan, R. Knothe, B. Amberg, S. Romdhani, T. Vetter, 'A 3D Face "
    "Model for Pose and Illumination Invariant Face Recognition', AVSS 2009), University of Basel, under its "
    "licence (non-commercial research; no redistribution), and from the expression basis of Y. Guo, J. Zhang, "
    "J. Cai, B. Jiang, J. Zheng, 'CNN-based Real-time Dense Face Reconstruction with Inverse-rendered "
    "Photo-realistic Face Images' (IEEE TPAMI 41(6), 2019), built on FaceWarehouse, under its licence. "
    "Index files from Deep3DFaceRecon (MIT). Do not redistribute this file."
)

#: Gate for :func:`mirror_index`: 95th percentile of the mirror distance (dm) and the share of mutual pairs.
MIRROR_P95_MAX_DM = 0.02
MIRROR_MUTUAL_MIN = 0.9
#: :func:`build` warns when the 68 standard landmarks and the mean shape's landmark vertices differ in centroid by
#: more than this (dm).
LANDMARK_FRAME_WARN_DM = 0.3


@dataclass(frozen=True)
class BfmIndex:
    """The front-face selection and topology from the reference's index files, 0-based.

    Attributes:
        shape_vertices: ``(N,)`` int64 rows into the 53,490 BFM09 vertices (the reference's ``index_shape``).
        exp_vertices: ``(N,)`` int64 rows into the 53,215 ``Exp_Pca.bin`` vertices (``index_exp``).
        triangles: ``(F, 3)`` int32, F = 70,789.
        point_buf: ``(N, 8)`` int32 incident triangles per vertex, padded with F.
        landmarks68: ``(68,)`` int32 vertex ids, iBUG order.
        face_vertices: ``(27660,)`` int64 vertex ids of the photometric-loss region.
        front_triangles: ``(54681, 3)`` int32 triangles of that region, global vertex ids.
        skin_mask: ``(N,)`` uint8.
        standard_landmarks68: ``(68, 3)`` float32, decimetres, re-centred model frame.
        exp_std: ``(79,)`` float64 standard deviations of the expression components.
        files: file name -> sha256 of every index file read.
    """

    shape_vertices: np.ndarray
    exp_vertices: np.ndarray
    triangles: np.ndarray
    point_buf: np.ndarray
    landmarks68: np.ndarray
    face_vertices: np.ndarray
    front_triangles: np.ndarray
    skin_mask: np.ndarray
    standard_landmarks68: np.ndarray
    exp_std: np.ndarray
    files: dict[str, str]


def default_aux_dir() -> Traversable:
    """The packaged copies of the reference's index files (``facerecon/assets/bfm``)."""
    return resources.files("facerecon") / "assets" / "bfm"


def _read_aux(aux: Traversable, name: str) -> bytes:
    entry = aux / name
    if not entry.is_file():
        raise ModelFileError(
            f"index file {name} not found in {aux} (the folder must hold {', '.join(AUX_FILES)} from the "
            "Deep3DFaceRecon BFM/ folder; leave out --aux to use the packaged copies)"
        )
    return entry.read_bytes()


def _aux_var(data: bytes, file: str, var: str) -> np.ndarray:
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=[var])
    except (MatReadError, ValueError, OSError, NotImplementedError) as exc:
        raise ModelFileError(f"index file {file} is not a readable MATLAB file: {exc}") from exc
    if var not in mat:
        raise ModelFileError(f"index file {file} lacks the variable {var}; is it the Deep3DFaceRecon copy?")
    return np.asarray(mat[var])


def _index(a: np.ndarray, file: str, var: str, shape: tuple[int, ...], upper: int) -> np.ndarray:
    """1-based MATLAB indices ``a`` of ``shape`` with values in ``1 … upper`` -> 0-based int64 of ``shape``."""
    if a.size != int(np.prod(shape)):
        raise ModelFileError(f"index file {file}: {var} has shape {a.shape}, expected {shape}")
    a = a.reshape(shape)
    if not np.issubdtype(a.dtype, np.integer) and not np.array_equal(a, np.round(a)):
        raise ModelFileError(f"index file {file}: {var} holds non-integer values")
    out = a.astype(np.int64) - 1
    if out.size and (out.min() < 0 or out.max() >= upper):
        raise ModelFileError(f"index file {file}: {var} has values outside 1 … {upper}")
    return out


def _mask(a: np.ndarray, file: str, var: str, n: int) -> np.ndarray:
    if a.size != n or not np.isin(a, (0, 1)).all():
        raise ModelFileError(f"index file {file}: {var} must be {n} values of 0/1, got shape {a.shape}")
    return a.reshape(n).astype(np.uint8)


def load_index(aux_dir: Path | Traversable | None = None) -> BfmIndex:
    """Read and check the index files in ``aux_dir`` (default: the packaged copies).

    Raises:
        ModelFileError: a file is missing or a variable has the wrong shape or range.
    """
    aux = default_aux_dir() if aux_dir is None else aux_dir
    raw = {name: _read_aux(aux, name) for name in AUX_FILES}
    files = {name: hashlib.sha256(data).hexdigest() for name, data in raw.items()}

    trim = _index(_aux_var(raw["BFM_exp_idx.mat"], "BFM_exp_idx.mat", "trimIndex"), "BFM_exp_idx.mat",
                  "trimIndex", (EXP_VERTICES,), BFM_VERTICES)
    exp_vertices = _index(_aux_var(raw["BFM_front_idx.mat"], "BFM_front_idx.mat", "idx"), "BFM_front_idx.mat",
                          "idx", (N_VERTICES,), EXP_VERTICES)
    shape_vertices = trim[exp_vertices]
    if (aux / AUX_CHECK_FILE).is_file():
        check = (aux / AUX_CHECK_FILE).read_bytes()
        files[AUX_CHECK_FILE] = hashlib.sha256(check).hexdigest()
        select = _index(_aux_var(check, AUX_CHECK_FILE, "select_id"), AUX_CHECK_FILE, "select_id",
                        (N_VERTICES,), BFM_VERTICES)
        if not np.array_equal(select, shape_vertices):
            raise ModelFileError(
                f"index files disagree: (trimIndex - 1)[idx - 1] != select_id - 1 ({AUX_CHECK_FILE}); "
                "mixed copies from different sources?"
            )

    info_name = "facemodel_info.mat"
    info = raw[info_name]

    def var(name: str) -> np.ndarray:
        return _aux_var(info, info_name, name)

    triangles = _index(var("tri"), info_name, "tri", (N_TRIANGLES, 3), N_VERTICES)
    point_buf = _index(var("point_buf"), info_name, "point_buf", (N_VERTICES, 8), N_TRIANGLES + 1)
    landmarks = _index(var("keypoints"), info_name, "keypoints", (68,), N_VERTICES)
    face_vertices = _index(var("frontmask2_idx"), info_name, "frontmask2_idx", (N_FACE_VERTICES,), N_VERTICES)
    local = _index(var("tri_mask2"), info_name, "tri_mask2", (N_FRONT_TRIANGLES, 3), N_FACE_VERTICES)
    front_triangles = face_vertices[local]  # local -> global vertex ids (not PT's bug)
    skin = _mask(var("skinmask"), info_name, "skinmask", N_VERTICES)

    lm = _aux_var(raw["similarity_Lm3D_all.mat"], "similarity_Lm3D_all.mat", "lm")
    if lm.shape != (68, 3) or not np.isfinite(lm).all():
        raise ModelFileError(f"index file similarity_Lm3D_all.mat: lm has shape {lm.shape}, expected (68, 3)")
    try:
        exp_std = np.loadtxt(io.StringIO(raw["std_exp.txt"].decode("ascii")), dtype=np.float64).reshape(-1)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"index file std_exp.txt is unreadable: {exc}") from exc
    if exp_std.shape != (EXP_DIM,) or not np.isfinite(exp_std).all():
        raise ModelFileError(f"index file std_exp.txt holds {exp_std.size} values, expected {EXP_DIM}")

    return BfmIndex(
        shape_vertices=shape_vertices,
        exp_vertices=exp_vertices,
        triangles=triangles.astype(np.int32),
        point_buf=point_buf.astype(np.int32),  # padding 70790 (1-based) -> 70789 = F, the zero normal
        landmarks68=landmarks.astype(np.int32),
        face_vertices=face_vertices,
        front_triangles=front_triangles.astype(np.int32),
        skin_mask=skin,
        standard_landmarks68=lm.astype(np.float32),
        exp_std=exp_std,
        files=files,
    )


def read_exp_basis(path: Path, n_components: int = K_EXP) -> np.ndarray:
    """The first ``n_components`` principal components of ``Exp_Pca.bin`` as stored (no std scaling).

    Returns:
        ``(n_components, 159645)`` float32: component k, then vertex, then x/y/z, micrometres per unit of the
        un-normalised component (= the reference's ``expPC.T[:n_components]``).

    Raises:
        ModelFileError: missing file, ``exp_dim`` other than 79, or fewer bytes than the layout needs.
    """
    if not 0 < n_components <= EXP_DIM:
        raise ValueError(f"n_components must be in 1 … {EXP_DIM}, got {n_components}")
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"expression basis {path} not found (Exp_Pca.bin from Guo et al., see README)")
    size = path.stat().st_size
    if size < 4:
        raise ModelFileError(f"{path} is empty or truncated ({size} bytes); is this Exp_Pca.bin?")
    exp_dim = int(np.fromfile(path, dtype="<i4", count=1)[0])
    if exp_dim != EXP_DIM:
        raise ModelFileError(f"{path} declares {exp_dim} components, expected {EXP_DIM}; is this Exp_Pca.bin?")
    floats = 3 * EXP_VERTICES
    expected = 4 + 4 * floats * (1 + exp_dim)
    if size < expected:
        raise ModelFileError(
            f"{path} is truncated: {size} bytes, the layout (int32 + 3 x 53215 float32 mean + 3 x 79 x 53215 "
            f"float32 components) needs {expected}; download Exp_Pca.bin again"
        )
    if size > expected:
        log.warning("%s has %d bytes after the expression basis; ignoring them (as the reference)", path,
                    size - expected)
    pcs = np.fromfile(path, dtype="<f4", count=n_components * floats, offset=4 + 4 * floats)
    return pcs.reshape(n_components, floats).astype(np.float32)


def _mat_v5_truncated(path: Path) -> bool:
    """Whether the top-level data elements of a MATLAB v5 file run past its end (a cut-off copy or download).

    (``whosmat`` silently stops listing at a cut-off element, which would read as a missing variable.)"""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(128)
        if not header.startswith(b"MATLAB"):  # not a v5 header (e.g. v4): nothing to say
            return False
        endian = ">" if header[126:128] == b"MI" else "<"
        pos = 128
        while pos + 8 <= size:
            f.seek(pos)
            mtype, nbytes = struct.unpack(f"{endian}II", f.read(8))
            if mtype >> 16:  # small data element: type and size in 4 bytes, data in the next 4
                pos += 8
                continue
            end = pos + 8 + nbytes
            if mtype != 15:  # all but miCOMPRESSED are padded to 8 bytes
                end = pos + 8 + -(-nbytes // 8) * 8
            if end > size:
                return True
            pos = end
    return False


def check_morphable_model(path: Path) -> dict[str, tuple[int, ...]]:
    """Check the variables and sizes of ``01_MorphableModel.mat`` from its headers (data not loaded).

    Returns:
        variable -> shape for :data:`MORPHABLE_VARIABLES`.

    Raises:
        ModelFileError: not a MATLAB v5 file, a variable missing, or a variable of the wrong size.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Basel Face Model file {path} not found (01_MorphableModel.mat, see README)")
    try:
        listing = scipy.io.whosmat(path)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5)
        raise ModelFileError(
            f"{path} is a MATLAB v7.3 (HDF5) file; the Basel Face Model 2009 file is MATLAB v5. Use the original "
            "01_MorphableModel.mat (or re-save it in MATLAB with -v7)"
        ) from exc
    except (MatReadError, ValueError, OSError, TypeError) as exc:
        raise ModelFileError(
            f"{path} is not a readable MATLAB v5 file ({exc}); is this the Basel Face Model 2009 "
            "01_MorphableModel.mat?"
        ) from exc
    if _mat_v5_truncated(path):
        raise ModelFileError(f"{path} is truncated (its last variable runs past the end of the file); copy it again")
    found = {name: tuple(int(s) for s in shape) for name, shape, _ in listing}
    classes = {name: cls for name, _, cls in listing}
    rows = 3 * BFM_VERTICES
    for var in MORPHABLE_VARIABLES:
        if var not in found:
            raise ModelFileError(f"{path.name} lacks {var}; is this the Basel Face Model 2009 file?")
        if classes[var] not in ("single", "double"):
            raise ModelFileError(f"{path.name}: {var} is of MATLAB class {classes[var]}, expected single/double")
    for kind, k_min in (("shape", K_ID), ("tex", K_TEX)):
        mu, pc, ev = found[f"{kind}MU"], found[f"{kind}PC"], found[f"{kind}EV"]
        if sorted(mu) != [1, rows]:
            raise ModelFileError(
                f"{path.name}: {kind}MU has shape {mu}, expected ({rows}, 1) (3 x {BFM_VERTICES} BFM09 vertices); "
                "is this the Basel Face Model 2009 file?"
            )
        if len(pc) != 2 or pc[0] != rows or pc[1] < k_min:
            raise ModelFileError(
                f"{path.name}: {kind}PC has shape {pc}, expected ({rows}, 199) with at least {k_min} components; "
                "is this the Basel Face Model 2009 file?"
            )
        if min(ev) != 1 or max(ev) != pc[1] or len(ev) != 2:
            raise ModelFileError(f"{path.name}: {kind}EV has shape {ev}, expected ({pc[1]}, 1) like {kind}PC")
    return {var: found[var] for var in MORPHABLE_VARIABLES}


def _load_morphable_model(path: Path) -> dict[str, np.ndarray]:
    try:
        mat = scipy.io.loadmat(path, variable_names=list(MORPHABLE_VARIABLES))
    except (MatReadError, ValueError, OSError, NotImplementedError) as exc:
        raise ModelFileError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); copy it again") from exc
    return {var: np.asarray(mat[var]) for var in MORPHABLE_VARIABLES}


def _xyz_rows(vertices: np.ndarray) -> np.ndarray:
    """Rows of an xyz-interleaved ``(3V, …)`` array for ``vertices`` ``(N,)``: ``(3N,)`` as x0 y0 z0 x1 …"""
    return (3 * vertices[:, None] + np.arange(3)[None]).reshape(-1)


def _basis(pc: np.ndarray, ev: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """``pc * ev`` (first ``k``) at ``rows``, in the reference's arithmetic (numpy promotion of the file dtypes).

    Returns ``(3N, k)`` in the promoted dtype (float32 x float64 -> float64, as the reference)."""
    return pc[np.ix_(rows, np.arange(k))] * ev.reshape(1, -1)[:, :k]


def _to_knc(basis: np.ndarray, n: int) -> np.ndarray:
    """``(3N, K)`` interleaved columns -> ``(K, N, 3)`` float32."""
    return np.ascontiguousarray(basis.T.reshape(-1, n, 3), dtype=np.float32)


def mirror_index(shape: np.ndarray) -> tuple[np.ndarray | None, float]:
    """The nearest vertex of ``shape`` ``(N, 3)`` mirrored about x = 0, if the shape is symmetric enough.

    Returns:
        ``((N,) int32 or None, p95 distance in dm)``: None when the 95th percentile of the distance between a
        mirrored vertex and its match exceeds :data:`MIRROR_P95_MAX_DM` or fewer than :data:`MIRROR_MUTUAL_MIN`
        of the pairs are mutual.
    """
    pts = np.asarray(shape, np.float64)
    dist, idx = cKDTree(pts).query(pts * np.array([-1.0, 1.0, 1.0]))
    p95 = float(np.percentile(dist, 95))
    mutual = float(np.mean(idx[idx] == np.arange(len(idx))))
    if p95 > MIRROR_P95_MAX_DM or mutual < MIRROR_MUTUAL_MIN:
        log.info("mean shape not symmetric enough for a mirror index (p95 %.2f mm, %.0f %% mutual); omitted",
                 p95 * 100.0, mutual * 100.0)
        return None, p95
    return idx.astype(np.int32), p95


def build(bfm_mat: Path, exp_bin: Path, out: Path, aux_dir: Path | None = None) -> dict[str, object]:
    """Convert the user's BFM09 and expression files into the front face model ``out`` (``.npz`` + ``.json``).

    Args:
        bfm_mat: ``01_MorphableModel.mat`` (Basel Face Model 2009, MATLAB v5).
        exp_bin: ``Exp_Pca.bin`` (Guo et al.).
        out: the model file to write, e.g. ``models/bfm/facemodel.npz``; the card goes beside it.
        aux_dir: folder with the reference's index files; default the packaged copies.

    Returns:
        The side-car card (card + file, bytes, sha256), as :func:`~facerecon.facemodel.format.save_face_model`.

    Raises:
        ModelFileError: an input is missing, of the wrong kind, truncated or of the wrong size.
    """
    bfm_mat, exp_bin, out = Path(bfm_mat), Path(exp_bin), Path(out)
    # Cheap checks first: index files, the expression file's header and size, the MAT headers.
    index = load_index(aux_dir)
    pcs = read_exp_basis(exp_bin, K_EXP)
    check_morphable_model(bfm_mat)
    log.info("reading %s", bfm_mat)
    bfm = _load_morphable_model(bfm_mat)
    n = N_VERTICES
    rows = _xyz_rows(index.shape_vertices)

    # Shape: micrometres -> decimetres, then re-centred on the 35,709-vertex centroid (reference.md 3.2).
    mean_shape = (bfm["shapeMU"].reshape(-1)[rows] / MICROMETRES_PER_DM).reshape(n, 3).astype(np.float32)
    centroid = np.mean(mean_shape, axis=0, keepdims=True)
    mean_shape = mean_shape - centroid
    id_basis = _to_knc(_basis(bfm["shapePC"], bfm["shapeEV"], rows, K_ID) / MICROMETRES_PER_DM, n)
    # Albedo: the reference keeps 0-255 and divides by 255 at run time (PT); done here once, in float32.
    mean_albedo = bfm["texMU"].reshape(-1)[rows].astype(np.float32).reshape(n, 3) / np.float32(255.0)
    albedo_basis = _to_knc(_basis(bfm["texPC"], bfm["texEV"], rows, K_TEX), n) / np.float32(255.0)
    del bfm
    # Expression: components x std (float32 x float64, as the reference), decimetres, at index_exp.
    exp_sel = pcs.reshape(K_EXP, EXP_VERTICES, 3)[:, index.exp_vertices]
    exp_basis = (exp_sel * index.exp_std[:K_EXP, None, None] / MICROMETRES_PER_DM).astype(np.float32)
    del pcs, exp_sel

    face_mask = np.zeros(n, np.uint8)
    face_mask[index.face_vertices] = 1
    lm = index.standard_landmarks68
    kp = mean_shape[index.landmarks68].astype(np.float64)
    lm_offset = float(np.linalg.norm(kp.mean(0) - lm.mean(0)))
    lm_rms = float(np.sqrt(((kp - lm) ** 2).sum(1).mean()))
    log.info("standard landmarks vs the mean shape's landmark vertices: centroid offset %.2f mm, RMS %.2f mm",
             lm_offset * 100.0, lm_rms * 100.0)
    if lm_offset > LANDMARK_FRAME_WARN_DM:
        log.warning(
            "the 68 standard landmarks lie %.1f cm from the mean shape's landmark vertices; the input files do not "
            "look like the Basel Face Model 2009 the reference uses", lm_offset * 10.0,
        )
    mirror, mirror_p95 = mirror_index(mean_shape)

    arrays: dict[str, np.ndarray] = {
        "mean_shape": mean_shape,
        "id_basis": id_basis,
        "exp_basis": exp_basis,
        "mean_albedo": mean_albedo,
        "albedo_basis": albedo_basis,
        "triangles": index.triangles,
        "point_buf": index.point_buf,
        "landmarks68": index.landmarks68,
        "standard_landmarks68": lm,
        "face_mask": face_mask,
        "front_triangles": index.front_triangles,
        "skin_mask": index.skin_mask,
    }
    storage: dict[str, str | float] = {
        "basis_dtype": "float32",
        "basis_max_abs_error_mm": 0.0,
        "recentred_by_dm": "[" + ", ".join(f"{c:.6f}" for c in centroid.reshape(3)) + "]",
        "standard_landmarks_centroid_offset_mm": round(lm_offset * 100.0, 3),
        "standard_landmarks_rms_mm": round(lm_rms * 100.0, 3),
    }
    if mirror is not None:
        arrays["mirror_index"] = mirror
        storage["mirror_index_p95_mm"] = round(mirror_p95 * 100.0, 3)

    sources = {bfm_mat.name: sha256_file(bfm_mat), exp_bin.name: sha256_file(exp_bin), **index.files}
    card = FaceModelCard(
        name="bfm",
        description=(
            "Basel Face Model 2009 front face as in Deep3DFaceRecon (BFM_model_front): 35,709 vertices, 70,789 "
            "triangles; 80 identity and 80 albedo components of BFM09, 64 expression components of Guo et al. "
            "(FaceWarehouse). The paper's exact model; coefficients of the reference's epoch_20.pth apply."
        ),
        licence=LICENCE,
        licence_notice=LICENCE_NOTICE,
        redistributable=False,
        layout=CoefficientLayout(id=K_ID, exp=K_EXP, tex=K_TEX),
        n_vertices=n,
        n_triangles=N_TRIANGLES,
        has_uvs=False,
        albedo=(
            "BFM09 texture PCA: texMU and texPC*texEV (first 80) divided by 255, RGB about [0, 1], unclamped "
            "(the reference's compute_texture with normalize=True); learned from 200 scans taken under the "
            "scanner's controlled lighting."
        ),
        storage=storage,
        limits=[
            "Licensed data: non-commercial research use; never commit, ship or serve this file to third parties.",
            "No texture coordinates: textures are per-vertex colours only.",
            "Face only (no ears, neck, eyes or inner mouth), as the reference's front model.",
            "Expression components are PCA modes without names.",
            "Fixed (not contour-sliding) jaw landmarks, as in the reference: at large yaw the detected jaw "
            "points lie on the silhouette, not on these vertices.",
        ],
        provenance=Provenance(
            source=(
                f"user's Basel Face Model 2009 ({BFM_URL}) and Exp_Pca.bin of Guo et al. ({EXP_URL}, CoarseData), "
                "with the Deep3DFaceRecon index files (BFM/ folder), converted like its transferBFM09"
            ),
            source_url=AUX_SOURCE_URL,
            source_commit=AUX_SOURCE_COMMIT,
            source_files=sources,
            builder="facerecon.facemodel.bfm",
            builder_version=__version__,
        ),
    )
    log.info("writing %s (%d vertices, %d triangles, layout %d)", out, n, N_TRIANGLES, card.layout.total)
    return save_face_model(out, arrays, card)
