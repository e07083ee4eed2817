"""R-Net: the coefficient regressor (reference.md section 7).

Input (exactly as the reference PyTorch code, "PT"): ``image`` ``(B, 3, 224, 224)`` float32, **RGB** channel order,
values = 8-bit pixel / 255 in [0, 1], **no** mean/std normalisation, the 224x224 crop of the reference alignment
(reference.md section 6). BGR or 0-255 input (the TF reference's convention) gives garbage, silently: convert first.

Architecture: a trunk (:mod:`facerecon.nets.resnet`: ResNet-50 in the reference, ResNet-18 for a CPU-trainable
net; or the pretrained face-mesh network, :mod:`facerecon.nets.meshnet`, the CPU default) whose pooled
``(B, C, 1, 1)`` features feed seven separate 1x1 convs with bias, sized by the face model's
:class:`~facerecon.coefficients.CoefficientLayout`: id, exp, tex, angle (3), gamma (27), trans xy (2), trans z (1),
concatenated in that order -> ``(B, layout.total)``. Module names (``backbone.*``, ``final_layers.{0..6}``) are the
reference's, so the official checkpoint maps one to one (:mod:`facerecon.nets.checkpoint`). All head weights and
biases start at zero, so a fresh R-Net predicts the mean face (neutral, frontal, at the origin, ambient light).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facerecon.coefficients import CoefficientLayout, Coefficients
from facerecon.nets.cards import INPUT_SIZE
from facerecon.nets.resnet import build_backbone

__all__ = ["INPUT_SIZE", "ReconNet", "check_image", "head_sizes"]



def head_sizes(layout: CoefficientLayout) -> tuple[int, ...]:
    """Output sizes of the seven heads in order: id, exp, tex, angle, gamma, trans xy, trans z."""
    return (layout.id, layout.exp, layout.tex, layout.angle, layout.gamma, 2, 1)


def check_image(image: Tensor) -> None:
    """Reject anything but a float ``(B, 3, 224, 224)`` tensor (skipped while tracing for export)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return
    if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"expected an RGB image batch (B, 3, {INPUT_SIZE}, {INPUT_SIZE}), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"expected float RGB in [0, 1] (pixel / 255), got dtype {image.dtype}")


class ReconNet(nn.Module):
    """ResNet trunk + seven zero-initialised 1x1-conv heads.

    Args:
        layout: the face model's coefficient layout (fixes the head sizes; ``layout.total`` outputs).
        backbone: ``"resnet50"`` (the reference), ``"resnet34"``, ``"resnet18"``, or ``"facemesh"``
            (:class:`facerecon.nets.meshnet.MeshTrunk`: MediaPipe's pretrained face-mesh network, at 192 px).
        trunk_size: side (px) at which the trunk sees the 224 input (default 224 = the reference, nothing changes).
            A smaller value (e.g. 112 for a CPU-trained net) resizes inside the network, so the input stays the
            224 crop: an exact divisor of 224 uses average pooling, anything else bilinear resampling.

    Attributes:
        layout, backbone_name, feature_dim (2048 for ResNet-50, 512 for ResNet-18/34 and the face mesh), trunk_size.
    """

    def __init__(self, layout: CoefficientLayout, backbone: str = "resnet50", *, trunk_size: int = INPUT_SIZE) -> None:
        super().__init__()
        if not 32 <= int(trunk_size) <= INPUT_SIZE:
            raise ValueError(f"trunk_size must lie in [32, {INPUT_SIZE}], got {trunk_size}")
        self.layout = layout
        self.backbone_name = backbone
        self.trunk_size = int(trunk_size)
        self.backbone: nn.Module
        if backbone == "facemesh":
            from facerecon.nets.meshnet import MESH_INPUT, MeshTrunk

            if self.trunk_size != MESH_INPUT:
                raise ValueError(f"the facemesh trunk needs trunk_size={MESH_INPUT}, got {trunk_size}")
            self.backbone = MeshTrunk()
        else:
            self.backbone = build_backbone(backbone)
        self.feature_dim: int = self.backbone.feature_dim
        self.final_layers = nn.ModuleList(
            nn.Conv2d(self.feature_dim, k, kernel_size=1, bias=True) for k in head_sizes(layout)
        )
        self.zero_heads()

    def zero_heads(self) -> None:
        """Set every head weight and bias to zero (the reference's initialisation: the mean face)."""
        with torch.no_grad():
            for head in self.final_layers:
                head.weight.zero_()
                head.bias.zero_()

    def _resize(self, image: Tensor) -> Tensor:
        """``(B, 3, 224, 224)`` -> ``(B, 3, trunk_size, trunk_size)`` (identity at the default 224)."""
        if self.trunk_size == INPUT_SIZE:
            return image
        if INPUT_SIZE % self.trunk_size == 0:
            return F.avg_pool2d(image, INPUT_SIZE // self.trunk_size)
        return F.interpolate(image, size=(self.trunk_size, self.trunk_size), mode="bilinear", align_corners=False)

    def forward_with_features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``image (B, 3, 224, 224)`` float32 RGB [0, 1] -> ``(coeffs (B, layout.total), features (B, C))`` float32.

        ``features`` are the trunk's globally pooled activations (what the C-Net takes besides the image).
        """
        check_image(image)
        pooled = self.backbone(self._resize(image))  # (B, C, 1, 1)
        coeffs = torch.cat([head(pooled) for head in self.final_layers], dim=1)
        return torch.flatten(coeffs, 1), torch.flatten(pooled, 1)

    def forward(self, image: Tensor) -> Tensor:
        """``image (B, 3, 224, 224)`` float32 RGB [0, 1] -> ``coeffs (B, layout.total)`` float32."""
        return self.forward_with_features(image)[0]

    def predict(self, image: Tensor) -> Coefficients:
        """Named coefficients for ``image (B, 3, 224, 224)`` (no gradient; the caller chooses eval/train mode)."""
        with torch.no_grad():
            return Coefficients.from_vector(self(image), self.layout)
