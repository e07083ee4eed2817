"""``facerecon reconstruct`` as a user runs it (issue #18 item 5): batches that survive bad inputs, unique output
folders, the API's validation of the flags, ``--help`` that documents everything, and ``--set --on-missing``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from facerecon.cli import build_parser, main
from tests.conftest import need_shared

pytestmark = pytest.mark.timeout(600)

SET_PHOTOS = ("Aaron_Peirsol_0001.jpg", "Aaron_Peirsol_0003.jpg")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "facerecon.cli", "reconstruct", *args], capture_output=True,
                          text=True, timeout=600)


def _faceless(path: Path) -> Path:
    """The bottom of a real photo: shoulders and background, no face (as eval.detection's no-face crops)."""
    Image.open(need_shared("data", "deep3d-examples", "000126.jpg")).crop((0, 310, 700, 873)).save(path, quality=92)
    return path


def _reconstruct_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["reconstruct"]


# -- no models needed ------------------------------------------------------------------------------------------------
def test_help_documents_every_option_its_default_an_example_and_the_layout() -> None:
    parser = _reconstruct_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help text"
        if action.option_strings and action.option_strings[0] not in ("--no-refine",):
            assert "default" in action.help, f"{action.option_strings[0]}: the help does not give the default"
    text = parser.format_help()
    assert "examples:" in text and "facerecon reconstruct photo.jpg" in text
    assert "output layout" in text
    for item in ("mesh.<format>", "overlay.png", "coefficients.json", "_face<k>", "identity.<format>", "-2"):
        assert item in text, item
    assert "exit status" in text


@pytest.mark.parametrize(("flags", "expected"), [
    (["--texture", "photo", "--format", "ply"], "--texture photo --format ply: texture=photo needs format=obj or glb"),
    (["--set", "--faces", "all"], "--faces all: not an option of --set"),
    (["--on-missing", "skip"], "--on-missing skip: not an option without --set"),
])
def test_flags_the_api_refuses_are_refused(flags: list[str], expected: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The same options answer 422 from the API; the CLI used to ignore them and report success. Refused before
    any model is loaded or any file is read (the photo need not exist), one line each, exit status 2."""
    from pydantic import ValidationError

    from facerecon.api.schemas import SetOptions

    assert main(["reconstruct", str(tmp_path / "any.jpg"), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValidationError):  # the rule the CLI shares: the set's form has no `faces`
        SetOptions.model_validate({"faces": "all"})


# -- real photos -----------------------------------------------------------------------------------------------------
def test_a_batch_reports_bad_inputs_on_one_line_and_keeps_every_output(tmp_path: Path) -> None:
    """A missing file and a folder used to end the run with a traceback; two photos named alike from two folders
    used to share (overwrite) one output folder."""
    for folder, name in (("a", "000006.jpg"), ("b", "000002.jpg")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "face.jpg").write_bytes(need_shared("data", "deep3d-examples", name).read_bytes())
    out = tmp_path / "out"
    missing, folder = tmp_path / "missing.jpg", tmp_path / "a"
    run = _cli(str(tmp_path / "a" / "face.jpg"), str(missing), str(folder), str(tmp_path / "b" / "face.jpg"),
               "--out", str(out), "--format", "ply")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, run.stderr
    assert str(missing) in errors[0] and "no such file" in errors[0]
    assert str(folder) in errors[1] and "a folder, not a photo" in errors[1]
    assert "reconstructed 2 of 4" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["face", "face-2"]
    docs = [json.loads((out / d / "coefficients.json").read_text()) for d in ("face", "face-2")]
    sizes = [tuple(Image.open(tmp_path / f / "face.jpg").size) for f in ("a", "b")]
    assert [tuple(d["photo_size"]) for d in docs] == sizes, "each folder holds its own photo's result"
    assert all((out / d / "mesh.ply").stat().st_size > 1000 for d in ("face", "face-2"))


def test_set_skips_a_faceless_photo_on_request(tmp_path: Path) -> None:
    photos = [str(need_shared("data", "faces-train", "lfw", name)) for name in SET_PHOTOS]
    empty = str(_faceless(tmp_path / "shoulders.jpg"))
    failed = _cli(photos[0], empty, photos[1], "--set", "--out", str(tmp_path / "fail"))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "error: no face found in photo 2 of the set" in failed.stderr
    assert not (tmp_path / "fail" / "identity.obj").exists()

    out = tmp_path / "skip"
    run = _cli(photos[0], empty, photos[1], "--set", "--on-missing", "skip", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert f"skipped {empty} (no face)" in run.stdout and "wrote 2 photos" in run.stdout
    assert f"{empty}: skipped, no face found" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Aaron_Peirsol_0001", "Aaron_Peirsol_0003", "identity.obj"]


def test_rnet_only_without_overlay_writes_mesh_and_json_and_never_loads_torch(tmp_path: Path) -> None:
    """``--no-refine --no-overlay``: the mesh and coefficients.json, no overlay.png, and the run imports neither
    torch nor the renderer (the fastest start-up); the JSON is the R-Net's (mode rnet) with the 68 landmarks."""
    photo = need_shared("data", "deep3d-examples", "000002.jpg")
    out = tmp_path / "out"
    code = ("import sys\nfrom facerecon.cli import main\n"
            f"rc = main(['reconstruct', {str(photo)!r}, '--out', {str(out)!r}, '--no-refine', '--no-overlay'])\n"
            "print(rc, 'torch' in sys.modules, any(m.startswith('facerecon.render') for m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "0 False False", run.stdout
    assert sorted(p.name for p in (out / "000002").iterdir()) == ["coefficients.json", "mesh.obj"]
    doc = json.loads((out / "000002" / "coefficients.json").read_text())
    assert doc["mode"] == "rnet+lm" and len(doc["landmarks68"]) == 68
    from facerecon.config import get_settings
    from facerecon.facemodel.format import read_card
    from facerecon.facemodel.registry import resolve

    s = get_settings()
    n = int(read_card(resolve(s.models_dir, s.face_model))["n_vertices"])
    lines = (out / "000002" / "mesh.obj").read_text().splitlines()
    assert sum(line.startswith("v ") for line in lines) == n
