"""Import the official Deep3DFaceRecon_pytorch checkpoint (``epoch_20.pth``) and export it as ``rnet.onnx`` + card.

The checkpoint (reference.md section 8) is a dict ``{'net_recon': state_dict, 'opt_00': ..., 'sched_00': ...}``;
only ``net_recon`` is used. Its 332 keys (``backbone.*`` of a torchvision ResNet-50 without ``fc``, and
``final_layers.{0..6}.weight (k, 2048, 1, 1)`` / ``.bias (k,)`` with k = 80, 64, 80, 3, 27, 2, 1) are exactly the
names of :class:`~facerecon.nets.rnet.ReconNet` ``(BFM_LAYOUT, "resnet50")``, so the mapping is the identity (after
stripping a ``module.`` prefix, if a DDP-wrapped copy was saved). Every key and shape is checked; anything else is
a :class:`~facerecon.errors.ModelFileError` naming the offending keys.

The file is read with ``torch.load(..., weights_only=True)``: tensors, containers and numbers only, so a file that
carries arbitrary pickled objects (code) is refused instead of executed.

The weights' licence: the reference code is MIT, but the network was trained on research face datasets (CelebA,
LFW, 300W-LP, IJB-A, LS3D-W, FFHQ) against the Basel Face Model 2009, whose licence forbids commercial use and
redistribution; the exported card says so (``redistributable: false``).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facerecon.coefficients import BFM_LAYOUT
from facerecon.errors import ModelFileError
from facerecon.facemodel.format import sha256_file
from facerecon.facemodel.registry import FACE_MODEL_FILE
from facerecon.nets.cards import CardInfo, FaceModelRef, NetworkProvenance, face_model_ref
from facerecon.nets.onnx_io import export_rnet
from facerecon.nets.rnet import ReconNet, head_sizes

__all__ = [
    "OFFICIAL_N_KEYS",
    "OFFICIAL_N_PARAMS",
    "import_official",
    "load_official",
    "map_official_state_dict",
    "read_official_state_dict",
]

log = logging.getLogger(__name__)

OFFICIAL_N_KEYS = 332
OFFICIAL_N_PARAMS = 24_034_625
SOURCE_URL = "https://github.com/sicxu/Deep3DFaceRecon_pytorch"
SOURCE_COMMIT = "9167c7136aebef0c54d3ac74f4b0396222a491c1"
LICENCE_NOTICE = (
    "Network definition and training code: Deep3DFaceRecon_pytorch, Copyright (c) 2022 Sicheng Xu, MIT licence. "
    "The weights were trained by its authors on research face datasets (CelebA, LFW, 300W-LP, IJB-A, LS3D-W, FFHQ) "
    "against the Basel Face Model 2009 (BFM09, University of Basel; non-commercial research licence, no "
    "redistribution) and FaceWarehouse expression bases; their coefficients only have meaning with that BFM. "
    "Treat the weights as research / non-commercial use only and do not redistribute them."
)


def read_official_state_dict(ckpt: Path) -> dict[str, Tensor]:
    """The ``net_recon`` state dict of an official checkpoint, ``module.`` prefix stripped, float tensors as float32.

    Accepts the official dict (``{'net_recon': ..., 'opt_00': ..., 'sched_00': ...}``) or a bare state dict. Raises
    :class:`ModelFileError` for a missing or unreadable file, one carrying non-tensor objects (refused by
    ``weights_only=True``), or one without ``net_recon``.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise ModelFileError(f"checkpoint {ckpt} not found (download epoch_20.pth from {SOURCE_URL})")
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"checkpoint {ckpt} was refused by torch.load(weights_only=True): it holds objects other than tensors, "
            f"containers and numbers (possibly code), so it is not loaded. Details: {str(exc).splitlines()[0]}"
        ) from exc
    except Exception as exc:  # zip/EOF/runtime errors for truncated or foreign files
        raise ModelFileError(f"checkpoint {ckpt} is unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, Mapping) and "net_recon" in obj:
        sd = obj["net_recon"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelFileError(f"checkpoint {ckpt} has no 'net_recon' state dict (found {keys})")
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelFileError(f"checkpoint {ckpt}: 'net_recon' is not a state dict of tensors")
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = key.removeprefix("module.")
        out[name] = value.float() if value.is_floating_point() else value
    return out


def map_official_state_dict(sd: Mapping[str, Tensor], model: ReconNet) -> dict[str, Tensor]:
    """Check ``sd`` key by key and shape by shape against ``model`` (a BFM ResNet-50 ReconNet) and return it.

    Head weights stored as linear ``(k, 2048)`` are reshaped to ``(k, 2048, 1, 1)``. Raises
    :class:`ModelFileError` on a head layout other than 80/64/80/3/27/2/1 (257), missing or unexpected keys,
    wrong shapes or non-finite values.
    """
    want = model.state_dict()
    sd = dict(sd)
    sizes = head_sizes(model.layout)
    got_heads = []
    for i in range(len(sizes)):
        w = sd.get(f"final_layers.{i}.weight")
        got_heads.append(int(w.shape[0]) if w is not None and w.ndim >= 1 else None)
        if w is not None and w.ndim == 2:
            sd[f"final_layers.{i}.weight"] = w.reshape(*w.shape, 1, 1)
    extra_heads = sorted(
        k
        for k in sd
        if k.startswith("final_layers.") and not (k.split(".")[1].isdigit() and int(k.split(".")[1]) < len(sizes))
    )
    if tuple(got_heads) != sizes or extra_heads:
        total = sum(h or 0 for h in got_heads)
        raise ModelFileError(
            f"checkpoint heads are {got_heads} (total {total}{', plus ' + str(extra_heads) if extra_heads else ''}); "
            f"the BFM layout needs {list(sizes)} = {model.layout.total} coefficients (id, exp, tex, angle, gamma, "
            "trans xy, trans z). This is not a Deep3DFaceRecon BFM R-Net checkpoint."
        )
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ModelFileError(
            f"checkpoint does not match the reference R-Net (ResNet-50 + 7 heads): {len(missing)} missing keys "
            f"{missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}"
        )
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in want.items() if sd[k].shape != v.shape]
    if bad:
        raise ModelFileError(f"checkpoint has {len(bad)} tensors of the wrong shape: {bad[:6]}")
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ModelFileError(f"checkpoint has non-finite values in {nonfinite[:6]}")
    return {k: sd[k].to(want[k].dtype) for k in want}


def load_official(ckpt: Path) -> ReconNet:
    """The official checkpoint as a ``ReconNet(BFM_LAYOUT, "resnet50")`` in eval mode."""
    sd = read_official_state_dict(ckpt)
    if len(sd) != OFFICIAL_N_KEYS:
        log.warning("checkpoint %s has %d keys, the official one %d", ckpt, len(sd), OFFICIAL_N_KEYS)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = ReconNet(BFM_LAYOUT, "resnet50")
    model.load_state_dict(map_official_state_dict(sd, model), strict=True, assign=True)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != OFFICIAL_N_PARAMS:  # cannot happen after the shape checks; kept as a guard
        raise ModelFileError(f"checkpoint gives {n_params} parameters, the official R-Net has {OFFICIAL_N_PARAMS}")
    return model.eval()


def import_official(ckpt: Path, out_dir: Path, *, face_model: Path | None = None, weights_fp16: bool = False) -> Path:
    """Import ``epoch_20.pth`` and write ``out_dir/rnet.onnx`` + ``out_dir/rnet.json``; returns the card's path.

    ``face_model`` is the BFM face model (``facemodel.npz``) the network is served with; by default
    ``out_dir/facemodel.npz`` when it exists. Its name and sha256 go into the card (without one: name ``bfm``,
    sha256 unknown). After export, onnxruntime's output is checked against torch on a random image.
    """
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    model = load_official(ckpt)
    fm_path = Path(face_model) if face_model is not None else out_dir / FACE_MODEL_FILE
    if fm_path.is_file():
        ref = face_model_ref(fm_path)
    elif face_model is not None:
        raise ModelFileError(f"face model {fm_path} not found")
    else:
        ref = FaceModelRef(name="bfm", sha256=None)
    info = CardInfo(
        description="Deep3DFaceRecon R-Net (official PyTorch epoch_20.pth): ResNet-50 + 7 heads -> 257 BFM "
        "coefficients from an aligned 224x224 RGB crop",
        face_model=ref,
        licence="MIT (code); weights: research / non-commercial use only (BFM09, research datasets)",
        licence_notice=LICENCE_NOTICE,
        redistributable=False,
        provenance=NetworkProvenance(
            source="official Deep3DFaceRecon_pytorch checkpoint epoch_20.pth (net_recon), imported unchanged",
            source_url=SOURCE_URL,
            source_commit=SOURCE_COMMIT,
            source_files={ckpt.name: sha256_file(ckpt)},
            datasets=["CelebA", "LFW", "300W-LP", "IJB-A", "LS3D-W", "FFHQ"],
            training={
                "recipe": "reference PyTorch defaults (reference.md section 12)",
                "optimiser": "Adam lr 1e-4, StepLR x0.2 every 10 epochs",
                "batch": 32,
                "epochs": 20,
                "init": "ImageNet ResNet-50 trunk, zero heads",
            },
            notes=["imported by facerecon.nets.checkpoint; no weights changed"],
        ),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    card = export_rnet(model, out_dir / "rnet.onnx", info, weights_fp16=weights_fp16)
    limit = 5e-3 if weights_fp16 else 1e-3
    diff = card.onnx.max_abs_diff_vs_torch
    if diff is None or not np.isfinite(diff) or diff > limit:
        for name in ("rnet.onnx", "rnet.json"):
            (out_dir / name).unlink(missing_ok=True)
        raise ModelFileError(f"exported network differs from torch by {diff} (limit {limit:g}); removed, not trusted")
    log.info("imported %s -> %s", ckpt, out_dir / "rnet.onnx")
    return out_dir / "rnet.json"
