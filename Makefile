# `make demo` and `make test` build .venv from scratch and need nothing pre-installed
# beyond python3 (3.10+). On a CPU machine torch is pinned to the CPU wheel first so
# that pip does not pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.entrgi-installed
# pytest-xdist workers for `make test`: the interpreted kernel tests are single-threaded
# Python; two workers on CI's 2 cores took 33 min where one process took 55 (2026-12-06).
# 0 runs one process (what a GPU box wants: the CUDA tests would share one device).
TEST_WORKERS ?= 2

.PHONY: install demo test test-gpu-image bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/entrgi demo

test: $(STAMP)
	$(PY) -m pytest -q tests bench --benchmark-disable -n $(TEST_WORKERS) --dist worksteal  # bench/: runs and well-formed output, never speed

# The suite in a second venv with the GPU image's versions (.ci/gpu-image-constraints.txt) on
# this CPU: what a lent GPU imports, checked without one. torch 2.11's wheel pulls its CUDA
# libraries (4.6 GB installed).
test-gpu-image:
	PIP_CONSTRAINT=$(CURDIR)/.ci/gpu-image-constraints.txt $(MAKE) test VENV=.venv-gpu-image TORCH_SPEC=torch==2.11.0

bench: $(STAMP)
	$(VENV)/bin/entrgi bench --suite op

clean:
	rm -rf $(VENV) .venv-gpu-image build *.egg-info .pytest_cache
