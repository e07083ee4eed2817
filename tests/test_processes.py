"""``facerecon serve --processes 2``: two server processes under gunicorn's arbiter, one port, one set of metrics.

What it must show: both processes answer requests (each process's own samples appear in the metrics directory), the
metrics at ``/metrics`` are the sum over them whichever process answers the scrape, a process killed outright is
replaced and the service keeps answering, and SIGTERM stops everything cleanly (exit code 0).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server_utils import serve_subprocess, wait_all_ready

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "deep3d-examples" / "000002.jpg"

pytestmark = pytest.mark.skipif(os.name != "posix", reason="gunicorn runs on Unix only")


def _counted(metrics: str, endpoint: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("facerecon_http_requests_total{") and f'endpoint="{endpoint}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _reconstruct(url: str) -> int:
    # a fresh connection each time, so that either process may accept it
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{url}/v1/reconstruct", files={"image": ("p.jpg", PHOTO.read_bytes(), "image/jpeg")},
                   data={"format": "json", "refine": "false"})
        return r.status_code


def test_two_processes_share_the_port_the_metrics_and_shut_down_cleanly(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    with serve_subprocess(tmp_path, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, processes=2,
                          workers=1) as srv:
        workers = srv.children()
        assert len(workers) == 2, f"expected 2 server processes under the arbiter, got {workers}"
        wait_all_ready(srv.url)
        sent, statuses = 0, []
        answered: set[int] = set()
        with ThreadPoolExecutor(4) as pool:
            while sent < 64 and answered != workers:
                statuses += list(pool.map(_reconstruct, [srv.url] * 4))
                sent += 4
                # prometheus_client's multiprocess files: one per kind and process that recorded a sample
                answered = {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")} & workers
        assert statuses == [200] * sent
        assert answered == workers, f"only {answered} of {workers} answered {sent} requests"
        # whichever process answers the scrape reports every process's requests
        for _ in range(4):
            with httpx.Client(timeout=30) as c:
                text = c.get(f"{srv.url}/metrics").text
            assert _counted(text, "/v1/reconstruct") == sent
            assert "facerecon_ready 1.0" in text

        # a process killed outright is replaced; meanwhile the service answers (the other process, or the new one
        # with the JSON 503 "not ready" and Retry-After while it loads)
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        assert _reconstruct(srv.url) in (200, 503)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = srv.children()
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the killed process was not replaced: {srv.children()}")
        wait_all_ready(srv.url)
        assert _reconstruct(srv.url) == 200
        with httpx.Client(timeout=30) as c:
            assert _counted(c.get(f"{srv.url}/metrics").text, "/v1/reconstruct") >= sent + 1  # the dead one's too

        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
