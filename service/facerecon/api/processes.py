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

Metrics: ``/metrics`` answers for all processes together, whichever one takes the scrape: the processes write
their samples to ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory made here unless the environment names one),
prometheus_client's multiprocess mode (:mod:`facerecon.api.metrics`).

gunicorn runs on Unix only; ``processes=1`` (the default) never imports it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication
from uvicorn_worker import UvicornWorker

from facerecon.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["MULTIPROC_ENV", "Worker", "serve_processes"]

log = logging.getLogger("facerecon.api.processes")

#: prometheus_client reads it when it is first imported: set before any process imports it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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
        from facerecon.api.http import Server

        app: FastAPI = self.wsgi  # what the application's load() returned in this process
        self.config.app = app
        state = getattr(app.state, "service", None)
        server = Server(self.config, on_shutdown=None if state is None else state.begin_shutdown)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
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
