#!/usr/bin/env bash
# The GPU validation run (shared/docs/gpu.md): ONE command of at most ~8 minutes on a lent GPU that
# turns the loan into evidence, the most valuable steps first.
#
#   bash bench/gpu_check.sh [--budget SECONDS] [--dry-run] [OUTDIR]
#
#   --budget   the whole run's time (default 480 s); each step gets a deadline from what remains
#   --dry-run  the same steps on a CPU machine at tiny shapes through the Triton interpreter, within
#              a small budget (default 240 s): CI runs it, so the script is known to work before a
#              GPU ever runs it
#   OUTDIR     default bench/results/<date>-<gpu>/
#
# Steps, by priority (a step that does not fit in what remains is skipped, saying so):
#   1. environment: GPU, driver, clocks, torch / triton / CUDA versions, git commit
#   2. build: the extension in place, for this GPU's architecture only
#   3. correctness: tests/nvlm_kernels/test_smoke.py, every op on every backend (ours and the peers)
#      in bf16 and fp16 at small shapes against float64 references (<= 90 s)
#   4. tuning: python -m nvlm_kernels.tune at targets.md's shapes -> OUTDIR/dispatch_table.json
#      (written after every case)
#   5. benchmarks: targets.md rows a-f (bench/run_all.py --targets), a CSV row appended as each
#      case finishes, summary.md rewritten after each op
#   6. while time remains: the whole test suite on CUDA, then compute-sanitizer memcheck and
#      racecheck over small subsets
#
# Files in OUTDIR (at most 8; each well under 16 MiB), written as the run goes so that a run cut
# off at its limit still returns everything that finished: gpu_check.log (everything printed),
# dispatch_table.json, results.csv, summary.md, results.png (when matplotlib is installed).
# Needs only what the GPU machines have (torch with CUDA, triton, nvcc, ninja; compute-sanitizer
# optional) and no network. Exit code non-zero if a step that ran failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$(command -v python3 || command -v python)}

budget=""
dry_run=0
out_arg=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --budget) budget=$2; shift 2 ;;
        --budget=*) budget=${1#--budget=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
        *) out_arg=$1; shift ;;
    esac
done
if [[ -z $budget ]]; then
    budget=$([[ $dry_run -eq 1 ]] && echo 240 || echo 480)
fi
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "gpu_check: --budget must be a whole number of seconds, got '$budget'" >&2
    exit 2
fi

if [[ $dry_run -eq 1 ]]; then
    slug=dry-run
else
    slug=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
fi
OUT=${out_arg:-$ROOT/bench/results/$(date -u +%Y-%m-%d)-$slug}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

START=$SECONDS
RESERVE=15  # kept for the summary at the end
status=0
failed=()
skipped=()
remaining() { echo $((budget - (SECONDS - START) - RESERVE)); }

step() {  # step [--optional] NAME MAX_SECONDS COMMAND...: runs with min(MAX, what remains) as its limit
    local optional=0
    if [[ $1 == --optional ]]; then
        optional=1
        shift
    fi
    local name=$1 max=$2
    shift 2
    local left
    left=$(remaining)
    local limit=$((max < left ? max : left))
    echo
    if ((limit < 10)); then
        echo "=== $name: SKIPPED, no time left (${left}s of the ${budget}s budget)"
        skipped+=("$name")
        return 0
    fi
    echo "=== $name (limit ${limit}s; $((SECONDS - START))s of ${budget}s used)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [[ $rc -eq 124 && $optional -eq 1 ]]; then
        echo "=== $name CUT OFF at its ${limit}s limit (it runs while time remains; not a failure)"
        skipped+=("$name (cut off)")
    elif [[ $rc -ne 0 ]]; then
        echo "=== $name FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', timed out')) after $((SECONDS - start)) s"
        status=1
        failed+=("$name")
    else
        echo "=== $name passed in $((SECONDS - start)) s"
    fi
}

environment() {
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "dry run on $(uname -m) ($(nproc) cores): no GPU; Triton kernels run through the interpreter"
    else
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
            --format=csv || true
    fi
    "$PY" - <<'PYEOF'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PYEOF
    nvcc --version 2>/dev/null | tail -2 || true
    git -C "$ROOT" log -1 --format='git %h %s' 2>/dev/null || true
}

build() {
    set -eo pipefail
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "dry run: using the extension already built here (make test builds it)"
    else
        # Build in place for this GPU only (sm_90a on Hopper), with every core; no pip, so nothing is
        # installed into the machine's Python and nothing is fetched.
        local arch
        arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))")
        TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) NVLM_KERNELS_PTXAS_VERBOSE=1 \
            "$PY" setup.py -q build_ext --inplace 2>&1 | grep -vE "^\s*$|Compile time|Function properties" | tail -60
    fi
    "$PY" -m nvlm_kernels.info
}

# `timeout` runs programs, not shell functions: export them for `bash -c`.
export -f environment build
export PY ROOT
export DRY_RUN=$dry_run
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [[ $dry_run -eq 1 ]]; then
    export TRITON_INTERPRET=1
    export NVLM_KERNELS_EXPECT_EXTENSION=${NVLM_KERNELS_EXPECT_EXTENSION:-0}
    tune_shapes=(--small --dtype float16)  # float16: the Triton kernels run too (interpreter)
    bench_args=(--quick)
    shapes_label="tiny shapes (dry run)"
else
    unset TRITON_INTERPRET
    export NVLM_KERNELS_EXPECT_EXTENSION=1 NVLM_KERNELS_EXPECT_CUDA_KERNELS=1
    tune_shapes=(--targets --dtype bfloat16)
    bench_args=(--targets)
    shapes_label="targets.md shapes"
fi

# GPU_CHECK_STEPS picks steps (default: all of "build smoke tune bench tests sanitizer").
steps=" ${GPU_CHECK_STEPS:-build smoke tune bench tests sanitizer} "
want() { [[ $steps == *" $1 "* ]]; }

step "environment" 30 bash -c environment
want build && step "build" 200 bash -c build
# NVLM_KERNELS_AUTOTUNE=0: one configuration per Triton kernel (one compile each, not one per
# configuration): this step checks results, the tuning and benchmark steps choose configurations.
want smoke && step "correctness: every op x backend, bf16/fp16, small shapes" 90 \
    env NVLM_KERNELS_AUTOTUNE=0 "$PY" -m pytest tests/nvlm_kernels/test_smoke.py -q -rs -p no:cacheprovider
if want tune; then
    tune_limit=$(($(remaining) * 45 / 100))
    # the tuner stops starting cases 20 s before its limit and has written every finished case
    step "tuning: dispatch table at $shapes_label" "$tune_limit" \
        "$PY" -m nvlm_kernels.tune "${tune_shapes[@]}" --budget $((tune_limit > 40 ? tune_limit - 20 : 20)) \
        --out "$OUT/dispatch_table.json"
fi
if want bench; then
    bench_limit=$(($(remaining) * 70 / 100))
    step "benchmarks: $([[ $dry_run -eq 1 ]] && echo 'quick CPU cases (dry run)' || echo 'targets.md rows a-f')" "$bench_limit" \
        "$PY" bench/run_all.py "${bench_args[@]}" --quiet --out "$OUT" --budget $((bench_limit > 40 ? bench_limit - 25 : 15))
fi
if want tests; then
    if [[ $dry_run -eq 1 ]]; then
        echo
        echo "=== whole suite: not in a dry run (make test runs it on this machine)"
    else
        step --optional "whole suite (CUDA, bf16 included)" 100000 "$PY" -m pytest tests -q -rs -p no:cacheprovider -x
    fi
fi
if want sanitizer; then
    if command -v compute-sanitizer >/dev/null && [[ $dry_run -eq 0 ]]; then
        # memcheck: the smoke matrix (every kernel and backend at small shapes) plus the strided,
        # empty and odd-size cases of the op tests.
        step --optional "compute-sanitizer memcheck" 100000 compute-sanitizer --tool memcheck --error-exitcode 1 \
            "$PY" -m pytest tests/nvlm_kernels/test_smoke.py tests/nvlm_kernels/test_pixel_shuffle.py \
            tests/nvlm_kernels/test_preprocess.py -q -p no:cacheprovider \
            -k "smoke or (not cpu and (dtypes_exact or strided or copy_unit or empty_batch or kernel_equals_pillow or kernel_dtypes or kernel_rejects))"
        # racecheck: the kernels that use shared memory (attention and the projector's GEMM).
        step --optional "compute-sanitizer racecheck" 100000 compute-sanitizer --tool racecheck --error-exitcode 1 \
            "$PY" -m pytest tests/nvlm_kernels/test_smoke.py -q -p no:cacheprovider -k "triton"
    else
        echo
        echo "=== compute-sanitizer: $([[ $dry_run -eq 1 ]] && echo 'not in a dry run' || echo 'not found'): memcheck and racecheck skipped"
    fi
fi

echo
echo "=== summary ($((SECONDS - START)) s of ${budget} s)"
[[ -f $OUT/summary.md ]] && sed -n '/^## Targets/,$p' "$OUT/summary.md"
ls -l "$OUT"
count=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if ((count > 8)); then
    echo "gpu_check: $count files in $OUT, more than the 8 a device run brings back"
    status=1
fi
((${#skipped[@]})) && echo "gpu_check: skipped for lack of time: ${skipped[*]}"
if [[ $status -ne 0 ]]; then
    echo "gpu_check: FAILED steps: ${failed[*]}"
else
    echo "gpu_check: all steps that ran passed"
fi
exit $status
