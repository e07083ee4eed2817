"""Rendering: z-buffered rasterisation of camera-space meshes, differentiable interpolation, overlays.

One small nvdiffrast-like interface (:class:`Renderer`: ``rasterize``, ``interpolate``, ``render``) with two
backends, chosen in one place, :func:`get_renderer`:

* ``"cpu"``: :class:`~facerecon.render.cpu.CpuRenderer`, a numba z-buffer; CPU tensors.
* ``"nvdiffrast"``: :class:`~facerecon.render.nvdiffrast_backend.NvdiffrastRenderer`, nvdiffrast's CUDA
  rasteriser; CUDA tensors.

Conventions (both backends agree; details in :mod:`facerecon.render.base`): vertices ``(B, N, 3)`` camera-space
``(x, y, d)`` in decimetres from :func:`facerecon.geometry.to_camera`; one shared ``(F, 3)`` int64 triangle list,
both windings drawn; :class:`facerecon.geometry.Intrinsics` in a y-up frame with pixel (c, r) centred at
``u = c + 0.5``, ``v_up = H - (r + 0.5)``; images top-down (row 0 = top); clip to ``[znear, zfar]`` = [5, 15] dm by
default; nearest depth wins.

Example::

    renderer = get_renderer()            # nvdiffrast on a CUDA machine with it installed, else CPU
    image, mask, depth = renderer.render(vertices_cam, triangles, colors, camera.intrinsics)
"""

from __future__ import annotations

import logging
import threading

import torch

from facerecon.render.base import DEFAULT_ZFAR, DEFAULT_ZNEAR, Raster, Renderer, RenderOutput
from facerecon.render.cpu import CpuRenderer
from facerecon.render.nvdiffrast_backend import nvdiffrast_status

__all__ = [
    "BACKENDS",
    "DEFAULT_ZFAR",
    "DEFAULT_ZNEAR",
    "CpuRenderer",
    "Raster",
    "RenderOutput",
    "Renderer",
    "get_renderer",
]

logger = logging.getLogger(__name__)

#: Every backend name :func:`get_renderer` accepts besides ``"auto"``.
BACKENDS = ("cpu", "nvdiffrast")

_lock = threading.Lock()
_renderers: dict[str, Renderer] = {}


def get_renderer(name: str = "auto", device: torch.device | str | None = None) -> Renderer:
    """The renderer to use; instances are cached per backend (and device), so call it freely.

    Args:
        name: ``"auto"`` picks ``"nvdiffrast"`` when CUDA is available and ``nvdiffrast.torch`` imports, else
            ``"cpu"``; ``"cpu"`` or ``"nvdiffrast"`` force one.
        device: where the tensors will live. With ``"auto"`` a CPU device selects the CPU backend; for
            ``"nvdiffrast"`` the CUDA device (default: the current one).

    Returns:
        A :class:`Renderer`.

    Raises:
        ValueError: unknown name.
        RuntimeError: ``"nvdiffrast"`` requested but unusable here (the message says why).
    """
    key = name.strip().lower()
    if key not in ("auto", *BACKENDS):
        raise ValueError(f"unknown renderer {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    dev = torch.device(device) if device is not None else None
    if key == "auto":
        if dev is not None and dev.type == "cpu":
            key = "cpu"
        else:
            usable, reason = nvdiffrast_status()
            key = "nvdiffrast" if usable else "cpu"
            if not usable:
                logger.debug("renderer 'auto' -> 'cpu': %s", reason)
    cache_key = key if key == "cpu" else f"{key}:{dev}"
    with _lock:
        renderer = _renderers.get(cache_key)
        if renderer is None:
            if key == "cpu":
                renderer = CpuRenderer()
            else:
                from facerecon.render.nvdiffrast_backend import NvdiffrastRenderer

                renderer = NvdiffrastRenderer(dev)
            _renderers[cache_key] = renderer
            logger.info("renderer: %s", cache_key)
    return renderer
