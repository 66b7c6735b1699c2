# `make train` and `make test` set up a fresh Debian machine on first use (idempotent), then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastseed-setup
APT    := libturbojpeg0-dev libopencv-dev dataset-fashion-mnist
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup train test bench clean gpu-check gpu-check-dry gpu-wheels

setup: $(STAMP)

$(STAMP): setup.py
	@dpkg -s $(APT) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT); }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

train: setup
	$(VENV)/bin/fastseed-train

test: setup
	$(VENV)/bin/pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf output data .pytest_cache .benchmarks

# The GPU machine (its python3 holds torch; no .venv there), one call: benchmarks/README.md,
# "GPU checklist". STEPS=c,g reruns only those steps.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(if $(STEPS),--steps $(STEPS))

# The same script here on the CPU at tiny sizes, its offline install of the tree included
# (tests/test_benchmarks.py runs it in `make test`).
gpu-check-dry: setup
	$(PY) benchmarks/gpu_check.py --dry

# .whl/ for the GPU machine: needs PyPI, a Python 3.12 (PY312=/path/to/python3.12), a C++ toolchain.
GPU_APT := cmake ninja-build pkg-config g++ libturbojpeg0-dev dataset-fashion-mnist
gpu-wheels: setup
	@dpkg -s $(GPU_APT) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(GPU_APT); }
	$(PY) benchmarks/gpu_wheels.py
