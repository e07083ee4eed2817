"""Shared fixtures: the repository's models, the shared assets folder beside the repository, and one engine and
one live server for the whole session (loading a Reconstructor costs seconds; each module used to build its own)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# One intra-op thread for torch (its OpenMP and MKL pools) in the test processes and the subprocesses they start,
# unless the caller sets another: the suite runs as two pytest-xdist workers on CI's two cores, and torch's default
# (a thread per core) in each oversubscribed them; on these small tensors the threads mostly spin (the torch-heavy
# files took 35 % less CPU on one thread). Read by torch when it loads, so set before any test module imports it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACERECON_SHARED_DIR", REPO.parent / "shared"))
MODELS = REPO / "models"
ICT_MODEL = MODELS / "ict" / "facemodel.npz"
EXAMPLES = SHARED / "data" / "deep3d-examples"


#: The slowest test files, slowest first (one-process wall time, measured with ``--durations``): pytest-xdist's
#: workers (``--dist loadfile --no-loadscope-reorder``) start them first, so that they end on small files instead of
#: one worker finishing a long file alone. Only the order changes; the other files follow in their own order.
SLOWEST_FIRST = (
    "test_pipeline.py", "test_page.py", "test_reliability.py", "test_batch.py", "test_api.py", "test_appearance.py",
    "test_cli.py", "test_train.py", "test_facemodel_bfm.py", "test_client.py", "test_nets.py", "test_bounds.py",
    "test_warmup.py", "test_detect.py", "test_fit.py", "test_imports.py", "test_pipeline_concurrency.py",
    "test_facemodel_ict.py", "test_texture.py", "test_render.py", "test_pipeline_networks.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: the files run in the order asked for
    rank = {name: k for k, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def need_shared(*parts: str) -> Path:
    """The path under ``../shared``, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared assets folder beside the repository)")
    return path


@pytest.fixture(scope="session")
def ict_model():
    from facerecon.facemodel import FaceModel

    return FaceModel.from_file(ICT_MODEL)


@pytest.fixture(scope="session")
def ict_decoder(ict_model):
    from facerecon.decoder import FaceDecoder

    return FaceDecoder(ict_model)


def _torch_if_loaded():
    """torch when it is imported and done importing, else None: a server's background warm-up may be importing it in
    another thread while a test starts (``sys.modules`` then holds a partly initialised module)."""
    torch = sys.modules.get("torch")
    spec = getattr(torch, "__spec__", None)
    if torch is None or getattr(spec, "_initializing", False) or not hasattr(torch, "get_num_threads"):
        return None
    return torch


@pytest.fixture(autouse=True)
def _seeded_global_rngs() -> None:
    """Each test draws from torch's and NumPy's global generators as if it ran first in its process (pytest-xdist
    gives a worker other files before it from run to run). torch only when already imported: some tests check that a
    path never imports it."""
    np = sys.modules.get("numpy")
    torch = _torch_if_loaded()
    if np is not None:
        np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _torch_global_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test file leaves torch's process state as it found it: the calling thread's intra-op thread count given
    back (a training call or an engine set up here would otherwise change the next file's), and a default dtype
    or grad mode left changed is an error of the file that changed it."""
    torch = _torch_if_loaded()
    threads = None if torch is None else torch.get_num_threads()
    yield
    torch = _torch_if_loaded()
    if torch is None:
        return
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    left = []
    if torch.get_default_dtype() != torch.float32:
        left.append(f"default dtype {torch.get_default_dtype()}")
        torch.set_default_dtype(torch.float32)
    if not torch.is_grad_enabled():
        left.append("grad mode off")
        torch.set_grad_enabled(True)
    if left:
        pytest.fail(f"{request.module.__name__} left torch changed: {', '.join(left)}")


#: Limits of the shared live server (small, so the 413 tests send little).
LIVE_MAX_UPLOAD = 1024 * 1024
LIVE_MAX_SET = 4


@pytest.fixture(scope="session")
def reconstructor():
    """The default engine (settings from the environment: the shipped ICT model, R-Net and C-Net)."""
    from facerecon.pipeline import Reconstructor

    return Reconstructor()


@pytest.fixture(scope="session")
def example_reconstructions(reconstructor):
    """``(name, grey=False) -> (photo, reconstructions)``: an example photo of ``../shared/data/deep3d-examples``
    (``grey``: made greyscale, still RGB) and the session engine's default reconstruction of it, made once per
    process for the checks that read the same photo (on the engine's one torch thread a reconstruction is
    bit-reproducible, so a shared one is the one a check would make itself)."""
    import numpy as np
    from PIL import Image

    from facerecon.imaging import load_image

    done: dict[tuple[str, bool], tuple[np.ndarray, list]] = {}

    def get(name: str, grey: bool = False) -> tuple[np.ndarray, list]:
        if (name, grey) not in done:
            img = load_image(need_shared("data", "deep3d-examples", name))
            if grey:
                img = np.repeat(np.asarray(Image.fromarray(img).convert("L"))[..., None], 3, axis=2)
            done[name, grey] = img, reconstructor.reconstruct(img)
        return done[name, grey]

    return get


@pytest.fixture(scope="session")
def live_server(reconstructor) -> Iterator[str]:
    """One real HTTP server over the session's engine (loaded through the app's start-up path, warm-up included);
    its URL. Tests that need other settings or a stand-in engine start their own."""
    import httpx

    from facerecon.api.app import create_app
    from facerecon.api.server import serve_in_thread
    from facerecon.config import Settings

    need_shared("data", "deep3d-examples")
    settings = Settings(max_upload_bytes=LIVE_MAX_UPLOAD, max_set_images=LIVE_MAX_SET, workers=1, queue_size=8,
                        request_timeout_s=240.0, graceful_timeout_s=5.0)
    with serve_in_thread(create_app(settings, lambda: reconstructor), settings) as server:
        t0 = time.monotonic()
        while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() - t0 < 240, "the server did not become ready"
            time.sleep(0.2)
        yield server.url
