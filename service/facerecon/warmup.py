"""Install-time warm-up: load the default face model and compile what compiles once (numba kernels), so the first
request or CLI call does not pay for it. Safe to run any time: ``python -m facerecon.warmup``."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("facerecon.warmup")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from facerecon.coefficients import Coefficients
    from facerecon.config import get_settings
    from facerecon.decoder import FaceDecoder
    from facerecon.facemodel import FaceModel
    from facerecon.facemodel.registry import resolve
    from facerecon.geometry import Camera

    settings = get_settings()
    t0 = time.perf_counter()
    model = FaceModel.from_file(resolve(settings.models_dir, settings.face_model))
    out = FaceDecoder(model)(Coefficients.zeros(model.layout))
    log.info("face model %s decoded in %.2f s", model.name, time.perf_counter() - t0)
    from facerecon.render import get_renderer
    t0 = time.perf_counter()
    renderer = get_renderer("cpu")
    renderer.warmup()  # compiles (and caches on disk) the forward and gradient kernels
    renderer.render(out.vertices_cam, model.triangles, out.colors, Camera().intrinsics)
    log.info("CPU rasteriser compiled and cached in %.2f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
