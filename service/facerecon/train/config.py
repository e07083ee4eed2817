"""Training run configurations (R-Net, C-Net), the learning-rate schedule and deterministic seeding."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from facerecon.config import resolve_device

log = logging.getLogger(__name__)


CHECKPOINT = "checkpoint.pt"
CNET_CHECKPOINT = "cnet_checkpoint.pt"


_C = TypeVar("_C")


def _from_known_fields(cls: type[_C], d: dict[str, Any]) -> _C:
    """A config dataclass from a saved dict, ignoring keys it no longer has (old run directories stay loadable)."""
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RNetConfig:
    """Everything a run needs; stored as ``RUN_DIR/config.json`` (a resumed run reads it back).

    Attributes (units): lr per Adam step, cosine-decayed to ``lr * lr_final`` after ``warmup`` linear steps;
    ``synthetic_fraction`` of every batch is synthetic; ``photo_per_batch`` real images per batch get the
    photometric + perceptual terms, rendered at ``render_size`` px; ``time_limit_s`` stops (with a checkpoint)
    after that many seconds of this process; held out (never trained on; ``val_max`` of them validate the run):
    :func:`facerecon.train.data.is_validation_photo`; synthetic poses reach ``synthetic_yaw_deg`` of yaw;
    ``synthetic_val`` held-out synthetic faces (their own seed) validate the pose and ``train eval`` reads them;
    ``large_pose`` training photos are turned to large yaw (:mod:`facerecon.train.large_pose`) and make up
    ``large_pose_fraction`` of every batch; ``init_from`` starts the network from another run's checkpoint (its
    weights only: a new optimiser and schedule); ``identity_pairs`` people with two photos each among every batch's
    real rows, their identity coefficients held together by
    :func:`facerecon.train.rnet.identity_contrast_loss` (weight ``identity_weight``, ``identity_temperature``);
    ``anchor_weight`` (needs ``init_from``) keeps the real rows' 68 projected landmarks near the starting network's
    own (a frozen copy predicts them), in units of the landmark term, so that the other terms (identity) train
    without giving back landmark accuracy; ``manual_landmark_weight`` scales the landmark term of the photos with
    manual 68-point labels (HELEN train), whose points are the benchmark's convention; ``vertex_weight`` adds the
    dense vertex term on the rows with known coefficients (:func:`facerecon.train.rnet.vertex_loss`, cm^2);
    ``mesh_weight`` the dense face-mesh term on the real rows (:mod:`facerecon.train.mesh`), in units of the landmark
    term.
    """

    data: list[str]
    out: str
    val_data: list[str] = field(default_factory=list)
    face_model: str = "ict"
    models_dir: str = "models"
    steps: int = 1000
    batch: int = 16
    backbone: str = "facemesh"
    trunk_size: int = 192
    lr: float = 3e-4
    lr_final: float = 0.1
    warmup: int = 30
    synthetic: int = 3000
    synthetic_fraction: float = 0.5
    synthetic_only: bool = False
    synthetic_yaw_deg: float = 45.0
    synthetic_val: int = 200
    photo_per_batch: int = 2
    render_size: int = 112
    perceptual: bool = True
    coef_supervision: float = 0.1
    augment: bool = True
    val_max: int = 50
    val_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    cache_dir: str = ""
    max_real: int = 0
    time_limit_s: float = 0.0
    progress: bool = True
    large_pose: int = 0
    large_pose_fraction: float = 0.25
    init_from: str = ""
    identity_pairs: int = 0
    identity_weight: float = 0.02
    identity_temperature: float = 0.1
    anchor_weight: float = 0.0
    manual_landmark_weight: float = 1.0
    vertex_weight: float = 0.0
    mesh_weight: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RNetConfig:
        return _from_known_fields(cls, d)


#: Scale of each coefficient group in the synthetic sampler; the supervision term is the mean squared error of each
#: group divided by its scale squared, averaged over groups (so every group counts about equally).
SUPERVISION_SCALES = {"id": 0.9, "exp": 0.3, "tex": 0.8, "angle": 0.35, "gamma": 0.15, "trans": 0.15}


def _device(name: str) -> torch.device:
    return resolve_device(name)


def _rng(seed: int, step: int, stream: int) -> tuple[np.random.Generator, torch.Generator]:
    """Per-step generators (numpy, torch CPU) so that resuming reproduces the same draws."""
    np_rng = np.random.default_rng([seed, step, stream])
    return np_rng, torch.Generator().manual_seed(int(np_rng.integers(0, 2**62)))


def lr_at(step: int, cfg: RNetConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up then cosine decay to ``lr * lr_final`` at ``cfg.steps``, or earlier at ``cfg.time_limit_s``
    seconds (``elapsed_s`` of this process) when a time limit would stop the run first."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.time_limit_s > 0:
        t = max(t, min(1.0, elapsed_s / cfg.time_limit_s))
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class CNetConfig:
    """C-Net run: ``rnet_run`` is the R-Net run directory (frozen); sets of ``min_set``-``max_set`` photos of one
    person from ``data``; Adam ``lr`` (paper 2e-5; a short CPU run uses more); after training, ``eval_sets``
    held-out people's sets compare the C-Net with mean pooling (``cnet_eval.json``; 0 = skip)."""

    data: list[str]
    out: str
    rnet_run: str
    steps: int = 100
    lr: float = 1e-4
    min_set: int = 2
    max_set: int = 4
    render_size: int = 112
    perceptual: bool = True
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    cache_dir: str = ""
    max_photos: int = 0
    checkpoint_every: int = 25
    eval_sets: int = 100
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CNetConfig:
        return _from_known_fields(cls, d)


_F = TypeVar("_F", bound=Callable[..., Any])


def keeps_torch_threads(fn: _F) -> _F:
    """Run ``fn`` and give torch back the intra-op thread count it had: a training call may set its own
    (``cfg.threads``), but the process's engine relies on its setting (one thread makes reconstructions
    bit-reproducible; a set reconstructed after a 2-thread training run in the same process came out
    order-dependent)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]
