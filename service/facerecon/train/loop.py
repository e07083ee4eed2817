"""Weakly-supervised training of the R-Net (and the C-Net) with the paper's hybrid loss.

R-Net (:func:`train_rnet`): each batch mixes synthetic photos rendered from the face model (true coefficients known:
a coefficient-supervision term + the landmark loss) and real photos (landmark loss with the reference weights and
the coefficient / gamma regularisers on all of them; for ``photo_per_batch`` of them also the skin-attention
photometric loss through the differentiable renderer, the albedo-flatness loss, and the perceptual loss with the
:class:`~facerecon.train.face_descriptor.FaceDescriptor` on the photo vs the render, black outside its mask). Weights
are :class:`facerecon.losses.LossWeights` (the reference's). The reference PT augmentation (shift/scale/rotation/
flip with 68-point mirror re-indexing) is applied to real photos.

Run directory ``RUN_DIR``: ``config.json``, ``split.json`` (validation photos), ``checkpoint.pt`` (state dicts only,
``torch.save``, read back with ``weights_only=True``), ``losses.csv`` (one row per step), ``val.csv`` and
``val/step_XXXXXX.png`` (validation renders). Determinism: every random draw of step ``k`` comes from generators
seeded with ``(seed, k)``, so a resumed run draws exactly what an uninterrupted one would.

C-Net (:func:`train_cnet`): R-Net frozen; sets of 2-4 photos of one person (LFW); the C-Net starts as exact mean
pooling (zero last layer); the loss is the hybrid loss of each image rendered with the set's aggregated identity.

Devices: CUDA (nvdiffrast renderer, mixed precision for the trunk) when available, else CPU (numba renderer).

The code lives in :mod:`.config`, :mod:`.checkpoints`, :mod:`.rnet` and :mod:`.cnet` (the loss in
:mod:`facerecon.objective`); this module gathers the names callers use.
"""

from __future__ import annotations

from facerecon.train.checkpoints import build_rnet, load_checkpoint, load_cnet, load_rnet, save_checkpoint
from facerecon.train.cnet import set_loss, train_cnet
from facerecon.train.config import (
    CHECKPOINT,
    CNET_CHECKPOINT,
    SUPERVISION_SCALES,
    CNetConfig,
    RNetConfig,
    lr_at,
)
from facerecon.train.rnet import (
    RunData,
    landmark_errors,
    predict,
    prepare_data,
    save_overlays,
    supervision_loss,
    train_rnet,
    validate,
)

__all__ = [
    "CHECKPOINT",
    "CNET_CHECKPOINT",
    "SUPERVISION_SCALES",
    "CNetConfig",
    "RNetConfig",
    "RunData",
    "build_rnet",
    "landmark_errors",
    "load_checkpoint",
    "load_cnet",
    "load_rnet",
    "lr_at",
    "predict",
    "prepare_data",
    "save_checkpoint",
    "save_overlays",
    "set_loss",
    "supervision_loss",
    "train_cnet",
    "train_rnet",
    "validate",
]
