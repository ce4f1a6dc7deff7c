#!/usr/bin/env bash
# One-call GPU run of the project's GPU checks and benchmark suite (issue #4).
#
#   bash benchmarks/gpu_run.sh                 # all stages: env tests bench sanitize report
#   bash benchmarks/gpu_run.sh bench report    # only some stages, in the order given
#
# Stages:
#   env       GPU, driver, python and library versions (fails if torch sees no CUDA)
#   tests     python -m pytest tests -m gpu            (compiled Triton kernels, bf16, CUDA graphs)
#   kernels   every kernel/layer test file compiled     (the interpreter-tested CI cases, on the GPU)
#   bench     python -m pytest benchmarks              (benchmarking enabled: merges GPU rows into
#                                                       benchmarks/results.json, keyed by device)
#   sanitize  compute-sanitizer memcheck + racecheck on benchmarks/sanitize_case.py
#   report    python benchmarks/report.py              (benchmarks/RESULTS.md)
#
# Logs and results go to $OUT when it is set (the device tool returns that folder), else to
# $LEMOE_GPU_LOGS or /tmp/lemoe-gpu-logs. At most 8 files are written there: env.log,
# gpu_tests.log or kernel_tests.log, bench.log, memcheck.log, racecheck.log, results.json, RESULTS.md.
# Environment: PYTHON (default python3: on the lent GPU machines the one holding CUDA
# PyTorch), BENCH_MAX_TIME (pytest-benchmark --benchmark-max-time, default 0.25 s per case,
# which keeps the whole run inside one 10-minute command), BENCH_ARGS (extra pytest args,
# e.g. "-k routing"; split on spaces, so no quoted phrases). On a short lease run each stage
# under its own limit: `timeout 200 bash benchmarks/gpu_run.sh kernels`.
# Exit status: 0 when every stage run passed, else 1 (every requested stage still runs).

set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOGS=${OUT:-${LEMOE_GPU_LOGS:-/tmp/lemoe-gpu-logs}}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels only
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env tests bench sanitize report)
failed=()

stage_env() {
    {
        date -u +%Y-%m-%dT%H:%M:%SZ
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
        "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
import triton, transformers
print("triton", triton.__version__, "transformers", transformers.__version__)
try:
    import pytest_benchmark
    print("pytest-benchmark", pytest_benchmark.__version__)
except ImportError:
    print("pytest-benchmark MISSING: pip install pytest-benchmark (carry a wheel)")
    raise
assert torch.cuda.is_available(), "torch sees no CUDA device"
p = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(0), p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
EOF
    } 2>&1 | tee "$LOGS/env.log"
}

stage_tests() {
    "$PY" -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$LOGS/gpu_tests.log"
}

stage_kernels() {
    "$PY" -m pytest tests/test_kernels.py tests/test_kernel_layer.py tests/test_layer.py \
        tests/test_kernel_compile.py -q -p no:cacheprovider 2>&1 | tee "$LOGS/kernel_tests.log"
}

stage_bench() {
    # shellcheck disable=SC2086
    "$PY" -m pytest benchmarks -q -p no:cacheprovider \
        --benchmark-max-time="${BENCH_MAX_TIME:-0.25}" --benchmark-columns=min,median,max,rounds \
        --durations=15 ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/bench.log"
    local rc=${PIPESTATUS[0]}
    [ -f benchmarks/results.json ] && cp benchmarks/results.json "$LOGS/results.json"
    return "$rc"
}

find_sanitizer() {
    command -v compute-sanitizer 2>/dev/null && return
    for c in /usr/local/cuda/bin/compute-sanitizer /opt/nvidia/nsight-compute/*/compute-sanitizer \
             /usr/local/cuda-*/bin/compute-sanitizer; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
}

stage_sanitize() {
    local cs rc=0
    cs=$(find_sanitizer)
    if [ -z "$cs" ]; then
        echo "compute-sanitizer not found" | tee "$LOGS/memcheck.log"
        return 1
    fi
    # the caching allocator off, so out-of-bounds accesses land outside any allocation
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 1 \
        "$PY" benchmarks/sanitize_case.py 2>&1 | tee "$LOGS/memcheck.log" || rc=1
    # racecheck is slow: SANITIZE_GROUPS picks case groups (sanitize_case.py; default all, FFN first)
    # shellcheck disable=SC2086
    "$cs" --tool racecheck --racecheck-report all --error-exitcode 1 \
        "$PY" benchmarks/sanitize_case.py ${SANITIZE_GROUPS:-} 2>&1 | tee "$LOGS/racecheck.log" || rc=1
    return "$rc"
}

stage_report() {
    "$PY" benchmarks/report.py && cp benchmarks/RESULTS.md "$LOGS/RESULTS.md" \
        && { [ ! -f benchmarks/results.json ] || cp benchmarks/results.json "$LOGS/results.json"; }
}

for s in "${stages[@]}"; do
    echo "=== stage $s ($(date -u +%H:%M:%S))"
    if ! "stage_$s"; then
        failed+=("$s")
        echo "=== stage $s FAILED"
        [ "$s" = env ] && { echo "no usable CUDA environment: stopping"; exit 1; }
    fi
done
echo "=== done; logs in $LOGS; failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
