# The two set-up commands of the README:
#   make demo   installs pymaml (compiling its kernels) and runs the main job (sinusoid MAML, no download)
#   make test   installs pymaml with its test extras and runs the suite twice:
#               compiled kernels, then the pure-torch fallback forced with PYMAML_BACKEND=torch
# Both install pymaml in editable mode; the compiled objects are kept in build/ (setup.py), so the
# second command only relinks the extension when no source changed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch guesses CUDA_HOME from the nvcc on PATH, which a wrapper script there can mislead.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
PYTEST_ARGS ?= -q -m "not slow"

.PHONY: deps install install-test demo test test-compiled test-torch bench

# The demo always writes runs/sinusoid with one torch thread (the sinusoid MLP is too small to gain
# from more, and loses on a busy machine). Set DEMO_ARGS= for the paper's full 70 000 iterations;
# the default stops after 5 minutes.
DEMO_ARGS ?= --max-minutes 5
DEMO_OUT ?= runs/sinusoid

# torch and the build tools first: the extension builds against the installed torch (no isolation).
deps:
	$(PIP) install torch ninja numpy packaging setuptools wheel

install: deps
	$(PIP) install --no-build-isolation -e ".[train]"

install-test: deps
	$(PIP) install --no-build-isolation -e ".[train,test]"

demo: install
	$(PYTHON) -m pymaml.info
	$(PYTHON) -m pymaml train sinusoid --threads 1 --out $(DEMO_OUT) $(DEMO_ARGS)

test: install-test test-compiled test-torch

test-compiled:
	$(PYTHON) -m pymaml.info
	$(PYTHON) -m pytest $(PYTEST_ARGS) tests

test-torch:
	PYMAML_BACKEND=torch $(PYTHON) -m pytest $(PYTEST_ARGS) tests

bench: install
	$(PYTHON) benchmarks/bench_kernels.py
