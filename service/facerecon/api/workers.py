"""The bounded inference pool: N worker threads and a bounded wait queue, with admission decided first.

Why threads: the engine is torch/numba/onnxruntime code that releases the GIL in its heavy parts, and the
:class:`~facerecon.pipeline.Reconstructor` is thread-safe; a process pool would load the models N times.

Contract:

* **Admission first.** :meth:`InferencePool.admit` gives a request its :class:`Ticket` (a slot) *before* its body
  is read or decoded, or raises :class:`~facerecon.api.errors.Overloaded` at once, with a ``retry_after``
  estimated from the mean job time and the backlog: the pool holds at most ``workers + queue_size`` tickets
  (requests reading, decoding, waiting or running), so a refused request costs neither its upload's memory nor a
  decode, and a full service answers 503 instead of hanging. The slot is freed when the request releases its
  ticket, or, if a worker is running its job then, when that job returns.
* :meth:`InferencePool.run` is awaited on the event loop. It enqueues the job and waits on an ``asyncio.Future``
  that a worker thread completes (``loop.call_soon_threadsafe``), so the loop stays free: ``/healthz``,
  ``/readyz`` and ``/metrics`` answer while every worker computes.
* **Cancellation.** A job nobody waits for any more (the request's deadline passed, its client disconnected, the
  server's shutdown grace ended) is removed from the queue at once; a running one cannot be interrupted inside
  torch, but its ticket is cancelled and the job checks it at every stage boundary (:meth:`Ticket.check`, the
  pipeline's ``checkpoint`` hook), so it stops within one stage; its result is dropped.
* :meth:`InferencePool.begin_shutdown` stops admission (503 ``shutting_down``); :meth:`InferencePool.close` lets
  accepted jobs finish (up to a timeout) and joins the threads.
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

from facerecon.api.errors import Cancelled, Overloaded, RequestTimedOut, ShuttingDown

__all__ = ["InferencePool", "Job", "JobResult", "Ticket"]

log = logging.getLogger("facerecon.api.workers")

T = TypeVar("T")


#: Retry-After of a 503 ``shutting_down``: time for a restart or for the load balancer to route elsewhere.
SHUTDOWN_RETRY_S = 5


class Ticket:
    """One admitted request's slot (:meth:`InferencePool.admit`), and its job's cancellation flag.

    Thread-safe: the event loop cancels, the worker thread checks.
    """

    def __init__(self, pool: InferencePool, deadline: float | None) -> None:
        self._pool = pool
        #: ``time.perf_counter()`` past which the work is no longer wanted (None: no deadline)
        self.deadline = deadline
        self._reason: str | None = None
        self._holds_slot = True
        self._request_done = False
        self._running = False

    @property
    def cancelled(self) -> str | None:
        """Why the work is no longer wanted (``timeout``, ``client gone``, ``shutdown``), or None."""
        if self._reason is None and self.deadline is not None and time.perf_counter() > self.deadline:
            self._reason = "timeout"
        return self._reason

    def cancel(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def check(self, stage: str = "") -> None:
        """Raise :class:`~facerecon.api.errors.Cancelled` when the work is no longer wanted (the pipeline's
        ``checkpoint``: called at each stage boundary, on the worker thread)."""
        reason = self.cancelled
        if reason is not None:
            raise Cancelled(f"stopped before {stage or 'the next stage'}: {reason}", reason=reason, stage=stage)

    def release(self) -> None:
        """The request is done with its slot (idempotent); a job a worker is running keeps it until it returns."""
        self._pool._release(self)


@dataclass(eq=False)
class Job:
    """One unit of work: ``fn()`` runs on a worker thread; its outcome completes ``future`` on ``loop``."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    ticket: Ticket
    owns_ticket: bool = False  # submitted without a ticket: the job's own, freed when it ends
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
        self._accepted = 0  # tickets holding a slot (requests reading, decoding, waiting or running)
        self._running = 0
        self._draining = False  # begin_shutdown: no new admissions
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

    @property
    def admitted(self) -> int:
        """Slots held: requests admitted and not finished (reading, decoding, waiting or running)."""
        return self._accepted

    def retry_after_s(self) -> float:
        """A guess at when a slot frees up: the backlog per worker times the mean job time (1 to 60 s)."""
        backlog = self._accepted - self.workers + 1
        return min(60.0, max(1.0, self._mean_run_s * max(1, backlog) / self.workers))

    # -- admission and submission -------------------------------------------------------------------------------
    def admit(self, deadline: float | None = None) -> Ticket:
        """A slot for one request, or :class:`Overloaded` / :class:`ShuttingDown` at once (nothing is held)."""
        with self._cond:
            if self._draining or self._closed:
                raise ShuttingDown("the service is shutting down", retry_after=SHUTDOWN_RETRY_S)
            if self._accepted >= self.capacity:
                raise Overloaded(
                    f"all {self.workers} inference workers are busy and {self.queue_size} requests are waiting",
                    retry_after=self.retry_after_s(), workers=self.workers, queue_size=self.queue_size,
                )
            self._accepted += 1
            return Ticket(self, deadline)

    def submit(self, fn: Callable[[], T], ticket: Ticket | None = None) -> Job:
        """Queue ``fn`` under ``ticket`` (default: admit it now, or raise :class:`Overloaded` at once); call from
        the event loop's thread."""
        loop = asyncio.get_running_loop()
        owns = ticket is None
        ticket = self.admit() if ticket is None else ticket
        with self._cond:
            if self._closed:
                if owns:
                    self._free(ticket)
                raise ShuttingDown("the service is shutting down", retry_after=SHUTDOWN_RETRY_S)
            job = Job(fn=fn, future=loop.create_future(), loop=loop, ticket=ticket, owns_ticket=owns)
            self._queue.append(job)
            self._cond.notify()
        return job

    async def run(self, fn: Callable[[], T], *, timeout: float | None = None, ticket: Ticket | None = None
                  ) -> JobResult[T]:
        """Run ``fn`` on a worker (under ``ticket``, else a slot admitted now) and await its value without
        blocking the loop.

        Raises:
            Overloaded: no ticket given and the pool is full (nothing was queued).
            RequestTimedOut: ``timeout`` seconds passed first (a queued job is dropped, a running one is cancelled
                at its next stage boundary).
            whatever ``fn`` raised.
        """
        job = self.submit(fn, ticket)
        try:
            value = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            self._abandon(job, "timeout")
            stage = "queued" if job.started == 0.0 else "running"
            raise RequestTimedOut(
                f"no result within the request's deadline (the job was still {stage})",
                waited_s=round(timeout or 0.0, 3), stage=stage,
            ) from None
        except asyncio.CancelledError:  # the request task was cancelled (client gone, shutdown)
            self._abandon(job, job.ticket.cancelled or "cancelled")
            raise
        return JobResult(
            value=value,
            queued_ms=(job.started - job.enqueued) * 1000.0,
            run_ms=(job.finished - job.started) * 1000.0,
        )

    def _abandon(self, job: Job, reason: str) -> None:
        """Nobody waits for ``job`` any more: drop it from the queue if no worker took it, else cancel its ticket
        (the worker stops at the next stage boundary)."""
        job.future.cancel()
        job.ticket.cancel(reason)
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:  # already taken by a worker
                return
            if job.owns_ticket:
                self._free(job.ticket)

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            ticket._request_done = True
            if not ticket._running:
                self._free(ticket)

    def _free(self, ticket: Ticket) -> None:
        """Give the ticket's slot back (call with the lock held; once per ticket)."""
        if ticket._holds_slot:
            ticket._holds_slot = False
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
                if job.future.cancelled() or job.ticket.cancelled:  # abandoned while waiting: skip it
                    job.ticket.cancel(job.ticket.cancelled or "cancelled")
                    if job.owns_ticket or job.ticket._request_done:
                        self._free(job.ticket)
                    job.complete(error=Cancelled("dropped from the queue", reason=job.ticket.cancelled))
                    continue
                self._running += 1
                job.ticket._running = True
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
                    job.ticket._running = False
                    if job.owns_ticket or job.ticket._request_done:
                        self._free(job.ticket)
                    if job.ticket.cancelled is None:  # a job cut short says nothing about the mean job time
                        self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * elapsed

    # -- shutdown ------------------------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Admit nothing more (503 ``shutting_down``); what was admitted still runs."""
        with self._cond:
            self._draining = True

    def close(self, timeout: float | None = None) -> bool:
        """Stop admitting, let accepted jobs finish, join the workers. True when all of them exited in time."""
        with self._cond:
            self._draining = True
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.perf_counter() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.perf_counter()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("inference workers still busy at shutdown: %s", ", ".join(alive))
        return not alive
