"""``facerecon batch``: inputs and ids, the local and the Ray engine on real photos, resuming a killed run, sets.

The collection (built from ../shared): two photos both named ``face.jpg`` in two folders (different people), a
photo in a sub-folder, a group photo with two faces, a face-free crop of a real photo, a truncated JPEG, a text
file named ``.png``, and a ``notes.txt`` a folder walk must not pick up. The engine tests use ``refine=False``
(R-Net only, ~0.1 s a photo) and PLY: they are about the engines, not accuracy.

Ray: one local Ray (2 CPUs) per test session, started only by the test that needs it and shut down after this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facerecon.coefficients import GROUPS
from tests.conftest import need_shared

pytest.importorskip("pyarrow")

pytestmark = pytest.mark.slow

PHOTO_FILES = {  # collection path -> (shared path parts, what the row must say)
    "a/face.jpg": (("data", "deep3d-examples", "000002.jpg"), "ok"),
    "b/face.jpg": (("data", "faces-train", "misc", "mica_examples", "carell.jpg"), "ok"),
    "a/sub/000006.jpg": (("data", "deep3d-examples", "000006.jpg"), "ok"),
    "group/trump_hillary.jpg": (("data", "faces-train", "misc", "3ddfa_examples", "trump_hillary.jpg"), "ok"),
}
EXPECTED_ERRORS = {"nothing/scenery.jpg": "no_face", "broken/truncated.jpg": "corrupt_image",
                   "broken/fake.png": "not_an_image"}


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("collection")
    for rel, (parts, _) in PHOTO_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(need_shared(*parts).read_bytes())
    (root / "nothing").mkdir()
    # The bottom of a real photo (shoulders and background, no face: eval.detection's no-face crops).
    Image.open(need_shared("data", "deep3d-examples", "000126.jpg")).crop((0, 310, 700, 873)).save(
        root / "nothing" / "scenery.jpg", quality=92)
    (root / "broken").mkdir()
    (root / "broken" / "truncated.jpg").write_bytes(need_shared("data", "deep3d-examples", "000031.jpg")
                                                    .read_bytes()[:12000])
    (root / "broken" / "fake.png").write_text("this is not an image\n")
    (root / "notes.txt").write_text("not a photo: a folder walk skips it\n")
    return root


def _options(out: Path, **kw: Any) -> Any:
    from facerecon.batch import BatchOptions

    base: dict[str, Any] = {"out": str(out), "format": "ply", "faces": "all", "refine": False, "progress": False}
    return BatchOptions(**{**base, **kw})


def _rows(out: Path, fmt: str = "parquet") -> list[dict[str, Any]]:
    from facerecon.batch.storage import Store
    from facerecon.batch.table import read_results

    return read_results(Store(str(out)), fmt)  # type: ignore[arg-type]


def _by_source(rows: list[dict[str, Any]], root: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(Path(r["source"]).relative_to(root.resolve()).as_posix(), []).append(r)
    return out


@pytest.fixture(scope="module")
def local_run(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, float]:
    from facerecon.batch import run_batch

    out = tmp_path_factory.mktemp("local") / "out"
    t0 = time.perf_counter()
    summary = run_batch([str(collection)], _options(out, engine="local", workers=2))
    return out, summary, time.perf_counter() - t0


# -- inputs and ids (no models) -------------------------------------------------------------------------------------
def test_inputs_expand_folders_globs_and_manifests(collection: Path, tmp_path: Path) -> None:
    from facerecon.batch.inputs import expand_inputs, make_units

    refs = expand_inputs([str(collection)])
    rels = sorted(Path(r.source).relative_to(collection.resolve()).as_posix() for r in refs)
    assert rels == sorted([*PHOTO_FILES, *EXPECTED_ERRORS]), "recursive, image types only (no notes.txt)"
    ids = {Path(r.source).relative_to(collection.resolve()).as_posix(): r.photo_id for r in refs}
    assert ids["a/face.jpg"] != ids["b/face.jpg"], "same file name in two folders must not collide"
    assert ids["a/face.jpg"].startswith("face-") and len(set(ids.values())) == len(ids)

    # The same photo has the same id however it is named (relative path, glob, a manifest without ids).
    cwd = os.getcwd()
    try:
        os.chdir(collection)
        again = expand_inputs(["a/face.jpg", "./b/../b/face.jpg", "group/*.jpg", "no/such/file.jpg"])
    finally:
        os.chdir(cwd)
    assert [r.photo_id for r in again[:3]] == [ids["a/face.jpg"], ids["b/face.jpg"], ids["group/trump_hillary.jpg"]]
    assert again[3].error_code == "not_found"
    # A URI goes through pyarrow's filesystems (listing, globbing); file:// is the one tested here (s3:// is alike).
    from facerecon.batch.inputs import _remote

    listed = {f.source.removeprefix("file://") for f in _remote(f"file://{collection.resolve()}")}
    assert listed == {r.source for r in refs}
    globbed = _remote(f"file://{collection.resolve()}/*/face.jpg")
    assert sorted(Path(f.source.removeprefix("file://")).parent.name for f in globbed) == ["a", "b"]
    assert expand_inputs([str(collection / "a" / "face.jpg"), str(collection / "a")])[0].photo_id == ids["a/face.jpg"]
    assert len(expand_inputs([str(collection / "a" / "face.jpg"), str(collection / "a")])) == 2, "duplicates once"

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,id,identity\n{collection}/a/face.jpg,,\n../{tmp_path.name}/x.jpg,custom-7,bob\n"
                        f"{collection}/b/face.jpg,,bob\n")
    got = expand_inputs([str(manifest)])
    assert got[0].photo_id == ids["a/face.jpg"], "a manifest row without id keys by path"
    assert got[1].photo_id.startswith("custom-7-") and got[1].source == str((tmp_path / "x.jpg").resolve())
    units = make_units(got)
    assert [len(u.members) for u in units] == [1, 2] and units[1].identity == "bob"
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": f"../{tmp_path.name}/x.jpg", "id": "custom-7"}) + "\n\n")
    assert expand_inputs([str(jsonl)])[0].photo_id == got[1].photo_id, "CSV and JSONL keys agree"

    from facerecon.errors import InputError

    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.jpg\n")
    with pytest.raises(InputError):
        expand_inputs([str(bad)])


# -- the local engine -----------------------------------------------------------------------------------------------
def test_local_engine_rows_and_outputs(collection: Path, local_run: tuple[Path, Any, float]) -> None:
    out, summary, wall = local_run
    print(f"\nlocal engine, 2 workers: {summary.processed} photos in {wall:.1f} s (start-up included)")
    rows = _rows(out)
    by = _by_source(rows, collection)
    assert set(by) == set(PHOTO_FILES) | set(EXPECTED_ERRORS)
    for rel, code in EXPECTED_ERRORS.items():
        (r,) = by[rel]
        assert r["status"] == "error" and r["error_code"] == code, (rel, r["error_code"], r["error_message"])
        assert r["error_message"] and r["mesh_path"] is None
    assert max(r["batch_faces"] or 0 for r in rows) >= 2, "photos share one R-Net call"
    assert summary.photos == 7 and summary.photos_ok == 4 and summary.photos_failed == 3 and summary.faces == 5
    group = by["group/trump_hillary.jpg"]
    assert [r["face_index"] for r in group] == [0, 1] and all(r["n_faces"] == 2 for r in group)
    assert group[0]["face_id"].endswith("_face0") and group[1]["face_id"].endswith("_face1")
    # Two people, one file name: two folders, two different faces.
    fa, fb = by["a/face.jpg"][0], by["b/face.jpg"][0]
    assert fa["mesh_path"] != fb["mesh_path"]
    assert np.abs(np.asarray(fa["coef_id"]) - np.asarray(fb["coef_id"])).max() > 0.05
    for r in rows:
        if r["status"] != "ok":
            continue
        mesh = out / r["mesh_path"]
        assert mesh.is_file() and mesh.read_bytes()[:3] == b"ply"
        assert (out / r["mesh_path"]).parent.name == r["face_id"]
        lm = np.asarray(r["landmarks68"])
        assert lm.shape == (68, 2)
        x0, y0, x1, y1 = r["box"]
        pad = 0.25 * (x1 - x0)
        assert (lm[:, 0] > x0 - pad).all() and (lm[:, 0] < x1 + pad).all() and (lm[:, 1] > y0 - pad).all()
        assert (lm[:, 1] < y1 + pad).all()
        assert 0 < r["detection_score"] <= 1 and r["mode"] == "rnet+lm"
        # rnet is the batch's call (all batch_faces faces); total holds this photo's share of the estimate
        share = r["timings_ms"]["rnet"] * r["n_faces"] / r["batch_faces"]
        assert r["timings_ms"]["rnet"] > 0 and r["timings_ms"]["total"] >= share, (r["timings_ms"], share)
        assert {len(r[f"coef_{g}"]) for g in ("angle", "trans")} == {3}


def test_local_engine_gives_the_pipelines_numbers(collection: Path, local_run: tuple[Path, Any, float],
                                                  reconstructor: Any) -> None:
    """The table holds what the bare pipeline computes for the same photo (here, in this process: the session's
    default engine, as the batch workers build it)."""
    from facerecon.imaging import load_image

    rec = reconstructor
    rows = _by_source(_rows(local_run[0]), collection)
    for rel in ("a/sub/000006.jpg", "group/trump_hillary.jpg"):
        faces = rec.reconstruct(load_image(collection / rel), which="all", refine=False)
        assert len(faces) == len(rows[rel])
        for face, row in zip(faces, rows[rel], strict=True):
            doc = rec.to_json(face)
            for g in GROUPS:
                np.testing.assert_allclose(row[f"coef_{g}"], doc["coefficients"][g], atol=1e-5, err_msg=g)
            np.testing.assert_allclose(row["landmarks68"], doc["landmarks68"], atol=1e-3)
            assert row["pose_yaw_deg"] == pytest.approx(doc["pose_degrees"]["yaw"], abs=1e-3)


def test_rerun_with_other_options_is_refused(collection: Path, local_run: tuple[Path, Any, float]) -> None:
    from facerecon.batch import run_batch
    from facerecon.errors import InputError

    with pytest.raises(InputError, match="format"):
        run_batch([str(collection)], _options(local_run[0], format="obj"))
    with pytest.raises(InputError, match="texture"):
        run_batch([str(collection)], _options(local_run[0].parent / "other", texture="photo"))  # PLY: no texture


def test_cli_rerun_skips_everything(collection: Path, local_run: tuple[Path, Any, float],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from facerecon.cli import main

    out = local_run[0]
    before = {p: p.stat().st_mtime_ns for p in (out / "faces").rglob("*") if p.is_file()}
    code = main(["batch", str(collection), "--out", str(out), "--format", "ply", "--faces", "all", "--no-refine",
                 "--no-progress"])
    said = capsys.readouterr().out
    assert code == 0 and "7 photos, 7 done before, 0 now" in said, said
    assert {p: p.stat().st_mtime_ns for p in (out / "faces").rglob("*") if p.is_file()} == before


# -- the Ray engine -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    """One local Ray for this module (the only user of Ray in the suite), shut down when the module ends."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.timeout(400)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_engine_matches_local(collection: Path, local_run: tuple[Path, Any, float], ray_cluster: Any,
                                  tmp_path: Path) -> None:
    from facerecon.batch import run_batch

    out = tmp_path / "out"
    t0 = time.perf_counter()
    summary = run_batch([str(collection)], _options(out, engine="ray", workers=2))
    wall = time.perf_counter() - t0
    print(f"\nray engine, 2 actors on a 2-CPU local Ray: {summary.processed} photos in {wall:.1f} s")
    assert wall < 240, "a 7-photo Ray run must finish in bounded time"
    assert summary.workers == 2 and summary.processed == 7
    assert list((out / "parts").glob("ray-*/*.parquet")), "rows written by Ray Data's Parquet writer"
    local, remote = _rows(local_run[0]), _rows(out)
    key = ["photo_id", "face_id", "face_index", "n_faces", "status", "error_code", "mesh_path", "files"]
    assert [[r[k] for k in key] for r in remote] == [[r[k] for k in key] for r in local]
    for a, b in zip(local, remote, strict=True):
        if a["status"] != "ok":
            continue
        for g in GROUPS:
            np.testing.assert_allclose(b[f"coef_{g}"], a[f"coef_{g}"], atol=1e-4, err_msg=g)
        np.testing.assert_allclose(b["landmarks68"], a["landmarks68"], atol=1e-2)
        assert (out / b["mesh_path"]).is_file()

    again = run_batch([str(collection)], _options(out, engine="ray", workers=2))
    assert again.skipped == 7 and again.processed == 0, "a rerun skips what is done"
    assert len(_rows(out)) == len(remote)


# -- resuming a killed run ------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_a_killed_run_resumes_without_redoing_finished_photos(tmp_path: Path) -> None:
    from facerecon.batch import run_batch
    from facerecon.batch.storage import Store
    from facerecon.batch.table import latest_rows, read_parts

    photos = tmp_path / "photos"
    photos.mkdir()
    examples = sorted(need_shared("data", "deep3d-examples").glob("0*.jpg"))[:10]
    for p in examples:
        (photos / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "facerecon.cli", "batch", str(photos), "--out", str(out), "--workers", "1",
           "--format", "ply", "--no-refine", "--batch-size", "1", "--flush-every", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while len(list((out / "parts").glob("*.parquet"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else "exited"
            assert time.monotonic() < deadline, "the first run produced no parts in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker process: a hard kill, no clean-up
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()
    store = Store(str(out))
    before = latest_rows(read_parts(store)).to_pylist()
    done = {r["photo_id"]: r for r in before}
    assert 3 <= len(done) < len(examples), f"the kill should land mid-run ({len(done)} of {len(examples)} done)"
    assert not (out / "results.parquet").exists(), "the killed run never got to write the table"
    mtimes = {r["photo_id"]: (out / r["mesh_path"]).stat().st_mtime_ns for r in before}
    killed_run = {r["run_id"] for r in before}
    assert len(killed_run) == 1

    # Resume in two steps: --limit 2 (in this process), then the rest (one worker process).
    first = run_batch([str(photos)], _options(out, faces="largest", workers=0, limit=2))
    assert first.skipped == len(done) and first.processed == 2
    summary = run_batch([str(photos)], _options(out, faces="largest", workers=1))
    assert summary.skipped == len(done) + 2 and summary.processed == len(examples) - len(done) - 2
    rows = _rows(out)
    assert len(rows) == len(examples) and all(r["status"] == "ok" for r in rows)
    assert sum(r["run_id"] == first.run_id for r in rows) == 2
    for r in rows:
        if r["photo_id"] in done:
            assert r["run_id"] in killed_run, "a finished photo keeps the row of the run that made it"
            assert (out / r["mesh_path"]).stat().st_mtime_ns == mtimes[r["photo_id"]], "and is not rewritten"
        else:
            assert r["run_id"] in (first.run_id, summary.run_id)


# -- sets from a manifest, textures, JSONL table ------------------------------------------------------------
@pytest.mark.timeout(300)
def test_manifest_identity_sets_textures_and_jsonl_table(tmp_path: Path) -> None:
    from facerecon.batch import run_batch

    lfw = need_shared("data", "faces-train", "lfw")
    sandler = sorted(lfw.glob("Adam_Sandler_*.jpg"))[:3]
    single = need_shared("data", "deep3d-examples", "000006.jpg")
    if len(sandler) < 3:
        pytest.skip("needs three LFW photos of Adam Sandler")
    manifest = tmp_path / "photos.csv"
    lines = ["path,id,identity"] + [f"{p},,adam" for p in sandler] + [f"{single},the-single-one,"]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = run_batch([str(manifest)], _options(out, faces="largest", workers=0, table="jsonl", format="obj",
                                                  texture="photo"))
    assert summary.photos_ok == 4, summary
    rows = _rows(out, "jsonl")
    sets = [r for r in rows if r["identity"] == "adam"]
    assert len(sets) == 3 and len({r["identity_id"] for r in sets}) == 1
    ids = np.asarray([r["coef_id"] for r in sets])
    np.testing.assert_allclose(ids, ids[:1].repeat(3, 0), atol=1e-6, err_msg="one identity for the set")
    assert np.abs(np.diff(np.asarray([r["coef_exp"] for r in sets]), axis=0)).max() > 1e-3, "own expressions"
    assert (out / sets[0]["identity_mesh_path"]).is_file() and sets[0]["identity_mesh_path"].endswith(".obj")
    for r in rows:  # --texture photo as `reconstruct`: a textured OBJ bundle per face
        folder = Path(r["mesh_path"]).parent
        assert set(r["files"]) == {f"{folder}/{n}" for n in ("mesh.obj", "mesh.mtl", "texture.png",
                                                             "coefficients.json")}
        assert (out / folder / "texture.png").read_bytes()[:4] == b"\x89PNG"
    (lone,) = [r for r in rows if r["identity"] is None]
    assert lone["photo_id"].startswith("the-single-one-") and lone["face_id"] == lone["photo_id"]
    assert isinstance(lone["timings_ms"], dict) and lone["finished_at"]
