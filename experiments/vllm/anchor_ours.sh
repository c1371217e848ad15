#!/usr/bin/env bash
# vLLM anchor runs, one engine per process, on the device machine: bf16 FLASH_ATTN, fp8, vLLM's own
# turboquant_4bit_nc, and tq-vllm's presets through --attention-backend CUSTOM (plus full capacity).
#
#   PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 bash experiments/vllm/anchor_ours.sh [NAME ...]
#
# NAME picks runs (default: all): bf16 fp8 vllm-4bit ours-k8v4 ours-4bit ours-k3v4 ours-3bit ours-4bit-full
# ours-4bit-flash (ours-k3v4-flash): boundary layers on FlashAttention (TQ_VLLM_DENSE_ATTENTION=flash,
# the default since 2026-11-28, commit 489190c); ours-4bit-triton: on vLLM's Triton kernel (the old default)
# vllm_anchor.py is a copy of ../shared/bench/vllm_anchor.py (the shared folder does not travel to the
# device).  Llama-3.1-8B shape, dummy weights, 32 x 8192 prompt tokens, 256 new tokens, CUDA graphs on;
# CTX / NSEQ / GEN / GMU override the workload.  Each run prints `RESULT {json}`; they are collected
# into results/vllm_anchor_ours.jsonl (and $OUT/).  A device call is capped at 10 minutes, and a first
# start compiles kernels while capturing CUDA graphs (~2 min), so pass a few names per call.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RESULTS=${OUT:-$HERE/../results}
mkdir -p "$RESULTS"
LOG=$RESULTS/vllm_anchor_ours.log
JSONL=$RESULTS/vllm_anchor_ours.jsonl
export PYTHONUNBUFFERED=1

declare -A RUNS=(
  [bf16]="auto FLASH_ATTN"
  [fp8]="fp8"
  [vllm-4bit]="turboquant_4bit_nc"
  [ours-k8v4]="turboquant_k8v4 CUSTOM"
  [ours-4bit]="turboquant_4bit_nc CUSTOM"
  [ours-k3v4]="turboquant_k3v4_nc CUSTOM"
  [ours-3bit]="turboquant_3bit_nc CUSTOM"
  [ours-4bit-full]="turboquant_4bit_nc CUSTOM"
  [ours-4bit-flash]="turboquant_4bit_nc CUSTOM"
  [ours-k3v4-flash]="turboquant_k3v4_nc CUSTOM"
  [ours-4bit-triton]="turboquant_4bit_nc CUSTOM"
)
# runs whose bf16 boundary layers use vLLM's FlashAttention instead of Triton unified_attention
declare -A DENSE=([ours-4bit-flash]=flash [ours-k3v4-flash]=flash [ours-4bit-triton]=triton)
ORDER=(bf16 fp8 vllm-4bit ours-k8v4 ours-4bit ours-k3v4 ours-3bit ours-4bit-full ours-4bit-flash)
NAMES=("$@")
[ ${#NAMES[@]} -eq 0 ] && NAMES=("${ORDER[@]}")

python3 -c 'import tq_vllm, vllm; print("tq-vllm", tq_vllm.__version__, "vllm", vllm.__version__)' | tee -a "$LOG"
for name in "${NAMES[@]}"; do
  args=${RUNS[$name]:?unknown run $name}
  full=0; [[ $name == *-full ]] && full=1
  dense=${DENSE[$name]:-default}
  echo "== $name: vllm_anchor.py $args (TQ_VLLM_FULL_CAPACITY=$full TQ_VLLM_DENSE_ATTENTION=$dense)" | tee -a "$LOG"
  # shellcheck disable=SC2086  # $args is two words on purpose
  dense_env=(); [ "$dense" != default ] && dense_env=(TQ_VLLM_DENSE_ATTENTION="$dense")
  env TQ_VLLM_FULL_CAPACITY=$full "${dense_env[@]}" timeout "${RUN_TIMEOUT:-560}" python3 "$HERE/vllm_anchor.py" $args 2>&1 \
    | tee -a "$LOG" | grep '^RESULT ' | sed "s/^RESULT {/{\"run\": \"$name\", /" >> "$JSONL"
done
grep -c . "$JSONL" | xargs echo "result lines in $JSONL:"
