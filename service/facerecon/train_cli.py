"""Training subcommands for the ``facerecon`` CLI: ``train rnet|cnet|skin-gmm|eval`` and ``export-onnx``.

The lead wires them in with :func:`add_train_commands` (``add_train_commands(subparsers)``); ``python -m
facerecon.train_cli ...`` also works on its own. Every handler returns a process exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("facerecon.train")


def _train_rnet(args: argparse.Namespace) -> int:
    from facerecon.train.loop import RNetConfig, train_rnet

    cfg = RNetConfig(
        data=[str(p) for p in args.data], out=str(args.out), val_data=[str(p) for p in args.val_data],
        face_model=args.face_model, models_dir=str(args.models_dir), steps=args.steps, batch=args.batch,
        backbone=args.backbone, trunk_size=args.trunk_size, lr=args.lr, synthetic=args.synthetic,
        synthetic_fraction=args.synthetic_fraction, synthetic_only=args.synthetic_only,
        synthetic_yaw_deg=args.synthetic_yaw,
        photo_per_batch=args.photo_per_batch, render_size=args.render_size, perceptual=not args.no_perceptual,
        augment=not args.no_augment, val_every=args.val_every, val_max=args.val_max,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed, threads=args.threads, device=args.device, cache_dir=str(args.cache_dir or ""),
        max_real=args.max_real, time_limit_s=args.time_limit * 60.0, progress=not args.no_progress,
        large_pose=args.large_pose, large_pose_fraction=args.large_pose_fraction,
        init_from=str(args.init_from or ""), identity_pairs=args.identity_pairs,
        identity_weight=args.identity_weight, anchor_weight=args.anchor_weight,
        manual_landmark_weight=args.manual_landmark_weight, vertex_weight=args.vertex_weight,
        mesh_weight=args.mesh_weight,
    )
    ckpt = train_rnet(cfg, resume=args.resume)
    print(f"checkpoint: {ckpt}")
    return 0


def _train_cnet(args: argparse.Namespace) -> int:
    from facerecon.train.loop import CNetConfig, train_cnet

    cfg = CNetConfig(
        data=[str(p) for p in args.data], out=str(args.out), rnet_run=str(args.rnet_run or args.out),
        steps=args.steps, lr=args.lr, render_size=args.render_size, perceptual=not args.no_perceptual,
        seed=args.seed, threads=args.threads, device=args.device, cache_dir=str(args.cache_dir or ""),
        max_photos=args.max_photos, eval_sets=args.eval_sets, progress=not args.no_progress,
    )
    print(f"checkpoint: {train_cnet(cfg, resume=args.resume)}")
    return 0


def _train_average(args: argparse.Namespace) -> int:
    from facerecon.train.checkpoints import average_runs

    weights = args.weights or [1.0 / len(args.runs)] * len(args.runs)
    print(f"checkpoint: {average_runs(args.runs, weights, args.out)}")
    return 0


def _train_skin(args: argparse.Namespace) -> int:
    import numpy as np

    from facerecon.facemodel import FaceModel
    from facerecon.facemodel.registry import resolve
    from facerecon.skin import REFERENCE_GMM
    from facerecon.train import data as D
    from facerecon.train import skin_gmm

    model = FaceModel.from_file(resolve(Path(args.models_dir), args.face_model))
    entries = D.list_photos([Path(p) for p in args.data], limit=args.max_photos or None)
    real = D.build_real_cache(entries, Path(args.cache_dir or Path.home() / ".cache" / "facerecon"),
                              model.standard_lm5)
    rng = np.random.default_rng(args.seed)
    ix = np.sort(rng.permutation(len(real))[: args.photos])
    gmm = skin_gmm.train_skin_gmm(real.images[ix], real.lm68[ix], per_class=args.pixels, seed=args.seed,
                                  source=f"facerecon.train.skin_gmm: EM, 4+4 components, {len(ix)} photos of "
                                         f"{', '.join(Path(p).name for p in args.data)} (landmark face region)")
    out = Path(args.out)
    skin_gmm.save_gmm(gmm, out)
    print(f"wrote {out}")
    held = np.setdiff1d(np.arange(len(real)), ix)[:200]
    for name, g in (("reference", REFERENCE_GMM), ("ours", gmm)):
        print(name, json.dumps(skin_gmm.agreement(g, real.images[held], real.lm68[held])))
    if args.figure:
        pick = held[np.linspace(0, len(held) - 1, 6).round().astype(int)]
        skin_gmm.skin_map_figure(real.images[pick], [REFERENCE_GMM, gmm], Path(args.figure))
        print(f"wrote {args.figure}")
    return 0


def _train_eval(args: argparse.Namespace) -> int:
    from facerecon.train.evaluate import evaluate_run

    report = evaluate_run(Path(args.run_dir), fit_photos=args.fit_photos, photo_steps=args.photo_steps)
    text = json.dumps(report, indent=1)
    (Path(args.run_dir) / "eval.json").write_text(text + "\n")
    print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from facerecon.train.export import export_run

    cards = export_run(Path(args.run_dir), Path(args.models_dir) if args.models_dir else None,
                       weights_fp16=not args.fp32, compress=args.xz)
    for c in cards:
        print(f"{c.kind}: {c.file} ({c.bytes} bytes, sha256 {c.sha256}, max |ORT - torch| "
              f"{c.onnx.max_abs_diff_vs_torch:.2e})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", type=Path, default=None, help="preprocessed-photo cache (default RUN_DIR/cache)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's checkpoint")
    p.add_argument("--no-progress", action="store_true")


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``train`` (rnet, cnet, skin-gmm, eval) and ``export-onnx`` to a ``facerecon`` subparsers object."""
    train = subparsers.add_parser("train", help="train the R-Net / C-Net / skin GMM (CPU or CUDA)")
    sub = train.add_subparsers(dest="train_command", required=True)

    r = sub.add_parser("rnet", help="weakly-supervised R-Net training (hybrid loss + synthetic supervision)")
    r.add_argument("--data", type=Path, nargs="*", default=[], help="photo folders (ytf_68pt landmarks used)")
    r.add_argument("--val-data", type=Path, nargs="*", default=[], help="extra validation photo folders")
    r.add_argument("--out", type=Path, required=True, help="run directory")
    r.add_argument("--face-model", default="ict")
    r.add_argument("--models-dir", type=Path, default=Path("models"))
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--backbone", default="facemesh", choices=["facemesh", "resnet18", "resnet34", "resnet50"],
                   help="facemesh: MediaPipe's pretrained face-mesh network (the CPU default, trunk at 192 px); "
                        "resnet50 at 224: the paper's R-Net (for a GPU)")
    r.add_argument("--trunk-size", type=int, default=192, help="px the trunk sees (224 = the reference)")
    r.add_argument("--lr", type=float, default=3e-4)
    r.add_argument("--synthetic", type=int, default=3000, help="synthetic pool size")
    r.add_argument("--synthetic-fraction", type=float, default=0.5)
    r.add_argument("--synthetic-yaw", type=float, default=45.0, help="largest synthetic yaw, degrees")
    r.add_argument("--synthetic-only", action="store_true", help="no real photos (commercially clean weights)")
    r.add_argument("--large-pose", type=int, default=0, metavar="N",
                   help="turn N training photos to large yaw, 300W-LP style (facerecon.train.large_pose); 0: none")
    r.add_argument("--large-pose-fraction", type=float, default=0.25,
                   help="share of every batch taken from the turned photos")
    r.add_argument("--init-from", type=Path, default=None, metavar="WEIGHTS",
                   help="start from a shipped rnet.onnx (e.g. models/ict/rnet.onnx: training continues from the "
                        "shipped weights) or another run's checkpoint.pt; weights only, new optimiser and schedule")
    r.add_argument("--identity-pairs", type=int, default=0, metavar="P",
                   help="P people with two photos each among every batch's real rows, their identity coefficients "
                        "held together (InfoNCE on the cosine); 0: off")
    r.add_argument("--identity-weight", type=float, default=0.02, help="weight of that identity term")
    r.add_argument("--anchor-weight", type=float, default=0.0, metavar="A",
                   help="with --init-from: hold the real rows' 68 projected landmarks near the starting network's "
                        "own (a frozen copy), A times the landmark term's weight; 0: off")
    r.add_argument("--manual-landmark-weight", type=float, default=1.0, metavar="W",
                   help="scale the landmark term of the photos with manual 68-point labels (HELEN train) by W")
    r.add_argument("--vertex-weight", type=float, default=0.0, metavar="V",
                   help="dense supervision of the synthetic and turned rows: V times the mean squared distance "
                        "(cm^2) of their face-region vertices, turned by the pose, to the true ones; 0: off")
    r.add_argument("--mesh-weight", type=float, default=0.0, metavar="M",
                   help="dense face-mesh term on the real rows: the face mesh's 468 points as targets of the face "
                        "model's vertices (models/<name>/mesh468.json), M times the landmark term's weight; 0: off")
    r.add_argument("--photo-per-batch", type=int, default=2, help="real images per batch with photometric loss")
    r.add_argument("--render-size", type=int, default=112, choices=[56, 112, 224])
    r.add_argument("--no-perceptual", action="store_true")
    r.add_argument("--no-augment", action="store_true")
    r.add_argument("--val-every", type=int, default=100)
    r.add_argument("--checkpoint-every", type=int, default=50)
    r.add_argument("--val-max", type=int, default=50, help="held-out photos validated during the run")
    r.add_argument("--max-real", type=int, default=0, help="use only the first N photos (0 = all)")
    r.add_argument("--time-limit", type=float, default=0.0, help="minutes; stop (with a checkpoint) after it")
    _common(r)
    r.set_defaults(func=_train_rnet)

    c = sub.add_parser("cnet", help="C-Net on image sets (R-Net frozen), starting as mean pooling")
    c.add_argument("--data", type=Path, nargs="+", required=True, help="folders of Person_Name_NNNN photos (LFW)")
    c.add_argument("--out", type=Path, required=True, help="run directory (the R-Net run by default)")
    c.add_argument("--rnet-run", type=Path, default=None, help="R-Net run directory (default: --out)")
    c.add_argument("--steps", type=int, default=100)
    c.add_argument("--lr", type=float, default=1e-4)
    c.add_argument("--render-size", type=int, default=112, choices=[56, 112, 224])
    c.add_argument("--no-perceptual", action="store_true")
    c.add_argument("--max-photos", type=int, default=0)
    c.add_argument("--eval-sets", type=int, default=100,
                   help="held-out people's sets to compare with mean pooling after training (0 = skip)")
    _common(c)
    c.set_defaults(func=_train_cnet)

    s = sub.add_parser("skin-gmm", help="train skin / non-skin GMMs from the landmark face region")
    s.add_argument("--data", type=Path, nargs="+", required=True)
    s.add_argument("--out", type=Path, default=Path("models/ict/skin_gmm.json"))
    s.add_argument("--figure", type=Path, default=None, help="PNG of skin maps (reference vs ours)")
    s.add_argument("--face-model", default="ict")
    s.add_argument("--models-dir", type=Path, default=Path("models"))
    s.add_argument("--photos", type=int, default=600)
    s.add_argument("--pixels", type=int, default=60000, help="pixels per class")
    s.add_argument("--max-photos", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cache-dir", type=Path, default=None)
    s.set_defaults(func=_train_skin)

    e = sub.add_parser("eval", help="landmark errors (R-Net, R-Net + fit, fit) and synthetic coefficient recovery")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--fit-photos", type=int, default=0, help="limit the fitted photos (0 = all)")
    e.add_argument("--photo-steps", type=int, default=30, help="photometric fitting steps")
    e.set_defaults(func=_train_eval)

    a = sub.add_parser("average", help="average the R-Nets of runs weight for weight (e.g. a stage and its start)")
    a.add_argument("runs", type=Path, nargs="+", help="run directories (the last one's config is kept)")
    a.add_argument("--weights", type=float, nargs="+", default=None, help="one per run, summing to 1 (default: equal)")
    a.add_argument("--out", type=Path, required=True, help="the averaged run's directory (export it with export-onnx)")
    a.set_defaults(func=_train_average)

    x = subparsers.add_parser("export-onnx", help="export a training run's R-Net (and C-Net) for serving")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--models-dir", type=Path, default=None)
    x.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16 storage)")
    x.add_argument("--xz", action="store_true", help="store the networks xz-compressed (read transparently)")
    x.set_defaults(func=_export)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facerecon-train")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
