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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
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
          st_checks.response_schema_conformance, st_checks.negative_data_rejection,
          st_checks.response_headers_conformance]
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
@pytest.fixture(scope="module")
def _load_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], ServerProcess]]:
    """One ``facerecon serve`` for the load test and then the SIGTERM test (a start costs seconds); a fresh one for
    whichever test finds it gone (the SIGTERM test ends it)."""
    with ExitStack() as stack:
        current: list[ServerProcess] = []

        def running() -> ServerProcess:
            if not current or current[-1].proc.poll() is not None:
                # One worker and a short queue: capacity 1 + 3 < the 6 concurrent clients, so the overload path is
                # exercised.
                current.append(stack.enter_context(serve_subprocess(
                    tmp_path_factory.mktemp("serve"), workers=1, queue_size=3, graceful_timeout_s=90,
                    request_timeout_s=120)))
            return current[-1]

        yield running


@pytest.fixture
def server(_load_servers: Callable[[], ServerProcess]) -> ServerProcess:
    return _load_servers()


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

    def answered() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        return metric_value(text, "facerecon_http_requests_total", endpoint="/v1/reconstruct", status="200")

    before = answered()
    with ThreadPoolExecutor(n) as pool:
        pending = [pool.submit(_post, server.url, small_photo) for _ in range(n)]

        def accepted() -> bool:
            # every request has reached the pool (running, waiting, or already answered) and one at least is
            # still in it: a window of about n fits, not the moment all n are in the pool together (a fit of this
            # photo takes ~0.1 s; polling for that moment missed it once on a loaded machine)
            text = httpx.get(f"{server.url}/metrics", timeout=5).text
            inside = (metric_value(text, "facerecon_inference_active")
                      + metric_value(text, "facerecon_inference_queue_depth"))
            done = metric_value(text, "facerecon_http_requests_total", endpoint="/v1/reconstruct",
                                status="200") - before
            return inside >= 1 and inside + done >= n

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


# -- memory ceiling for the worst inputs (issue #19) -------------------------------------------------------------------
#: Peak RSS during a request above the idle RSS (after warm-up and one request), whatever the request holds. The
#: issue's goal is ~200 MB; before admission came first and decoding was bounded, one 115 KB PNG cost ~480 MiB, a set
#: of 16 such PNGs ~1.7 GB, a refused (503) request 260-526 MiB. A 40 MP PNG (decoded whole by Pillow, 160 MB, before
#: it is reduced: +245 MiB) is now refused from its header by max_decode_bytes; the largest decoded PNG is ~22 MP.
#: The ceiling leaves room for the machine's noise and what earlier requests left in the allocators' arenas.
MEMORY_CEILING_MIB = 250.0


def _png_declaring(width: int, height: int, bit_depth: int, colour_type: int, channels: int) -> bytes:
    """A valid all-black PNG, streamed through zlib row by row (tiny file, huge image)."""
    import struct
    import zlib

    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _big_face_jpeg() -> bytes:
    import io

    from PIL import Image

    from tests.conftest import EXAMPLES

    im = Image.open(EXAMPLES / "000002.jpg").convert("RGB")
    k = (39_000_000 / (im.width * im.height)) ** 0.5  # just under the 40 MP limit
    big = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture
def bounded_server(tmp_path: Path) -> Iterator[ServerProcess]:
    # the default limits (20 MB a file, 40 MP a photo, 16 a set); one slot, so a second request is a 503
    with serve_subprocess(tmp_path, workers=1, queue_size=0, request_timeout_s=200) as srv:
        yield srv


def test_memory_ceiling_for_the_worst_inputs(bounded_server: ServerProcess, small_photo: bytes) -> None:
    srv = bounded_server
    need_shared("data", "deep3d-examples")
    black = _png_declaring(6300, 6300, 8, 2, 3)
    mid = _png_declaring(3000, 3000, 8, 2, 3)
    cases: list[tuple[str, Any]] = [
        (f"black 6300x6300 PNG ({len(black) // 1024} KB)", lambda: httpx.post(
            f"{srv.url}/v1/reconstruct", files={"image": ("b.png", black, "image/png")}, timeout=200)),
        ("RGBA 6300x6300 PNG", lambda: httpx.post(f"{srv.url}/v1/reconstruct", files={
            "image": ("b.png", _png_declaring(6300, 6300, 8, 6, 4), "image/png")}, timeout=200)),
        ("16-bit grey 6300x6300 PNG", lambda: httpx.post(f"{srv.url}/v1/reconstruct", files={
            "image": ("b.png", _png_declaring(6300, 6300, 16, 0, 1), "image/png")}, timeout=200)),
        (f"set of 16 black PNGs ({16 * len(black) // 1024} KB)", lambda: httpx.post(
            f"{srv.url}/v1/reconstruct/set", files=[("images", (f"{i}.png", black, "image/png")) for i in range(16)],
            timeout=200)),
        # the largest PNG still decoded under max_decode_bytes (128 MiB): ~22 MP, decoded whole, then reduced
        ("RGBA 4700x4700 PNG (largest decoded)", lambda: httpx.post(f"{srv.url}/v1/reconstruct", files={
            "image": ("b.png", _png_declaring(4700, 4700, 8, 6, 4), "image/png")}, timeout=200)),
        ("set of 16 RGB 3000x3000 PNGs", lambda: httpx.post(
            f"{srv.url}/v1/reconstruct/set", files=[("images", (f"{i}.png", mid, "image/png")) for i in range(16)],
            timeout=200)),
    ]
    face = _big_face_jpeg()
    cases.append((f"39 MP JPEG of a face ({len(face) // 1024} KB), JSON + mesh + overlay", lambda: httpx.post(
        f"{srv.url}/v1/reconstruct", files={"image": ("f.jpg", face, "image/jpeg")},
        data={"format": "json", "include": "mesh,overlay"}, timeout=200)))
    assert _post(srv.url, small_photo).status_code == 200  # first-request allocations belong to the baseline
    idle = srv.rss_mib()
    rows: list[tuple[str, int, float, float, float]] = []
    for name, send in cases:
        srv.reset_peak_rss()
        t0 = time.perf_counter()
        r = send()
        rows.append((name, r.status_code, srv.peak_rss_mib() - idle, time.perf_counter() - t0, srv.rss_mib() - idle))
        assert r.status_code < 500, (name, r.text[:300])
        if "6300" in name and "16-bit" not in name:  # 40 MP at 4 B/px would need ~160 MB: refused from its header
            assert r.status_code == 413 and error_of(r)["code"] == "image_too_large", (name, r.text[:300])
    # a refused request while the one slot is busy: a fitted set of 16 copies of a small photo (seconds of work; a
    # single photo's ~0.3 s fit could end before the five refused requests were sent, which then got their 413)
    def busy_set() -> httpx.Response:
        return httpx.post(f"{srv.url}/v1/reconstruct/set", data={"refine": "true"}, timeout=120,
                          files=[("images", (f"{i}.jpg", small_photo, "image/jpeg")) for i in range(16)])

    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(busy_set)
        deadline = time.monotonic() + 60
        while metric_value(httpx.get(f"{srv.url}/metrics", timeout=5).text, "facerecon_requests_admitted") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        srv.reset_peak_rss()
        t0 = time.perf_counter()
        refused = [httpx.post(f"{srv.url}/v1/reconstruct", files={"image": ("b.png", black, "image/png")},
                              timeout=30) for _ in range(5)]
        rows.append(("5 x the black PNG while a set runs (refused; peak: the set's)", refused[-1].status_code,
                     srv.peak_rss_mib() - idle, (time.perf_counter() - t0) / 5, srv.rss_mib() - idle))
        assert busy.result(timeout=120).status_code == 200
    print(f"\nidle RSS {idle:.0f} MiB (after warm-up and one request); peak RSS above it during each request:")
    for name, status, delta, seconds, after in rows:
        print(f"  {name:<62} {status}  peak +{delta:6.1f} MiB, after +{after:6.1f} MiB  {seconds:5.2f} s")
    worst = max(rows, key=lambda row: row[2])
    print(f"worst case: +{worst[2]:.0f} MiB ({worst[0]})")
    for r in refused:
        assert r.status_code == 503 and error_of(r)["code"] == "overloaded" and r.headers.get("retry-after")
    assert worst[2] < MEMORY_CEILING_MIB, worst


def test_server_utils_reads_proc_status() -> None:
    import os

    from tests.server_utils import peak_rss_mib, rss_mib

    assert 0 < rss_mib(os.getpid()) <= peak_rss_mib(os.getpid())
    assert Path(f"/proc/{os.getpid()}/status").is_file()
