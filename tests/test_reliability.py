"""Reliability of the HTTP service, measured on real servers on 127.0.0.1 (issue #8).

* Schemathesis against the live OpenAPI schema of the real app (in-thread uvicorn): generated requests for every
  operation; no 5xx, and every response conforms to the schema it documents (status, content type, body).
* A bounded concurrent load on a ``facerecon serve`` subprocess with the real pipeline and a small photo: every
  answer is a 200 or a 503 ``overloaded`` carrying ``Retry-After``; the server's RSS comes back near where it was
  after warm-up.
* SIGTERM to that subprocess while requests are in flight: they all finish with 200, then the process exits
  (uvicorn re-raises the SIGTERM after its clean shutdown: exit status -15), well before the graceful timeout.

Bounded: ~1-2 minutes on two shared CPU cores (the load is 24 requests; most of the time is the fits).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import need_shared
from tests.server_utils import ServerProcess, serve_subprocess, wait_ready

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

from facerecon.api.app import create_app  # noqa: E402
from facerecon.api.server import serve_in_thread  # noqa: E402
from facerecon.config import Settings  # noqa: E402
from tests.test_api import error_of, metric_value  # noqa: E402

pytestmark = pytest.mark.timeout(240)

SMALL_PHOTO = ("lfw", "Aaron_Peirsol_0001.jpg")  # 150 x 150 (the fit, on the 224 crop, dominates anyway)
LOAD_REQUESTS = 24
LOAD_CONCURRENCY = 6
#: Memory margin after the load, against the RSS measured after warm-up plus two sequential requests (so one-off
#: first-request allocations are in the baseline). What may legitimately stay: glibc keeps freed chunks in its
#: per-thread arenas (up to 8 x cores of them; each worker, decode and event-loop thread allocates: decoded photos
#: ~0.1 MB, 224 crops, fit tensors ~20-40 MB at peak per concurrent fit) and torch's CPU caching. A leak of even one
#: photo-sized or mesh-sized buffer per request is below this over 24 requests; it catches about 3 MB or more per
#: request, the kind of leak that matters in a long-running server (e.g. keeping fit graphs or rendered images);
#: the measured figures are printed for the record (`pytest -s`; +8 MiB on the development machine).
RSS_MARGIN_MIB = 64.0


# -- schemathesis against the real app ----------------------------------------------------------------------------
def _cheap_reconstructor() -> Any:
    """The real Reconstructor, with a short fit: generated bodies almost never hold a face, and when one decodes
    the request still goes through detection, alignment, decoding and export."""
    from facerecon.fit import FitConfig
    from facerecon.pipeline import Reconstructor

    return Reconstructor(fit_config=FitConfig(landmark_steps=3, photo_steps=0))


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    s = Settings(workers=1, queue_size=4, max_upload_bytes=256 * 1024, max_image_pixels=4_000_000,
                 request_timeout_s=60.0, graceful_timeout_s=5.0)
    with serve_in_thread(create_app(s, _cheap_reconstructor), s) as server:
        wait_ready(server.url, 120)
        yield server.url


@pytest.fixture(scope="module")
def api_schema(api_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance]
EXAMPLES_PER_OPERATION = 40


def _exercise(op: Any, generation: Any) -> list[int]:
    """``EXAMPLES_PER_OPERATION`` generated requests to one operation; returns the statuses seen."""
    from hypothesis import given

    statuses: list[int] = []

    @given(case=op.as_strategy(generation_mode=generation))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call(timeout=30)
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:  # every error in the one JSON shape
            ctype = response.headers.get("content-type", [""])
            assert (ctype[0] if isinstance(ctype, list) else ctype).startswith("application/json")
            error_of(httpx.Response(response.status_code, content=response.content))

    try:
        check()
    except Unsatisfiable:  # nothing to violate (an operation without parameters or body)
        assert generation == schemathesis.GenerationMode.NEGATIVE
    return statuses


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_conforms_to_its_schema(api_schema: Any, mode: str) -> None:
    """Every operation of the live schema: schema-valid requests (positive) and schema-violating ones (negative);
    no 5xx, each response conforms to its documented status, content type and body schema."""
    generation = schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    seen: dict[str, list[int]] = {}
    for result in api_schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        seen[label] = statuses = _exercise(op, generation)
        print(f"\n{mode:<9}{label:<28}{len(statuses):>4} requests, statuses {sorted(set(statuses))}", end="")
    assert {"POST /v1/reconstruct", "POST /v1/reconstruct/set", "GET /v1/models", "GET /readyz"} <= set(seen)
    assert all(seen[p] for p in ("POST /v1/reconstruct", "POST /v1/reconstruct/set"))


# -- load, memory and SIGTERM on a `facerecon serve` subprocess -----------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    # One worker and a short queue: capacity 1 + 3 < the 6 concurrent clients, so the overload path is exercised.
    with serve_subprocess(tmp_path, workers=1, queue_size=3, graceful_timeout_s=90, request_timeout_s=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def small_photo() -> bytes:
    return need_shared("data", "faces-train", *SMALL_PHOTO).read_bytes()


def _post(url: str, photo: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/reconstruct", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=120)


def test_load_overload_and_memory(server: ServerProcess, small_photo: bytes) -> None:
    for _ in range(2):  # first-request allocations belong in the baseline
        assert _post(server.url, small_photo).status_code == 200
    rss_start = server.rss_mib()
    outcomes: list[tuple[int, str | None, str | None, float]] = []

    def client(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            r = _post(server.url, small_photo)
            code = error_of(r)["code"] if r.status_code != 200 else None
            outcomes.append((r.status_code, code, r.headers.get("retry-after"), time.perf_counter() - t0))
            if r.status_code == 503 and r.headers.get("retry-after"):
                time.sleep(min(float(r.headers["retry-after"]), 2.0))  # a polite client backs off

    t0 = time.perf_counter()
    per_client = LOAD_REQUESTS // LOAD_CONCURRENCY
    with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
        for f in [pool.submit(client, per_client) for _ in range(LOAD_CONCURRENCY)]:
            f.result(timeout=200)
    wall = time.perf_counter() - t0
    time.sleep(1.0)
    rss_end = server.rss_mib()
    ok = [o for o in outcomes if o[0] == 200]
    rejected = [o for o in outcomes if o[0] == 503]
    print(f"\nload: {len(outcomes)} requests at concurrency {LOAD_CONCURRENCY} in {wall:.1f} s: {len(ok)} x 200, "
          f"{len(rejected)} x 503; RSS start {rss_start:.0f} MiB, after {rss_end:.0f} MiB "
          f"(+{rss_end - rss_start:.0f}), peak {server.peak_rss_mib():.0f} MiB")
    assert len(outcomes) == LOAD_REQUESTS
    others = [o for o in outcomes if o[0] not in (200, 503)]
    assert not others, f"unexpected answers: {others}"
    for _status, code, retry_after, _ in rejected:
        assert code == "overloaded"
        assert retry_after is not None and int(retry_after) >= 1
    assert len(ok) >= LOAD_CONCURRENCY  # the service kept serving under overload
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric_value(metrics, "facerecon_http_requests_total", endpoint="/v1/reconstruct", status="500") == 0
    assert metric_value(metrics, "facerecon_inference_queue_depth") == 0
    assert rss_end - rss_start < RSS_MARGIN_MIB, f"RSS grew {rss_end - rss_start:.0f} MiB over the load"


def test_sigterm_lets_in_flight_requests_finish(server: ServerProcess, small_photo: bytes) -> None:
    n = 3  # within capacity (1 running + 3 waiting): all accepted
    with ThreadPoolExecutor(n) as pool:
        pending = [pool.submit(_post, server.url, small_photo) for _ in range(n)]

        def accepted() -> bool:
            text = httpx.get(f"{server.url}/metrics", timeout=5).text
            return (metric_value(text, "facerecon_inference_active")
                    + metric_value(text, "facerecon_inference_queue_depth")) >= n

        deadline = time.monotonic() + 60
        while not accepted():
            assert time.monotonic() < deadline, "the requests never reached the pool"
            time.sleep(0.05)
        t0 = time.perf_counter()
        server.terminate()
        results = [f.result(timeout=120) for f in pending]
    assert [r.status_code for r in results] == [200] * n, [r.text[:200] for r in results]
    code = server.proc.wait(timeout=60)
    print(f"\nSIGTERM with {n} requests in flight: all 200, exit {code} after {time.perf_counter() - t0:.1f} s")
    # uvicorn, after a clean shutdown, restores the default handler and re-raises the captured signal (so the
    # parent sees "terminated by SIGTERM", -15); a forced exit would have taken the 90 s graceful timeout.
    assert code in (0, -signal.SIGTERM), server.log_tail()
    assert time.perf_counter() - t0 < 80
    assert "Traceback" not in server.log.read_text(errors="replace"), server.log_tail()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_server_utils_reads_proc_status() -> None:
    import os

    from tests.server_utils import peak_rss_mib, rss_mib

    assert 0 < rss_mib(os.getpid()) <= peak_rss_mib(os.getpid())
    assert Path(f"/proc/{os.getpid()}/status").is_file()
