"""What bounds one request besides the pool's slots (:mod:`facerecon.api.workers`): the memory all decodes in flight
may use together, the end of the shutdown grace period, and the client going away.

* :class:`MemoryBudget`: a decode first asks for the bytes :func:`facerecon.imaging.probe_image` estimates from
  the header, and waits (FIFO) while the decodes in flight hold too much; one larger than the whole budget runs
  alone. So a burst of small files that decode to huge images cannot add up.
* :class:`ShutdownGrace`: set when the server starts shutting down (:class:`facerecon.api.server.Server`); its
  ``over`` event fires ``graceful_timeout_s`` later. Work still waiting or running then is cancelled and the
  request answers the JSON 503 ``shutting_down`` with ``Retry-After``, before uvicorn would cancel it into a
  plain-text 500.
* :func:`release_free_memory`: after a large decode, hands the freed pages back to the system (glibc keeps freed
  memory in per-thread arenas: without it, RSS stays ~250 MiB above idle after one 40 MP PNG, though nothing is
  in use).
* :func:`guarded`: runs a request's work while watching both, and the client's ``http.disconnect`` once its body
  is read: a gone client's job is dropped from the queue, or stopped at its next stage boundary.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.types import Receive

from facerecon.api.errors import ClientDisconnected, ShuttingDown
from facerecon.api.workers import SHUTDOWN_RETRY_S, Ticket

__all__ = ["MemoryBudget", "ShutdownGrace", "guarded", "release_free_memory"]

log = logging.getLogger("facerecon.api")

T = TypeVar("T")


class MemoryBudget:
    """Bytes shared by the decodes in flight (event-loop only; no lock needed)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, n_bytes: int) -> AsyncIterator[int]:
        """Hold ``n_bytes`` (at most the whole budget) for the block; waits while they are not free."""
        n = await self._acquire(n_bytes)
        try:
            yield n
        finally:
            self._release(n)

    async def _acquire(self, n_bytes: int) -> int:
        n = max(0, min(int(n_bytes), self.capacity))
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return n
        entry = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():  # granted, then cancelled before it ran
                self._release(n)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise
        return n

    def _release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            n, future = self._waiters.popleft()
            if future.done():
                continue
            self.used += n
            future.set_result(None)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``; a no-op elsewhere). Milliseconds; call
    off the event loop after freeing a large buffer."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class ShutdownGrace:
    """The server's shutdown, seen from the requests (methods called on the event loop)."""

    def __init__(self) -> None:
        self.started = False
        self.over = asyncio.Event()

    def begin(self, grace_s: float) -> None:
        """Shutdown starts now; ``over`` fires after ``grace_s`` seconds."""
        if self.started:
            return
        self.started = True
        asyncio.get_running_loop().call_later(max(0.0, grace_s), self.over.set)


async def guarded(work: Callable[[], Awaitable[T]], *, ticket: Ticket, grace: ShutdownGrace, receive: Receive,
                  body_read: asyncio.Event) -> T:
    """``await work()``, unless the shutdown grace ends first (:class:`ShuttingDown`) or, once ``body_read`` is
    set, the client disconnects (:class:`ClientDisconnected`); either cancels ``ticket``, which drops or stops
    the request's job."""
    outcome: dict[str, Any] = {}

    async with anyio.create_task_group() as tg:

        async def main() -> None:
            try:
                outcome["value"] = await work()
            except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
                outcome["error"] = exc
            tg.cancel_scope.cancel()

        async def watch_shutdown() -> None:
            await grace.over.wait()
            ticket.cancel("shutdown")
            outcome.setdefault("error", ShuttingDown(
                "the service shut down before this request was answered", retry_after=SHUTDOWN_RETRY_S))
            tg.cancel_scope.cancel()

        async def watch_client() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            ticket.cancel("client gone")
            outcome.setdefault("error", ClientDisconnected("the client disconnected before its answer was ready"))
            tg.cancel_scope.cancel()

        tg.start_soon(main)
        tg.start_soon(watch_shutdown)
        tg.start_soon(watch_client)
    if "value" in outcome:  # done, even if a watcher fired in the same instant
        return outcome["value"]  # type: ignore[no-any-return]
    raise outcome["error"]
