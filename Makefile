# Two commands set up and run everything on a fresh machine (each installs what it needs):
#   make run    the distillation pipeline on MovieLens-100K (python -m dagfm_ext run)
#   make test   build, then the Python tests (the benchmark smoke run `bench --quick --device cpu`
#               and a short fuzz of the op against the reference among them), the C++ tests (ctest)
#               and the CUDA compile check
# After a change to the kernels, `make fuzz-long` runs the long fuzz profile (many more cases).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dagfm-installed
RUN_ARGS ?=

.PHONY: install run test test-python test-cpp check-cuda bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp)
	$(PY) -m pip install -r requirements-dev.txt
	MAX_JOBS=2 $(PY) -m pip install --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m dagfm_ext run $(RUN_ARGS)

test: test-python test-cpp check-cuda

test-python: install
	$(PY) -m pytest tests -q

test-cpp: install
	cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build-cmake -j2
	ctest --test-dir build-cmake --output-on-failure

.PHONY: fuzz-long
fuzz-long: install
	$(PY) -m pytest tests/test_fuzz.py -q --hypothesis-profile=long --hypothesis-show-statistics

check-cuda:
	bash scripts/check_cuda_compile.sh

bench: install
	$(VENV)/bin/dagfm-ext bench --device cpu --json benchmarks/results_cpu.json --plot benchmarks/speedup_cpu.png

clean:
	rm -rf build build-cmake dagfm_ext/_C*.so
