"""End-to-end HTTP latency and throughput through a real ``facerecon serve`` subprocess on 127.0.0.1.

    python bench/bench_http.py [--photo PATH] [--levels 1,4,16] [--requests 16] [--max-seconds 120]
                               [--workers 1] [--format obj]

For each concurrency level: ``--requests`` POST /v1/reconstruct of one photo from that many client threads (no
new request starts past ``--max-seconds``): median and p90 client latency, the server's own median total
(``Server-Timing: total``), requests/s (successes / wall time), errors by status. Then the server's peak RSS
(``VmHWM`` of ``/proc/<pid>/status``), and the ratio of the single-request end-to-end latency to the bare R-Net
forward (when an R-Net is installed) or to the bare test-time fit (otherwise), measured in this process on the
same photo. On a GPU machine, images/s with the micro-batcher at concurrency ``max_batch``; skipped on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.server_utils import serve_subprocess  # noqa: E402

DEFAULT_PHOTO = REPO.parent / "shared" / "data" / "deep3d-examples" / "000002.jpg"


def server_total_ms(response: httpx.Response) -> float | None:
    for item in response.headers.get("server-timing", "").split(","):
        name, _, rest = item.strip().partition(";")
        if name == "total" and "dur=" in rest:
            return float(rest.split("dur=")[1].split(";")[0])
    return None


def run_level(url: str, photo: bytes, fmt: str, concurrency: int, n: int, max_seconds: float) -> dict:
    lat: list[float] = []
    server_ms: list[float] = []
    statuses: Counter[int | str] = Counter()
    lock = threading.Lock()
    counter = iter(range(n))
    t_start = time.perf_counter()

    def client() -> None:
        with httpx.Client(timeout=300) as c:
            while True:
                with lock:
                    if next(counter, None) is None or time.perf_counter() - t_start > max_seconds:
                        return
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/v1/reconstruct", files={"image": ("p.jpg", photo, "image/jpeg")},
                               data={"format": fmt})
                except httpx.HTTPError as exc:
                    with lock:
                        statuses[type(exc).__name__] += 1
                    continue
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    statuses[r.status_code] += 1
                    if r.status_code == 200:
                        lat.append(dt)
                        if (s := server_total_ms(r)) is not None:
                            server_ms.append(s)

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t_start
    return {"c": concurrency, "n": sum(statuses.values()), "ok": len(lat), "wall": wall, "lat": lat,
            "server": server_ms, "statuses": statuses}


def bare_reference(photo_path: Path, repeats: int) -> tuple[str, float]:
    """The bare model step on the same photo, in this process: the estimate stage (R-Net if installed, else the
    fit) on the prepared face, as the pipeline runs it (ms)."""
    from facerecon.imaging import load_image
    from facerecon.pipeline import Reconstructor

    rec = Reconstructor()  # same settings as the server (FACERECON_*; 1 torch thread by default)
    image = load_image(photo_path)
    prepared = rec.prepare(image, rec.detect(image)[0])
    times = []
    mode = "rnet" if rec.rnet is not None else "fit"
    rec.estimate([prepared], mode=mode)  # warm-up (numba, allocations)
    for _ in range(max(repeats, 10) if mode == "rnet" else repeats):
        t0 = time.perf_counter()
        rec.estimate([prepared], mode=mode)
        times.append((time.perf_counter() - t0) * 1000)
    if mode == "rnet":
        return f"bare R-Net estimate ({rec.rnet.providers[0]})", statistics.median(times)
    return "bare test-time fit (no R-Net installed)", statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    ap.add_argument("--levels", default="1,4,16", help="comma list of client concurrencies")
    ap.add_argument("--requests", type=int, default=16, help="requests per level")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="no new request past this, per level")
    ap.add_argument("--workers", type=int, default=1, help="server inference workers (FACERECON_WORKERS)")
    ap.add_argument("--format", default="obj", choices=["obj", "glb", "ply", "json", "png"])
    ap.add_argument("--bare-repeats", type=int, default=3)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    photo = args.photo.read_bytes()

    import torch

    gpu = torch.cuda.is_available()
    print(f"photo {args.photo.name} ({len(photo)} bytes), format {args.format}, server workers {args.workers}, "
          f"{'GPU ' + torch.cuda.get_device_name(0) if gpu else 'CPU only'}; loopback 127.0.0.1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with serve_subprocess(Path(tmp), workers=args.workers, queue_size=max(levels) + 4,
                              request_timeout_s=600, graceful_timeout_s=30) as srv:
            ready_s = time.perf_counter() - t0
            mode = httpx.get(f"{srv.url}/v1/models", timeout=10).json().get("default_mode")
            run_level(srv.url, photo, args.format, 1, 2, 600)  # warm the request path
            rss_ready = srv.rss_mib()
            print(f"server ready in {ready_s:.1f} s (load + warm-up); mode {mode}; RSS after warm-up "
                  f"{rss_ready:.0f} MiB\n")
            print(f"{'conc':>5}{'sent':>6}{'ok':>5}{'median ms':>11}{'p90 ms':>9}{'server ms':>11}{'req/s':>8}"
                  f"  errors")
            for c in levels:
                r = run_level(srv.url, photo, args.format, c, args.requests, args.max_seconds)
                rows.append(r)
                errs = {k: v for k, v in r["statuses"].items() if k != 200}
                med = statistics.median(r["lat"]) if r["lat"] else float("nan")
                p90 = float(np.percentile(r["lat"], 90)) if r["lat"] else float("nan")
                smed = statistics.median(r["server"]) if r["server"] else float("nan")
                print(f"{c:>5}{r['n']:>6}{r['ok']:>5}{med:>11.0f}{p90:>9.0f}{smed:>11.0f}"
                      f"{r['ok'] / r['wall']:>8.2f}  {dict(errs) or 'none'}", flush=True)
            if gpu:
                s = srv.url
                from facerecon.config import Settings

                b = Settings().max_batch
                r = run_level(s, photo, args.format, b, 4 * b, args.max_seconds)
                print(f"\nGPU micro-batching (max_batch {b}, concurrency {b}): {r['ok'] / r['wall']:.2f} images/s, "
                      f"median {statistics.median(r['lat']):.0f} ms")
            else:
                print("\nGPU micro-batching: skipped (no CUDA device; the micro-batcher is on only with a GPU)")
            peak = srv.peak_rss_mib()
            print(f"server peak RSS (VmHWM) {peak:.0f} MiB; RSS now {srv.rss_mib():.0f} MiB")
    name, bare = bare_reference(args.photo, args.bare_repeats)
    single = rows[0] if rows and rows[0]["c"] == 1 else None
    if single and single["lat"]:
        e2e = statistics.median(single["lat"])
        print(f"\n{name}: {bare:.0f} ms (median of {args.bare_repeats}); end-to-end single request {e2e:.0f} ms; "
              f"ratio {e2e / bare:.2f}x")


if __name__ == "__main__":
    main()
