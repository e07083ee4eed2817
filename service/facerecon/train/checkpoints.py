"""Training checkpoints (state dicts, read with ``weights_only=True``) and rebuilding the networks of a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from facerecon.coefficients import CoefficientLayout
from facerecon.facemodel import FaceModel
from facerecon.facemodel.registry import resolve
from facerecon.nets.cnet import ConfidenceNet
from facerecon.nets.rnet import ReconNet
from facerecon.train.config import CHECKPOINT, CNET_CHECKPOINT, RNetConfig

log = logging.getLogger(__name__)


def save_checkpoint(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None) -> None:
    """State dicts + step (+ plain extras) via ``torch.save``; atomic replace."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": int(step), **(extra or {})}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers only, no pickle of code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def build_rnet(layout: CoefficientLayout, cfg: RNetConfig) -> ReconNet:
    return ReconNet(layout, backbone=cfg.backbone, trunk_size=cfg.trunk_size)


def load_rnet(run_dir: Path, device: torch.device | str = "cpu") -> tuple[ReconNet, RNetConfig, FaceModel, int]:
    """The trained R-Net of a run (eval mode), its config, its face model and its step count."""
    run_dir = Path(run_dir)
    cfg = RNetConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = FaceModel.from_file(resolve(Path(cfg.models_dir), cfg.face_model), device=device)
    net = build_rnet(model.layout, cfg)
    state = load_checkpoint(run_dir / CHECKPOINT)
    net.load_state_dict(state["model"])
    return net.to(device).eval(), cfg, model, int(state["step"])


@torch.no_grad()
def load_cnet(run_dir: Path, feature_dim: int, layout: CoefficientLayout) -> tuple[ConfidenceNet, int]:
    """The trained C-Net of a run (eval mode) and its step count."""
    state = load_checkpoint(Path(run_dir) / CNET_CHECKPOINT)
    net = ConfidenceNet(layout, feature_dim)
    net.load_state_dict(state["model"])
    return net.eval(), int(state["step"])
