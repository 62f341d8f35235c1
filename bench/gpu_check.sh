#!/usr/bin/env bash
# The GPU validation run (shared/docs/gpu.md): one command on a GPU machine that builds, tests,
# sanitizes and benchmarks everything, and leaves its evidence in OUTDIR.
#
#   bash bench/gpu_check.sh [OUTDIR]        # default: bench/results/<date>-<gpu>/
#
# Needs only what the GPU machines have (torch with CUDA, triton, nvcc, ninja; compute-sanitizer
# optional) and no network. Writes at most five files: gpu_check.log (everything), results.csv,
# summary.md, and one PNG per benchmarked kernel when matplotlib is installed. Each step has a time
# limit (together under 9.5 minutes, inside one 10-minute device call) and a failing step does not stop
# the later ones; the exit code is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$(command -v python3 || command -v python)}

gpu_slug=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
OUT=${1:-$ROOT/bench/results/$(date -u +%Y-%m-%d)-$gpu_slug}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

status=0
failed=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "=== $name FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', timed out')) after $((SECONDS - start)) s"
        status=1
        failed+=("$name")
    else
        echo "=== $name passed in $((SECONDS - start)) s"
    fi
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
        --format=csv || true
    "$PY" - <<'PYEOF'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PYEOF
    nvcc --version | tail -2 || true
    git -C "$ROOT" log -1 --format='git %h %s' 2>/dev/null || true
}

build() {
    set -eo pipefail
    # Build in place for this GPU only (sm_90a on Hopper), with every core; no pip, so nothing is
    # installed into the machine's Python and nothing is fetched.
    local arch
    arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))")
    TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) NVLM_KERNELS_PTXAS_VERBOSE=1 \
        "$PY" setup.py -q build_ext --inplace 2>&1 | grep -vE "^\s*$|Compile time|Function properties" | tail -60
    "$PY" -m nvlm_kernels.info
}

# `timeout` runs programs, not shell functions: export them for `bash -c`.
export -f environment build
export PY ROOT
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export NVLM_KERNELS_EXPECT_EXTENSION=1 NVLM_KERNELS_EXPECT_CUDA_KERNELS=1
unset TRITON_INTERPRET

# GPU_CHECK_SKIP="build tests" (any of: build tests sanitizer bench) skips steps, e.g. to finish a
# run that a device call's time limit cut short without repeating what already passed.
skip=" ${GPU_CHECK_SKIP:-} "
step "environment" 30 bash -c environment
[[ $skip == *" build "* ]] || step "build" 150 bash -c build
[[ $skip == *" tests "* ]] || step "tests (CUDA, bf16 included)" 200 "$PY" -m pytest tests -q -rs -p no:cacheprovider
if [[ $skip == *" sanitizer "* ]]; then
    :
elif command -v compute-sanitizer >/dev/null; then
    # A small, fast subset on CUDA tensors: every kernel path (pixel shuffle: dtypes, strides, copy
    # units, empty; preprocessing: every job kind, dtypes, strided and 1/4-channel inputs).
    # racecheck: none of the kernels so far uses shared memory; later ops add it here.
    step "compute-sanitizer memcheck" 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PY" -m pytest tests/nvlm_kernels/test_pixel_shuffle.py tests/nvlm_kernels/test_preprocess.py -q \
        -p no:cacheprovider -k "not cpu and (dtypes_exact or strided or copy_unit or empty_batch or \
double_backward or kernel_equals_pillow or kernel_dtypes or kernel_rejects)"
else
    echo "compute-sanitizer not found: memcheck skipped"
fi
[[ $skip == *" bench "* ]] || step "benchmarks" 120 "$PY" bench/run_all.py --out "$OUT"

echo
echo "=== summary"
[[ -f $OUT/summary.md ]] && sed -n '/^## Targets/,$p' "$OUT/summary.md"
ls -l "$OUT"
if [[ $status -ne 0 ]]; then
    echo "gpu_check: FAILED steps: ${failed[*]}"
else
    echo "gpu_check: all steps passed"
fi
exit $status
