"""GPU backend: the real nvdiffrast (``import nvdiffrast.torch as dr``; PyPI ``diffrp-nvdiffrast``, CUDA only,
NVIDIA Source Code License: non-commercial use).

nvdiffrast is imported lazily, only when this renderer is created, so CPU machines never need it.

Clip space (generalising the reference matrix of reference.md section 9 to any :class:`Intrinsics`). nvdiffrast
maps normalised device coordinates ``ndc = clip.xyz / clip.w`` to pixels as ``col = (ndc_x + 1) W / 2`` and
``row = (ndc_y + 1) H / 2`` (continuous, pixel centres at ``+0.5``, row 0 first in memory). Our image frame has
``u = col`` and ``v_up = H - row``, with ``u = fx x / d + cx`` and ``v_up = fy y / d + cy``. Solving for clip
coordinates with ``clip_w = d``:

* ``clip_x = (2 fx / W) x + (2 cx / W - 1) d``
* ``clip_y = -(2 fy / H) y + (1 - 2 cy / H) d``
* ``clip_z = (f + n)/(f - n) d - 2 f n / (f - n)``, so ``ndc_z = -1`` at ``d = n`` (znear) and ``+1`` at ``d = f``
* ``clip_w = d``

i.e. ``clip = P (x, y, d, 1)`` with::

    P = [[2fx/W,   0,      2cx/W - 1,        0        ],
         [0,      -2fy/H,  1 - 2cy/H,        0        ],
         [0,       0,      (f+n)/(f-n),  -2fn/(f-n)   ],
         [0,       0,      1,                0        ]]

For the reference camera (fx = fy = 1015, cx = cy = 112, 224 x 224, n = 5, f = 15) this is exactly
``clip = (9.0625 x, -9.0625 y, 2d - 15, d)``, 9.0625 = 1015/112. nvdiffrast clips to ``-w <= z <= w``, i.e.
``znear <= d <= zfar``, and rasterises both windings (no culling), like the CPU backend.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from typing import Any

import torch
from torch import Tensor

from facerecon.geometry import Intrinsics
from facerecon.render.base import (
    DEFAULT_ZFAR,
    DEFAULT_ZNEAR,
    Raster,
    Renderer,
    check_attributes,
    check_clip_range,
    check_intrinsics,
    check_triangles,
    check_vertices,
)

__all__ = ["NvdiffrastRenderer", "build_plugin", "clip_space", "nvdiffrast_status", "projection_matrix"]

logger = logging.getLogger(__name__)


def projection_matrix(
    intrinsics: Intrinsics,
    znear: float = DEFAULT_ZNEAR,
    zfar: float = DEFAULT_ZFAR,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``(4, 4)`` matrix ``P`` with ``clip = P (x, y, d, 1)`` (see the module docstring).

    Args:
        intrinsics: image size and y-up projection.
        znear, zfar: clip depths, decimetres.
        dtype, device: of the result.

    Returns:
        ``(4, 4)`` tensor.
    """
    check_intrinsics(intrinsics)
    check_clip_range(znear, zfar)
    w, h = float(intrinsics.width), float(intrinsics.height)
    n, f = float(znear), float(zfar)
    return torch.tensor(
        [
            [2.0 * intrinsics.fx / w, 0.0, 2.0 * intrinsics.cx / w - 1.0, 0.0],
            [0.0, -2.0 * intrinsics.fy / h, 1.0 - 2.0 * intrinsics.cy / h, 0.0],
            [0.0, 0.0, (f + n) / (f - n), -2.0 * f * n / (f - n)],
            [0.0, 0.0, 1.0, 0.0],
        ],
        dtype=dtype,
        device=device,
    )


def clip_space(
    vertices_cam: Tensor, intrinsics: Intrinsics, znear: float = DEFAULT_ZNEAR, zfar: float = DEFAULT_ZFAR
) -> Tensor:
    """Camera-space ``(x, y, d)`` to nvdiffrast clip space ``(B, N, 4)`` (differentiable, any device).

    Args:
        vertices_cam: ``(B, N, 3)`` float, decimetres.
        intrinsics, znear, zfar: as for :func:`projection_matrix`.

    Returns:
        ``(B, N, 4)`` same dtype and device, ``P (x, y, d, 1)``.
    """
    p = projection_matrix(intrinsics, znear, zfar, dtype=vertices_cam.dtype, device=vertices_cam.device)
    return vertices_cam @ p[:, :3].T + p[:, 3]


def nvdiffrast_status() -> tuple[bool, str]:
    """Whether the nvdiffrast backend can be used here: ``(usable, reason if not)``. Never raises."""
    if not torch.cuda.is_available():
        return False, f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    try:
        importlib.import_module("nvdiffrast.torch")
    except Exception as exc:  # ImportError, or a broken install
        return False, f"nvdiffrast.torch does not import ({exc!r}); install the 'gpu' extra (diffrp-nvdiffrast)"
    return True, ""


def _make_plugin_importable() -> None:
    """Put nvdiffrast's JIT build directory on ``sys.path``.

    nvdiffrast 0.3.3 builds its plugin with ``torch.utils.cpp_extension`` and then calls
    ``importlib.import_module(plugin_name)``; current torch loads the built module by file spec without adding it
    to ``sys.modules`` or its directory to ``sys.path``, so that import fails. Harmless where it is not needed.
    """
    try:
        import nvdiffrast
        import torch.utils.cpp_extension as cpp_extension

        name = re.sub(r"\W|^(?=\d)", "_", f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
        build_dir = cpp_extension._get_build_directory(name, False)
        if build_dir not in sys.path:
            sys.path.append(build_dir)
    except Exception:  # best effort only
        logger.debug("could not prepare the nvdiffrast plugin path", exc_info=True)


def build_plugin() -> str:
    """Compile nvdiffrast's CUDA plugin now (``docker build`` runs this: no GPU is needed to compile, only nvcc, a
    C++ compiler, the Python headers and ninja), so the service never compiles at start-up; returns the build
    folder (under ``TORCH_EXTENSIONS_DIR``). Set ``TORCH_CUDA_ARCH_LIST`` for the GPUs to serve on: without a GPU
    torch cannot detect them.

    Loading the built module needs the CUDA driver (``libcuda.so.1``), which an image build does not have: a load
    failure after a successful compile is logged and ignored, and the service's first use only loads it.

    Raises:
        RuntimeError: the compile failed, or left no plugin library behind.
    """
    import glob
    import os

    import nvdiffrast
    import nvdiffrast.torch.ops as ops
    import torch.utils.cpp_extension as cpp_extension

    _make_plugin_importable()
    name = re.sub(r"\W|^(?=\d)", "_", f"nvdiffrast_plugin_{nvdiffrast.__version__}_torch{torch.__version__}")
    build_dir = cpp_extension._get_build_directory(name, False)
    try:
        ops._get_plugin(gl=False)
    except (ImportError, OSError) as exc:  # compiled, but cannot be loaded without a driver
        logger.warning("nvdiffrast plugin built but not loaded here (%s)", exc)
    libraries = glob.glob(os.path.join(build_dir, "*.so"))
    if not libraries:
        raise RuntimeError(f"the nvdiffrast plugin build left no library in {build_dir}")
    logger.info("nvdiffrast plugin: %s", libraries[0])
    return build_dir


class NvdiffrastRenderer(Renderer):
    """nvdiffrast's CUDA rasteriser (``dr.RasterizeCudaContext``, no OpenGL). Inputs must be CUDA tensors.

    The context is created on first use (or by :meth:`warmup`, which also triggers nvdiffrast's one-off plugin
    build, minutes on a fresh machine) and kept for the renderer's lifetime.
    """

    name = "nvdiffrast"
    supports_antialias = True

    def __init__(self, device: torch.device | str | int | None = None) -> None:
        usable, reason = nvdiffrast_status()
        if not usable:
            raise RuntimeError(f"the nvdiffrast renderer is unusable here: {reason}")
        self._dr: Any = importlib.import_module("nvdiffrast.torch")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if self._device.type != "cuda":
            raise ValueError(f"the nvdiffrast renderer needs a CUDA device, got {self._device}")
        self._context: Any = None

    @property
    def device(self) -> torch.device:
        return self._device

    def _ctx(self) -> Any:
        if self._context is None:
            _make_plugin_importable()
            self._context = self._dr.RasterizeCudaContext(device=self._device)
        return self._context

    def rasterize(
        self,
        vertices_cam: Tensor,
        triangles: Tensor,
        intrinsics: Intrinsics,
        *,
        znear: float = DEFAULT_ZNEAR,
        zfar: float = DEFAULT_ZFAR,
    ) -> Raster:
        """``dr.rasterize`` on the clip-space vertices; see :meth:`Renderer.rasterize`.

        Args:
            vertices_cam: ``(B, N, 3)`` float32 camera space, decimetres, CUDA.
            triangles: ``(F, 3)`` int64 in ``[0, N)``, CUDA.
            intrinsics, znear, zfar: projection and clip depths.

        Returns:
            :class:`Raster` (CUDA tensors, float32); ``native = (rast (B, H, W, 4), pos_clip (B, N, 4), tri int32)``.
        """
        check_vertices(vertices_cam, self._device, self.name)
        check_triangles(triangles, self._device, self.name)
        check_intrinsics(intrinsics)
        check_clip_range(znear, zfar)
        n_vert = int(vertices_cam.shape[1])
        if bool(((triangles < 0) | (triangles >= n_vert)).any()):  # nvdiffrast does not check: one sync
            raise ValueError(f"triangles index outside the {n_vert} vertices (0-based ids)")
        verts = vertices_cam.float()
        pos = clip_space(verts, intrinsics, znear, zfar).contiguous()
        tri = triangles.to(torch.int32).contiguous()
        rast, _ = self._dr.rasterize(self._ctx(), pos, tri, resolution=(int(intrinsics.height), int(intrinsics.width)))
        triangle_id = rast[..., 3].long() - 1
        mask = triangle_id >= 0
        u, v = rast[..., 0], rast[..., 1]
        bary = torch.stack((u, v, 1.0 - u - v), dim=-1) * mask.unsqueeze(-1)
        depth, _ = self._dr.interpolate(verts[..., 2:3].contiguous(), rast, tri)
        return Raster(
            triangle_id=triangle_id,
            barycentrics=bary,
            depth=depth[..., 0] * mask,
            mask=mask,
            intrinsics=intrinsics,
            num_vertices=n_vert,
            num_triangles=int(triangles.shape[0]),
            backend=self.name,
            native=(rast, pos, tri),
        )

    def interpolate(self, attributes: Tensor, raster: Raster, triangles: Tensor) -> Tensor:
        """``dr.interpolate``; see :meth:`Renderer.interpolate`.

        Args:
            attributes: ``(B, N, C)`` or ``(1, N, C)`` float (computed in float32), CUDA.
            raster: from this renderer's :meth:`rasterize`.
            triangles: ``(F, 3)`` int64, the rasterised list.

        Returns:
            ``(B, H, W, C)`` float32 CUDA, zeros off the face.
        """
        check_attributes(attributes, raster, self._device, self.name)
        check_triangles(triangles, self._device, self.name)
        rast, _, tri = raster.native
        if triangles.shape[0] != tri.shape[0]:
            raise ValueError(f"triangles has {triangles.shape[0]} rows but {tri.shape[0]} were rasterised")
        attr = attributes.float().expand(raster.batch_size, -1, -1).contiguous()
        out, _ = self._dr.interpolate(attr, rast, tri)
        return out

    def antialias(self, image: Tensor, raster: Raster | None, triangles: Tensor) -> Tensor:
        """``dr.antialias`` of a ``(B, H, W, C)`` CUDA image made from ``raster`` (silhouette coverage and gradients
        to the positions); returns the same shape, float32."""
        if raster is None or raster.backend != self.name:
            raise ValueError("antialias needs the raster this renderer made the image from")
        rast, pos, tri = raster.native
        return self._dr.antialias(image.float().contiguous(), rast, pos, tri)

    def warmup(self) -> None:
        """Build/load the plugin, create the context and render one triangle."""
        verts = torch.tensor([[[-0.5, -0.5, 10.0], [0.5, -0.5, 10.0], [0.0, 0.5, 10.0]]], device=self._device)
        tris = torch.tensor([[0, 1, 2]], dtype=torch.int64, device=self._device)
        self.render(verts, tris, torch.ones(1, 3, 3, device=self._device), Intrinsics(1015, 1015, 8, 8, 16, 16))
        torch.cuda.synchronize(self._device)
