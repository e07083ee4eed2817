"""The import graph: the serving path (the HTTP app, the pipeline, the CLI) loads no training or build-time code,
and no module imports another that imports it back."""

from __future__ import annotations

import json
import subprocess
import sys

SERVING = ("facerecon.api.app", "facerecon.pipeline", "facerecon.cli")
#: Never on the serving path: the onnx package (export only), training, build-time ports, dlib, the TFLite parser.
FORBIDDEN = ("onnx", "facerecon.train", "facerecon.nets.onnx_io", "facerecon.nets.checkpoint", "dlib", "tflite",
             "ai_edge_litert", "facerecon.detect.tflite_onnx", "facerecon.detect.build", "facerecon.detect.dlib_hog",
             "ray", "pyarrow", "facerecon.batch.runner")


def _loaded_after(*modules: str) -> list[str]:
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_serving_imports_no_training_or_build_code() -> None:
    loaded = _loaded_after(*SERVING)
    bad = sorted(m for m in loaded for f in FORBIDDEN if m == f or m.startswith(f + "."))
    assert not bad, f"the serving path imports {bad}"
    assert "onnxruntime" in loaded and "facerecon.detect.detector" in loaded  # the check itself sees imports


def test_no_import_cycle_between_the_pipeline_and_its_stages() -> None:
    """The stage modules import, one after another in a fresh interpreter, without the pipeline being loaded (a
    stage that reached back into the pipeline, directly or through a cycle, would pull it in)."""
    stages = ("facerecon.texture", "facerecon.export", "facerecon.results", "facerecon.report", "facerecon.detect",
              "facerecon.align", "facerecon.fit", "facerecon.objective", "facerecon.render.overlay")
    loaded = _loaded_after(*stages)
    assert set(stages) <= set(loaded)
    assert "facerecon.pipeline" not in loaded, "a stage module pulls in the pipeline"


def test_the_cpu_paths_never_import_torch() -> None:
    """In a fresh interpreter on the CPU: ``refine=False`` from photo bytes to the JSON answer, the landmarks and an
    OBJ/GLB export (and the CLI's module and parser) loads neither torch, numba, the renderer, the torch face model
    nor the decoder; the default mode (R-Net + fit) with its overlay and exports then runs on the fused engine and
    the raster kernels (numba) and still loads no torch. Last, the torch decoder is asked for, which does load torch
    (so the check sees a torch import when there is one)."""
    from tests.conftest import need_shared

    photo = need_shared("data", "deep3d-examples", "000002.jpg")
    code = (
        "import json, sys\n"
        "import facerecon.cli\n"
        "facerecon.cli.build_parser()\n"
        "from facerecon.imaging import decode_image\n"
        "from facerecon.pipeline import Reconstructor\n"
        "rec = Reconstructor()\n"
        f"image = decode_image(open({str(photo)!r}, 'rb').read(), max_bytes=1 << 26, max_pixels=1 << 26)\n"
        "r = rec.reconstruct(image, refine=False)[0]\n"
        "doc = json.loads(json.dumps(rec.to_json(r)))\n"
        "obj, glb = rec.export(r, 'obj'), rec.export(r, 'glb')\n"
        "def loaded(*names):\n"  # the modules named and their submodules ('numba' and 'numba.core', not 'numbax')
        "    return sorted(m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in ('torch', *names)))\n"
        "before = loaded('numba', 'facerecon.render', 'facerecon.decoder', 'facerecon.facemodel.model')\n"
        "f = rec.reconstruct(image, refine=True)[0]\n"
        "fdoc = json.loads(json.dumps(rec.to_json(f)))\n"
        "png = rec.overlay(image, f)\n"
        "fobj = rec.export(f, 'obj')\n"
        "fitted = loaded('facerecon.decoder', 'facerecon.facemodel.model', 'facerecon.render.cpu', "
        "'facerecon.render.base', 'facerecon.fit', 'facerecon.objective', 'facerecon.losses')\n"
        "rec.decoder\n"
        "print(json.dumps({'before': before, 'fitted': fitted, 'after': 'torch' in sys.modules, 'mode': doc['mode'], "
        "'fit_mode': fdoc['mode'], 'overlay': list(png.shape), 'landmarks': len(doc['landmarks68']), "
        "'obj': obj[:2].decode(), 'fobj': fobj[:2].decode(), 'glb': glb[:4].decode()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == [], f"the R-Net path imports {got['before']}"
    assert got["mode"] == "rnet+lm" and got["landmarks"] == 68 and got["glb"] == "glTF" and got["obj"] in ("# ", "v ")
    assert got["fitted"] == [], f"the fit's path imports {got['fitted']}"
    assert got["fit_mode"] == "rnet+fit" and got["fobj"] in ("# ", "v ") and got["overlay"][2] == 3, got
    assert got["after"] is True
