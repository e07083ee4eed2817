"""Start-up warm-up (issue #20): every stage of the default mode runs once before readiness, at a fraction of a
request's cost; a service whose default is the R-Net alone becomes ready without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)


def _run(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rnet_only_service_is_ready_without_torch() -> None:
    """The service's own start-up path (ServiceState: load, warm-up, ready) with refine=false: ready, each network
    and the NumPy decoding warmed, torch and the renderer never imported; the first request is then the R-Net's."""
    got = _run(
        "import json, sys, time\n"
        "import numpy as np\n"
        "from facerecon.api.state import ServiceState\n"
        "from facerecon.config import Settings\n"
        "state = ServiceState(Settings(refine=False, workers=1), None)\n"
        "state.start()\n"
        "t0 = time.monotonic()\n"
        "while not state.ready and state.stage != 'failed' and time.monotonic() - t0 < 300:\n"
        "    time.sleep(0.05)\n"
        "rec = state.reconstructor\n"
        "print(json.dumps({'ready': state.ready, 'stage': state.stage, 'warmup_ms': state.warmup_ms,\n"
        "                  'mode': rec.mode_for(), 'torch': 'torch' in sys.modules,\n"
        "                  'render': sorted(m for m in sys.modules if m.startswith('facerecon.render'))}))\n"
    )
    assert got["ready"] is True and got["stage"] == "ready", got
    assert got["mode"] == "rnet+lm" and float(got["warmup_ms"]) > 0  # type: ignore[arg-type]
    assert got["torch"] is False and got["render"] == [], got


def test_fitting_warm_up_runs_every_stage_with_a_short_fit() -> None:
    """The default mode (R-Net + fit): the renderer's kernels, detection on a photo with a face, alignment, a fit of
    a few steps, JSON, OBJ and the overlay all run; the fit is a few steps (far below a whole fit's 90)."""
    got = _run(
        "import json\n"
        "import facerecon.fused as fused_module\n"
        "from facerecon.pipeline import Reconstructor\n"
        "from facerecon.warmup import WARMUP_FIT_STEPS, warm_up_engine\n"
        "steps = []\n"
        "real_fit = fused_module.fit_arrays\n"  # both engines' fused path (the pipeline's NumPy one and fit.fit's)
        "def counting_fit(*a, **k):\n"
        "    r = real_fit(*a, **k)\n"
        "    steps.append(len(a[6]))\n"  # the history the fit appended its steps to
        "    return r\n"
        "fused_module.fit_arrays = counting_fit\n"
        "rec = Reconstructor()\n"
        "t = warm_up_engine(rec)\n"
        "print(json.dumps({'mode': rec.mode_for(), 'stages': sorted(t), 'steps': steps,\n"
        "                  'expected': sum(WARMUP_FIT_STEPS)}))\n"
    )
    if "fit" not in got["mode"]:
        pytest.skip("the installed engine's default mode does not fit")
    assert got["stages"] == sorted(["renderer", "synthetic photo", "detect", "prepare", "estimate",
                                    "finish+json+export", "overlay"]), got
    assert got["steps"] == [got["expected"]], got


def test_a_fitting_service_is_ready_before_torch_and_warms_the_fit_next() -> None:
    """Default mode R-Net + fit with ``warmup_fit_after_ready``: the warm-up before readiness is the torch-free R-Net
    path, /readyz's state says the fit is warming, then the fit's warm-up runs (the fused engine's kernels, a short
    fit, the overlay) and the state says nothing is warming; with the setting off, readiness waits for the fit.
    Torch is never imported: on the CPU the fit and the overlay run on NumPy and numba."""
    got = _run(
        "import json, sys, time\n"
        "import facerecon.api.state as st\n"
        "from facerecon.config import Settings\n"
        "calls = []\n"
        "real = st.warm_up\n"
        "def recording(rec, settings, mode=None):\n"
        "    real(rec, settings, mode)\n"
        "    calls.append([mode, 'torch' in sys.modules])\n"
        "st.warm_up = recording\n"
        "out = {}\n"
        "for later in (True, False):\n"
        "    calls.clear()\n"
        "    state = st.ServiceState(Settings(workers=1, warmup_fit_after_ready=later), None)\n"
        "    state.start()\n"
        "    t0 = time.monotonic()\n"
        "    while not state.ready and state.stage != 'failed' and time.monotonic() - t0 < 300:\n"
        "        time.sleep(0.01)\n"
        "    at_ready = {'warming': list(state.warming), 'calls': [list(c) for c in calls]}\n"
        "    while state.warming and time.monotonic() - t0 < 300:\n"
        "        time.sleep(0.05)\n"
        "    out[str(later)] = {'at_ready': at_ready, 'mode': state.reconstructor.mode_for(),\n"
        "                       'calls': calls[:], 'warming': state.warming, 'fit_ms': state.fit_warmup_ms,\n"
        "                       'stage': state.stage}\n"
        "print(json.dumps(out))\n"
    )
    later, before = got["True"], got["False"]
    if "fit" not in later["mode"]:  # type: ignore[index]
        pytest.skip("the installed engine's default mode does not fit")
    assert later["at_ready"]["calls"] == [["rnet+lm", False]], later  # type: ignore[index]
    assert later["at_ready"]["warming"] == ["fit"], later  # type: ignore[index]
    assert later["calls"] == [["rnet+lm", False], [None, False]] and later["warming"] == [], later  # type: ignore[index]
    assert float(later["fit_ms"]) > 0 and later["stage"] == "ready", later  # type: ignore[index,arg-type]
    assert before["at_ready"] == {"warming": [], "calls": [[None, False]]}, before  # type: ignore[index]
    assert before["fit_ms"] is None, before  # type: ignore[index]
