"""The service bounded under hostile load (issue #19), on small servers over a stand-in reconstructor (timing under
control, no models): admission before the body is read, work for gone clients dropped or stopped at a stage
boundary, the ``faces=all`` cap, shutdown past the grace period, connection timeouts and cap, and the small
defects (static paths, start-up errors, malformed HTTP and multipart, the OpenAPI schema, hosts and CORS).

The memory ceiling with the real pipeline is measured on a ``facerecon serve`` subprocess in
``tests/test_reliability.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.test_api import (
    SMALL_PNG,
    FakeReconstructor,
    error_of,
    fake_server,
    metric_value,
    png_header_only,
    post_image,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {k: metric_value(text, f"facerecon_{k}") for k in (
        "inference_active", "inference_queue_depth", "requests_admitted")}


def multipart(data: bytes, boundary: str = "xyzzy", field: str = "image", close: bool = True,
              extra: dict[str, str] | None = None) -> bytes:
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in (extra or {}).items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"p.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + (f"--{boundary}--\r\n".encode() if close else b"")


def raw_post(url: str, body: bytes, boundary: str = "xyzzy") -> socket.socket:
    """A POST /v1/reconstruct sent over a raw socket (the caller reads or hangs up)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (f"POST /v1/reconstruct HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def read_response(sock: socket.socket, limit: float = 10.0) -> bytes:
    sock.settimeout(limit)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


# -- admission before reading and decoding -------------------------------------------------------------------------
def test_a_refused_request_is_refused_before_its_body_is_decoded() -> None:
    fake = FakeReconstructor()
    fake.gate.clear()
    big = png_header_only(6000, 6000)  # would decode (and fail) if it were read
    with fake_server(fake, workers=1, queue_size=0) as srv, ThreadPoolExecutor(1) as pool:
        running = pool.submit(post_image, srv.url)
        wait_until(lambda: fake.calls == 1)
        t0 = time.perf_counter()
        r = post_image(srv.url, big, timeout=10)
        assert r.status_code == 503 and error_of(r)["code"] == "overloaded", r.text
        assert int(r.headers["retry-after"]) >= 1 and time.perf_counter() - t0 < 2.0
        fake.gate.set()
        assert running.result(timeout=30).status_code == 200
        text = httpx.get(f"{srv.url}/metrics").text
        # one decode (the admitted request's), none for the refused one
        assert metric_value(text, "facerecon_stage_duration_seconds_count", stage="image") == 1
        assert gauges(srv.url)["requests_admitted"] == 0


def test_a_slot_is_held_from_the_upload_on() -> None:
    """A request still uploading holds its slot: the next one is refused rather than read into memory."""
    fake = FakeReconstructor()
    with fake_server(fake, workers=1, queue_size=0) as srv:
        body = multipart(SMALL_PNG)
        sock = _connect(srv.url)
        try:  # the headers and the first 100 bytes; the rest of the body still to come
            sock.sendall((f"POST /v1/reconstruct HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                          f"boundary=xyzzy\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:100])
            wait_until(lambda: gauges(srv.url)["requests_admitted"] == 1)
            r = post_image(srv.url, timeout=10)
            assert r.status_code == 503 and error_of(r)["code"] == "overloaded"
            sock.sendall(body[100:])
            assert b"200 OK" in read_response(sock, 5).split(b"\r\n")[0]
        finally:
            sock.close()


# -- work for clients that have gone ---------------------------------------------------------------------------------
def test_queued_work_of_a_gone_client_is_dropped() -> None:
    fake = FakeReconstructor()
    fake.gate.clear()
    with fake_server(fake, workers=1, queue_size=8) as srv, ThreadPoolExecutor(1) as pool:
        live = pool.submit(post_image, srv.url)
        wait_until(lambda: fake.calls == 1)
        socks = [raw_post(srv.url, multipart(SMALL_PNG)) for _ in range(5)]
        wait_until(lambda: gauges(srv.url)["inference_queue_depth"] == 5)
        for s in socks:
            s.close()  # hang up at once
        wait_until(lambda: gauges(srv.url) == {"inference_active": 1, "inference_queue_depth": 0,
                                               "requests_admitted": 1}, timeout=10)
        fake.gate.set()
        assert live.result(timeout=30).status_code == 200
        assert fake.calls == 1  # the five never ran
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric_value(text, "facerecon_http_requests_total", endpoint="/v1/reconstruct", status="499") == 5


def test_a_running_job_stops_at_its_next_stage_when_the_client_is_gone() -> None:
    fake = FakeReconstructor()
    fake.gate.clear()
    with fake_server(fake, workers=1, queue_size=2) as srv:
        sock = raw_post(srv.url, multipart(SMALL_PNG))
        wait_until(lambda: fake.calls == 1)  # inside the stage after `estimate`
        sock.close()
        wait_until(lambda: gauges(srv.url)["requests_admitted"] == 1)  # the request ended; the job still runs
        fake.gate.set()
        wait_until(lambda: gauges(srv.url)["requests_admitted"] == 0)  # the job returned at the next boundary
        assert fake.reconstructed == []  # it never finished its reconstruction
        assert post_image(srv.url).status_code == 200  # the worker is free again


def test_a_timed_out_job_stops_at_its_next_stage() -> None:
    fake = FakeReconstructor()
    fake.gate.clear()
    with fake_server(fake, request_timeout_s=0.5) as srv:
        r = post_image(srv.url, timeout=20)
        assert r.status_code == 504 and error_of(r)["code"] == "timeout"
        fake.gate.set()
        wait_until(lambda: gauges(srv.url)["requests_admitted"] == 0)
        assert fake.reconstructed == []


# -- faces=all cap ---------------------------------------------------------------------------------------------------
def test_faces_all_is_capped_to_the_largest_n() -> None:
    fake = FakeReconstructor()
    fake.faces = 36
    with fake_server(fake, max_faces=16) as srv:
        r = post_image(srv.url, faces="all", format="png")
        assert r.status_code == 200, r.text
        assert r.headers["x-faces-detected"] == "36" and r.headers["x-faces-limit"] == "16"
        assert r.headers["x-face-count"] == "16"
        assert fake.reconstructed == [16]
        fake.faces = 3
        r = post_image(srv.url, faces="all", format="png")
        assert r.headers["x-faces-detected"] == "3" and "x-faces-limit" not in r.headers
        assert fake.reconstructed == [16, 3]


# -- shutdown past the grace period ----------------------------------------------------------------------------------
def test_shutdown_past_the_grace_period_answers_json_503s(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeReconstructor()
    fake.gate.clear()
    with fake_server(fake, workers=1, queue_size=4, graceful_timeout_s=1.0) as srv, ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(post_image, srv.url, SMALL_PNG, 30.0) for _ in range(4)]
        wait_until(lambda: gauges(srv.url)["requests_admitted"] == 4)
        t0 = time.perf_counter()
        srv.server.should_exit = True  # what SIGTERM does
        results = [f.result(timeout=30) for f in pending]
        elapsed = time.perf_counter() - t0
        fake.gate.set()
        srv.thread.join(15)
    for r in results:
        assert r.status_code == 503, r.text
        assert error_of(r)["code"] == "shutting_down" and int(r.headers["retry-after"]) >= 1
    assert elapsed < 5.0  # at the end of the grace period, not at uvicorn's backstop
    assert not any("Traceback" in rec.getMessage() or rec.exc_info for rec in caplog.records
                   if rec.name.startswith("uvicorn"))


def test_new_requests_during_shutdown_are_refused_as_shutting_down() -> None:
    from facerecon.api.workers import InferencePool

    pool = InferencePool(1, 1)
    try:
        pool.begin_shutdown()
        from facerecon.api.errors import ShuttingDown

        with pytest.raises(ShuttingDown) as info:
            pool.admit()
        assert info.value.retry_after >= 1 and info.value.http_status == 503
    finally:
        pool.close(5)


# -- connections -----------------------------------------------------------------------------------------------------
def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_idle_and_trickling_connections_are_closed() -> None:
    with fake_server(FakeReconstructor(), timeout_headers_s=0.5, timeout_keep_alive_s=0.5) as srv:
        idle = _connect(srv.url)
        trickle = _connect(srv.url)
        trickle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        t0 = time.perf_counter()
        stop = threading.Event()

        def dribble() -> None:
            while not stop.is_set():
                try:
                    trickle.sendall(b"X-A: b\r\n")
                except OSError:
                    return
                time.sleep(0.1)

        threading.Thread(target=dribble, daemon=True).start()
        try:
            for sock in (idle, trickle):
                answer = read_response(sock, 5)
                assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
                assert b'"code": "header_timeout"' in answer
            assert time.perf_counter() - t0 < 3.0
            keep = _connect(srv.url)  # a finished request's keep-alive connection closes after its timeout
            keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_response(keep, 5)
            assert answer.startswith(b"HTTP/1.1 200") and time.perf_counter() - t0 < 6.0
        finally:
            stop.set()
            idle.close()
            trickle.close()


def test_connections_past_the_cap_get_a_json_503() -> None:
    with fake_server(FakeReconstructor(), max_connections=3) as srv:
        held = [_connect(srv.url) for _ in range(3)]
        try:
            time.sleep(0.2)
            extra = _connect(srv.url)
            answer = read_response(extra, 5)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
            assert b"retry-after: 1" in answer.lower() and b'"code": "overloaded"' in answer
        finally:
            for s in held:
                s.close()
        wait_until(lambda: httpx.get(f"{srv.url}/healthz", timeout=2).status_code == 200)


def test_malformed_http_gets_the_json_error_shape() -> None:
    with fake_server(FakeReconstructor()) as srv:
        sock = _connect(srv.url)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost x\x00\r\n\r\n")
        answer = read_response(sock, 5)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
        assert error_of(httpx.Response(400, content=body))["code"] == "bad_request"


# -- small defects ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/static/a%00b", "/static/" + "a" * 5000, "/static/" + "/".join(["b" * 200] * 30)])
def test_hostile_static_paths_are_404s(path: str) -> None:
    with fake_server(FakeReconstructor()) as srv:
        r = httpx.get(f"{srv.url}{path}", timeout=10)
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        assert len(r.text) < 1000  # the path is not echoed back in full


def test_a_failed_start_up_does_not_reveal_host_paths() -> None:
    def broken() -> Any:
        raise FileNotFoundError("/srv/secret/deployment/models/ict/facemodel.npz: no such file")

    with fake_server(broken) as srv:
        wait_until(lambda: error_of(httpx.get(f"{srv.url}/readyz"))["details"].get("stage") == "failed")
        for r in (httpx.get(f"{srv.url}/readyz"), post_image(srv.url)):
            assert r.status_code == 503 and "/srv/secret" not in r.text, r.text
            assert "FileNotFoundError" in error_of(r)["message"]


def test_a_multipart_body_without_its_closing_boundary_is_a_400() -> None:
    with fake_server(FakeReconstructor()) as srv:
        sock = raw_post(srv.url, multipart(SMALL_PNG, close=False))
        answer = read_response(sock, 5)
        sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:300]
        assert error_of(httpx.Response(400, content=body))["code"] == "malformed_request"


def test_openapi_form_fields_are_not_nullable_and_files_not_empty() -> None:
    with fake_server(FakeReconstructor()) as srv:
        spec = httpx.get(f"{srv.url}/openapi.json").json()
    for path, field in (("/v1/reconstruct", "image"), ("/v1/reconstruct/set", "images")):
        form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        for name, prop in form["properties"].items():
            assert "null" not in str(prop), (path, name, prop)
        file_schema = form["properties"][field]
        assert (file_schema.get("items") or file_schema)["minLength"] == 1


def test_allowed_hosts_and_cors_are_settings() -> None:
    with fake_server(FakeReconstructor(), allowed_hosts=["api.example.com", "127.0.0.1"],
                     cors_origins=["https://app.example.com"]) as srv:
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        r = httpx.get(f"{srv.url}/healthz", headers={"Host": "evil.example.net"})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_host"
        ok = httpx.options(f"{srv.url}/v1/reconstruct", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
        bad = httpx.options(f"{srv.url}/v1/reconstruct", headers={
            "Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"})
        assert bad.status_code == 400 and error_of(bad)["code"] == "cors_rejected"
        r = post_image(srv.url)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with fake_server(FakeReconstructor()) as srv:  # the defaults: any Host, no CORS
        r = httpx.get(f"{srv.url}/healthz", headers={"Host": "anything.example", "Origin": "https://x.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_photo_whose_decode_would_not_fit_is_refused_from_its_header() -> None:
    """A 36 MP PNG would be decoded whole (~144 MB) before it is reduced: 413 at once, before any decode; the
    limit is a setting."""
    fake = FakeReconstructor()
    with fake_server(fake) as srv:
        r = post_image(srv.url, png_header_only(6000, 6000), timeout=10)
        assert r.status_code == 413 and error_of(r)["code"] == "image_too_large", r.text
        assert "JPEG" in error_of(r)["message"] and fake.calls == 0
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric_value(text, "facerecon_stage_duration_seconds_count", stage="image") == 0
    with fake_server(fake, max_decode_bytes=1024 * 1024 * 1024) as srv:  # allowed: decoded (and found corrupt)
        r = post_image(srv.url, png_header_only(6000, 6000), timeout=30)
        assert r.status_code == 400 and error_of(r)["code"] == "corrupt_image", r.text
