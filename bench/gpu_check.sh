#!/usr/bin/env bash
# The GPU validation run (shared/docs/gpu.md): one command on a GPU machine that builds, tests,
# sanitizes and benchmarks everything, and leaves its evidence in OUTDIR.
#
#   bash bench/gpu_check.sh [OUTDIR]        # default: bench/results/<date>-<gpu>/
#
# Needs only what the GPU machines have (torch with CUDA, triton, nvcc, ninja; compute-sanitizer
# optional) and no network. Writes four files: gpu_check.log (everything), results.csv, summary.md
# and results.png (when matplotlib is installed; else `run_all.py --plot-only` draws it later).
# Each step has a time limit and a failing step does not stop the later ones; the exit code is
# non-zero if any failed.
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

# GPU_CHECK_STEPS picks steps (default: all of "build tests sanitizer bench"). A device call has
# 10 minutes: run "build tests sanitizer" in one call and "build bench" in the next (the build is
# a no-op the second time on a machine that is still warm).
steps=" ${GPU_CHECK_STEPS:-build tests sanitizer bench} "
want() { [[ $steps == *" $1 "* ]]; }
step "environment" 30 bash -c environment
want build && step "build" 240 bash -c build
want tests && step "tests (CUDA, bf16 included)" 300 "$PY" -m pytest tests -q -rs -p no:cacheprovider
if want sanitizer; then
    if command -v compute-sanitizer >/dev/null; then
        # memcheck: a small subset on CUDA tensors covering every kernel path (pixel shuffle: dtypes,
        # strides, copy units, empty; preprocessing: every job kind, dtypes, strided and 1/4-channel
        # inputs; ViT attention: forward, backward and the fused QK-norm at small shapes; cross
        # attention: forward and backward over every kind of range, GQA 8, decode with split-K;
        # projector: gathered LayerNorm + GEMM, every variant's backward, at an odd token count).
        step "compute-sanitizer memcheck" 200 compute-sanitizer --tool memcheck --error-exitcode 1 \
            "$PY" -m pytest tests/nvlm_kernels/test_pixel_shuffle.py tests/nvlm_kernels/test_preprocess.py \
            tests/nvlm_kernels/test_vit_attention.py tests/nvlm_kernels/test_cross_attention.py \
            tests/nvlm_kernels/test_mlp_projector.py -q -p no:cacheprovider \
            -k "not cpu and (dtypes_exact or strided or copy_unit or empty_batch or double_backward or \
kernel_equals_pillow or kernel_dtypes or kernel_rejects or 1x97x25x64 or 2x65x4x64 or \
2-97-130-4-2-64 or 1-64-300-8-1-128 or decode_matches or 27tok)"
        # racecheck: the kernels that use shared memory (the attention kernels).
        step "compute-sanitizer racecheck" 120 compute-sanitizer --tool racecheck --error-exitcode 1 \
            "$PY" -m pytest tests/nvlm_kernels/test_vit_attention.py tests/nvlm_kernels/test_cross_attention.py -q \
            -p no:cacheprovider -k "cuda and (1x97x25x64 or 2-97-130-4-2-64 or decode_matches)"
    else
        echo "compute-sanitizer not found: memcheck and racecheck skipped"
    fi
fi
want bench && step "benchmarks" 420 "$PY" bench/run_all.py --quiet --out "$OUT"

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
