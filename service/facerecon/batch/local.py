"""``--engine local``: a pool of processes on this machine, each holding one Reconstructor loaded once.

The driver (this process) hands out batches of work units (``batch_size`` photos: one R-Net call), two per worker
at a time (so a 100K-photo run never queues 100K futures), collects their rows and appends them to the resume log
in small Parquet parts (:class:`PartSink`): every ``flush_every`` photos or ``flush_seconds`` seconds, whichever
comes first, each part written whole. A run killed at any moment loses at most the photos since the last part; a
rerun skips every photo in a part.

Workers are started with ``spawn`` (not ``fork``: torch, onnxruntime and numba hold threads). A worker that dies
(out of memory, a native crash) breaks the pool: the units it and the others had in flight get ``worker_crashed``
rows (rerun with ``--retry-failed`` to try them again) and a fresh pool takes over the rest. As with any ``spawn``
pool, a script that calls :func:`~facerecon.batch.run_batch` needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from facerecon.batch.inputs import WorkUnit
from facerecon.batch.storage import Store
from facerecon.batch.table import PARTS_DIR, ResultRow, write_part
from facerecon.batch.worker import UnitProcessor, WorkConfig

log = logging.getLogger(__name__)

Advance = Callable[[int], None]


class PartSink:
    """Collects rows and writes them as Parquet parts ``parts/local-<run id>-<n>.parquet``."""

    def __init__(self, store: Store, run_id: str, flush_every: int = 32, flush_seconds: float = 10.0) -> None:
        self.store, self.run_id = store, run_id
        self.flush_every, self.flush_seconds = max(1, flush_every), flush_seconds
        self.rows: list[dict[str, Any]] = []
        self.photos = 0
        self.parts = 0
        self.last = time.monotonic()

    def add(self, rows: Sequence[dict[str, Any]], photos: int) -> None:
        self.rows.extend(rows)
        self.photos += photos
        if self.photos >= self.flush_every or time.monotonic() - self.last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            write_part(self.store, f"{PARTS_DIR}/local-{self.run_id}-{self.parts:06d}.parquet", self.rows)
            self.parts += 1
        self.rows, self.photos, self.last = [], 0, time.monotonic()


# -- in the worker processes ----------------------------------------------------------------------------------------
_PROCESSOR: UnitProcessor | None = None


def _exit_with_parent(parent: int) -> None:
    """A pool worker blocks on its queue forever if the driver dies without shutting the pool down (SIGKILL):
    leave with it."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(config_json: str, log_level: int) -> None:
    # Workers say warnings and errors (the per-worker start-up lines would break up the progress bar) unless the
    # driver runs with debug logging.
    level = log_level if log_level <= logging.DEBUG else max(log_level, logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    global _PROCESSOR
    _PROCESSOR = UnitProcessor(WorkConfig.model_validate_json(config_json))


def _run_units(units_json: list[str]) -> list[dict[str, Any]]:
    assert _PROCESSOR is not None, "worker not initialised"
    return _PROCESSOR.process_batch([WorkUnit.model_validate_json(u) for u in units_json])


# -- in the driver --------------------------------------------------------------------------------------------------
def _crashed(units: Sequence[WorkUnit], config: WorkConfig, exc: BaseException, code: str = "worker_crashed"
             ) -> list[dict[str, Any]]:
    if code == "worker_crashed":
        msg = (f"a worker process died while this photo was in flight ({type(exc).__name__}); it may have been "
               "another photo in flight at the time: rerun with --retry-failed")
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return [ResultRow(photo_id=m.photo_id, input_index=m.input_index, source=m.source, identity=u.identity,
                      identity_id=u.identity_id, status="error", error_code=code, error_message=msg,
                      run_id=config.run_id, worker="driver").model_dump() for u in units for m in u.members]


def _photos(units: Sequence[WorkUnit]) -> int:
    return sum(len(u.members) for u in units)


def run_local(units: Sequence[WorkUnit], config: WorkConfig, sink: PartSink, *, workers: int, batch_size: int,
              advance: Advance) -> None:
    """Process ``units`` on ``workers`` processes (0: in this process), ``batch_size`` units per worker call (one
    R-Net batch), feeding rows to ``sink``.

    ``advance(n)`` is called with the number of photos of each finished batch (the progress bar).
    """
    batches = [list(units[i : i + batch_size]) for i in range(0, len(units), max(1, batch_size))]
    try:
        if workers <= 0:
            processor = UnitProcessor(config)
            for batch in batches:
                sink.add(processor.process_batch(batch), _photos(batch))
                advance(_photos(batch))
            return
        _pool_loop(batches, config, sink, workers, advance)
    finally:
        sink.flush()


def _pool_loop(batches: list[list[WorkUnit]], config: WorkConfig, sink: PartSink, workers: int,
               advance: Advance) -> None:
    ctx = mp.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    todo = list(reversed(batches))  # pop() from the end keeps the input order
    while todo:
        completed = 0
        pending: dict[Future[list[dict[str, Any]]], list[WorkUnit]] = {}
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(config.model_dump_json(), level)) as pool:
            try:
                while todo or pending:
                    while todo and len(pending) < 2 * workers:
                        batch = todo.pop()
                        pending[pool.submit(_run_units, [u.model_dump_json() for u in batch])] = batch
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        batch = pending[fut]
                        try:
                            rows = fut.result()  # BrokenProcessPool leaves the batch in pending (marked below)
                        except BrokenProcessPool:
                            raise
                        except Exception as exc:  # a bug outside the per-photo guards: rows, not a crash
                            log.error("a batch failed", exc_info=exc)
                            rows = _crashed(batch, config, exc, code="internal")
                        del pending[fut]
                        completed += 1
                        sink.add(rows, _photos(batch))
                        advance(_photos(batch))
            except BrokenProcessPool as exc:
                if completed == 0:
                    raise RuntimeError("the batch workers failed before finishing any photo (models missing or "
                                       "out of memory? run with --workers 0 to see the error)") from exc
                log.error("a worker process died; %d batch(es) in flight are marked worker_crashed", len(pending))
                for batch in pending.values():
                    sink.add(_crashed(batch, config, exc), _photos(batch))
                    advance(_photos(batch))
                pending.clear()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
