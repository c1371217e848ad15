#!/usr/bin/env bash
# The vLLM quickstart, run for real: `vllm serve MODEL --kv-cache-dtype turboquant_4bit_nc
# --attention-backend CUSTOM`, then a completion over HTTP on localhost, then stop the server.
#
#   PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 bash experiments/vllm/serve_check.sh [MODEL_DIR]
#
# MODEL_DIR with a tokenizer (the reference model) gets a text prompt; without one, a Llama config with
# dummy weights is served with --skip-tokenizer-init and a token-id prompt.  Prints the responses and
# writes the server log and responses under ${OUT:-/tmp} (serve_check.log, serve_check_responses.json).
set -uo pipefail
OUTDIR=${OUT:-/tmp}
PORT=${PORT:-8011}
MODEL=${1:-}
LOG=$OUTDIR/serve_check.log
extra=()
if [ -z "$MODEL" ] || [ ! -e "$MODEL/tokenizer.json" ]; then
  MODEL=${MODEL:-/tmp/tq_serve_dummy}
  mkdir -p "$MODEL"
  [ -e "$MODEL/config.json" ] || cat > "$MODEL/config.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
 "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
 "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
 "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}
EOF
  extra=(--load-format dummy --skip-tokenizer-init)
  prompt='[1, 306, 4658, 278, 6593, 310, 2834, 338]'
else
  prompt='"def fibonacci(n):\n    "'
fi
python3 -m vllm.entrypoints.cli.main serve "$MODEL" --served-model-name ref --port "$PORT" \
  --kv-cache-dtype turboquant_4bit_nc --attention-backend CUSTOM --gpu-memory-utilization 0.3 \
  --max-model-len 4096 "${extra[@]}" > "$LOG" 2>&1 &
pid=$!
t0=$(date +%s)
until curl -sf "localhost:$PORT/health" > /dev/null; do
  if ! kill -0 $pid 2> /dev/null || [ $(($(date +%s) - t0)) -gt "${SERVE_TIMEOUT:-240}" ]; then
    echo "server did not come up; last lines of $LOG:"; tail -n 30 "$LOG"; kill $pid 2> /dev/null; exit 1
  fi
  sleep 2
done
echo "server healthy after $(($(date +%s) - t0)) s"
grep -m3 -i "CUSTOM\|turboquant\|tq-vllm\|tq_vllm" "$LOG"
body="{\"model\": \"ref\", \"prompt\": $prompt, \"max_tokens\": 32, \"temperature\": 0}"
resp=$(curl -sf "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$body")
rc=$?
echo "completion (curl exit $rc): $resp"
printf '{"request": %s, "response": %s}\n' "$body" "${resp:-null}" > "$OUTDIR/serve_check_responses.json"
kill $pid; wait $pid 2> /dev/null
[ $rc -eq 0 ] && [ -n "$resp" ]
