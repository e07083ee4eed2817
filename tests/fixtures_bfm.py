"""Synthetic stand-ins for the licensed Basel files, in exactly their formats and shapes (random content).

* :func:`synthetic_morphable_model` / :func:`write_morphable_model`: ``01_MorphableModel.mat`` as MATLAB v5 with
  the real variable names and shapes (``shapeMU`` (160470, 1), ``shapePC`` (160470, 199), ``shapeEV`` (199, 1),
  the same for ``tex``, and ``tl`` (106466, 3)); PCs and means float32 ("single"), EVs float64 ("double"), so the
  converter sees the mixed-dtype case. Units as BFM09: micrometres, texture 0-255.
* :func:`synthetic_exp_pca` / :func:`write_exp_pca`: ``Exp_Pca.bin``: int32 79, 3 x 53215 float32 mean,
  3 x 79 x 53215 float32 components (component-major).

The mean shape is not pure noise: its 35,709 front vertices (``select_vertex_id.mat``) have their centroid at
:data:`FRONT_CENTROID_DM` and the 68 landmark vertices sit exactly at the reference's standard landmarks plus that
centroid, so a correct conversion puts them onto ``similarity_Lm3D_all.mat`` without shifting the latter.

The index files are read here with scipy directly (not through ``facerecon.facemodel.bfm``), so tests can use these
helpers as an independent check.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import scipy.io

BFM_VERTICES = 53_490
EXP_VERTICES = 53_215
EXP_DIM = 79
#: Where the synthetic front-face centroid lies in the raw (BFM09-like) frame, decimetres.
FRONT_CENTROID_DM = (0.05, 0.21, 0.43)


def packaged_aux_dir() -> Path:
    return Path(str(resources.files("facerecon") / "assets" / "bfm"))


def select_ids(aux: Path | None = None) -> np.ndarray:
    """``(35709,)`` 0-based BFM09 vertex ids of the front face, straight from ``select_vertex_id.mat``."""
    aux = aux or packaged_aux_dir()
    return scipy.io.loadmat(aux / "select_vertex_id.mat")["select_id"].astype(np.int64).ravel() - 1


def synthetic_morphable_model(seed: int = 0, n_components: int = 199) -> dict[str, np.ndarray]:
    """Random BFM09-shaped variables (see the module docstring); about 2 x 128 MB for 199 components."""
    rng = np.random.default_rng(seed)
    aux = packaged_aux_dir()
    sel = select_ids(aux)
    info = scipy.io.loadmat(aux / "facemodel_info.mat", variable_names=["keypoints"])
    kp = sel[info["keypoints"].astype(np.int64).ravel() - 1]
    lm = scipy.io.loadmat(aux / "similarity_Lm3D_all.mat")["lm"].astype(np.float64)

    shape = rng.normal(0.0, 0.5, (BFM_VERTICES, 3))  # dm, about the front centroid
    shape[kp] = lm
    others = np.setdiff1d(sel, kp)
    shape[others] -= shape[sel].sum(0) / others.size  # front centroid exactly 0
    shape += np.asarray(FRONT_CENTROID_DM)
    rows = 3 * BFM_VERTICES
    scale = np.float32(1.0 / np.sqrt(rows))
    shape_pc = rng.standard_normal((rows, n_components), dtype=np.float32)
    shape_pc *= scale
    tex_pc = rng.standard_normal((rows, n_components), dtype=np.float32)
    tex_pc *= scale
    n_tl = 106_466
    return {
        "shapeMU": (shape * 1e5).astype(np.float32).reshape(rows, 1),
        "shapePC": shape_pc,
        "shapeEV": np.geomspace(8e5, 8e3, n_components).reshape(-1, 1),
        "texMU": rng.uniform(40.0, 220.0, (rows, 1)).astype(np.float32),
        "texPC": tex_pc,
        "texEV": np.geomspace(4e3, 40.0, n_components).reshape(-1, 1),
        "tl": rng.integers(1, BFM_VERTICES + 1, (n_tl, 3)).astype(np.float64),
    }


def write_morphable_model(path: Path, variables: dict[str, np.ndarray], *, compress: bool = False) -> Path:
    """Write ``variables`` as a MATLAB v5 file (the format of ``01_MorphableModel.mat``)."""
    scipy.io.savemat(path, variables, format="5", do_compression=compress, oned_as="column")
    return path


def synthetic_exp_pca(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (159645,), components (79, 159645))`` float32 in micrometres per unit component."""
    rng = np.random.default_rng(seed)
    floats = 3 * EXP_VERTICES
    mean = rng.normal(0.0, 1e4, floats).astype(np.float32)
    pcs = rng.standard_normal((EXP_DIM, floats), dtype=np.float32)
    pcs *= np.float32(1.0 / np.sqrt(floats))
    return mean, pcs


def write_exp_pca(
    path: Path,
    mean: np.ndarray,
    pcs: np.ndarray,
    *,
    exp_dim: int | None = None,
    truncate_to: int | None = None,
) -> Path:
    """Write ``Exp_Pca.bin``: int32 ``exp_dim`` (default: the number of components), mean, components.

    ``truncate_to`` cuts the file to that many bytes (a broken download)."""
    header = np.asarray([pcs.shape[0] if exp_dim is None else exp_dim], dtype="<i4").tobytes()
    data = header + mean.astype("<f4").tobytes() + pcs.astype("<f4").tobytes()
    path.write_bytes(data if truncate_to is None else data[:truncate_to])
    return path


def write_v73_stub(path: Path) -> Path:
    """The 128-byte header of a MATLAB v7.3 (HDF5) file followed by zeros: scipy refuses it."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    path.write_bytes(text.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM" + b"\0" * 512)
    return path
