#!/usr/bin/env bash
# One device call: kernel tests over the GPU shape matrix, then the benchmarks.  Logs land in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD/packages/tq-core/src:$PWD/packages/tq-kernels/src:$PWD/experiments PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest packages/tq-kernels/tests -m "gpu" -q -x -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
  | tail -n 40 | tee "$OUT/kernels_gpu_tests.log"
python3 experiments/kernels/bench_kernels.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/kernels_bench.log"
