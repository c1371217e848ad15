#!/usr/bin/env bash
# One device call: kernel tests over the GPU shape matrix, then the benchmarks.  Logs land in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD/packages/tq-core/src:$PWD/packages/tq-kernels/src:$PWD/experiments PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  # Triton compiles one kernel per constexpr set: spread the matrix over 8 processes (pytest-xdist).
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest packages/tq-kernels/tests -m "gpu" -q -n 8 -p no:cacheprovider \
    ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -n 60 | tee "$OUT/kernels_gpu_tests.log"
fi
timeout ${BENCH_TIMEOUT:-280} python3 experiments/kernels/bench_kernels.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/kernels_bench.log"
