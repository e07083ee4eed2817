# Two targets:
#   docker build --target cpu -t facerecon:cpu .
#   docker build --target gpu -t facerecon:gpu .      (CUDA, onnxruntime-gpu, nvdiffrast: non-commercial licence)
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

FROM nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04 AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 FACERECON_HOST=0.0.0.0 \
    FACERECON_MODELS_DIR=/app/models FACERECON_DEVICE=cuda FACERECON_RENDERER=nvdiffrast \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0" TORCH_EXTENSIONS_DIR=/app/.torch_extensions
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
        libgomp1 curl ninja-build && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
RUN pip install torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124
COPY pyproject.toml README.md ./
COPY service ./service
COPY --from=web /src/service/facerecon/api/static ./service/facerecon/api/static
COPY client ./client
COPY models/ict ./models/ict
RUN pip install -e ".[gpu]" && pip uninstall -y onnxruntime && pip install --force-reinstall onnxruntime-gpu \
    && useradd --create-home --uid 10001 facerecon && mkdir -p /app/.torch_extensions \
    && chown facerecon /app/.torch_extensions
USER facerecon
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s CMD curl -fsS http://localhost:8000/readyz || exit 1
CMD ["facerecon", "serve"]
