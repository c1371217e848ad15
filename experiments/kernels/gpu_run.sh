#!/usr/bin/env bash
# One device call: kernel tests over the GPU shape matrix, then the benchmarks.  Logs land in $OUT.
# Carry experiments/kernels/.whl-bench (pytest-benchmark and py-cpuinfo; the machine has no registry).
set -uo pipefail
export PYTHONPATH=$PWD/packages/tq-core/src:$PWD/packages/tq-kernels/src:/tmp/benchsite PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  # Triton compiles one kernel per constexpr set: spread the matrix over 8 processes (pytest-xdist).
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest packages/tq-kernels/tests -m "gpu" -q -n 8 -p no:cacheprovider \
    ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -n 60 | tee "$OUT/kernels_gpu_tests.log"
fi
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/benchsite experiments/kernels/.whl-bench/*.whl
# BENCH_SELECT: a pytest -m expression ("not tune": without the config sweeps); BENCH_K: a -k expression
timeout -s INT -k 30 ${BENCH_TIMEOUT:-420} python3 -m pytest packages/tq-kernels/benchmarks --benchmark-only -q -rs \
  -p no:cacheprovider --benchmark-json="$OUT/kernels_bench.json" ${BENCH_SELECT:+-m "$BENCH_SELECT"} \
  ${BENCH_K:+-k "$BENCH_K"} 2>&1 | tee "$OUT/kernels_bench.log"
python3 experiments/kernels/bench_report.py "$OUT/kernels_bench.json" 2>&1 | tee -a "$OUT/kernels_bench.log"
