"""Helpers shared by the HTTP tests and the HTTP bench: a real ``facerecon serve`` subprocess on loopback, its
memory as the kernel reports it, and a free port.

The in-thread server (``facerecon.api.server.serve_in_thread``) shares the test process's memory and signals; a
subprocess is what a deployment runs, so memory (``/proc/<pid>/status``) and SIGTERM are measured on one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
FACERECON_BIN = Path(sys.executable).with_name("facerecon")


def serve_command() -> list[str]:
    """``facerecon serve``: the installed console script beside this interpreter, else the CLI through it."""
    if FACERECON_BIN.is_file():
        return [str(FACERECON_BIN), "serve"]
    return [sys.executable, "-c", "import sys; from facerecon.cli import main; sys.exit(main())", "serve"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (bound then released; a race is possible but unlikely on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM`` the peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def rss_mib(pid: int) -> float:
    return proc_status_kib(pid, "VmRSS") / 1024.0


def peak_rss_mib(pid: int) -> float:
    return proc_status_kib(pid, "VmHWM") / 1024.0


def reset_peak_rss(pid: int) -> None:
    """Set ``VmHWM`` back to the current RSS (Linux: ``5`` into ``/proc/<pid>/clear_refs``), to measure the peak of
    what follows."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class ServerProcess:
    """A ``facerecon serve`` subprocess; ``log`` is the file its stdout/stderr go to."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> set[int]:
        """The process's children (the server processes under gunicorn's arbiter with ``processes > 1``)."""
        out: set[int] = set()
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            out.update(int(t) for t in (task / "children").read_text().split())
        return out

    def tree_rss_mib(self) -> float:
        """RSS of the process and its children together (MiB)."""
        total = 0.0
        for pid in {self.pid, *self.children()}:
            try:
                total += rss_mib(pid)
            except (FileNotFoundError, KeyError):  # gone meanwhile
                continue
        return total

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.pid)

    def reset_peak_rss(self) -> None:
        reset_peak_rss(self.pid)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM (graceful: uvicorn finishes in-flight requests first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL past ``timeout``; returns the exit code."""
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Poll ``/readyz`` until 200; returns the seconds waited. Raises if the process dies or time runs out."""
    t0 = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{url} not ready within {timeout} s")
        time.sleep(0.2)


def wait_all_ready(url: str, timeout: float = 120.0) -> None:
    """Until ``facerecon_ready`` (the minimum over a server's live processes) is 1: every process has loaded its
    models (``/readyz`` answers for the one process that takes the connection)."""
    deadline = time.monotonic() + timeout
    while "facerecon_ready 1.0" not in httpx.get(f"{url}/metrics", timeout=10).text:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every server process at {url} became ready within {timeout} s")
        time.sleep(0.2)


@contextmanager
def serve_subprocess(log_dir: Path, *, ready_timeout: float = 240.0, env: dict[str, str] | None = None,
                     **settings: object) -> Iterator[ServerProcess]:
    """Start ``facerecon serve`` on 127.0.0.1 and a free port, with ``FACERECON_<KEY>`` set from ``settings``;
    yield once ``/readyz`` is 200; stop it (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    full_env = {**os.environ, **(env or {})}
    full_env.update({f"FACERECON_{k.upper()}": str(v) for k, v in settings.items()})
    full_env.update({"FACERECON_HOST": "127.0.0.1", "FACERECON_PORT": str(port)})
    full_env.setdefault("FACERECON_LOG_LEVEL", "WARNING")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"facerecon-serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_command(), stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                cwd=REPO)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        try:
            wait_ready(server.url, ready_timeout, proc)
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- server log ---\n{server.log_tail()}") from exc
        yield server
    finally:
        server.stop()
