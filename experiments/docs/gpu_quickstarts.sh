#!/usr/bin/env bash
# One device call: the GPU-titled code blocks of the docs (docs/tests/test_quickstarts.py -m gpu), log in
# $OUT and experiments/results/docs_gpu_quickstarts.log.  The vLLM blocks need vLLM installed (the 0.26
# bundle, see experiments/vllm/README.md, with tq-vllm installed from wheels so its entry point exists)
# and MODEL set to a model directory the machine can load with its tokenizer.
set -uo pipefail
export PYTHONPATH=$PWD/packages/tq-core/src:$PWD/packages/tq-kernels/src:$PWD/packages/tq-hf/src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! command -v vllm > /dev/null; then  # vLLM imported from PYTHONPATH (the bundle): no console script
  mkdir -p /tmp/vllm-bin && printf '#!/bin/sh\nexec python3 -m vllm.entrypoints.cli.main "$@"\n' > /tmp/vllm-bin/vllm
  chmod +x /tmp/vllm-bin/vllm && export PATH=/tmp/vllm-bin:$PATH
fi
log=experiments/results/docs_gpu_quickstarts.log
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%F; echo "MODEL=${MODEL:-unset}"
  timeout ${TEST_TIMEOUT:-540} python3 -m pytest docs/tests/test_quickstarts.py -m gpu -v -ra -p no:cacheprovider 2>&1
} | tee "$log" "$OUT/docs_gpu_quickstarts.log"
