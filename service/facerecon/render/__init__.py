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

import importlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from facerecon.render.raster import DEFAULT_ZFAR, DEFAULT_ZNEAR

if TYPE_CHECKING:
    import torch

    from facerecon.render.base import Raster, Renderer, RenderOutput
    from facerecon.render.cpu import CpuRenderer

#: Names this package exports from its torch modules, imported on first use: the package itself (and its torch-free
#: modules, :mod:`~facerecon.render.raster` and the overlay's NumPy path) never imports torch.
_LAZY = {"CpuRenderer": "facerecon.render.cpu", "Raster": "facerecon.render.base",
         "Renderer": "facerecon.render.base", "RenderOutput": "facerecon.render.base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BACKENDS",
    "DEFAULT_ZFAR",
    "DEFAULT_ZNEAR",
    "CpuRenderer",
    "Raster",
    "RenderOutput",
    "Renderer",
    "get_renderer",
    "usable_renderer",
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
    import torch

    from facerecon.render.cpu import CpuRenderer
    from facerecon.render.nvdiffrast_backend import nvdiffrast_status

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


def usable_renderer(name: str, device: torch.device) -> tuple[Renderer, torch.device]:
    """The renderer to serve with and the torch device that goes with it: the engine's start-up choice.

    nvdiffrast (asked for, or ``"auto"`` on a CUDA device) is created *and warmed up* here: its plugin is compiled
    on first use, which fails without a compiler, the CUDA headers or the Python headers. When it cannot be used
    (no CUDA, no nvdiffrast, a failed build) the CPU renderer is used instead with a logged warning, never a
    service that does not become ready; the CPU renderer takes CPU tensors, so torch (decoder, fit, overlays,
    textures) then runs on the CPU too, while the ONNX networks keep their own execution providers.

    Args:
        name: ``"auto"``, ``"cpu"`` or ``"nvdiffrast"`` (the ``renderer`` setting).
        device: the torch device the settings resolve to.

    Returns:
        ``(renderer, device)``; ``device`` is the CPU whenever the renderer is the CPU one.

    Raises:
        ValueError: an unknown renderer name.
    """
    key = name.strip().lower()
    if key not in ("auto", *BACKENDS):
        raise ValueError(f"unknown renderer {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    import torch

    cpu = torch.device("cpu")
    if key == "cpu" or (key == "auto" and device.type == "cpu"):
        if device.type != "cpu":
            logger.info("renderer 'cpu' takes CPU tensors: torch runs on the CPU (device %s not used)", device)
        return get_renderer("cpu"), cpu
    try:
        if device.type != "cuda":
            raise RuntimeError(f"the torch device is {device}, not CUDA")
        renderer = get_renderer("nvdiffrast", device)
        renderer.warmup()  # builds or loads the plugin, creates the CUDA context, draws one triangle
        return renderer, device
    except Exception as exc:  # ImportError, a failed plugin build (RuntimeError, OSError, CalledProcessError), ...
        with _lock:
            _renderers.pop(f"nvdiffrast:{device}", None)
        logger.warning("renderer %r is unusable on %s (%s: %s); falling back to the CPU renderer, with torch on "
                       "the CPU (the ONNX networks keep their providers)", name, device, type(exc).__name__,
                       str(exc).splitlines()[0][:300] if str(exc) else "")
        return get_renderer("cpu"), cpu
