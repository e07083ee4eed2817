"""``export-onnx RUN_DIR``: a training run's R-Net (and C-Net, when trained) -> the serving files
``models/<face_model>/rnet.onnx`` + ``rnet.json`` (and ``cnet.*``) through :mod:`facerecon.nets.onnx_io`."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from facerecon.facemodel.registry import resolve
from facerecon.nets.cards import CardInfo, NetworkCard, NetworkProvenance, face_model_ref
from facerecon.nets.onnx_io import export_cnet, export_rnet
from facerecon.nets.runtime import compress_network
from facerecon.train.loop import CNET_CHECKPOINT, load_cnet, load_rnet

log = logging.getLogger(__name__)

#: Datasets named by folder: what the card says about each (licence).
DATASET_NOTES = {
    "ytf_68pt": "YouTube Faces frames with 68 landmarks (Wolf et al. 2011; via udacity/P1_Facial_Keypoints, MIT "
                "repository): research use only",
    "lfw": "Labeled Faces in the Wild (Huang et al. 2007): research use only",
    "lfw_more": "Labeled Faces in the Wild (Huang et al. 2007), one photo per further person: research use only",
    "afw_helen": "AFW (Zhu & Ramanan 2012) and HELEN (Le et al. 2012) Flickr photos with the 300-W 68-point "
                 "annotations (Sagonas et al. 2013; HELEN train half only): research use only",
    "cfp": "Celebrities in Frontal-Profile (Sengupta et al. 2016), frontal and profile photos: research use only",
    "deep3d-examples": "Deep3DFaceRecon example photos (CelebA and others): non-commercial research",
    "deep3dfacerecon_examples": "Deep3DFaceRecon example photos (CelebA and others): non-commercial research",
    "misc": "demo photos of face-reconstruction repositories (MIT / non-commercial research licences)",
}
SYNTHETIC_NOTE = "synthetic photos rendered from the ICT FaceKit face model (MIT)"


def _datasets(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        name = Path(p).name
        out.append(f"{name}: {DATASET_NOTES.get(name, 'licence not recorded: check before shipping')}")
    return out


def _last_row(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[-1] if rows else {}


def _licence(real_data: bool) -> tuple[str, str, bool]:
    if real_data:
        return ("research-only (trained on research-only data)",
                "Weights trained on research-only data (YouTube Faces, LFW, CFP, 300-W's AFW/HELEN annotations): "
                "research and non-commercial use "
                "only. The face model (ICT FaceKit light) is MIT. Shipped with facerecon for research use, plainly "
                "marked; FACERECON_USE_NETWORKS=false serves without it.", True)
    return ("MIT", "Trained on synthetic renders of the MIT ICT FaceKit face model only.", True)


def export_run(run_dir: Path, models_dir: Path | None = None, *, weights_fp16: bool = True,
               description: str | None = None, compress: bool = False) -> list[NetworkCard]:
    """Export the R-Net of ``run_dir`` (and its C-Net if ``cnet_checkpoint.pt`` exists) beside the face model.

    Args:
        run_dir: a :func:`facerecon.train.loop.train_rnet` run directory.
        models_dir: where ``<face_model>/facemodel.npz`` lives (default: the run's ``models_dir``).
        weights_fp16: store the weights as float16 (half the size; parity is measured into the card).
        compress: store each network as ``<file>.xz`` (:func:`facerecon.nets.runtime.compress_network`).

    Returns:
        The written cards (R-Net first).
    """
    run_dir = Path(run_dir)
    net, cfg, model, step = load_rnet(run_dir, "cpu")
    mdir = Path(models_dir) if models_dir is not None else Path(cfg.models_dir)
    npz = resolve(mdir, cfg.face_model)
    real = bool(cfg.data) and not cfg.synthetic_only
    licence, notice, redistributable = _licence(real)
    last = _last_row(run_dir / "losses.csv")
    val = _last_row(run_dir / "val.csv")
    seconds = 0.0
    if (run_dir / "losses.csv").is_file():
        with open(run_dir / "losses.csv", newline="") as fh:
            seconds = sum(float(r["seconds"]) for r in csv.DictReader(fh))
    training: dict[str, str | int | float | bool] = {
        "recipe": "weakly-supervised hybrid loss (landmark, skin-attention photometric, "
                  + ("perceptual with dlib's face descriptor, " if cfg.perceptual else "")
                  + "coefficient/gamma/albedo regularisers, reference weights) + coefficient supervision on "
                  "synthetic renders; facerecon.train.loop",
        "steps": step, "batch": cfg.batch, "images_seen": step * cfg.batch, "backbone": cfg.backbone,
        "trunk_input_px": cfg.trunk_size, "synthetic_fraction": 1.0 if not real else cfg.synthetic_fraction,
        "photometric_images_per_batch": cfg.photo_per_batch if real else 0, "lr": cfg.lr,
        "train_seconds": round(seconds, 1), "device": "cpu" if cfg.device != "cuda" else "cuda",
    }
    for k in ("total", "landmark", "photo", "perceptual", "supervision"):
        if k in last:
            training[f"final_{k}"] = float(last[k])
    for k, v in val.items():
        if k != "step":
            training[k if k.startswith("val_") else f"val_{k}"] = float(v)
    notes = [f"run config: {json.dumps({k: getattr(cfg, k) for k in ('seed', 'augment', 'render_size')})}",
             *(["trunk initialised from MediaPipe's face-mesh network (Apache-2.0; facerecon's ONNX port in "
                "facerecon/assets/mediapipe/face_landmark.onnx)"] if cfg.backbone == "facemesh" else []),
             f"model card: models/{cfg.face_model}/MODEL_CARD_RNET.md"]
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():
        ev = json.loads(eval_file.read_text())
        for group, modes in ev.get("real", {}).get("all", {}).items():
            training[f"eval_real_{group}_lm_px"] = float(modes["lm_px"])
    info = CardInfo(
        description=description or (
            f"R-Net {cfg.backbone} (trunk at {cfg.trunk_size} px from the 224 crop) for face model "
            f"'{cfg.face_model}', CPU-trained {step} steps x {cfg.batch}; "
            + ("trained on research-only data" if real else "synthetic data only")),
        face_model=face_model_ref(npz),
        licence=licence,
        licence_notice=notice,
        redistributable=redistributable,
        provenance=NetworkProvenance(
            source="trained by facerecon.train (this repository)",
            datasets=[*_datasets(cfg.data if real else []), SYNTHETIC_NOTE],
            training=training,
            notes=notes,
        ),
    )
    out_dir = npz.parent
    cards = [export_rnet(net, out_dir / "rnet.onnx", info, weights_fp16=weights_fp16, batch=2)]
    if (run_dir / CNET_CHECKPOINT).is_file():
        cnet, cstep = load_cnet(run_dir, net.feature_dim, model.layout)
        ccfg_file = run_dir / "cnet_config.json"
        cdata = json.loads(ccfg_file.read_text()).get("data", ["lfw"]) if ccfg_file.is_file() else ["lfw"]
        ctraining: dict[str, str | int | float | bool] = {"steps": cstep}
        if (run_dir / "cnet_eval.json").is_file():
            held = json.loads((run_dir / "cnet_eval.json").read_text())
            ctraining.update({f"heldout_{k}": v for k, v in held.items()})
        cinfo = info.model_copy(update={
            "description": f"C-Net for the R-Net above ({cstep} steps on image sets of "
                           f"{', '.join(Path(d).name for d in cdata)}, R-Net frozen)",
            "paired_rnet_sha256": cards[0].sha256,
            "provenance": NetworkProvenance(source="trained by facerecon.train (this repository)",
                                            datasets=_datasets(cdata), training=ctraining),
            "licence": _licence(True)[0], "licence_notice": _licence(True)[1], "redistributable": True,
        })
        # the C-Net is tiny (~0.3 MB): float32 always (its exp-scaled confidences magnify float16 rounding)
        cards.append(export_cnet(cnet, out_dir / "cnet.onnx", cinfo, backbone=cfg.backbone, batch=2))
    for c in cards:
        log.info("exported %s: %s (%d bytes, max |ORT - torch| %.2e)", c.kind, c.file, c.bytes or 0,
                 c.onnx.max_abs_diff_vs_torch or 0.0)
        if compress:
            log.info("compressed to %s", compress_network(out_dir / str(c.file)))
    return cards
