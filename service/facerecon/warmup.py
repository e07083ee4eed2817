"""Warm-up, at install time and at service start.

``python -m facerecon.warmup`` (install time, safe to run any time): load the default face model, decompress the
shipped networks into the cache (so no start decompresses them again), and compile what compiles once (numba
kernels of the rasteriser and the overlay, cached on disk), so the first request or CLI call does not pay for it.

:func:`warm_up_engine` (service start, before ``/readyz`` turns ready): every stage the service's default mode uses
runs once, so the first request pays no first-call costs (onnxruntime's first runs, the rasteriser's kernels,
torch's autograd), at a fraction of a request's time: the fit runs a few steps (the same kernels as a full fit), not
a whole fit. With the R-Net alone as the default (``refine=false``) it imports no torch: the networks run once on
blank inputs and the mean face is decoded and exported with NumPy; the renderer (overlays, depth/normal maps,
textures) then loads on the first request that asks for one.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from facerecon.pipeline import Reconstructor
    from facerecon.results import Mode

log = logging.getLogger("facerecon.warmup")

#: Steps of the warm-up fit (landmark, photometric): enough to run every kernel of the fit once.
WARMUP_FIT_STEPS = (2, 2)


def synthetic_face_photo(rec: Any, size: int = 320) -> np.ndarray:
    """A photo the detector finds a face in, made from the face model alone: the mean face, lit from the front and
    above (plain ambient light is too flat for a HOG detector), over a dark grey background, ``(size, size, 3)``
    uint8. Needs a real :class:`~facerecon.pipeline.Reconstructor` (a torch-free one draws it with NumPy; else its
    decoder and renderer: imports torch)."""
    from facerecon.coefficients import Coefficients
    from facerecon.geometry import Intrinsics
    from facerecon.render.overlay import overlay_on_photo

    vec = np.zeros((1, rec.card.layout.total), np.float32)
    c = Coefficients.from_vector(vec, rec.card.layout)
    gamma = c.arrays().gamma  # a view of vec
    for ch in range(3):  # SH bands 1 (y) and 2 (z): light from above and in front
        gamma[0, ch * 9 + 2] = 0.3
        gamma[0, ch * 9 + 3] = 0.3
    camera = rec.np_decoder.camera
    f = camera.focal * size / camera.size * 0.6
    intrinsics = Intrinsics(f, f, size / 2, size / 2, size, size)
    background = np.full((size, size, 3), 60, np.uint8)
    if getattr(rec, "torch_free", False):
        decoded = rec.np_decoder.decode(c)
        return overlay_on_photo(background, decoded.vertices_cam, rec.overlay_triangles_array,
                                np.clip(decoded.colors, 0.0, 1.0), intrinsics)
    import torch

    with torch.no_grad():
        dec = rec.decoder(c.to(rec.device))
    return overlay_on_photo(background, dec.vertices_cam, rec.overlay_triangles, dec.colors.clamp(0, 1),
                            intrinsics, renderer=rec.renderer)


def warm_up_engine(rec: Reconstructor, image: np.ndarray | None = None, mode: Mode | None = None
                   ) -> dict[str, float]:
    """Run each stage of ``mode`` (default: ``rec``'s default mode) once, cheaply (module docstring); returns
    stage -> milliseconds.

    Args:
        image: a photo with a face (``settings.warmup_image``); default: :func:`synthetic_face_photo` when the
            mode fits, blank inputs for the R-Net alone.
        mode: a mode without a fit (``rnet``, ``rnet+lm``) warms the torch-free R-Net path only (the service turns
            ready after it and warms the default mode's fit next, ``settings.warmup_fit_after_ready``).
    """
    from facerecon.coefficients import Coefficients
    from facerecon.errors import NoFaceFound
    from facerecon.export import export_mesh
    from facerecon.pipeline import _timed

    mode = mode or rec.mode_for()
    t: dict[str, float] = {}
    fits = "fit" in mode
    if fits:
        from facerecon.fitconfig import FitConfig

        with _timed(t, "renderer"):
            if rec.torch_free:  # the fused engine's and the raster's kernels (no torch)
                from facerecon.fused import warmup as fused_warmup

                fused_warmup()
            else:
                rec.renderer.warmup()  # loads (or compiles and caches) the forward and gradient kernels
        if image is None:
            with _timed(t, "synthetic photo"):
                image = synthetic_face_photo(rec)
    if image is None:  # the R-Net alone, no photo given: each network and the NumPy decoding once, no torch
        with _timed(t, "detect"):
            rec.detector.detect(np.full((320, 320, 3), 128, np.uint8), "largest")  # the box networks
            rec.detector.mesh.run(np.zeros((1, 192, 192, 3), np.float32))
        if rec.rnet is not None:
            with _timed(t, "rnet"):
                out = rec.rnet.run(np.zeros((1, 3, 224, 224), np.float32))
                coeffs = Coefficients.from_vector(np.asarray(out["coeffs"], np.float32), rec.card.layout)
            with _timed(t, "decode+export"):
                lm = rec.np_decoder.landmarks(coeffs)
                if mode == "rnet+lm":
                    from facerecon.npfit import landmark_stage

                    landmark_stage(rec.np_decoder, coeffs, lm + 1.0)
                export_mesh(rec.mesh(rec.np_decoder.decode(coeffs)), "obj")
        return t
    with _timed(t, "detect"):
        try:
            face = rec.detect(image)[0]
        except NoFaceFound:
            log.warning("warm-up: no face detected in the warm-up photo; only detection was warmed up")
            return t
    with _timed(t, "prepare"):
        prepared = rec.prepare(image, face)
    with _timed(t, "estimate"):
        steps = FitConfig(landmark_steps=WARMUP_FIT_STEPS[0], photo_steps=WARMUP_FIT_STEPS[1]) if fits else None
        est = rec.estimate([prepared], mode=mode, fit_config=steps)
    with _timed(t, "finish+json+export"):
        r = rec.finish(prepared, est)
        rec.to_json(r)
        rec.export(r, "obj")
    if fits:
        from facerecon.render.overlay import encode_png

        with _timed(t, "overlay"):
            encode_png(rec.overlay(image, r))
    return t


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
    from facerecon.fused import warmup as fused_warmup

    fused_warmup()  # the fit's fused engine
    numpy_inputs = tuple(x.numpy() for x in with_torch)
    overlay_on_photo(photo, *numpy_inputs, intr)  # the torch-free overlay path
    log.info("CPU rasteriser, fit kernels and overlay compiled and cached in %.2f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
