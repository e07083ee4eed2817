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


@torch.no_grad()
def load_rnet_onnx_weights(net: ReconNet, onnx_path: Path, *, check: bool = True) -> None:
    """Load an exported R-Net's weights (``models/<name>/rnet.onnx``, fp16 or fp32) into ``net``, so that training
    continues from the shipped network on a machine without the run's checkpoint.

    The exporter keeps the parameter names (``net.<state-dict key>``, ``__fp16`` appended where stored in half
    precision), except the PReLU slopes, which it folds into
    the ``Mul`` of ``relu(x) + slope * min(x, 0)`` under generated names: those are matched in execution order
    (the order of the graph's nodes, which is the order of the trunk's nodes and then the projection's). With
    ``check``, the loaded network must reproduce the ONNX file's outputs on a random batch (within fp16 rounding),
    else ValueError.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = net.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key in state:
        for name in (f"net.{key}", f"net.{key}__fp16"):  # the fp16 file keeps large weights as <name>__fp16
            if name in values:
                loaded[key] = torch.from_numpy(values[name].astype(np.float32))
    slopes = [k for k in state if k not in loaded]

    def order(key: str) -> tuple[int, int]:  # trunk slopes p_slope_<node index> first, then the projection's
        tail = key.rsplit("_", 1)[-1]
        return (0, int(tail)) if "p_slope_" in key else (1, 0)

    slopes.sort(key=order)
    cast = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}  # fp16 files cast on use
    used: list[str] = []
    for node in graph.node:
        if node.op_type == "Mul":
            ins = [cast.get(n, n) for n in node.input]
            used += [n for n in ins if n in values and not n.startswith("net.") and n not in used]
    if len(used) != len(slopes):
        raise ValueError(f"{onnx_path}: {len(slopes)} PReLU slopes in the network, {len(used)} in the file")
    for key, name in zip(slopes, used, strict=True):
        v = torch.from_numpy(values[name].astype(np.float32)).reshape(state[key].shape)
        loaded[key] = v
    state.update(loaded)
    net.load_state_dict(state)
    if check:
        import onnxruntime as ort

        x = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        ref = sess.run(["coeffs"], {sess.get_inputs()[0].name: x})[0]
        was = net.training
        out = net.eval()(torch.from_numpy(x)).numpy()
        net.train(was)
        err = float(np.abs(out - ref).max())
        if err > 2e-2 * max(1.0, float(np.abs(ref).max())):
            raise ValueError(f"{onnx_path}: the loaded weights differ from the file's network by {err:.3g}")
        log.info("R-Net weights from %s (max difference to onnxruntime %.2g)", onnx_path, err)


def average_runs(runs: list[Path], weights: list[float], out: Path) -> Path:
    """A run whose R-Net is the weighted mean, weight for weight, of the runs' R-Nets (a "model soup": runs that
    continue one another from the same weights, e.g. a stage and the stage it started from, average into a network
    that keeps most of both; Wortsman et al., "Model soups", ICML 2022). ``out`` gets the checkpoint (no optimiser
    state), the last run's config (with ``out`` set) and losses; returns the checkpoint path.

    Raises:
        ValueError: weights that do not match the runs or do not sum to 1, or runs with different networks.
    """
    import shutil

    if len(runs) != len(weights) or len(runs) < 2 or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"need >= 2 runs and as many weights summing to 1, got {len(runs)} runs, {weights}")
    states = [load_checkpoint(Path(r) / CHECKPOINT) for r in runs]
    keys = set(states[0]["model"])
    if any(set(s["model"]) != keys for s in states[1:]):
        raise ValueError("the runs' networks differ (state-dict keys)")
    mean: dict[str, torch.Tensor] = {}
    for k, v in states[-1]["model"].items():
        if v.is_floating_point():
            mean[k] = sum(w * s["model"][k].float() for w, s in zip(weights, states, strict=True)).to(v.dtype)
        else:
            mean[k] = v
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    last = Path(runs[-1])
    cfg = json.loads((last / "config.json").read_text())
    cfg["out"] = str(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("losses.csv", "split.json"):
        if (last / f).is_file():
            shutil.copy(last / f, out / f)
    torch.save({"model": mean, "optimizer": {}, "step": int(states[-1]["step"]),
                "averaged": {"runs": [str(r) for r in runs], "weights": list(weights)}}, out / CHECKPOINT)
    log.info("averaged %s with weights %s into %s", [str(r) for r in runs], weights, out)
    return out / CHECKPOINT
