"""The service under sustained load: memory after warm-up and after many requests, and throughput with 1 and 2
inference workers, through a real ``facerecon serve`` subprocess on 127.0.0.1. Figures only; nothing is asserted.

    python bench/bench_service.py [--photo PATH] [--requests 1000] [--layouts 1x1,1x2,2x1] [--concurrency 1,2,4]
                                  [--fit-requests 8] [--max-seconds 300]

For each server layout (PROCESSESxWORKERS: ``FACERECON_PROCESSES`` server processes of ``FACERECON_WORKERS``
inference threads each): the server's RSS once ``/readyz`` is 200 (after its warm-up), then ``--requests`` JSON
requests with ``refine=false`` (the R-Net path, the fastest: the most requests per second, so the most chances to
leak), sent from 2 client threads, with the RSS after 10 %, 50 % and all of them and the peak (``VmHWM``); then
photos/s at each ``--concurrency`` for ``refine=false`` and, with ``--fit-requests`` requests, for the default
mode (R-Net + fit). The last table is the scaling: photos/s of each layout over one process of one worker at the
same concurrency (issue #20's goal: at least 1.8x on 2 cores). Every figure comes with the load average (1 min)
when it was taken: the machine is shared, and another process on the second core caps what 2 workers can show.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.server_utils import serve_subprocess, wait_all_ready  # noqa: E402

DEFAULT_PHOTO = REPO.parent / "shared" / "data" / "deep3d-examples" / "000002.jpg"


def load1() -> float:
    return os.getloadavg()[0]


def multipart(photo: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with ``photo`` as ``image`` and ``fields``, built once per run (the client's
    own CPU is taken from the same cores as the server's): the body and its content type."""
    boundary = "facerecon-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n".encode() + photo + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def send(url: str, photo: bytes, n: int, concurrency: int, refine: bool | None, max_seconds: float,
         on_progress: dict[int, object] | None = None, keep_alive: bool = False) -> dict[str, object]:
    """``n`` JSON requests from ``concurrency`` threads: successes, wall seconds, median latency, statuses; calls
    ``on_progress[k]()`` when the k-th request has been answered.

    The client is lean on purpose (the standard library's ``http.client``, the body built once): on 2 cores its
    CPU is the server's loss. Every request opens its own connection, so that with several server processes the
    kernel spreads them as a load balancer would (a kept-alive connection stays with one process); ``keep_alive``:
    one connection per client thread instead."""
    lock = threading.Lock()
    todo = iter(range(n))
    done = [0]
    lat: list[float] = []
    statuses: Counter[int | str] = Counter()
    fields = {"format": "json"} if refine is None else {"format": "json", "refine": str(refine).lower()}
    body, ctype = multipart(photo, fields)
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
    parsed = urlsplit(url)
    t_start = time.perf_counter()

    def client() -> None:
        conn = None
        while True:
            with lock:
                if next(todo, None) is None or time.perf_counter() - t_start > max_seconds:
                    if conn is not None:
                        conn.close()
                    return
            t0 = time.perf_counter()
            if conn is None:
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
            try:
                conn.request("POST", "/v1/reconstruct", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status: int | str = resp.status
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                conn.close()
                conn = None
            if conn is not None and (not keep_alive or resp.will_close):
                conn.close()
                conn = None
            with lock:
                statuses[status] += 1
                if status == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                done[0] += 1
                hook = (on_progress or {}).get(done[0])
            if callable(hook):
                hook()

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t_start
    return {"ok": len(lat), "wall": wall, "median": statistics.median(lat) if lat else float("nan"),
            "statuses": {k: v for k, v in statuses.items() if k != 200}, "load": load1()}


def _layout(text: str) -> tuple[int, int]:
    p, _, w = text.partition("x")
    return int(p), int(w or 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    ap.add_argument("--requests", type=int, default=1000, help="refine=false requests for the memory figures")
    ap.add_argument("--layouts", default="1x1,1x2,2x1",
                    help="server layouts, PROCESSESxWORKERS each (FACERECON_PROCESSES x FACERECON_WORKERS)")
    ap.add_argument("--concurrency", default="1,2,4", help="client threads for the throughput figures")
    ap.add_argument("--throughput-requests", type=int, default=40, help="refine=false requests per level")
    ap.add_argument("--fit-requests", type=int, default=8, help="default-mode requests per level (0: skip)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="no new request past this, per run")
    ap.add_argument("--keep-alive", action="store_true",
                    help="one kept-alive connection per client thread (default: a connection per request, so that "
                         "several server processes share the requests)")
    args = ap.parse_args()
    photo = args.photo.read_bytes()
    layouts = [_layout(t) for t in args.layouts.split(",") if t]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    print(f"photo {args.photo.name} ({len(photo)} bytes); {os.cpu_count()} CPUs; load average at start "
          f"{load1():.2f}")
    memory: list[tuple[str, str, float, float]] = []
    speed: dict[tuple[str, str, int], dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs, w in layouts:
            name = f"{procs}x{w}"
            t0 = time.perf_counter()
            with serve_subprocess(Path(tmp), processes=procs, workers=w, queue_size=max([*levels, 2]) + 4,
                                  request_timeout_s=600, graceful_timeout_s=30) as srv:
                wait_all_ready(srv.url)
                ready = time.perf_counter() - t0
                memory.append((name, f"ready ({ready:.1f} s after start)", srv.tree_rss_mib(), load1()))
                marks = {max(1, round(args.requests * f)): f for f in (0.1, 0.5, 1.0)}
                hooks = {k: (lambda f=f, name=name, srv=srv: memory.append(
                    (name, f"after {round(args.requests * f)} requests", srv.tree_rss_mib(), load1())))
                    for k, f in marks.items()}
                r = send(srv.url, photo, args.requests, 2, False, args.max_seconds, hooks)
                if r["ok"] < args.requests:
                    memory.append((name, f"({r['ok']} of {args.requests} answered 200 in time; {r['statuses']})",
                                   srv.tree_rss_mib(), load1()))
                if procs == 1:
                    memory.append((name, "peak (VmHWM)", srv.peak_rss_mib(), load1()))
                for c in levels:
                    speed[(name, "refine=false", c)] = send(srv.url, photo, args.throughput_requests, c, False,
                                                            args.max_seconds, keep_alive=args.keep_alive)
                    if args.fit_requests:
                        speed[(name, "default (fit)", c)] = send(srv.url, photo, args.fit_requests, c, None,
                                                                 args.max_seconds, keep_alive=args.keep_alive)
    print(f"\n{'layout':>8}  {'when':<34}{'RSS MiB':>9}{'load':>7}   (RSS: all the server's processes)")
    for name, when, rss, load in memory:
        print(f"{name:>8}  {when:<34}{rss:>9.0f}{load:>7.2f}")
    print(f"\n{'layout':>8}  {'mode':<15}{'conc':>5}{'ok':>5}{'photos/s':>10}{'median ms':>11}{'load':>7}  errors")
    for (name, mode, c), r in speed.items():
        ok, wall = int(r["ok"]), float(r["wall"])  # type: ignore[arg-type]
        print(f"{name:>8}  {mode:<15}{c:>5}{ok:>5}{ok / wall:>10.2f}{float(r['median']):>11.0f}"  # type: ignore[arg-type]
              f"{float(r['load']):>7.2f}  {r['statuses'] or 'none'}")  # type: ignore[arg-type]
    if (1, 1) in layouts:
        print(f"\n{'layout':>8}  {'mode':<15}{'conc':>5}{'over 1x1':>10}   (goal >= 1.8 with 2 on 2 cores)")
        for (name, mode, c), r in speed.items():
            if name == "1x1" or ("1x1", mode, c) not in speed:
                continue
            one = speed[("1x1", mode, c)]
            a = int(r["ok"]) / float(r["wall"])  # type: ignore[arg-type]
            b = int(one["ok"]) / float(one["wall"])  # type: ignore[arg-type]
            print(f"{name:>8}  {mode:<15}{c:>5}{a / b if b else float('nan'):>10.2f}")


if __name__ == "__main__":
    main()
