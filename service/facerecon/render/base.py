"""The renderer interface shared by every backend: the :class:`Raster` result, the :class:`Renderer` base class,
input validation, and the torch interpolation used by the CPU backend.

Conventions (one set for all backends, reference.md sections 1, 4 and 9):

* **Vertices** are camera-space ``(x, y, d)`` in decimetres: x right, y up, ``d > 0`` depth in front of the camera
  (what :func:`facerecon.geometry.to_camera` produces), shape ``(B, N, 3)``.
* **Triangles** are one shared list ``(F, 3)`` int64 of 0-based vertex ids. Counter-clockwise as seen from the camera
  is front-facing, but **both windings are rasterised** (no back-face culling), exactly like nvdiffrast; the depth
  test alone decides visibility.
* **Projection**: ``u = fx x / d + cx``, ``v_up = fy y / d + cy`` (:class:`facerecon.geometry.Intrinsics`, y up).
  The centre of pixel (column c, row r) is ``u = c + 0.5``, ``v_up = height - (r + 0.5)``; row 0 is the top of the
  image (images are top-down, no flip). This is nvdiffrast's convention with the reference projection matrix.
* **Clipping**: only surface points with ``znear <= d <= zfar`` are drawn (nvdiffrast clips to the frustum; the CPU
  backend tests the interpolated depth per pixel, which is the same set of pixels).
* **Depth test**: the nearest ``d`` wins.
* **Barycentrics** are perspective-correct: the surface point seen through a pixel is
  ``sum_i b_i V_i`` with ``V_i`` the camera-space vertices of its triangle, so interpolating any attribute with them
  interpolates it linearly over the 3D triangle.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from facerecon.geometry import Intrinsics
from facerecon.render.raster import DEFAULT_ZFAR, DEFAULT_ZNEAR  # the reference's clip planes (torch-free home)

__all__ = [
    "DEFAULT_ZFAR",
    "DEFAULT_ZNEAR",
    "Raster",
    "RenderOutput",
    "Renderer",
    "check_attributes",
    "check_clip_range",
    "check_intrinsics",
    "check_triangles",
    "check_vertices",
    "interpolate_covered",
]



@dataclass
class Raster:
    """Per-pixel result of :meth:`Renderer.rasterize` for a batch of ``B`` images of ``H x W`` pixels.

    All tensors live on the renderer's device.

    Attributes:
        triangle_id: ``(B, H, W)`` int64, index of the visible triangle, ``-1`` for background.
        barycentrics: ``(B, H, W, 3)``, dtype of the vertices (float32 in the pipeline), perspective-correct weights
            of the visible triangle's vertices ``(b0, b1, b2)`` in the order of its ``triangles`` row; zeros off the
            face. Differentiable w.r.t. the vertex positions when they require grad (inside the silhouette only:
            there are no silhouette gradients without antialiasing).
        depth: ``(B, H, W)``, same dtype, interpolated camera depth ``d`` in decimetres, ``0`` off the face.
            Differentiable like ``barycentrics``.
        mask: ``(B, H, W)`` bool, ``triangle_id >= 0``.
        intrinsics: the intrinsics the raster was made with.
        num_vertices: ``N`` of the rasterised vertices (checked again by :meth:`Renderer.interpolate`).
        num_triangles: ``F`` of the rasterised triangle list.
        backend: name of the renderer that produced it (``"cpu"`` or ``"nvdiffrast"``).
        native: backend-specific state (nvdiffrast: ``(rast, pos_clip, tri_int32)``; CPU: ``None``).
        pixels: ``(P,)`` int64 flat indices into ``B * H * W`` of the covered pixels, or ``None`` (computed on
            demand by :meth:`covered`).
        pixel_batch: ``(P,)`` int64 batch index of each covered pixel, or ``None``.
        pixel_vertices: ``(P, 3)`` int64 vertex ids (0 ... N-1) of the visible triangle at each covered pixel, or
            ``None``.
        pixel_barycentrics: ``(P, 3)`` barycentrics at the covered pixels (the same values as ``barycentrics``, with
            the same autograd history), or ``None``.
    """

    triangle_id: Tensor
    barycentrics: Tensor
    depth: Tensor
    mask: Tensor
    intrinsics: Intrinsics
    num_vertices: int
    num_triangles: int
    backend: str
    native: Any = field(default=None, repr=False)
    pixels: Tensor | None = field(default=None, repr=False)
    pixel_batch: Tensor | None = field(default=None, repr=False)
    pixel_vertices: Tensor | None = field(default=None, repr=False)
    pixel_barycentrics: Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.triangle_id.shape[0])

    @property
    def height(self) -> int:
        return int(self.triangle_id.shape[1])

    @property
    def width(self) -> int:
        return int(self.triangle_id.shape[2])

    def covered(self, triangles: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The covered pixels in compact form, computed once and cached.

        Args:
            triangles: ``(F, 3)`` int64, the list that was rasterised (same device).

        Returns:
            ``(pixels (P,), pixel_batch (P,), pixel_vertices (P, 3), pixel_barycentrics (P, 3))``, see the class.
        """
        if self.pixels is None or self.pixel_batch is None or self.pixel_vertices is None:
            flat_id = self.triangle_id.reshape(-1)
            pixels = torch.nonzero(flat_id >= 0).squeeze(1)
            self.pixels = pixels
            self.pixel_batch = pixels // (self.height * self.width)
            self.pixel_vertices = triangles[flat_id[pixels]]
        if self.pixel_barycentrics is None:
            self.pixel_barycentrics = self.barycentrics.reshape(-1, 3)[self.pixels]
        return self.pixels, self.pixel_batch, self.pixel_vertices, self.pixel_barycentrics


class RenderOutput(NamedTuple):
    """Result of :meth:`Renderer.render` (unpacks as ``image, mask, depth``).

    Attributes:
        image: ``(B, C, H, W)`` (C = 3 for RGB), dtype of the colours: ``mask * interpolated colour``; colours pass
            through in whatever range they come ([0, 1] in the pipeline), never clamped here.
        mask: ``(B, 1, H, W)`` same dtype, 1 where a triangle is visible, else 0.
        depth: ``(B, 1, H, W)`` same dtype, camera depth ``d`` in decimetres, 0 off the face.
    """

    image: Tensor
    mask: Tensor
    depth: Tensor


class Renderer(abc.ABC):
    """A rasteriser backend. Create one with :func:`facerecon.render.get_renderer`; it is cheap to keep and reuse.

    Three ops, nvdiffrast-like: :meth:`rasterize`, :meth:`interpolate` and the convenience :meth:`render`.
    """

    #: Backend name, ``"cpu"`` or ``"nvdiffrast"``.
    name: str = ""
    #: Whether :meth:`antialias` (and ``render(..., antialias=True)``) is available.
    supports_antialias: bool = False
    #: Whether several threads may call one renderer at once (the pipeline serialises a renderer that is not).
    thread_safe: bool = False

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device every input tensor must be on (outputs are on it too)."""

    @abc.abstractmethod
    def rasterize(
        self,
        vertices_cam: Tensor,
        triangles: Tensor,
        intrinsics: Intrinsics,
        *,
        znear: float = DEFAULT_ZNEAR,
        zfar: float = DEFAULT_ZFAR,
    ) -> Raster:
        """Z-buffered rasterisation.

        Args:
            vertices_cam: ``(B, N, 3)`` float32 camera-space ``(x, y, d)``, decimetres, on :attr:`device`.
            triangles: ``(F, 3)`` int64 vertex ids in ``[0, N)``, on :attr:`device`; both windings are drawn.
            intrinsics: image size and projection (y-up frame, see the module docstring).
            znear: near clip depth, decimetres, ``> 0``.
            zfar: far clip depth, decimetres, ``> znear``.

        Returns:
            A :class:`Raster`; its barycentrics and depth carry gradients to ``vertices_cam``.
        """

    @abc.abstractmethod
    def interpolate(self, attributes: Tensor, raster: Raster, triangles: Tensor) -> Tensor:
        """Interpolate per-vertex attributes with the raster's perspective-correct barycentrics.

        Args:
            attributes: ``(B, N, C)`` or ``(1, N, C)`` (broadcast over the batch), float, on :attr:`device`.
            raster: from :meth:`rasterize` of this renderer.
            triangles: ``(F, 3)`` int64, the list that was rasterised.

        Returns:
            ``(B, H, W, C)``, dtype of the attributes, zeros off the face. Differentiable w.r.t. ``attributes`` and,
            through the raster, w.r.t. the vertex positions.
        """

    def render(
        self,
        vertices_cam: Tensor,
        triangles: Tensor,
        colors: Tensor,
        intrinsics: Intrinsics,
        *,
        znear: float = DEFAULT_ZNEAR,
        zfar: float = DEFAULT_ZFAR,
        antialias: bool = False,
    ) -> RenderOutput:
        """Rasterise and shade with per-vertex colours: ``image = mask * interpolated colour``.

        Args:
            vertices_cam: ``(B, N, 3)`` float32 camera space, decimetres.
            triangles: ``(F, 3)`` int64.
            colors: ``(B, N, C)`` or ``(1, N, C)`` float, usually RGB in [0, 1] (not clamped here).
            intrinsics: output size and projection.
            znear, zfar: clip depths, decimetres.
            antialias: analytic silhouette antialiasing (nvdiffrast ``dr.antialias``; it also gives silhouette
                gradients). The CPU backend has none and raises if asked; supersample instead (see
                :mod:`facerecon.render.overlay`).

        Returns:
            :class:`RenderOutput` ``(image (B, C, H, W), mask (B, 1, H, W), depth (B, 1, H, W))``.
        """
        if antialias and not self.supports_antialias:
            self.antialias(colors, None, triangles)  # raises the explanation
        raster = self.rasterize(vertices_cam, triangles, intrinsics, znear=znear, zfar=zfar)
        color = self.interpolate(colors, raster, triangles)
        mask = raster.mask.to(color.dtype)
        image = color * mask.unsqueeze(-1)
        if antialias:
            image = self.antialias(image, raster, triangles)
        return RenderOutput(
            image.permute(0, 3, 1, 2).contiguous(),
            mask.unsqueeze(1),
            raster.depth.to(color.dtype).unsqueeze(1),
        )

    def antialias(self, image: Tensor, raster: Raster | None, triangles: Tensor) -> Tensor:
        """Analytic silhouette antialiasing of a ``(B, H, W, C)`` image made from ``raster``; backend-specific.

        Raises:
            NotImplementedError: when :attr:`supports_antialias` is false (the CPU backend).
        """
        raise NotImplementedError(
            f"the {self.name!r} renderer has no analytic antialiasing; render at a higher resolution and "
            "box-downsample instead (facerecon.render.overlay does)"
        )

    def warmup(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Do one-off start-up work (JIT compilation, context creation) so the first request is fast."""


# ----------------------------------------------------------------------------------------------------------------
# Validation, shared by the backends.


def check_vertices(vertices_cam: Tensor, device: torch.device, backend: str) -> None:
    """Reject anything but a ``(B, N, 3)`` floating tensor on ``device``."""
    if not isinstance(vertices_cam, Tensor):
        raise TypeError(f"vertices_cam must be a torch.Tensor, got {type(vertices_cam).__name__}")
    if vertices_cam.ndim != 3 or vertices_cam.shape[-1] != 3:
        raise ValueError(f"vertices_cam must be (B, N, 3) camera-space (x, y, d), got {tuple(vertices_cam.shape)}")
    if vertices_cam.shape[0] == 0 or vertices_cam.shape[1] == 0:
        raise ValueError(f"vertices_cam must have B >= 1 and N >= 1, got {tuple(vertices_cam.shape)}")
    if not vertices_cam.is_floating_point():
        raise TypeError(f"vertices_cam must be floating point (float32), got {vertices_cam.dtype}")
    _check_device(vertices_cam, device, backend, "vertices_cam")


def check_triangles(triangles: Tensor, device: torch.device, backend: str) -> None:
    """Reject anything but a ``(F, 3)`` int64 tensor on ``device`` (index range is checked by the backend)."""
    if not isinstance(triangles, Tensor):
        raise TypeError(f"triangles must be a torch.Tensor, got {type(triangles).__name__}")
    if triangles.ndim != 2 or triangles.shape[1] != 3:
        raise ValueError(f"triangles must be (F, 3), got {tuple(triangles.shape)}")
    if triangles.dtype != torch.int64:
        raise TypeError(f"triangles must be int64, got {triangles.dtype}")
    _check_device(triangles, device, backend, "triangles")


def check_attributes(attributes: Tensor, raster: Raster, device: torch.device, backend: str) -> None:
    """Reject attributes that are not ``(B, N, C)``/``(1, N, C)`` floats matching ``raster`` on ``device``."""
    if not isinstance(attributes, Tensor):
        raise TypeError(f"attributes must be a torch.Tensor, got {type(attributes).__name__}")
    if attributes.ndim != 3:
        raise ValueError(f"attributes must be (B, N, C), got {tuple(attributes.shape)}")
    b, n, _ = attributes.shape
    if b not in (1, raster.batch_size) or n != raster.num_vertices:
        batch = "1" if raster.batch_size == 1 else f"{raster.batch_size} or 1"
        raise ValueError(
            f"attributes must be ({batch}, {raster.num_vertices}, C) to match the raster, got {tuple(attributes.shape)}"
        )
    if not attributes.is_floating_point():
        raise TypeError(f"attributes must be floating point, got {attributes.dtype}")
    _check_device(attributes, device, backend, "attributes")
    if raster.backend != backend:
        raise ValueError(f"the raster was made by the {raster.backend!r} renderer, not {backend!r}")


def check_intrinsics(intrinsics: Intrinsics) -> None:
    """Reject non-positive image sizes and zero focal lengths."""
    if not isinstance(intrinsics, Intrinsics):
        raise TypeError(f"intrinsics must be facerecon.geometry.Intrinsics, got {type(intrinsics).__name__}")
    if int(intrinsics.width) <= 0 or int(intrinsics.height) <= 0:
        raise ValueError(f"image size must be positive, got {intrinsics.width} x {intrinsics.height}")
    if intrinsics.fx == 0 or intrinsics.fy == 0:
        raise ValueError(f"focal lengths must be non-zero, got fx={intrinsics.fx}, fy={intrinsics.fy}")


def check_clip_range(znear: float, zfar: float) -> None:
    """Require ``0 < znear < zfar``."""
    if not (0.0 < znear < zfar):
        raise ValueError(f"need 0 < znear < zfar, got znear={znear}, zfar={zfar}")


def _check_device(tensor: Tensor, device: torch.device, backend: str, name: str) -> None:
    if tensor.device.type != device.type:
        raise ValueError(
            f"the {backend!r} renderer needs {name} on {device.type}, got a tensor on {tensor.device}; "
            f"move it with .to({device.type!r}) or pick another renderer"
        )


# ----------------------------------------------------------------------------------------------------------------
# Interpolation over the covered pixels (torch; differentiable).


def interpolate_covered(attributes: Tensor, raster: Raster, triangles: Tensor) -> Tensor:
    """``sum_i b_i A[v_i]`` at the covered pixels, scattered into a zero ``(B, H, W, C)`` image.

    Touches only the ``P`` covered pixels: one gather of ``(P, 3, C)`` attribute rows, a weighted sum and one
    scatter. Differentiable w.r.t. ``attributes`` (gather) and ``raster.barycentrics`` (hence the positions).

    Args:
        attributes: ``(B, N, C)`` or ``(1, N, C)``, validated by the caller.
        raster: the raster.
        triangles: ``(F, 3)`` int64.

    Returns:
        ``(B, H, W, C)``, dtype of ``attributes``.
    """
    pixels, batch, vertices, bary = raster.covered(triangles)
    b_attr, n, c = attributes.shape
    index = vertices if b_attr == 1 else vertices + (batch * n).unsqueeze(1)
    rows = attributes.reshape(-1, c).index_select(0, index.reshape(-1)).view(-1, 3, c)
    values = torch.einsum("pk,pkc->pc", bary.to(attributes.dtype), rows) if c > 4 else _weighted_sum(bary, rows)
    out = attributes.new_zeros(raster.batch_size * raster.height * raster.width, c)
    out = out.index_copy(0, pixels, values)
    return out.view(raster.batch_size, raster.height, raster.width, c)


def _weighted_sum(bary: Tensor, rows: Tensor) -> Tensor:
    """``(P, 3) x (P, 3, C) -> (P, C)`` as three fused multiply-adds (faster than einsum for small C)."""
    bary = bary.to(rows.dtype)
    return rows[:, 0] * bary[:, 0:1] + rows[:, 1] * bary[:, 1:2] + rows[:, 2] * bary[:, 2:3]
