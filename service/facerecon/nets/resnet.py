"""ResNet-18/34/50 trunks (He et al. 2016, torchvision's "v1.5": the stride of a bottleneck sits on its 3x3 conv).

Written here because torchvision does not import beside the CPU torch build this project pins. Module names are
exactly torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` / ``.1``, ...), so a
torchvision state dict loads with ``strict=True`` once its ``fc.*`` keys are dropped (:func:`load_torchvision_weights`).
There is no ``fc``: :meth:`ResNet.forward` returns the global-average-pooled features ``(B, C, 1, 1)``, as the
reference R-Net keeps them before its 1x1-conv heads (reference.md section 7).

Initialisation follows torchvision (Kaiming-normal fan-out convs, BN weight 1 / bias 0, ``zero_init_residual=False``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from facerecon.errors import ModelFileError

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_backbone",
    "load_torchvision_weights",
    "resnet18",
    "resnet34",
    "resnet50",
]

log = logging.getLogger(__name__)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first carries the stride."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: v1.5) -> 1x1 with 4x expansion (ResNet-50)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk without ``fc``.

    ``forward(x)``: ``(B, 3, H, W)`` float32 -> ``(B, feature_dim, 1, 1)`` float32 (global average pool), where
    ``feature_dim`` = 512 (ResNet-18/34) or 2048 (ResNet-50). The trunk itself knows nothing about input scaling;
    the R-Net feeds it RGB in [0, 1] (see :mod:`facerecon.nets.rnet`).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet34() -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3))


def resnet50() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3))


#: Backbone name -> constructor.
BACKBONES = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


def build_backbone(name: str) -> ResNet:
    """A freshly initialised trunk by name (``resnet18``, ``resnet34`` or ``resnet50``)."""
    try:
        return BACKBONES[name]()
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def load_torchvision_weights(backbone: ResNet, path: Path) -> None:
    """Load a torchvision ImageNet checkpoint (e.g. ``resnet50-0676ba61.pth``) into ``backbone``, dropping ``fc.*``.

    The file is read with ``weights_only=True`` (no pickle code runs). Raises :class:`ModelFileError` when the file
    is missing, unreadable or its keys/shapes do not match the trunk.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ImageNet weights {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise ModelFileError(f"ImageNet weights {path} are unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(sd, dict):
        raise ModelFileError(f"ImageNet weights {path} hold a {type(sd).__name__}, not a state dict")
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad_shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shapes:
        raise ModelFileError(
            f"ImageNet weights {path} do not fit this trunk: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {bad_shapes[:5]}"
        )
    backbone.load_state_dict(sd, strict=True)
    log.info("loaded torchvision weights %s (%d tensors)", path.name, len(sd))
