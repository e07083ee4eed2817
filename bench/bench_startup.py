"""Start-up: wall time of ``facerecon reconstruct photo.jpg`` (a fresh process: imports, model and network loading,
one photo, its files) and of ``facerecon serve`` until ``/readyz`` answers 200, median and p90 over runs, with the
ratio to the targets of issue #20 (1.5 s and 3 s). Also the import of torch alone, the floor of any command that
needs it (the fit, the overlay); ``--no-refine --no-overlay`` runs without torch. Figures only; nothing is asserted.
A row whose flags the installed CLI does not know (an older checkout on ``PYTHONPATH``) prints n/a.

    python bench/bench_startup.py [--photo PATH] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTO = REPO.parent / "shared" / "data" / "deep3d-examples" / "000002.jpg"
TARGET_CLI_S, TARGET_READY_S = 1.5, 3.0


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True)
    if run.returncode == 2:  # flags this CLI does not have
        return float("nan")
    run.check_returncode()
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready_s(timeout: float = 120.0) -> float:
    import httpx

    port = _free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "facerecon.cli", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError("the server was not ready in time")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _row(label: str, values: list[float], target: float | None) -> str:
    if any(v != v for v in values):
        return f"{label:<44}{'n/a':>9}"
    med, p90 = statistics.median(values), float(np.percentile(values, 90))
    ratio = f"{med / target:>8.2f}x" if target else f"{'':>9}"
    return f"{label:<44}{med:>9.2f}{p90:>9.2f}{target if target else '':>9}{ratio}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", type=Path, default=DEFAULT_PHOTO)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "facerecon.cli", "reconstruct", str(args.photo)]
    subprocess.run([sys.executable, "-m", "facerecon.warmup"], check=True, capture_output=True)  # cache + kernels
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        _wall([*cli, "--out", tmp])  # a warm disk: everything read once
        rows["import torch (the floor)"] = ([_wall([sys.executable, "-c", "import torch"])
                                            for _ in range(args.runs)], None)
        rows["facerecon reconstruct --no-refine --no-overlay"] = (
            [_wall([*cli, "--out", tmp, "--no-refine", "--no-overlay"]) for _ in range(args.runs)], TARGET_CLI_S)
        rows["facerecon reconstruct --no-refine"] = ([_wall([*cli, "--out", tmp, "--no-refine"])
                                                     for _ in range(args.runs)], TARGET_CLI_S)
        rows["facerecon reconstruct (default: R-Net + fit)"] = ([_wall([*cli, "--out", tmp])
                                                                for _ in range(args.runs)], TARGET_CLI_S)
    rows["facerecon serve -> /readyz 200"] = ([_ready_s() for _ in range(args.runs)], TARGET_READY_S)
    load = os.getloadavg()
    import facerecon

    print(f"facerecon from {Path(facerecon.__file__).parent}")
    print(f"photo {args.photo.name}, {args.runs} runs each; load average {load[0]:.2f} / {load[1]:.2f} "
          f"(1 / 5 min) on {os.cpu_count()} CPUs")
    print(f"{'seconds, wall':<44}{'median':>9}{'p90':>9}{'target':>9}{'ratio':>9}")
    for label, (values, target) in rows.items():
        print(_row(label, values, target))


if __name__ == "__main__":
    main()
