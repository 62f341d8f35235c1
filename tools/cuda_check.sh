#!/usr/bin/env bash
# `make cuda-check`: the real CUDA build of the extension on a machine with no GPU.
#
# In .venv-cuda (torch 2.14.1, a CUDA 13.0 build, + pip's nvcc/crt/nvvm/cccl 13.0): builds a wheel
# for sm_80 and sm_90a out of the source tree (the CPU editable build in nvlm_kernels/ is left
# alone), installs it there, checks the device code (tools/check_cuda_build.py: both
# architectures, no spills, no stack frames, 16-byte memory instructions), and runs the test suite
# against the installed package: the extension's CPU dispatch and the Triton kernels through
# triton 3.8's interpreter. Writes build/cuda-check/{build.log,resources.txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv-cuda/bin/python
OUT=$ROOT/build/cuda-check
[[ -x $PY ]] || { echo "cuda-check: $PY missing (run: make venv-cuda)"; exit 2; }

CU13=$("$PY" -c "import nvidia.cu13, os; print(nvidia.cu13.__path__[0])")
# The toolkit wheels ship libcudart.so.13 only; the link step asks for libcudart.so.
ln -sf libcudart.so.13 "$CU13/lib/libcudart.so"
export CUDA_HOME=$CU13 PATH=$CU13/bin:$PATH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-2}

rm -rf "$OUT"
mkdir -p "$OUT"
echo "cuda-check: building the extension for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with $(nvcc --version | tail -1)"
start=$SECONDS
if ! NVLM_KERNELS_PTXAS_VERBOSE=1 "$PY" -m pip wheel . --no-build-isolation --no-deps -w "$OUT/wheel" -v \
    >"$OUT/build.log" 2>&1; then
    tail -50 "$OUT/build.log"
    echo "cuda-check: the CUDA build failed (full log: $OUT/build.log)"
    exit 1
fi
echo "cuda-check: built in $((SECONDS - start)) s"
"$PY" -m pip install -q --no-deps --force-reinstall "$OUT"/wheel/nvlm_kernels-*.whl

# -P: do not put the working directory on sys.path, so the installed package (with the CUDA
# build of _C) is the one imported, not the source tree.
SO=$(cd /tmp && "$PY" -P -c "import importlib.util as u; print(u.find_spec('nvlm_kernels._C').origin)")
echo "cuda-check: checking device code in $SO"
"$PY" tools/check_cuda_build.py "$SO" | tee "$OUT/resources.txt"

echo "cuda-check: test suite against the installed CUDA build (CPU dispatch, Triton interpreter)"
NVLM_KERNELS_EXPECT_EXTENSION=1 NVLM_KERNELS_EXPECT_CUDA_KERNELS=1 TRITON_INTERPRET=1 \
    "$PY" -P -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-}
