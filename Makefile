# The two set-up commands of the README:
#   make demo   installs pymaml (compiling its kernels) and runs the main job (sinusoid MAML, no download)
#   make test   installs pymaml with its test extras and runs the suite twice:
#               compiled kernels, then the pure-torch fallback forced with PYMAML_BACKEND=torch
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as on our machines) misleads it.
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
PYTEST_ARGS ?= -q -m "not slow"

.PHONY: deps install install-test demo test test-compiled test-torch bench info

# Set DEMO_ARGS= for the paper's full 70 000-iteration run; the default stops after 5 minutes.
# One torch thread: the sinusoid MLP is too small to gain from more, and loses on a busy machine.
DEMO_ARGS ?= --max-minutes 5 --threads 1 --out runs/sinusoid

# torch and the build tools first: the extension builds against the installed torch (no isolation).
deps:
	$(PIP) install torch ninja numpy packaging setuptools wheel

install: deps
	$(PIP) install --no-build-isolation -e ".[train]"

install-test: deps
	$(PIP) install --no-build-isolation -e ".[train,test]"

demo: install
	$(PYTHON) -m pymaml.info
	$(PYTHON) -m pymaml train sinusoid $(DEMO_ARGS)

test: install-test test-compiled test-torch

test-compiled:
	$(PYTHON) -m pymaml.info
	$(PYTHON) -m pytest $(PYTEST_ARGS) tests

test-torch:
	PYMAML_BACKEND=torch $(PYTHON) -m pytest $(PYTEST_ARGS) tests

bench: install
	$(PIP) install matplotlib tqdm
	$(PYTHON) benchmarks/bench_kernels.py
