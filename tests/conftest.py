"""Shared fixtures: the repository's models, the shared assets folder beside the repository, and one engine and
one live server for the whole session (loading a Reconstructor costs seconds; each module used to build its own)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACERECON_SHARED_DIR", REPO.parent / "shared"))
MODELS = REPO / "models"
ICT_MODEL = MODELS / "ict" / "facemodel.npz"
EXAMPLES = SHARED / "data" / "deep3d-examples"


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


@pytest.fixture(autouse=True)
def _seeded_global_rngs() -> None:
    """Each test draws from torch's and NumPy's global generators as if it ran first in its process (pytest-xdist
    gives a worker other files before it from run to run). torch only when already imported: some tests check that a
    path never imports it."""
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    if np is not None:
        np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _torch_global_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test file leaves torch's process state as it found it: the calling thread's intra-op thread count given
    back (a training call or an engine set up here would otherwise change the next file's), and a default dtype
    or grad mode left changed is an error of the file that changed it."""
    torch = sys.modules.get("torch")
    threads = None if torch is None else torch.get_num_threads()
    yield
    torch = sys.modules.get("torch")
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
