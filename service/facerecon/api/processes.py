"""``facerecon serve`` with several server processes: gunicorn's arbiter running facerecon's uvicorn server in each.

Why processes: a request of the R-Net path (``refine=false``, ~15 ms) spends much of its time in Python (the HTTP
layer, the pipeline's glue), under one interpreter lock, so inference *threads* (``settings.workers``) scale only
the parts that release it (onnxruntime, the fit's kernels). Processes scale the whole request. Each process is a
complete server (its own models, ``workers`` inference threads, queue and connection cap: the limits are per
process) on one shared listening socket; the kernel spreads connections over them.

The engine is gunicorn (its arbiter forks the processes, restarts one that dies, and on SIGTERM stops them
gracefully) with :class:`Worker`, the ``uvicorn-worker`` class made to run facerecon's own :class:`Server` and HTTP
protocol (header timeout, connection cap, JSON for malformed HTTP, the app told when shutdown begins), so a process
behaves exactly as ``processes=1`` does.

Load-aware accepting: the processes share one listening socket, and a process's event loop would accept
connections while its inference worker is busy (the loop is free; the work runs in a thread), so with plain
epoll one process tends to take most connections (the wake-up order favours the process that waited last, the
busy one) and requests queue behind each other while another process idles. So each process accepts in its own
thread (:class:`_Acceptor`) and only while it has a free inference slot: a connection goes to a process that can
start on it now. When every process is busy, each accepts after :data:`GATE_MAX_WAIT_S` (the request then waits
in that process's queue, or gets 503 when it is full), so probes and scrapes are never refused, only delayed; a
process still loading its models defers to ready ones the same way. A kept-alive connection stays with the process
that accepted it (as behind any load balancer).

Metrics: ``/metrics`` answers for all processes together, whichever one takes the scrape: the processes write
their samples to ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory made here unless the environment names one),
prometheus_client's multiprocess mode (:mod:`facerecon.api.metrics`).

gunicorn runs on Unix only; ``processes=1`` (the default) never imports it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from uvicorn_worker import UvicornWorker

from facerecon.api.http import Server
from facerecon.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["MULTIPROC_ENV", "Worker", "serve_processes"]

log = logging.getLogger("facerecon.api.processes")

#: prometheus_client reads it when it is first imported: set before any process imports it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds a busy (or loading) process waits for a free slot before it accepts anyway (module docstring).
GATE_MAX_WAIT_S = 0.1
#: Seconds an accepted connection counts as taking a slot before its request has taken one (its headers arrive
#: within about a millisecond on a LAN; the slot is taken before the body is read).
PENDING_S = 0.005
#: Seconds between a busy process's looks at its slots.
_POLL_S = 0.002


class _Acceptor:
    """Accepts connections on the shared listening sockets in a thread, one at a time and only while
    ``free_slots()`` (less those accepted in the last :data:`PENDING_S`) is positive, or after
    :data:`GATE_MAX_WAIT_S` without one; hands each to the event loop as a connection of ``factory``'s protocol.

    The sockets stay non-blocking (their file description is the arbiter's and every process's): ``select`` wakes
    every idle process, one wins ``accept``, the others see ``BlockingIOError`` and wait again."""

    def __init__(self, sockets: list[socket.socket], loop: asyncio.AbstractEventLoop,
                 factory: Callable[[], asyncio.Protocol], free_slots: Callable[[], int]) -> None:
        self._socks = sockets
        self._loop = loop
        self._factory = factory
        self._free_slots = free_slots
        self._recent: deque[float] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="facerecon-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)

    def _free(self) -> int:
        now = time.monotonic()
        while self._recent and now - self._recent[0] > PENDING_S:
            self._recent.popleft()
        try:
            return self._free_slots() - len(self._recent)
        except Exception:  # the app's state not set up yet: accept (the app answers 503 not_ready itself)
            return 1

    def _run(self) -> None:
        while not self._stop.is_set():
            waited = 0.0
            while self._free() <= 0 and waited < GATE_MAX_WAIT_S and not self._stop.is_set():
                time.sleep(_POLL_S)
                waited += _POLL_S
            try:
                readable, _, _ = select.select(self._socks, [], [], 0.05)
            except (OSError, ValueError):  # the sockets closed under us: shutting down
                return
            for sock in readable[:1]:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):  # another process took it
                    continue
                except OSError:
                    if self._stop.is_set():
                        return
                    log.exception("accept failed")
                    continue
                self._recent.append(time.monotonic())
                try:
                    self._loop.call_soon_threadsafe(self._hand_over, conn)
                except RuntimeError:  # the loop has closed
                    conn.close()
                    return

    def _hand_over(self, conn: socket.socket) -> None:
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, sock=conn))
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a connection could not be set up: %s", task.exception())


class _GatedServer(Server):
    """facerecon's uvicorn server that creates no listener of its own: its :class:`_Acceptor` feeds it."""

    def __init__(self, config: Any, on_shutdown: Callable[[], None] | None, listeners: list[socket.socket],
                 free_slots: Callable[[], int]) -> None:
        super().__init__(config, on_shutdown=on_shutdown)
        self._listeners = listeners
        self._free_slots = free_slots
        self._acceptor: _Acceptor | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan, no listener
        loop = asyncio.get_running_loop()
        config = self.config

        def factory() -> asyncio.Protocol:  # what uvicorn's own listener builds per connection
            return config.http_protocol_class(config=config, server_state=self.server_state,  # type: ignore[call-arg]
                                              app_state=self.lifespan.state, _loop=loop)

        self._acceptor = _Acceptor(self._listeners, loop, factory, self._free_slots)
        self._acceptor.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._acceptor is not None:
            self._acceptor.stop()  # accept nothing more; the arbiter closes the shared sockets
        await super().shutdown(None)


class Worker(UvicornWorker):
    """A gunicorn worker process serving the app with facerecon's uvicorn configuration and :class:`Server`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from facerecon.api.server import uvicorn_kwargs

        settings: Settings = self.app.settings  # the gunicorn application (:class:`_Application`)
        kw = uvicorn_kwargs(settings)
        for k in ("host", "port"):  # the arbiter holds the listening socket
            kw.pop(k)
        # the arbiter's liveness check: the server's main loop notifies it every `timeout_notify` seconds
        kw.update(app=None, log_config=None, timeout_notify=self.timeout, callback_notify=self.callback_notify)
        import uvicorn

        self.config = uvicorn.Config(**kw)

    async def _serve(self) -> None:
        app: FastAPI = self.wsgi  # what the application's load() returned in this process
        self.config.app = app
        state = getattr(app.state, "service", None)
        listeners = [getattr(s, "sock", s) for s in self.sockets]  # gunicorn's wrappers hold the socket

        def free_slots() -> int:
            if state is None:
                return 1
            if not state.ready or state.pool is None:
                return 0  # loading: let ready processes take the connection first
            return state.settings.workers - state.pool.admitted

        server = _GatedServer(self.config, None if state is None else state.begin_shutdown, listeners, free_slots)
        self._install_sigquit_handler()
        await server.serve(sockets=[])
        if not server.started:
            from gunicorn.arbiter import Arbiter

            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class _Application(BaseApplication):  # type: ignore[misc]
    """gunicorn's embedding API: the configuration from :class:`Settings`, the app built in each process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        host = f"[{s.host}]" if ":" in s.host else s.host
        for key, value in {
            "bind": [f"{host}:{s.port}"],
            "workers": s.processes,
            "worker_class": f"{Worker.__module__}.{Worker.__qualname__}",
            # SIGTERM: the processes stop as one does alone (the app's grace, then uvicorn's margin); the arbiter
            # kills what is left a little after that
            "graceful_timeout": math.ceil(s.graceful_timeout_s + 10.0),  # gunicorn takes whole seconds
            "timeout": 120,  # a process that stops notifying the arbiter for this long is restarted
            "keepalive": math.ceil(s.timeout_keep_alive_s),  # uvicorn's own (exact) setting is what applies
            "loglevel": s.log_level.lower(),
            "accesslog": None,
            "errorlog": "-",
            "proc_name": "facerecon",
            "preload_app": False,  # each process loads its own models after the fork
            "child_exit": _child_exit,
        }.items():
            self.cfg.set(key, value)

    def load(self) -> FastAPI:
        from facerecon.api.app import create_app

        return create_app(self.settings)


def _child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: a process has exited; its live gauges leave the aggregate."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def serve_processes(settings: Settings) -> None:
    """Serve with ``settings.processes`` processes until SIGTERM/SIGINT (blocking; module docstring)."""
    if "prometheus_client" in sys.modules and not os.environ.get(MULTIPROC_ENV):
        raise RuntimeError("prometheus_client was imported before the server processes were set up: its "
                           f"multiprocess mode needs {MULTIPROC_ENV} set first")
    made = None
    if not os.environ.get(MULTIPROC_ENV):
        made = tempfile.mkdtemp(prefix="facerecon-metrics-")
        os.environ[MULTIPROC_ENV] = made
    metrics_dir = Path(os.environ[MULTIPROC_ENV])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # a former run's samples would be summed in
        stale.unlink()
    log.info("serving on http://%s:%d with %d processes (each: workers %d, queue %d); metrics in %s",
             settings.host, settings.port, settings.processes, settings.workers, settings.queue_size, metrics_dir)
    try:
        _Application(settings).run()
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
