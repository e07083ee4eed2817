"""``facerecon batch``: the command line of :mod:`facerecon.batch` (registered by :mod:`facerecon.cli`)."""

from __future__ import annotations

import argparse
import sys


def add_batch_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``batch`` on the CLI's sub-parsers (imports nothing heavy: Ray and pyarrow load when it runs)."""
    b = sub.add_parser(
        "batch", help="reconstruct a photo collection: one folder per face and one results table (resumable)",
        description="Reconstruct every photo the inputs name into OUT/faces/<id>/ and one results table "
                    "(OUT/results.parquet or .jsonl). A rerun into the same OUT skips the photos already done.",
    )
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="photo files, folders (recursive, image types only), globs ('photos/**/*.jpg'), manifests "
                        "(.csv/.jsonl with path[, id, identity]), or URIs pyarrow reads (s3://bucket/prefix/)")
    b.add_argument("--out", required=True, help="output folder (a local path or a URI)")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine (default); ray: Ray Data on an actor pool")
    b.add_argument("--workers", type=int, default=None,
                   help="local: processes (default: the CPU cores; 0 runs in this process); ray: actors "
                        "(default: the cluster's CPUs)")
    b.add_argument("--address", default=None, help="ray: join this cluster (e.g. auto, ray://head:10001); "
                   "without it a local Ray starts")
    b.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per actor (e.g. 0.25, 1)")
    b.add_argument("--format", choices=["obj", "ply", "glb"], default="obj")
    b.add_argument("--texture", choices=["none", "photo", "albedo"], default="none",
                   help="OBJ/GLB with a UV texture: the photo's colours or the fitted albedo")
    b.add_argument("--faces", choices=["largest", "all"], default="largest")
    b.add_argument("--refine", dest="refine", action="store_true", default=None,
                   help="test-time fitting after R-Net (default: FACERECON_REFINE)")
    b.add_argument("--no-refine", dest="refine", action="store_false")
    b.add_argument("--overlay", action="store_true", help="also write overlay.png per face")
    b.add_argument("--table", choices=["parquet", "jsonl"], default="parquet", help="results table format")
    b.add_argument("--retry-failed", action="store_true", help="redo photos that failed in an earlier run")
    b.add_argument("--limit", type=int, default=None, help="process at most this many new photos, then stop")
    b.add_argument("--batch-size", type=int, default=4, help="photos per worker call (one batched R-Net call)")
    b.add_argument("--flush-every", type=int, default=32, help="photos per part file (what a kill can lose)")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    b.set_defaults(func=batch_command)


def batch_command(args: argparse.Namespace) -> int:
    """Run the batch; print a one-line summary. Exit 0 when every photo succeeded, 1 when some failed."""
    import signal

    from facerecon.batch.runner import BatchOptions, run_batch

    # SIGTERM (a pod being stopped, `kill`) ends the run like Ctrl-C: the rows collected so far are written as a
    # part, so the rerun skips them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    options = BatchOptions(
        out=args.out, engine=args.engine, workers=args.workers, address=args.address, format=args.format,
        texture=args.texture, faces=args.faces, refine=args.refine, overlay=args.overlay, table=args.table,
        retry_failed=args.retry_failed, limit=args.limit, batch_size=args.batch_size, flush_every=args.flush_every,
        gpus_per_worker=args.gpus_per_worker, progress=args.progress,
    )
    s = run_batch(list(args.inputs), options)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "none"
    print(f"batch {s.run_id}: {s.photos} photos, {s.skipped} done before, {s.processed} now "
          f"({s.photos_ok} ok with {s.faces} faces, {s.photos_failed} failed: {errors}) in {s.wall_s:.1f} s "
          f"({s.photos_per_s:.2f} photos/s, engine {s.engine}, {s.workers} workers); table {s.out}/{s.table}",
          file=sys.stdout)
    return 1 if s.photos_failed else 0
