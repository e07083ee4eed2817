"""The GPU image's start-up, tested where there is no GPU: a renderer that cannot be used (no CUDA, no nvdiffrast, a
plugin that fails to build) gives the CPU renderer and a logged warning, never a service that does not become ready;
deploy/check_gpu_image.py reads what a service really serves with. (The image itself is checked on a GPU machine:
`python deploy/check_gpu_image.py --serve` inside it.)"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import facerecon.render as render
from facerecon.render import CpuRenderer, usable_renderer

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "deploy" / "check_gpu_image.py"


class _BrokenPlugin:
    """What nvdiffrast looks like when its plugin cannot be compiled: it imports, then the first use fails."""

    name = "nvdiffrast"

    def warmup(self) -> None:
        raise RuntimeError("Error building extension 'nvdiffrast_plugin': fatal error: Python.h: No such file")


class _WorkingPlugin:
    name = "nvdiffrast"
    warmed = False

    def warmup(self) -> None:
        self.warmed = True


def _fake_get_renderer(nvdiffrast: Any) -> Any:
    real = render.get_renderer

    def get(name: str = "auto", device: Any = None) -> Any:
        return nvdiffrast if name == "nvdiffrast" else real(name, device)

    return get


def test_nvdiffrast_on_a_cpu_device_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="facerecon.render"):
        renderer, device = usable_renderer("nvdiffrast", torch.device("cpu"))
    assert isinstance(renderer, CpuRenderer) and device.type == "cpu"
    assert any("falling back to the CPU renderer" in r.getMessage() for r in caplog.records), caplog.text


def test_no_cuda_falls_back_and_moves_torch_to_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the fallback for a missing CUDA is not reachable")
    with caplog.at_level(logging.WARNING, logger="facerecon.render"):
        renderer, device = usable_renderer("auto", torch.device("cuda"))
    assert isinstance(renderer, CpuRenderer) and device.type == "cpu"
    assert "CUDA is not available" in caplog.text or "unusable" in caplog.text


def test_a_plugin_that_does_not_build_falls_back(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(render, "get_renderer", _fake_get_renderer(_BrokenPlugin()))
    with caplog.at_level(logging.WARNING, logger="facerecon.render"):
        renderer, device = usable_renderer("nvdiffrast", torch.device("cuda", 0))
    assert isinstance(renderer, CpuRenderer) and device.type == "cpu"
    assert "Python.h" in caplog.text and "RuntimeError" in caplog.text


def test_a_working_plugin_is_kept_and_warmed_up(monkeypatch: pytest.MonkeyPatch) -> None:
    good = _WorkingPlugin()
    monkeypatch.setattr(render, "get_renderer", _fake_get_renderer(good))
    renderer, device = usable_renderer("nvdiffrast", torch.device("cuda", 0))
    assert renderer is good and good.warmed and device == torch.device("cuda", 0)
    renderer, device = usable_renderer("cpu", torch.device("cuda", 0))  # the CPU renderer takes CPU tensors
    assert isinstance(renderer, CpuRenderer) and device.type == "cpu"
    with pytest.raises(ValueError, match="unknown renderer"):
        usable_renderer("opengl", torch.device("cpu"))


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=300)


def test_a_service_asked_for_nvdiffrast_without_it_turns_ready_and_the_check_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """FACERECON_RENDERER=nvdiffrast (the GPU image's setting) on a machine where it cannot run: the service used to
    stay not ready for ever; now it serves with the CPU renderer, warns, and the image check reports it."""
    from facerecon.api.app import create_app
    from facerecon.api.server import serve_in_thread
    from facerecon.config import Settings

    settings = Settings(renderer="nvdiffrast", workers=1, queue_size=2, request_timeout_s=120.0,
                        graceful_timeout_s=2.0)
    with caplog.at_level(logging.WARNING, logger="facerecon.render"), \
            serve_in_thread(create_app(settings, None), settings) as server:
        t0 = time.monotonic()
        while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() - t0 < 180, "the service never turned ready"
            time.sleep(0.3)
        info = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert info["renderer"] == "cpu" and info["device"] == "cpu", info
        assert "falling back to the CPU renderer" in caplog.text
        gpu = _check("--url", server.url, "--timeout", "30")
        cpu = _check("--url", server.url, "--expect", "cpu", "--json", "--timeout", "30")
    assert gpu.returncode == 1, gpu.stdout + gpu.stderr
    assert re.search(r"^FAIL renderer 'cpu' \(expected 'nvdiffrast'", gpu.stdout, re.M), gpu.stdout
    assert re.search(r"^FAIL rnet execution providers \['CPUExecutionProvider'\]", gpu.stdout, re.M), gpu.stdout
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    assert '"renderer": "cpu"' in cpu.stdout and "0 failed" in cpu.stdout


def test_the_check_gives_up_on_a_service_that_is_not_there() -> None:
    run = _check("--url", "http://127.0.0.1:9", "--timeout", "2")
    assert run.returncode == 2 and "did not turn ready" in run.stderr


def test_the_gpu_stage_is_one_pinned_cuda_major() -> None:
    """The base image's CUDA major is the one onnxruntime-gpu's pinned build and torch's wheel index are for (the
    CUDA 12 base image with an unpinned onnxruntime-gpu whose CUDA EP needs libcudart.so.13 was the bug); torch is
    the tested 2.13.0; nvdiffrast is compiled at build time with a compiler and the Python headers installed; the
    server runs as a non-root user that owns the plugin's folder."""
    text = (REPO / "Dockerfile").read_text()
    gpu = text[text.index("AS gpu"):]
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu[\d.]+ AS gpu", text, re.M)
    assert base, "the GPU stage starts from a pinned CUDA devel image with cuDNN"
    major, minor = base.group(1), base.group(2)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", gpu, re.M))
    ort_cuda_major = {"1.31.1": "13", "1.31.0": "13"}  # read from the wheels' build_and_package_info.cuda_version
    assert args["ORT_GPU_VERSION"] in ort_cuda_major and ort_cuda_major[args["ORT_GPU_VERSION"]] == major
    assert '"onnxruntime-gpu==${ORT_GPU_VERSION}"' in gpu
    assert args["TORCH_INDEX"].endswith(f"/cu{major}{minor}"), args["TORCH_INDEX"]
    cpu_torch = re.search(r"torch==([\d.]+) --index-url https://download.pytorch.org/whl/cpu", text)
    assert cpu_torch and args["TORCH_VERSION"] == cpu_torch.group(1) == "2.13.0"
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in gpu
    for package in ("python3.11-dev", "build-essential", "ninja-build"):
        assert package in gpu, f"{package} is needed to compile nvdiffrast's plugin"
    assert "build_plugin()" in gpu and "TORCH_CUDA_ARCH_LIST=" in gpu
    assert re.search(r"diffrp-nvdiffrast==\$\{NVDIFFRAST_VERSION\}", gpu) and args["NVDIFFRAST_VERSION"] == "0.3.3.1"
    assert "chown -R facerecon /app/.torch_extensions" in gpu
    assert re.findall(r"^USER\s+(\S+)", gpu, re.M) == ["facerecon"]
    assert "COPY deploy/check_gpu_image.py" in gpu
