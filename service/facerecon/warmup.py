"""Install-time warm-up: load the default face model, decompress the shipped networks into the cache (so no start
decompresses them again), and compile what compiles once (numba kernels of the rasteriser and the overlay, cached
on disk), so the first request or CLI call does not pay for it. Safe to run any time: ``python -m
facerecon.warmup``."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("facerecon.warmup")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numpy as np

    from facerecon.coefficients import Coefficients
    from facerecon.config import get_settings, network_cache_dir, onnx_threads
    from facerecon.decoder import FaceDecoder
    from facerecon.facemodel import FaceModel
    from facerecon.facemodel.registry import resolve
    from facerecon.geometry import Camera

    settings = get_settings()
    t0 = time.perf_counter()
    npz = resolve(settings.models_dir, settings.face_model)
    model = FaceModel.from_file(npz)
    out = FaceDecoder(model)(Coefficients.zeros(model.layout))
    log.info("face model %s decoded in %.2f s", model.name, time.perf_counter() - t0)
    if settings.use_networks:
        from facerecon.nets.runtime import OnnxNet

        t0 = time.perf_counter()
        for kind in ("rnet", "cnet"):
            if (npz.parent / f"{kind}.json").is_file():
                OnnxNet.for_face_model(npz, kind, device=settings.device, intra_op_threads=onnx_threads(settings),
                                       cache_dir=network_cache_dir(settings))
        log.info("networks loaded (and cached in %s) in %.2f s", network_cache_dir(settings), time.perf_counter() - t0)
    from facerecon.render import get_renderer
    from facerecon.render.overlay import overlay_on_photo

    t0 = time.perf_counter()
    renderer = get_renderer("cpu")
    renderer.warmup()  # compiles (and caches on disk) the forward and gradient kernels
    intr = Camera().intrinsics
    renderer.render(out.vertices_cam, model.triangles, out.colors, intr)
    photo = np.zeros((intr.height, intr.width, 3), np.uint8)
    with_torch = out.vertices_cam.detach(), model.triangles, out.colors.detach().clamp(0, 1)
    overlay_on_photo(photo, *with_torch, intr, renderer=renderer)  # the overlay's kernels, at both scales
    big = intr.scaled(4)
    overlay_on_photo(np.zeros((big.height, big.width, 3), np.uint8), *with_torch, big, renderer=renderer)
    log.info("CPU rasteriser and overlay compiled and cached in %.2f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
