# The two commands a newcomer runs:
#   make bench   set up, build, and benchmark fusedgauss against torch.distributions
#   make test    set up, build, and run every test (pytest, then the C++ tests with ctest)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2

.PHONY: setup build test test-python test-cpp bench clean

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

build: setup
	$(PY) -m pip install --quiet --no-build-isolation --no-deps .

test: test-python test-cpp

test-python: build
	$(PY) -m pytest -q -p no:cacheprovider

test-cpp: setup
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j $(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

bench: build
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build dist *.egg-info pyext/_C*.so
