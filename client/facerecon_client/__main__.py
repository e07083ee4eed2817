"""``python -m facerecon_client URL photo.jpg [more.jpg ...] --out mesh.obj``

The output's suffix picks what is asked for: ``.obj``/``.glb``/``.ply`` the mesh, ``.json`` the coefficients,
landmarks and pose, ``.png`` the overlay (``--format depth`` / ``--format normals``: the depth map, a 16-bit grey
PNG with value / 10000 = metres, or the normal map, an RGB PNG). Several photos (or ``--set``) are reconstructed
as one person: the identity mesh, or the set's JSON (``--on-missing skip`` leaves out a photo without a face).
``--out -`` writes to standard output (then say ``--format``).

``--texture photo|albedo`` asks for a UV-textured mesh: a GLB holds its texture; a textured OBJ is three files,
written beside each other as ``NAME.obj``, ``NAME.mtl`` and ``NAME.png`` for ``--out NAME.obj``, or kept as the
service's zip for ``--out NAME.zip`` (or ``-``).
Exit status: 0 done, 1 the service answered with an error or could not be reached, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facerecon_client.client import FaceReconClient, RetryPolicy
from facerecon_client.errors import FaceReconClientError, ServiceError

FORMATS = ("obj", "glb", "ply", "json", "png", "depth", "normals")
MAPS = ("depth", "normals")
TEXTURES = ("none", "photo", "albedo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facerecon_client", description="Call a facerecon service.")
    p.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument("photos", nargs="+", type=Path, help="photo file(s)")
    p.add_argument("--out", "-o", required=True, help="output file (suffix picks the format) or - for stdout")
    p.add_argument("--format", choices=FORMATS,
                   help="output format (default: from --out's suffix; depth and normals: the maps as PNG)")
    p.add_argument("--set", action="store_true", help="the photos show one person (implied by several photos)")
    p.add_argument("--faces", choices=["largest", "all"], default="largest")
    p.add_argument("--texture", choices=TEXTURES, default="none",
                   help="obj/glb: a UV texture from the photo's colours or the fitted albedo (default: none, "
                        "per-vertex colours)")
    p.add_argument("--on-missing", choices=["fail", "skip"], default=None,
                   help="a set: a photo without a face fails the set, or is skipped (default: fail)")
    p.add_argument("--refine", dest="refine", action="store_true", default=None, help="test-time fitting")
    p.add_argument("--no-refine", dest="refine", action="store_false")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--retries", type=int, default=3, help="attempts on 429/503 (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = args.format or (Path(args.out).suffix.lstrip(".").lower() if args.out != "-" else "")
    if fmt == "zip":  # the service's textured OBJ bundle, as it sends it
        fmt = "obj"
        if args.texture == "none":
            parser.error("a .zip is a textured OBJ bundle: add --texture photo or --texture albedo")
    if fmt not in FORMATS:
        parser.error(f"cannot tell the format from --out {args.out!r}; add --format {{{','.join(FORMATS)}}}")
    is_set = args.set or len(args.photos) > 1
    if is_set and fmt in ("png", *MAPS):
        parser.error(f"a set has no single {'overlay' if fmt == 'png' else fmt + ' map'}; ask for .json "
                     "(per-photo results) or a mesh")
    if args.texture != "none" and (is_set or fmt not in ("obj", "glb")):
        parser.error(f"--texture {args.texture} needs one photo and an .obj or .glb output")
    if args.on_missing is not None and not is_set:
        parser.error("--on-missing is for a set (several photos or --set)")
    on_missing = args.on_missing or "fail"
    skipped: list[int] = []
    files: dict[str, bytes] = {}
    with FaceReconClient(args.url, timeout=args.timeout, retry=RetryPolicy(max_attempts=max(1, args.retries))) as c:
        try:
            if is_set and fmt == "json":
                result_set = c.reconstruct_set(args.photos, refine=args.refine, on_missing=on_missing)
                skipped = result_set.skipped
                body = result_set.model_dump_json(indent=1).encode()
            elif is_set:
                mesh = c.identity_mesh(args.photos, format=fmt, refine=args.refine, on_missing=on_missing)
                skipped, body = mesh.skipped, mesh.data
            elif fmt == "json":
                result = c.reconstruct(args.photos[0], faces=args.faces, refine=args.refine, include=())
                body = result.model_dump_json(indent=1).encode()
            elif fmt == "png":
                body = c.overlay(args.photos[0], faces=args.faces, refine=args.refine).data
            elif fmt in MAPS:
                body = c.map(args.photos[0], fmt, faces=args.faces, refine=args.refine).data
            else:
                mesh = c.mesh(args.photos[0], format=fmt, faces=args.faces, refine=args.refine, texture=args.texture)
                body = mesh.data
                if mesh.is_bundle and args.out != "-" and not args.out.lower().endswith(".zip"):
                    files = _named_bundle(mesh.files(), Path(args.out))
        except ServiceError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except FaceReconClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for k in skipped:
        print(f"skipped {args.photos[k]}: no face found", file=sys.stderr)
    if args.out == "-":
        sys.stdout.buffer.write(body)
    elif files:
        for path, data in files.items():
            Path(path).write_bytes(data)
            print(f"wrote {path} ({len(data)} bytes)", file=sys.stderr)
    else:
        Path(args.out).write_bytes(body)
        print(f"wrote {args.out} ({len(body)} bytes)", file=sys.stderr)
    return 0


def _named_bundle(bundle: dict[str, bytes], out: Path) -> dict[str, bytes]:
    """A textured OBJ bundle (``mesh.obj`` -> ``mesh.mtl`` -> ``texture.png``) as ``out``'s name with ``.obj``,
    ``.mtl`` and ``.png``, the references between the files renamed to match."""
    mtl_name, png_name = out.with_suffix(".mtl").name, out.with_suffix(".png").name
    obj = bundle["mesh.obj"].replace(b"mtllib mesh.mtl", f"mtllib {mtl_name}".encode(), 1)
    mtl = bundle["mesh.mtl"].replace(b"map_Kd texture.png", f"map_Kd {png_name}".encode())
    return {str(out): obj, str(out.with_suffix(".mtl")): mtl, str(out.with_suffix(".png")): bundle["texture.png"]}


if __name__ == "__main__":
    sys.exit(main())
