"""The paper's hybrid loss, assembled once, for test-time fitting and for training (R-Net and C-Net).

``total = w_photo L_photo + w_lm L_lm + w_coef L_coef + w_refl L_refl + w_gamma L_gamma + w_feat L_feat``
(:class:`facerecon.losses.LossWeights`, the reference's weights): skin-attention photometric loss inside the
rendered face region, weighted 68-landmark loss, coefficient prior, albedo flatness, gamma (monochrome light)
prior, and the perceptual loss when a face descriptor is given. The terms are :mod:`facerecon.losses`' functions;
this module only renders and composes them.

The **photometric region** is a named argument, because fitting and training use different ones on purpose:

* ``"face_mask"`` (test-time fitting): the whole mesh is rasterised (so the head, ears and neck occlude correctly)
  and pixels where the model's photometric ``face_mask`` covers more than half are scored: what is visible of the
  face region in the photo.
* ``"front"`` (training, as the reference's ``front_face_buf`` render): only the front-face triangles are rendered
  and their coverage is the region (cheaper; the reference R-Net's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from facerecon import losses
from facerecon.coefficients import Coefficients
from facerecon.decoder import FaceDecoder
from facerecon.render.base import Renderer

__all__ = ["CROP", "Region", "Terms", "crop_to_pixels", "hybrid_terms", "landmark_terms"]

#: Side of the aligned crop the targets live in (px).
CROP = 224

Region = Literal["face_mask", "front"]


@dataclass
class Terms:
    """Each loss term (scalars) of a batch, and the render it came from (``None`` for landmark-only terms).

    Attributes:
        render: ``(B, 3, S, S)`` the rendered colours inside the region, black outside; mask: ``(B, 1, S, S)``.
    """

    landmark: Tensor
    coef: Tensor
    gamma: Tensor
    photo: Tensor
    reflectance: Tensor
    perceptual: Tensor
    render: Tensor | None = None
    mask: Tensor | None = None

    def total(self, w: losses.LossWeights | None = None) -> Tensor:
        """The weighted sum (terms that were not computed are zero)."""
        w = w or losses.LossWeights()
        return (w.photo * self.photo + w.landmark * self.landmark + w.coef * self.coef
                + w.reflectance * self.reflectance + w.gamma * self.gamma + w.perceptual * self.perceptual)


def crop_to_pixels(lm: Tensor, size: int) -> Tensor:
    """Crop landmarks ``(B, 68, 2)`` (u, v_up at 224, integer = pixel centre) -> pixel ``(x, y)`` y down in an image
    of ``size`` px covering the same crop (``size / 224`` scale; pixel centres kept consistent)."""
    f = size / CROP
    x = (lm[..., 0] + 0.5) * f - 0.5
    y = ((CROP - 1) - lm[..., 1] + 0.5) * f - 0.5
    return torch.stack([x, y], dim=-1)


def landmark_terms(decoder: FaceDecoder, coeffs: Coefficients, lm_target: Tensor,
                   lm_weights: Tensor | None = None, w: losses.LossWeights | None = None) -> Terms:
    """Landmark loss and coefficient prior only (decodes the 68 landmark vertices, no render): the fit's first
    stage. ``lm_target``: ``(B, 68, 2)`` crop px, y up."""
    w = w or losses.LossWeights()
    zero = lm_target.new_zeros(())
    return Terms(
        landmark=losses.landmark_loss(decoder.landmarks(coeffs), lm_target, lm_weights),
        coef=losses.coefficient_loss(coeffs.id, coeffs.exp, coeffs.tex, w),
        gamma=zero, photo=zero, reflectance=zero, perceptual=zero,
    )


def hybrid_terms(
    decoder: FaceDecoder,
    renderer: Renderer,
    coeffs: Coefficients,
    image: Tensor,
    skin: Tensor,
    lm_target: Tensor,
    *,
    region: Region,
    lm_weights: Tensor | None = None,
    size: int = CROP,
    descriptor: torch.nn.Module | None = None,
    w: losses.LossWeights | None = None,
) -> Terms:
    """Every term of the hybrid loss for a batch of ``B`` crops rendered with ``coeffs``.

    Args:
        image: ``(B, 3, 224, 224)`` in [0, 1]; skin: ``(B, 1, 224, 224)`` skin attention; lm_target: ``(B, 68, 2)``
            crop px, y up.
        region: the photometric region (module docstring).
        lm_weights: ``(68,)`` or ``(B, 68)`` per face, or None for the reference weights.
        size: render side (px); the photo and skin map are average-pooled to it when smaller than 224.
        descriptor: a face descriptor (``embed_faces(images, landmarks_px)``) for the perceptual term, or None.
    """
    w = w or losses.LossWeights()
    model = decoder.model
    face = decoder(coeffs)
    k = CROP // size
    photo = F.avg_pool2d(image, k) if k > 1 else image
    sk = F.avg_pool2d(skin, k) if k > 1 else skin
    intr = decoder.camera.intrinsics.scaled(size / CROP) if size != CROP else decoder.camera.intrinsics
    if region == "front":
        tris = model.front_triangles
        raster = renderer.rasterize(face.vertices_cam, tris, intr)
        render = renderer.interpolate(face.colors, raster, tris).permute(0, 3, 1, 2)
        mask = (raster.triangle_id >= 0)[:, None].to(render.dtype)
    elif region == "face_mask":
        tris = model.triangles
        raster = renderer.rasterize(face.vertices_cam, tris, intr)
        render = renderer.interpolate(face.colors, raster, tris).permute(0, 3, 1, 2)
        area = model.face_mask.to(render.dtype)[None, :, None]  # (1, N, 1)
        with torch.no_grad():
            mask = (renderer.interpolate(area, raster, tris) > 0.5).permute(0, 3, 1, 2).to(render.dtype)
    else:
        raise ValueError(f"unknown photometric region {region!r}; use 'face_mask' or 'front'")
    render = render * mask
    if descriptor is not None:
        with torch.no_grad():
            f_photo = descriptor.embed_faces(photo, crop_to_pixels(lm_target, size))
        f_render = descriptor.embed_faces(render.clamp(0, 1), crop_to_pixels(face.landmarks_2d, size))
        per = losses.perceptual_loss(f_photo, f_render)
    else:
        per = render.new_zeros(())
    return Terms(
        landmark=losses.landmark_loss(face.landmarks_2d, lm_target, lm_weights),
        coef=losses.coefficient_loss(coeffs.id, coeffs.exp, coeffs.tex, w),
        gamma=losses.gamma_loss(coeffs.gamma),
        photo=losses.photometric_loss(render, photo, sk * mask),
        reflectance=losses.reflectance_loss(face.albedo, model.skin_mask),
        perceptual=per,
        render=render,
        mask=mask,
    )
