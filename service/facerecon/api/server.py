"""Running the app: :func:`serve` (the ``facerecon serve`` command) and :func:`serve_in_thread` (tests, notebooks).

Graceful shutdown: on SIGTERM or SIGINT uvicorn stops accepting connections, closes idle keep-alive connections and
tells the app (:class:`facerecon.api.http.Server`), which admits nothing more (503 ``shutting_down``) and lets the
requests in flight finish for up to ``settings.graceful_timeout_s`` seconds; past it, those still waiting or running
are answered the JSON 503 ``shutting_down`` with ``Retry-After`` and their jobs cancelled (a running job stops at its
next stage boundary). Then the app's lifespan shutdown stops the inference pool. A second signal exits at once.

Connections (:mod:`facerecon.api.http`): idle keep-alive connections close after ``settings.timeout_keep_alive_s``;
a request's headers must arrive within ``settings.timeout_headers_s``; at most ``settings.max_connections`` are
open at once; malformed HTTP is answered in the JSON error shape.

uvicorn and the app are imported inside the functions, so importing this module (the CLI does) stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from facerecon.config import Settings, get_settings

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

__all__ = ["RunningServer", "add_serve_arguments", "cli_serve", "serve", "serve_in_thread"]

log = logging.getLogger("facerecon.api.server")


def uvicorn_kwargs(settings: Settings) -> dict[str, Any]:
    """uvicorn's configuration for ``settings`` (also each process's under ``processes > 1``)."""
    from facerecon.api.http import GRACE_MARGIN_S, guarded_protocol

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "lifespan": "on",
        "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.timeout_keep_alive_s,
        "timeout_graceful_shutdown": settings.graceful_timeout_s + GRACE_MARGIN_S,
        "server_header": False,
        "proxy_headers": False,
    }


def _config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(app, **{**uvicorn_kwargs(settings), **overrides})


def _server(app: FastAPI, config: uvicorn.Config) -> uvicorn.Server:
    """The uvicorn server, telling the app's state when shutdown begins (an app without one: plain uvicorn)."""
    from facerecon.api.http import Server

    state = getattr(app.state, "service", None)
    return Server(config, on_shutdown=None if state is None else state.begin_shutdown)


def serve(settings: Settings | None = None) -> None:
    """Serve the API on ``settings.host:settings.port`` until SIGTERM/SIGINT (blocking).

    The process answers ``/healthz`` immediately; ``/readyz`` turns 200 when the models are loaded and warmed up.
    With ``settings.processes > 1``, that many server processes share the port (:mod:`facerecon.api.processes`).
    """
    settings = settings or get_settings()
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("facerecon").setLevel(level)
    if settings.processes > 1:
        try:
            from facerecon.api.processes import serve_processes
        except ImportError as exc:  # gunicorn's arbiter needs Unix (fcntl, fork)
            raise RuntimeError(f"processes={settings.processes} needs gunicorn, which runs on Unix only ({exc}); "
                               "use processes=1 with more workers, or one process per container") from exc
        serve_processes(settings)
        return
    from facerecon.api.app import create_app

    app = create_app(settings)
    log.info("serving on http://%s:%d (workers %d, queue %d, graceful shutdown %.0f s)", settings.host,
             settings.port, settings.workers, settings.queue_size, settings.graceful_timeout_s)
    _server(app, _config(app, settings)).run()


@dataclass
class RunningServer:
    """A server started by :func:`serve_in_thread`."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        """What SIGTERM does: stop accepting, finish in-flight requests, run the lifespan shutdown."""
        self.server.should_exit = True
        self.thread.join(timeout)


@contextmanager
def serve_in_thread(app: FastAPI, settings: Settings | None = None, *, host: str = "127.0.0.1", port: int = 0,
                    start_timeout: float = 60.0, log_level: str = "warning") -> Iterator[RunningServer]:
    """Run ``app`` under uvicorn on a background thread, on ``host:port`` (0 = a free port, bound before start).

    Yields once the server accepts connections (the app may still be loading: poll ``/readyz``); stops it
    gracefully on exit.
    """
    settings = settings or get_settings()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = _server(app, _config(app, settings, host=host, port=bound, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="facerecon-uvicorn", daemon=True)
    thread.start()
    running = RunningServer(url=f"http://{host}:{bound}", server=server, thread=thread)
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread exited during start-up (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start within {start_timeout} s")
            time.sleep(0.02)
        yield running
    finally:
        running.stop(settings.graceful_timeout_s + 10.0)
        sock.close()


# -- the CLI's `facerecon serve` ------------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``facerecon serve``; each overrides the matching ``FACERECON_*`` setting."""
    parser.add_argument("--host", help="bind address (FACERECON_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (FACERECON_PORT, default 8000)")
    parser.add_argument("--workers", type=int, help="inference worker threads (FACERECON_WORKERS)")
    parser.add_argument("--processes", type=int,
                        help="server processes sharing the port, each with its models and --workers threads "
                             "(FACERECON_PROCESSES)")
    parser.add_argument("--queue-size", type=int, help="requests waiting beyond the workers (FACERECON_QUEUE_SIZE)")
    parser.set_defaults(func=cli_serve)


def cli_serve(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in ("host", "port", "workers", "processes", "queue_size")
                 if getattr(args, k, None) is not None}
    settings = get_settings()
    if overrides:
        settings = Settings.model_validate({**settings.model_dump(), **overrides})
    serve(settings)
    return 0
