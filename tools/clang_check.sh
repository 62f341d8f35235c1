#!/usr/bin/env bash
# `make clang-check`: the extension's C++ host kernels built with Clang, and tested.
#
# The host loops are compiled twice, and the AVX2 copy is made under a target pragma that differs
# between compilers (`#pragma GCC target` for GCC, `#pragma clang attribute` for Clang: see
# csrc/preprocess/resize_host.cpp). The regular build uses GCC; this one builds the CPU extension
# with Debian's clang++ (installed with apt-get when missing) into build/clang, puts it beside a
# copy of the Python package, and runs the host-kernel tests of every ISA against Pillow with it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/clang
[[ -x $PY ]] || { echo "clang-check: $PY missing (run: make venv)"; exit 2; }

find_clang() { command -v clang++ || command -v clang++-14 || true; }
CXX_CLANG=$(find_clang)
if [[ -z $CXX_CLANG ]]; then
    # Debian's clang, through apt-get (root only); the package lists are refreshed when the first
    # try cannot find it. Where none of that works the check says why and passes: it is the one
    # step of CI that needs a system package.
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "clang-check: SKIPPED: no clang++ here, and no root apt-get to install Debian's clang"
        exit 0
    fi
    echo "clang-check: installing Debian's clang"
    log=$ROOT/build/clang-apt.log
    mkdir -p "$ROOT/build"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q clang >"$log" 2>&1 ||
        { apt-get update -q >>"$log" 2>&1 && apt-get install -y -q clang >>"$log" 2>&1; } ||
        { tail -5 "$log"; echo "clang-check: SKIPPED: apt-get could not install clang (log: $log)"; exit 0; }
    CXX_CLANG=$(find_clang)
fi
echo "clang-check: $("$CXX_CLANG" --version | head -1)"

rm -rf "$OUT"
mkdir -p "$OUT/pkg"
start=$SECONDS
if ! CXX=$CXX_CLANG NVLM_KERNELS_FORCE_CPU=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext \
    --build-temp "$OUT/temp" --build-lib "$OUT/lib" >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
fi
echo "clang-check: built in $((SECONDS - start)) s"
# The Python package from the source tree beside the Clang-built extension, ahead of the editable
# install on sys.path (PYTHONPATH; python -P, so the working directory's package is not first).
cp -r nvlm_kernels "$OUT/pkg/"
rm -f "$OUT"/pkg/nvlm_kernels/_C*.so
cp "$OUT"/lib/nvlm_kernels/_C*.so "$OUT/pkg/nvlm_kernels/"
# One process checks which extension it loaded, then runs the tests with it.
PYTHONPATH=$OUT/pkg NVLM_KERNELS_EXPECT_EXTENSION=1 "$PY" -P - "$OUT/pkg" <<'EOF'
import sys

import pytest

from nvlm_kernels import _extension

_extension.require()
import nvlm_kernels._C as extension  # noqa: E402

if not extension.__file__.startswith(sys.argv[1]):
    sys.exit(f"clang-check: loaded {extension.__file__}, not the Clang build")
print(f"clang-check: testing {extension.__file__}", flush=True)
tests = ["tests/nvlm_kernels/test_preprocess.py", "tests/nvlm_kernels/test_pixel_shuffle.py"]
# (Triton rows excluded: they run the same Python on either build, and take most of the time)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-k", "not triton", *tests]))
EOF
