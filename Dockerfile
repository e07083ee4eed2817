# Two targets:
#   docker build --target cpu -t facerecon:cpu .
#   docker build --target gpu -t facerecon:gpu .      (CUDA 13, onnxruntime-gpu, nvdiffrast: non-commercial licence)
#   docker run --rm --gpus all facerecon:gpu python deploy/check_gpu_image.py --serve   (what the image serves with)
# Both serve on port 8000 with the default face model shipped in models/ict, as the non-root user `facerecon`. Only
# the shipped model is copied (a converted Basel model in models/bfm stays out: see .dockerignore); mount your own
# models folder at /app/models to serve another.

# The page (service/facerecon/api/static): built once with node, copied into both images; no node at run time.
FROM node:20-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json web/.npmrc ./
RUN npm ci --no-audit --no-fund
COPY web/build.mjs ./
COPY web/src ./src
RUN npm run build

FROM python:3.11-slim AS cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FACERECON_HOST=0.0.0.0 FACERECON_MODELS_DIR=/app/models
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY service ./service
COPY --from=web /src/service/facerecon/api/static ./service/facerecon/api/static
COPY client ./client
COPY models/ict ./models/ict
RUN pip install -e . && python -m facerecon.warmup \
    && useradd --create-home --uid 10001 facerecon
USER facerecon
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD curl -fsS http://localhost:8000/readyz || exit 1
CMD ["facerecon", "serve"]

# GPU: one CUDA major for everything, pinned (the CUDA 13 user-space libraries come with the base image):
# * onnxruntime-gpu 1.31.1 is built with CUDA 13.0 and cuDNN 9: its build_and_package_info says cuda_version
#   '13.0', and libonnxruntime_providers_cuda.so needs libcudart.so.13 and libcublas.so.13 (read from the wheel).
#   ONNX Runtime's CUDA EP needs the CUDA major it was built with (minor versions are compatible) and cuDNN 9 for
#   a cuDNN 9 build (onnxruntime.ai, CUDA Execution Provider, Requirements). Until 1.2x the PyPI package was CUDA
#   12 (CUDA 12 default since 1.19; CUDA 13 builds on a separate feed, microsoft/onnxruntime#27944), which is why
#   an unpinned install moved from one major to the other under a CUDA 12 base image.
# * torch 2.13.0 is what every test runs on; its cu130 build (the PyPI wheel itself requires cuda-toolkit 13.0.3
#   and nvidia-cudnn-cu13) from the matching wheel index.
# * nvdiffrast's plugin is compiled here with the devel image's nvcc 13.0 (torch's extension builder insists on
#   the CUDA major torch was built with), g++, the Python headers and ninja, for TORCH_CUDA_ARCH_LIST (no GPU
#   during a build to detect them); the service only loads it. Should it still fail at run time, the service
#   logs a warning and serves with the CPU renderer (facerecon.render.usable_renderer) rather than never turning
#   ready; deploy/check_gpu_image.py says which renderer and execution providers an image really serves with.
# The host needs an NVIDIA driver for CUDA 13 (580 or newer).
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu22.04 AS gpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG ORT_GPU_VERSION=1.31.1
ARG NVDIFFRAST_VERSION=0.3.3.1
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FACERECON_HOST=0.0.0.0 \
    FACERECON_MODELS_DIR=/app/models FACERECON_DEVICE=cuda FACERECON_RENDERER=nvdiffrast \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0" TORCH_EXTENSIONS_DIR=/app/.torch_extensions \
    CUDA_HOME=/usr/local/cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
        build-essential ninja-build libgomp1 curl && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && python -c "import sys, torch; v = torch.version.cuda or ''; print('torch', torch.__version__, 'CUDA', v); \
sys.exit(0 if v.startswith('13.') else 'torch is not a CUDA 13 build')"
COPY pyproject.toml README.md ./
COPY service ./service
COPY --from=web /src/service/facerecon/api/static ./service/facerecon/api/static
COPY client ./client
COPY models/ict ./models/ict
COPY deploy/check_gpu_image.py ./deploy/check_gpu_image.py
RUN pip install -e . "diffrp-nvdiffrast==${NVDIFFRAST_VERSION}" ninja \
    && pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && python -c "import onnxruntime as o; from onnxruntime.capi import build_and_package_info as b; \
print('onnxruntime-gpu', o.__version__, 'CUDA', b.cuda_version); assert b.cuda_version.startswith('13.')" \
    && python -c "from facerecon.render.nvdiffrast_backend import build_plugin; print(build_plugin())" \
    && FACERECON_DEVICE=cpu python -m facerecon.warmup \
    && useradd --create-home --uid 10001 facerecon && chown -R facerecon /app/.torch_extensions
USER facerecon
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s CMD curl -fsS http://localhost:8000/readyz || exit 1
CMD ["facerecon", "serve"]
