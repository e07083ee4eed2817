"""A batch run from start to end: expand the inputs, skip what is done, run an engine, rebuild the table."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from facerecon.batch.inputs import expand_inputs, make_units
from facerecon.batch.storage import Store
from facerecon.batch.table import done_photos, latest_rows, read_parts, sort_rows, summarise, write_results
from facerecon.batch.worker import WorkConfig
from facerecon.errors import InputError

log = logging.getLogger(__name__)

CONFIG_FILE = "batch.json"
#: Options that change what is written for a photo: a rerun into the same folder must use the same ones.
_PINNED = ("format", "texture", "faces", "refine", "overlay", "face_model")


class BatchOptions(BaseModel):
    """Everything ``facerecon batch`` takes besides its inputs."""

    out: str = Field(description="output folder (local path or URI)")
    engine: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=0, description="local: processes (0: in this process); ray: actors. "
                                "Default: the CPU cores (local), the cluster's CPUs (ray)")
    address: str | None = Field(None, description="ray: a running cluster to join (default: start a local Ray)")
    format: Literal["obj", "ply", "glb"] = "obj"
    texture: Literal["none", "photo", "albedo"] = "none"
    faces: Literal["largest", "all"] = "largest"
    refine: bool | None = Field(None, description="fitting after R-Net (default: FACERECON_REFINE)")
    overlay: bool = Field(False, description="also write overlay.png (the render over the photo) per face")
    table: Literal["parquet", "jsonl"] = "parquet"
    retry_failed: bool = Field(False, description="redo photos whose earlier rows are errors")
    limit: int | None = Field(None, ge=1, description="process at most this many new photos, then stop")
    batch_size: int = Field(4, ge=1, description="photos per worker call: one R-Net call for all their faces")
    flush_every: int = Field(32, ge=1, description="photos per part file (the resume granularity)")
    flush_seconds: float = Field(10.0, gt=0, description="local: write a part at least this often")
    gpus_per_worker: float = Field(0.0, ge=0, description="ray: num_gpus of each actor")
    progress: bool = True


class BatchSummary(BaseModel):
    """What a run did (the CLI prints it; tests and the bench read it)."""

    run_id: str
    engine: str
    workers: int
    out: str
    table: str
    photos: int = Field(description="photos the inputs name")
    skipped: int = Field(description="photos already done by an earlier run")
    processed: int = Field(description="photos this run reconstructed or failed")
    photos_ok: int
    photos_failed: int
    faces: int
    errors: dict[str, int]
    wall_s: float
    photos_per_s: float


def _new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def _check_config(store: Store, pinned: dict[str, Any]) -> None:
    """Refuse to mix outputs of different options in one folder; record the options on the first run."""
    raw = store.read_bytes(CONFIG_FILE)
    if raw is None:
        store.makedirs("")
        store.write_atomic(CONFIG_FILE, json.dumps({**pinned, "created": datetime.now(UTC).isoformat()},
                                                   indent=1).encode())
        return
    before = json.loads(raw)
    diff = {k: (before.get(k), pinned[k]) for k in _PINNED if before.get(k) != pinned[k]}
    if diff:
        said = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise InputError(f"{store.root} was made with {said}: use another --out, or the same options to resume")


def _batch(batch_size: int, todo: list[Any], workers: int) -> int:
    """Photos per worker call: ``batch_size``, smaller when there are too few photos to keep every worker busy."""
    return max(1, min(batch_size, math.ceil(len(todo) / max(1, workers))))


def run_batch(inputs: list[str], options: BatchOptions) -> BatchSummary:
    """Run one batch (see :mod:`facerecon.batch`); failures of single photos are rows, never exceptions.

    Raises:
        InputError: a malformed manifest, or an output folder made with other options.
    """
    from tqdm import tqdm

    from facerecon.config import get_settings

    t_start = time.perf_counter()
    if options.texture != "none" and options.format == "ply":
        raise InputError(f"--texture {options.texture} needs --format obj or glb (PLY has per-vertex colours only)")
    settings = get_settings()
    store = Store(options.out)
    refine = settings.refine if options.refine is None else options.refine
    pinned = {"format": options.format, "texture": options.texture, "faces": options.faces, "refine": refine,
              "overlay": options.overlay, "face_model": settings.face_model}
    refs = expand_inputs(inputs)
    units = make_units(refs)
    _check_config(store, pinned)
    done = done_photos(latest_rows(read_parts(store)), options.retry_failed)
    todo = [u for u in units if not all(p in done for p in u.photo_ids)]
    skipped = sum(len(u.members) for u in units) - sum(len(u.members) for u in todo)
    if options.limit is not None:
        kept, n = [], 0
        for u in todo:
            if n + len(u.members) > options.limit and kept:
                break
            kept.append(u)
            n += len(u.members)
        todo = kept
    n_todo = sum(len(u.members) for u in todo)
    run_id = _new_run_id()
    config = WorkConfig(out=store.uri(), run_id=run_id, format=options.format, texture=options.texture,
                        faces=options.faces, refine=refine, overlay=options.overlay)
    log.info("batch %s: %d photos, %d done before, %d to do (engine %s)", run_id, len(refs), skipped, n_todo,
             options.engine)

    workers = 0
    if todo:
        bar = tqdm(total=n_todo, unit="photo", desc=f"batch ({options.engine})", disable=not options.progress,
                   smoothing=0.1, dynamic_ncols=True)
        try:
            if options.engine == "local":
                from facerecon.batch.local import PartSink, run_local

                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
                workers = min(cores if options.workers is None else options.workers, len(todo))
                sink = PartSink(store, run_id, options.flush_every, options.flush_seconds)
                run_local(todo, config, sink, workers=workers, batch_size=_batch(options.batch_size, todo, workers),
                          advance=bar.update)
            else:
                try:
                    from facerecon.batch.ray_engine import run_ray
                except ImportError as exc:
                    raise InputError("--engine ray needs Ray Data: pip install 'facerecon[batch]'") from exc
                actors = options.workers or None
                workers = run_ray(todo, config, store, actors=actors, address=options.address,
                                  batch_size=_batch(options.batch_size, todo, actors or 1),
                                  flush_every=options.flush_every,
                                  gpus_per_actor=options.gpus_per_worker, advance=bar.update)
        finally:
            bar.close()

    table = latest_rows(read_parts(store))
    order = {r.photo_id: r.input_index for r in refs}
    table = sort_rows(table, order)
    name = write_results(store, table, options.table)
    import pyarrow.compute as pc

    this_run = table.filter(pc.equal(table["run_id"], run_id)).select(["photo_id", "status", "error_code"]).to_pylist()
    counts = summarise(this_run)
    wall = time.perf_counter() - t_start
    processed = len({r["photo_id"] for r in this_run})
    return BatchSummary(
        run_id=run_id, engine=options.engine, workers=workers, out=store.root, table=name, photos=len(refs),
        skipped=skipped, processed=processed, wall_s=wall, photos_per_s=processed / wall if wall > 0 else 0.0,
        **counts,
    )
