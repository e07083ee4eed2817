"""The images' build recipe, checked where no Docker engine runs (our CI): what goes into the build context and the
images, and who the server runs as. (Building and running the images needs an engine: see the README.)"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: a pattern excludes a path when it matches the path or one of its
    parent folders; ``**/x`` matches ``x`` in any folder."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for p in patterns:
        alts = [p, p[3:], "*/" + p[3:]] if p.startswith("**/") else [p]
        if any(fnmatch.fnmatch(pre, a) for pre in prefixes for a in alts):
            return True
    return False


def test_build_context_leaves_out_basel_data_virtualenvs_and_caches() -> None:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for path in ("models/bfm/facemodel.npz", ".venv/bin/python", "web/node_modules/three/package.json",
                 ".git/HEAD", "runs/rnet/checkpoint.pt"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker build"
    for path in ("models/ict/facemodel.npz", "service/facerecon/pipeline.py", "web/src/app.js", "pyproject.toml"):
        assert not _ignored(path, patterns), f"{path} is needed by the build"


def test_images_copy_only_the_shipped_model_and_run_as_a_non_root_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert not re.search(r"^COPY\s+models\s", text, re.M), "the whole models/ folder (a converted BFM?) is copied"
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    served = [s for s in stages if "CMD [\"facerecon\", \"serve\"]" in s]
    assert len(served) == 2  # cpu and gpu
    for stage in served:
        assert "COPY models/ict ./models/ict" in stage
        users = re.findall(r"^USER\s+(\S+)", stage, re.M)
        assert users and users[-1] not in ("root", "0"), f"stage {stage.split()[2]} runs as root"
