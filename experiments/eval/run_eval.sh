#!/usr/bin/env bash
# Reproduces experiments/results/turboquant_eval.{json,png,log} and format_sweep.json on a CPU.
set -euo pipefail
cd "$(dirname "$0")/../results"
turboquant eval --plot turboquant_eval.png --no-progress | tee turboquant_eval.log
turboquant eval --json --no-plot --no-progress > turboquant_eval.json
turboquant eval --json --sweep --no-plot --no-progress > format_sweep.json
