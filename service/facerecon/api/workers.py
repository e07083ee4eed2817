"""The bounded inference pool: N worker threads and a bounded wait queue.

Why threads: the engine is torch/numba/onnxruntime code that releases the GIL in its heavy parts, and the
:class:`~facerecon.pipeline.Reconstructor` is thread-safe; a process pool would load the models N times.

Contract:

* :meth:`InferencePool.run` is awaited on the event loop. It enqueues the job and waits on an ``asyncio.Future``
  that a worker thread completes (``loop.call_soon_threadsafe``), so the loop stays free: ``/healthz``,
  ``/readyz`` and ``/metrics`` answer while every worker computes.
* Admission is immediate: the pool holds at most ``workers + queue_size`` accepted jobs (running or waiting). One
  more raises :class:`~facerecon.api.errors.Overloaded` at once, with a ``retry_after`` estimated from the mean
  job time and the backlog, so a full service answers 503 instead of hanging.
* Timeouts: ``run(..., timeout=)`` raises :class:`~facerecon.api.errors.RequestTimedOut`. A job still waiting is
  then removed from the queue (its slot freed at once); a job already running cannot be interrupted (torch has no
  cancellation): it finishes, still counts against capacity while it runs, and its result is dropped.
* :meth:`InferencePool.close` stops admission, lets accepted jobs finish (up to a timeout) and joins the threads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from facerecon.api.errors import Overloaded, RequestTimedOut

__all__ = ["InferencePool", "Job", "JobResult"]

log = logging.getLogger("facerecon.api.workers")

T = TypeVar("T")


@dataclass(eq=False)
class Job:
    """One unit of work: ``fn()`` runs on a worker thread; its outcome completes ``future`` on ``loop``."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0

    def complete(self, value: Any = None, error: BaseException | None = None) -> None:
        """Hand the outcome to the event loop (thread-safe; a cancelled future or closed loop drops it)."""
        self.finished = time.perf_counter()

        def _set() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(_set)


@dataclass(frozen=True)
class JobResult(Generic[T]):
    """A job's value and where its time went (milliseconds)."""

    value: T
    queued_ms: float
    run_ms: float


class InferencePool:
    """``workers`` threads over a bounded FIFO (see the module docstring for the contract).

    Args:
        workers: worker threads (``settings.workers``).
        queue_size: jobs that may wait beyond the running ones (``settings.queue_size``); 0 = no waiting.
    """

    def __init__(
        self,
        workers: int,
        queue_size: int,
        *,
        name: str = "facerecon-infer",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.workers = workers
        self.queue_size = queue_size
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._accepted = 0  # jobs admitted and not finished (waiting + running)
        self._running = 0
        self._closed = False
        self._mean_run_s = 1.0  # EWMA of one job's run time, for Retry-After
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # -- observation ---------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.workers + self.queue_size

    @property
    def waiting(self) -> int:
        """Jobs in the queue, not yet taken by a worker (the queue-depth gauge)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Jobs a worker is executing now."""
        return self._running

    def retry_after_s(self) -> float:
        """A guess at when a slot frees up: the backlog per worker times the mean job time (1 to 60 s)."""
        backlog = self._accepted - self.workers + 1
        return min(60.0, max(1.0, self._mean_run_s * max(1, backlog) / self.workers))

    # -- submission ----------------------------------------------------------------------------------------------
    def submit(self, fn: Callable[[], T]) -> Job:
        """Admit ``fn`` or raise :class:`Overloaded` at once; call from the event loop's thread."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closed:
                raise Overloaded("the service is shutting down", retry_after=5)
            if self._accepted >= self.capacity:
                raise Overloaded(
                    f"all {self.workers} inference workers are busy and {self.queue_size} requests are waiting",
                    retry_after=self.retry_after_s(), workers=self.workers, queue_size=self.queue_size,
                )
            job = Job(fn=fn, future=loop.create_future(), loop=loop)
            self._accepted += 1
            self._queue.append(job)
            self._cond.notify()
        return job

    async def run(self, fn: Callable[[], T], *, timeout: float | None = None
                  ) -> JobResult[T]:
        """Run ``fn`` on a worker and await its value without blocking the loop.

        Raises:
            Overloaded: the pool is full (nothing was queued).
            RequestTimedOut: ``timeout`` seconds passed first (a queued job is skipped, a running one finishes).
            whatever ``fn`` raised.
        """
        job = self.submit(fn)
        try:
            value = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            self._abandon(job)
            stage = "queued" if job.started == 0.0 else "running"
            raise RequestTimedOut(
                f"no result within the request's deadline (the job was still {stage})",
                waited_s=round(timeout or 0.0, 3), stage=stage,
            ) from None
        except asyncio.CancelledError:  # the request task was cancelled (client gone, shutdown)
            self._abandon(job)
            raise
        return JobResult(
            value=value,
            queued_ms=(job.started - job.enqueued) * 1000.0,
            run_ms=(job.finished - job.started) * 1000.0,
        )

    def _abandon(self, job: Job) -> None:
        """Nobody waits for ``job`` any more: drop it from the queue (freeing its slot) if no worker took it."""
        job.future.cancel()
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:  # already taken by a worker: it finishes and frees its slot then
                return
            self._accepted -= 1

    # -- workers -------------------------------------------------------------------------------------------------
    def _take(self) -> Job | None:
        """Block for the next job; ``None`` when closed and drained."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None
                job = self._queue.popleft()
                if job.future.cancelled():  # timed out while waiting: skip it
                    self._accepted -= 1
                    continue
                self._running += 1
                return job

    def _worker(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            job.started = time.perf_counter()
            try:
                value = job.fn()
            except BaseException as exc:  # delivered to the awaiting request, mapped there; the worker lives on
                job.complete(error=exc)
            else:
                job.complete(value)
            finally:
                elapsed = time.perf_counter() - job.started
                with self._cond:
                    self._running -= 1
                    self._accepted -= 1
                    self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * elapsed

    # -- shutdown ------------------------------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> bool:
        """Stop admitting, let accepted jobs finish, join the workers. True when all of them exited in time."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.perf_counter() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.perf_counter()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("inference workers still busy at shutdown: %s", ", ".join(alive))
        return not alive
