"""The face-model file format: validation, corrupt and truncated files, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from facerecon.errors import ModelFileError
from facerecon.facemodel.format import FaceModelData, load_face_model, save_face_model

from .conftest import ICT_MODEL


def test_shipped_model_loads_and_matches_its_card() -> None:
    data = load_face_model(ICT_MODEL)
    card = json.loads(ICT_MODEL.with_suffix(".json").read_text())
    assert data.card.layout.total == sum(card["layout"].values())
    assert data["id_basis"].dtype == np.float32  # stored float16, widened on load
    assert ICT_MODEL.stat().st_size == card["bytes"] < 25_000_000


def test_truncated_file_fails_clearly(tmp_path: Path) -> None:
    raw = ICT_MODEL.read_bytes()
    bad = tmp_path / "facemodel.npz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_face_model(bad)
    # With the side-car card beside it, the checksum names the problem first.
    shutil.copy(ICT_MODEL.with_suffix(".json"), bad.with_suffix(".json"))
    with pytest.raises(ModelFileError, match="does not match its card"):
        load_face_model(bad)


def test_corrupted_bytes_fail_clearly(tmp_path: Path) -> None:
    raw = bytearray(ICT_MODEL.read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 64] = b"\0" * 64
    bad = tmp_path / "facemodel.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_face_model(bad)


def test_not_a_model_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_face_model(tmp_path / "nope.npz")
    txt = tmp_path / "x.npz"
    txt.write_text("hello")
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_face_model(txt)


def _rewrite(tmp_path: Path, drop: str | None = None, **replace: np.ndarray) -> Path:
    data = load_face_model(ICT_MODEL)
    arrays = {k: v for k, v in data.arrays.items() if k != drop}
    arrays.update(replace)
    out = tmp_path / "m.npz"
    # Bypass save-time validation to produce a malformed file as a broken tool would.
    np.savez(out, **arrays, card_json=np.frombuffer(data.card.model_dump_json().encode(), np.uint8))
    return out


def test_missing_array_and_wrong_shapes(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"missing arrays \['skin_mask'\]"):
        load_face_model(_rewrite(tmp_path, drop="skin_mask"))
    data = load_face_model(ICT_MODEL)
    with pytest.raises(ModelFileError, match="id_basis has shape"):
        load_face_model(_rewrite(tmp_path, id_basis=data["id_basis"][:10]))
    tris = data["triangles"].copy()
    tris[0, 0] = data.card.n_vertices
    with pytest.raises(ModelFileError, match="triangles indices out of range"):
        load_face_model(_rewrite(tmp_path, triangles=tris))
    shape = data["mean_shape"].copy()
    shape[3, 1] = np.nan
    with pytest.raises(ModelFileError, match="non-finite"):
        load_face_model(_rewrite(tmp_path, mean_shape=shape))


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    data = load_face_model(ICT_MODEL)
    out = tmp_path / "m.npz"
    arrays = dict(data.arrays)
    arrays["landmarks68"] = np.array([object()] * 68, dtype=object)
    np.savez(out, **arrays, card_json=np.frombuffer(data.card.model_dump_json().encode(), np.uint8))
    with pytest.raises(ModelFileError):
        load_face_model(out)


def test_save_is_deterministic_and_validates(tmp_path: Path) -> None:
    """Two saves give the same bytes. On the shipped model cut to two modes per basis (the same format; deflate -9
    of the whole model twice was ~15 s; its full-size rebuild is checked byte for byte in test_facemodel_ict)."""
    full = load_face_model(ICT_MODEL)
    card = full.card.model_copy(update={
        "layout": full.card.layout.model_copy(update={"id": 2, "exp": 2, "tex": 2}),
        "expression_names": full.card.expression_names[:2]})
    data = FaceModelData(card, {**full.arrays, **{k: full[k][:2] for k in ("id_basis", "exp_basis", "albedo_basis")}})
    a = save_face_model(tmp_path / "a.npz", data.arrays, data.card)
    b = save_face_model(tmp_path / "b.npz", data.arrays, data.card)
    assert a["sha256"] == b["sha256"] and (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    again = load_face_model(tmp_path / "a.npz")
    assert again.card == card and np.array_equal(again["id_basis"], data["id_basis"].astype(np.float32))
    arrays = dict(data.arrays)
    arrays["face_mask"] = arrays["face_mask"][:-1]
    with pytest.raises(ModelFileError, match="face_mask has shape"):
        save_face_model(tmp_path / "c.npz", arrays, data.card)


def test_the_uncompressed_copy_gives_the_same_model_and_a_damaged_one_is_replaced(tmp_path: Path) -> None:
    """With ``cache_dir`` the first load stores the arrays uncompressed under the shipped file's sha256; the next
    reads them from there (same arrays, same card); a copy with flipped bytes fails its zip CRC, is dropped and
    written again from the shipped file."""
    import zipfile

    cache = tmp_path / "cache"
    plain = load_face_model(ICT_MODEL)
    first = load_face_model(ICT_MODEL, cache_dir=cache)
    sha = json.loads(ICT_MODEL.with_suffix(".json").read_text())["sha256"]
    stored = cache / "facemodels" / f"{sha}.npz"
    assert stored.is_file() and stored.stat().st_size > ICT_MODEL.stat().st_size  # stored, not deflated
    with zipfile.ZipFile(stored) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    again = load_face_model(ICT_MODEL, cache_dir=cache)
    for data in (first, again):
        assert data.card == plain.card and set(data.arrays) == set(plain.arrays)
        for k, v in plain.arrays.items():
            np.testing.assert_array_equal(data.arrays[k], v)
            assert data.arrays[k].dtype == v.dtype
    raw = bytearray(stored.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])
    stored.write_bytes(bytes(raw))
    repaired = load_face_model(ICT_MODEL, cache_dir=cache)
    np.testing.assert_array_equal(repaired["id_basis"], plain["id_basis"])
    from facerecon.facemodel.format import _read_stored

    assert _read_stored(stored) is not None  # written again, whole


def test_an_unwritable_cache_still_loads(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    data = load_face_model(ICT_MODEL, cache_dir=blocker)  # <file>/facemodels cannot be made
    np.testing.assert_array_equal(data["mean_shape"], load_face_model(ICT_MODEL)["mean_shape"])
