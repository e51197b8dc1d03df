# The two set-up commands of the README:
#   make demo   installs pymaml (compiling its kernels) and runs the main job (sinusoid, no download)
#   make test   installs pymaml with its test extras and runs the suite twice:
#               compiled kernels, then the pure-torch fallback forced with PYMAML_BACKEND=torch
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as on our machines) misleads it.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
PYTEST_ARGS ?= -q -m "not slow"

.PHONY: install install-test demo test test-compiled test-torch bench info

install:
	$(PIP) install torch ninja numpy packaging setuptools wheel
	$(PIP) install --no-build-isolation -e .

install-test: install
	$(PIP) install --no-build-isolation -e ".[test]"

demo: install
	$(PYTHON) -m pymaml.info
	$(PYTHON) -m pymaml train sinusoid

test: install-test test-compiled test-torch

test-compiled:
	$(PYTHON) -m pymaml.info
	$(PYTHON) -m pytest $(PYTEST_ARGS) tests

test-torch:
	PYMAML_BACKEND=torch $(PYTHON) -m pytest $(PYTEST_ARGS) tests

bench: install
	$(PIP) install matplotlib tqdm
	$(PYTHON) benchmarks/bench_kernels.py
