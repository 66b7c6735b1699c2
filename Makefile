# `make train` and `make test` set up a fresh Debian machine on first use (idempotent), then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastseed-setup
APT    := libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
CHECK_ARGS ?=
PY312 ?= python3.12
TRITON36 := .triton36-cp312

.PHONY: setup train test test-fast lint results-page bench clean kernel-check kernel-check-triton36 gpu-check gpu-check-dry gpu-wheels gpu-rehearse

setup: $(STAMP)

$(STAMP): setup.py
	@dpkg -s $(APT) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT); }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,export,tensorboard,mlflow,wandb]'
	@touch $(STAMP)

train: setup
	$(VENV)/bin/fastseed-train

test: setup
	$(VENV)/bin/pytest tests $(PYTEST_ARGS)

# The suite without the end-to-end runs marked slow (pytest.ini's markers).
test-fast: setup
	$(VENV)/bin/pytest tests -m "not slow" $(PYTEST_ARGS)

# pyflakes and pycodestyle (pyproject.toml's [tool.ruff]); no import sorting: import order matters here.
lint: setup
	$(VENV)/bin/ruff check .

# docs/results.md from benchmarks/results/*.jsonl (tests/test_docs.py fails when it is stale).
results-page: setup
	$(PY) benchmarks/results_page.py

# Compile every Triton kernel ahead of time for sm_90 and sm_100 (no GPU needed); exits
# non-zero if one would not launch, spills or traps. CHECK_ARGS: e.g. --arch 90 --dims 128.
kernel-check: setup
	$(PY) -m fastseed.kernels.check $(CHECK_ARGS)

# The same with the GPU machine's triton 3.6 under its Python 3.12 (PY312): with
# CHECK_ARGS="--arch 90 --cache-dir .triton-cache" it fills a Triton cache that machine's JIT
# finds when run from the repository root with TRITON_CACHE_DIR=.triton-cache.
$(TRITON36)/triton/__init__.py:
	$(PY) -m pip install -q --no-deps --only-binary :all: --python-version 3.12 --target $(TRITON36) triton==3.6.0

kernel-check-triton36: setup $(TRITON36)/triton/__init__.py
	$(PY) -m fastseed.kernels.check --python "env PYTHONPATH=$(CURDIR)/$(TRITON36) $(PY312)" $(CHECK_ARGS)

bench: setup
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf output data .pytest_cache .benchmarks

# The GPU machine has no make: there, its checklist runs `python3 benchmarks/gpu/gpu_check.py --call N`
# (benchmarks/gpu/README.md). Here, the same script: CALL=1 one call of the plan,
# STEPS=c,f only those steps, neither every call in turn.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) benchmarks/gpu/gpu_check.py $(if $(CALL),--call $(CALL)) $(if $(STEPS),--steps $(STEPS))

# The same script here on the CPU at tiny sizes, every call, its offline install of the tree
# included (tests/test_benchmarks.py runs it in `make test`).
gpu-check-dry: setup
	$(PY) benchmarks/gpu/gpu_check.py --dry

# By hand, not in CI: a Python 3.12 environment with the GPU machine's versions (build/gpu-rehearse/,
# ~4 GB downloaded once), a copy of the tree and .whl/ as the device receives them, the real
# install and every call at dry sizes; prints each step's time. Needs .whl/ (make gpu-wheels).
gpu-rehearse: setup
	PY312=$(PY312) $(PY) benchmarks/gpu/gpu_rehearse.py

# .whl/ for the GPU machine: needs PyPI, a Python 3.12 (PY312=/path/to/python3.12), a C++ toolchain.
GPU_APT := cmake ninja-build pkg-config g++ libturbojpeg0-dev dataset-fashion-mnist
gpu-wheels: setup
	@dpkg -s $(GPU_APT) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(GPU_APT); }
	$(PY) benchmarks/gpu/gpu_wheels.py
