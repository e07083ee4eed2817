"""``python -m facerecon_client URL photo.jpg [more.jpg ...] --out mesh.obj``

The output's suffix picks what is asked for: ``.obj``/``.glb``/``.ply`` the mesh, ``.json`` the coefficients,
landmarks and pose, ``.png`` the overlay. Several photos (or ``--set``) are reconstructed as one person: the
identity mesh, or the set's JSON. ``--out -`` writes to standard output (then say ``--format``).
Exit status: 0 done, 1 the service answered with an error or could not be reached, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facerecon_client.client import FaceReconClient, RetryPolicy
from facerecon_client.errors import FaceReconClientError, ServiceError

FORMATS = ("obj", "glb", "ply", "json", "png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facerecon_client", description="Call a facerecon service.")
    p.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    p.add_argument("photos", nargs="+", type=Path, help="photo file(s)")
    p.add_argument("--out", "-o", required=True, help="output file (suffix picks the format) or - for stdout")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from --out's suffix)")
    p.add_argument("--set", action="store_true", help="the photos show one person (implied by several photos)")
    p.add_argument("--faces", choices=["largest", "all"], default="largest")
    p.add_argument("--refine", dest="refine", action="store_true", default=None, help="test-time fitting")
    p.add_argument("--no-refine", dest="refine", action="store_false")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--retries", type=int, default=3, help="attempts on 429/503 (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = args.format or (Path(args.out).suffix.lstrip(".").lower() if args.out != "-" else "")
    if fmt not in FORMATS:
        parser.error(f"cannot tell the format from --out {args.out!r}; add --format {{{','.join(FORMATS)}}}")
    is_set = args.set or len(args.photos) > 1
    if is_set and fmt == "png":
        parser.error("a set has no single overlay; ask for .json (per-photo results) or a mesh")
    with FaceReconClient(args.url, timeout=args.timeout, retry=RetryPolicy(max_attempts=max(1, args.retries))) as c:
        try:
            if is_set and fmt == "json":
                body = c.reconstruct_set(args.photos, refine=args.refine).model_dump_json(indent=1).encode()
            elif is_set:
                body = c.identity_mesh(args.photos, format=fmt, refine=args.refine).data
            elif fmt == "json":
                result = c.reconstruct(args.photos[0], faces=args.faces, refine=args.refine, include=())
                body = result.model_dump_json(indent=1).encode()
            elif fmt == "png":
                body = c.overlay(args.photos[0], faces=args.faces, refine=args.refine).data
            else:
                body = c.mesh(args.photos[0], format=fmt, faces=args.faces, refine=args.refine).data
        except ServiceError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except FaceReconClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.out == "-":
        sys.stdout.buffer.write(body)
    else:
        Path(args.out).write_bytes(body)
        print(f"wrote {args.out} ({len(body)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
