#!/usr/bin/env python3
"""What a facerecon image really serves with: its torch device, its renderer and the ONNX Runtime execution
providers of its networks, read from ``GET /v1/models`` once ``/readyz`` is ready, checked against what the image
is for (``--expect gpu``, the default: CUDA, nvdiffrast, ``CUDAExecutionProvider`` first; ``--expect cpu``).

A GPU image whose CUDA libraries do not match onnxruntime-gpu's build still starts, on the CPU provider; one
whose nvdiffrast plugin does not load serves with the CPU renderer (a warning in its log): this script is what
tells. Standard library only, so it runs inside the image or on any host::

    docker run --rm --gpus all facerecon:gpu python deploy/check_gpu_image.py --serve
    python deploy/check_gpu_image.py --url http://gpu-host:8000 --photo face.jpg

``--serve`` starts ``facerecon serve`` on a free local port, checks it and stops it. ``--photo`` also
reconstructs one photo (``refine=false``, JSON) and reports the server's timings. Exit status: 0 every check
passed, 1 a check failed, 2 the service did not answer or did not turn ready in ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

GPU_RENDERER = "nvdiffrast"
GPU_PROVIDER = "CUDAExecutionProvider"


def _get(url: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}


def wait_ready(base: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll ``/readyz`` until it answers 200 (True) or ``timeout`` passes or ``process`` exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if _get(f"{base}/readyz", 5.0)[0] == 200:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    return False


def check_models(info: dict[str, Any], expect: str) -> list[tuple[bool, str]]:
    """``(passed, what)`` for each expectation on a ``/v1/models`` answer."""
    device, renderer = str(info.get("device", "")), str(info.get("renderer", ""))
    nets = {k: info.get(k) for k in ("rnet", "cnet") if info.get(k)}
    out: list[tuple[bool, str]] = []
    if expect == "gpu":
        out.append((device.startswith("cuda"), f"torch device {device!r} (expected cuda)"))
        out.append((renderer == GPU_RENDERER, f"renderer {renderer!r} (expected {GPU_RENDERER!r}; 'cpu' means "
                                              "nvdiffrast did not load: see the service's warning)"))
        for kind, net in nets.items():
            providers = list(net.get("providers") or [])
            out.append((bool(providers) and providers[0] == GPU_PROVIDER,
                        f"{kind} execution providers {providers} (expected {GPU_PROVIDER} first; CPU only means "
                        "onnxruntime-gpu found no CUDA libraries of its build's major)"))
    else:
        out.append((device == "cpu", f"torch device {device!r} (expected cpu)"))
        out.append((renderer == "cpu", f"renderer {renderer!r} (expected 'cpu')"))
        for kind, net in nets.items():
            providers = list(net.get("providers") or [])
            out.append(("CPUExecutionProvider" in providers, f"{kind} execution providers {providers}"))
    if not nets:
        out.append((True, "no R-Net installed (fitting from the mean face): no providers to check"))
    return out


def _multipart(fields: dict[str, str], file_field: str, path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{path.name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def reconstruct(base: str, photo: Path, timeout: float = 300.0) -> tuple[bool, str]:
    body, ctype = _multipart({"format": "json", "refine": "false"}, "image", photo)
    req = urllib.request.Request(f"{base}/v1/reconstruct", data=body, headers={"Content-Type": ctype}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return False, f"reconstruct {photo.name}: HTTP {exc.code} {exc.read()[:300]!r}"
    wall = (time.perf_counter() - t0) * 1000.0
    face = doc["faces"][0]
    stages = ", ".join(f"{k} {v:.0f}" for k, v in doc.get("timings_ms", {}).items())
    return True, f"reconstruct {photo.name}: {doc['face_count']} face(s), mode {face['mode']}, {wall:.0f} ms ({stages})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", action="store_true", help="start `facerecon serve` here, check it, stop it")
    p.add_argument("--expect", choices=["gpu", "cpu"], default="gpu", help="what the image is for (default: gpu)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /readyz (default: 600)")
    p.add_argument("--photo", type=Path, help="also reconstruct this photo (refine=false) and report the timings")
    p.add_argument("--json", action="store_true", help="print /v1/models' device, renderer and providers as JSON")
    args = p.parse_args(argv)

    process: subprocess.Popen[bytes] | None = None
    if args.serve:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        process = subprocess.Popen([sys.executable, "-m", "facerecon.cli", "serve", "--host", "127.0.0.1",
                                    "--port", str(port)], env={**os.environ})
    else:
        base = args.url.rstrip("/")
    try:
        if not wait_ready(base, args.timeout, process):
            print(f"FAIL {base} did not turn ready within {args.timeout:.0f} s", file=sys.stderr)
            return 2
        status, info = _get(f"{base}/v1/models")
        if status != 200:
            print(f"FAIL GET /v1/models answered {status}: {info}", file=sys.stderr)
            return 2
        summary = {"version": info.get("version"), "device": info.get("device"), "renderer": info.get("renderer"),
                   **{f"{k}_providers": (info.get(k) or {}).get("providers") for k in ("rnet", "cnet")}}
        if args.json:
            print(json.dumps(summary))
        checks = check_models(info, args.expect)
        if args.photo is not None:
            checks.append(reconstruct(base, args.photo))
        for ok, what in checks:
            print(f"{'ok  ' if ok else 'FAIL'} {what}")
        failed = sum(1 for ok, _ in checks if not ok)
        print(f"{len(checks) - failed} passed, {failed} failed ({args.expect} image at {base})")
        return 1 if failed else 0
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
