#!/usr/bin/env bash
# The quality harness on the device machine (H200).  See experiments/quality/README.md.
#
#   bash experiments/quality/run.sh MODEL_DIR hf                      # tq-hf path, every config
#   bash experiments/quality/run.sh MODEL_DIR vllm [NAME ...]         # vLLM path (default set, or NAMEs)
#   bash experiments/quality/run.sh MODEL_DIR all                     # both
#
# Environment: QUALITY_TAG (suffix of the output files, so split calls do not collide), QUALITY_JOBS
# (vLLM engines at a time, default 1), QUALITY_TIMEOUT (seconds per vLLM config, default 300),
# QUALITY_SMALL=1 (the short CPU smoke protocol).
# Writes to $OUT (or experiments/results/): quality_{hf,vllm}[_TAG].jsonl and .log.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:?usage: run.sh MODEL_DIR hf|vllm|all [vLLM config names]}
PART=${2:-all}
shift $(( $# >= 2 ? 2 : $# ))
DEST=${OUT:-experiments/results}
TAG=${QUALITY_TAG:+_$QUALITY_TAG}
mkdir -p "$DEST"
SMALL=${QUALITY_SMALL:+--small}
SRC=packages/tq-core/src:packages/tq-kernels/src:packages/tq-hf/src

if [[ $PART == hf || $PART == all ]]; then
  echo "== tq-hf path"
  PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH} python3 experiments/quality/hf_quality.py "$MODEL" $SMALL \
    --jsonl "$DEST/quality_hf$TAG.jsonl" 2>&1 | tee "$DEST/quality_hf$TAG.log"
fi
if [[ $PART == vllm || $PART == all ]]; then
  echo "== vLLM path"
  # the plugin's entry point needs installed distributions (wheels built on the dev machine)
  # (TQ_WHEELS_INSTALLED=1: already installed, e.g. while other engines are importing from /tmp/site)
  if [ -z "${TQ_WHEELS_INSTALLED:-}" ] && compgen -G "experiments/vllm/.whl-tq/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site experiments/vllm/.whl-tq/*.whl
  fi
  PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLLM_USE_FLASHINFER_SAMPLER=0 \
    python3 experiments/quality/vllm_quality.py "$MODEL" "$@" $SMALL --jobs "${QUALITY_JOBS:-1}" \
    --jsonl "$DEST/quality_vllm$TAG.jsonl" --log "$DEST/quality_vllm$TAG.log"
fi
