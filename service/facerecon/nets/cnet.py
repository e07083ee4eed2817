"""C-Net: per-image confidences for aggregating identity (and albedo) over an image set (reference.md section 13).

For a set of photos of one person, R-Net gives per-image coefficients; the C-Net gives each image a positive
confidence per identity and per albedo coefficient, and the set's identity is the element-wise weighted mean
``a_agg = (sum_j c_j * a_j) / (sum_j c_j)`` (:func:`aggregate`). Pose, expression and lighting stay per image.

Network (light-weight; the paper gives no architecture and no code is public): the R-Net input image
``(B, 3, 224, 224)`` RGB [0, 1] is average-pooled 4x4 to 56x56 and goes through three stride-2 3x3 convs with ReLU
(width w, 2w, 4w) and a global average pool; R-Net's pooled features ``(B, C)`` go through a linear layer + ReLU;
both are concatenated and an MLP (one hidden layer) gives one logit per identity and albedo coefficient. The last
layer is zero-initialised (weights and bias), and the confidence is ``exp(L * tanh(logit / L))`` (``L`` =
``max_log_conf``, bounding the ratio between two confidences by ``exp(2L)``), so an untrained C-Net gives every
confidence exactly 1 and :func:`aggregate` is exactly mean pooling, the paper's starting point and the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facerecon.coefficients import CoefficientLayout, Coefficients
from facerecon.nets.rnet import check_image

__all__ = ["ConfidenceNet", "aggregate", "aggregate_set"]


class ConfidenceNet(nn.Module):
    """Confidences for the identity and albedo coefficients of one image.

    Args:
        layout: the face model's coefficient layout (``layout.id`` + ``layout.tex`` outputs).
        feature_dim: size of the R-Net's pooled features (2048 ResNet-50, 512 ResNet-18).
        width: channels of the first conv (then 2x, 4x).
        hidden: width of the feature projection and of the MLP's hidden layer.
        max_log_conf: ``L`` above; confidences lie in ``(exp(-L), exp(L))``.
    """

    def __init__(
        self,
        layout: CoefficientLayout,
        feature_dim: int,
        *,
        width: int = 16,
        hidden: int = 128,
        max_log_conf: float = 8.0,
    ) -> None:
        super().__init__()
        if max_log_conf <= 0:
            raise ValueError("max_log_conf must be positive")
        self.layout = layout
        self.feature_dim = feature_dim
        self.max_log_conf = float(max_log_conf)
        self.image_branch = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.feature_branch = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(4 * width + hidden, hidden), nn.ReLU(inplace=True))
        self.final_layer = nn.Linear(hidden, layout.id + layout.tex)
        with torch.no_grad():
            self.final_layer.weight.zero_()
            self.final_layer.bias.zero_()

    def forward(self, image: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """``image (B, 3, 224, 224)`` float32 RGB [0, 1], ``features (B, feature_dim)`` float32 ->
        ``(conf_id (B, layout.id), conf_tex (B, layout.tex))`` float32, strictly positive."""
        check_image(image)
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()) and (
            features.ndim != 2 or features.shape != (image.shape[0], self.feature_dim)
        ):
            raise ValueError(f"expected features ({image.shape[0]}, {self.feature_dim}), got {tuple(features.shape)}")
        small = F.avg_pool2d(image, kernel_size=4)  # (B, 3, 56, 56)
        hidden = self.head(torch.cat([self.image_branch(small), self.feature_branch(features)], dim=1))
        bound = self.max_log_conf
        conf = torch.exp(bound * torch.tanh(self.final_layer(hidden) / bound))
        return conf[:, : self.layout.id], conf[:, self.layout.id :]


def aggregate(id: Tensor, tex: Tensor, conf_id: Tensor, conf_tex: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence-weighted element-wise mean over a set of ``B`` images of one person.

    Args:
        id: ``(B, K_id)`` identity coefficients; tex: ``(B, K_tex)`` albedo coefficients.
        conf_id: ``(B, K_id)``, conf_tex: ``(B, K_tex)`` positive confidences (all equal = plain mean).

    Returns:
        ``(id_agg (K_id,), tex_agg (K_tex,))``: ``sum_j c_j * a_j / sum_j c_j`` per coefficient. Invariant to the
        order of the set (up to float rounding of the sums); differentiable in every input.
    """
    for name, a, c in (("id", id, conf_id), ("tex", tex, conf_tex)):
        if a.ndim != 2 or a.shape != c.shape or a.shape[0] == 0:
            raise ValueError(
                f"{name} and its confidences must be one non-empty (B, K) shape, got "
                f"{tuple(a.shape)} and {tuple(c.shape)}"
            )
    id_agg = (conf_id * id).sum(dim=0) / conf_id.sum(dim=0)
    tex_agg = (conf_tex * tex).sum(dim=0) / conf_tex.sum(dim=0)
    return id_agg, tex_agg


def aggregate_set(coeffs: Coefficients, conf_id: Tensor, conf_tex: Tensor, *, albedo: bool = True) -> Coefficients:
    """Per-image coefficients of a set with ``id`` (and ``tex`` when ``albedo``) replaced by the set's aggregate.

    ``coeffs`` is a batch of ``B`` images of one person; ``conf_id (B, K_id)``, ``conf_tex (B, K_tex)`` from the
    C-Net (or ``torch.ones`` for the mean-pooling baseline). Expression, pose, lighting stay per image.
    """
    id_agg, tex_agg = aggregate(coeffs.id, coeffs.tex, conf_id, conf_tex)
    b = coeffs.batch_size
    return Coefficients(
        id=id_agg.expand(b, -1).clone(),
        exp=coeffs.exp,
        tex=tex_agg.expand(b, -1).clone() if albedo else coeffs.tex,
        angle=coeffs.angle,
        gamma=coeffs.gamma,
        trans=coeffs.trans,
    )
