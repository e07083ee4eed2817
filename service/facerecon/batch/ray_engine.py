"""``--engine ray``: the same work units on a Ray cluster through Ray Data.

``ray.data.from_items`` holds the work units (the expanded inputs with their stable ids, a few KB each); each actor
of a fixed-size pool (:class:`BatchActor`, ``map_batches`` with an :class:`~ray.data.ActorPoolStrategy`) loads the
models once, reads its photos itself through pyarrow's filesystems (local paths, ``s3://``, ``gs://``, ...),
writes the face folders, and returns its rows as an Arrow table; Ray Data's Parquet writer writes them into
``parts/ray-<run id>/``, one file per block (about ``flush_every`` photos), so a killed run keeps the blocks that
were written and a rerun skips their photos (a file the kill left half-written is unreadable and ignored).

The photos are read in the actors, not by ``ray.data.read_binary_files``, so that a file that cannot be read
becomes that photo's error row (code ``unreadable``) instead of failing a read task and with it the dataset.

``address=None`` (and no ``RAY_ADDRESS`` in the environment) starts a local Ray (``num_cpus`` = the actor count)
and shuts it down at the end; an address (``ray://host:10001``, ``auto``) joins a running cluster, whose nodes
must have facerecon installed, and the output folder must then be on shared storage (an ``s3://`` URI, or a volume
every node mounts) for the face folders and the parts.
A Ray already initialised in this process (a test session) is used as it is and left running.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.data

from facerecon.batch.inputs import WorkUnit
from facerecon.batch.storage import Store
from facerecon.batch.table import PARTS_DIR, to_arrow
from facerecon.batch.worker import UnitProcessor, WorkConfig

log = logging.getLogger(__name__)


class _Progress:
    """A tiny counter actor: the batch actors add the photos they finished, the driver polls it for the bar."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def get(self) -> int:
        return self.n


class BatchActor:
    """One Ray actor: a :class:`UnitProcessor` (one Reconstructor, loaded once) over batches of work units."""

    def __init__(self, config_json: str, progress: Any = None) -> None:
        self.processor = UnitProcessor(WorkConfig.model_validate_json(config_json))
        self.progress = progress

    def __call__(self, batch: Any) -> Any:
        """``batch``: a pyarrow table with a ``unit`` column (``WorkUnit`` JSON); returns the rows' table."""
        units = [WorkUnit.model_validate_json(text) for text in batch.column("unit").to_pylist()]
        try:
            rows = self.processor.process_batch(units)  # one R-Net call for the batch's faces
        except Exception as exc:  # a bug outside the per-photo guards: rows, not a failed dataset
            log.error("a batch failed", exc_info=exc)
            rows = [self.processor.failed_row(m, u, exc).model_dump() for u in units for m in u.members]
        if self.progress is not None:
            self.progress.add.remote(sum(len(u.members) for u in units))
        return to_arrow(rows)


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def run_ray(units: Sequence[WorkUnit], config: WorkConfig, store: Store, *, actors: int | None,
            address: str | None, batch_size: int, flush_every: int, gpus_per_actor: float,
            advance: Callable[[int], None], poll_s: float = 0.5) -> int:
    """Process ``units`` on a pool of Ray actors; rows land in ``parts/ray-<run id>/`` (Ray Data's Parquet writer).

    Args:
        actors: the actor-pool size (default: the cluster's CPUs; a local Ray gets that many CPUs).
        address: a running cluster to join, or None for a local Ray.
        batch_size: units per actor call (one R-Net call).
        flush_every: about how many units per block (= per Parquet file, the resume granularity).
        gpus_per_actor: ``num_gpus`` of each actor (0: CPU only).
        advance: called with the number of photos finished since the last call (the progress bar).

    Returns:
        the actor count used.
    """
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None  # a Ray job's driver finds its cluster there
        if address is None:
            ray.init(num_cpus=actors or os.cpu_count() or 1, include_dashboard=False)
        else:
            ray.init(address=address)
        started = True
    try:
        n_actors = max(1, min(actors or cluster_cpus(), len(units)))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver draws one bar in photos
        progress = ray.remote(num_cpus=0)(_Progress).remote()
        n_blocks = max(min(len(units), 2 * n_actors), math.ceil(len(units) / max(1, flush_every)))
        ds = ray.data.from_items([{"unit": u.model_dump_json()} for u in units], override_num_blocks=n_blocks)
        ds = ds.map_batches(
            BatchActor,
            fn_constructor_kwargs={"config_json": config.model_dump_json(), "progress": progress},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=1,
            num_gpus=gpus_per_actor or None,
        )
        target = store.uri(f"{PARTS_DIR}/ray-{config.run_id}")
        failure: list[BaseException] = []

        def write() -> None:
            try:
                # The write tasks only encode and store Arrow blocks: no CPU reserved, so they never wait for a
                # slot held by an actor.
                ds.write_parquet(target, ray_remote_args={"num_cpus": 0})
            except BaseException as exc:
                failure.append(exc)

        writer = threading.Thread(target=write, name="ray-write", daemon=True)
        t0 = time.monotonic()
        writer.start()
        seen = 0
        while writer.is_alive():
            writer.join(poll_s)
            n = ray.get(progress.get.remote())
            if n > seen:
                advance(n - seen)
                seen = n
        n = ray.get(progress.get.remote())
        if n > seen:
            advance(n - seen)
        if failure:
            raise failure[0]
        log.info("ray: %d units on %d actors in %.1f s", len(units), n_actors, time.monotonic() - t0)
        return n_actors
    finally:
        if started:
            ray.shutdown()
