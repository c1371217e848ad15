#!/usr/bin/env bash
# One device call: tq-hf's GPU tests, then the transformers decode benchmark.  Logs land in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD/packages/tq-core/src:$PWD/packages/tq-kernels/src:$PWD/packages/tq-hf/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  (cd packages/tq-hf && timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests/test_gpu.py tests/test_triton_backend.py \
    -q -p no:cacheprovider -W ignore 2>&1 | tail -n 60 | tee "$OUT/hf_gpu_tests.log")
fi
timeout ${BENCH_TIMEOUT:-360} python3 experiments/hf/bench_hf.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/hf_bench.log"
