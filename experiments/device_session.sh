#!/usr/bin/env bash
# A 2-GPU device machine (nvidia-h200-x2), driven as a few back-to-back `run` calls:
# GPU 0 runs what is timed (the anchor workload against vLLM's own options, one engine at a time, then
# the kernel and transformers benchmarks), GPU 1 runs a background queue (reference-model training, the
# consistency check, the server check, the quality harness) whose logs are collected by later calls.  Each call's command is short:
#
#   bash experiments/device_session.sh piece part0.00   # carry .device-bundle/pieces/part0.00.d; the first
#   ...                                                 #   call starts the GPU-1 queue (NO_QUEUE=1: not)
#   bash experiments/device_session.sh piece part3.01   # (pieces: experiments/device_bundle_split.sh)
#   bash experiments/device_session.sh install       # carry .device-bundle/part3.d/install-vllm-bundle.py,
#                                                    #   .device-bundle/part3.d/SHA256, experiments/vllm/.whl-tq
#   bash experiments/device_session.sh anchor bf16 fp8 ...   # GPU 0, names of anchor_ours.sh
#   bash experiments/device_session.sh kernels       # GPU 0: kernel benchmarks (carry experiments/kernels/.whl-bench)
#   bash experiments/device_session.sh hf            # GPU 0: tq-hf's benchmark
#   bash experiments/device_session.sh model         # the trained reference model's files
#   bash experiments/device_session.sh profile "turboquant_4bit_nc CUSTOM"   # GPU 0: per-kernel decode time
#   bash experiments/device_session.sh tp2           # both GPUs, after the queue is done
#   (FOUR_GPU=1 on every call of an nvidia-h200-x4 machine: GPU 0 timed vLLM runs, GPU 1 and 2 two
#    queues, GPU 2 kernel tests, GPU 3 kernel benchmarks, TP2 on GPUs 2 and 3)
#   bash experiments/device_session.sh collect       # pack the queue's logs into $OUT
#
# The queue (experiments/gpu1_queue.sh) waits for the vLLM install before its vLLM steps.  Everything
# lands in /tmp/res; `collect` (and every `anchor` call) copies it back as one tarball plus the JSONs.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RES=/tmp/res
mkdir -p "$RES" /tmp/b
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0

pack() {  # at most 8 files come back: one tarball of logs + the small result files
  [ -n "${OUT:-}" ] || return 0
  tar -C "$RES" -czf "$OUT/res.tgz" . 2>/dev/null
  ls -la "$RES"
}

# The kernel benchmarks (packages/tq-kernels/benchmarks, pytest-benchmark) on one GPU:
# pytest-benchmark and py-cpuinfo come from experiments/kernels/.whl-bench (carry it: no registry here);
# the JSON lands in $RES/kernels_bench.json and experiments/kernels/bench_report.py turns it into
# kernels_<gpu>_<date>.json and _decode.png in $RES.  SIGINT at the timeout, so pytest still writes the
# JSON of the cases that ran.  KERNELS_SELECT: a pytest -m expression ("not tune" leaves out the config
# sweeps); KERNELS_K: a -k expression.
kernel_bench() {  # GPU TIMEOUT_S
  local src=$ROOT/packages/tq-core/src:$ROOT/packages/tq-kernels/src:/tmp/benchsite
  if ! python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/benchsite \
      "$ROOT"/experiments/kernels/.whl-bench/*.whl > $RES/kernels_bench_install.log 2>&1; then
    echo "pytest-benchmark not installed: carry experiments/kernels/.whl-bench" | tee $RES/kernels_bench.log
    return 1
  fi
  (cd "$ROOT" && CUDA_VISIBLE_DEVICES=$1 PYTHONPATH=$src timeout -s INT -k 30 "$2" python3 -m pytest \
    packages/tq-kernels/benchmarks --benchmark-only --benchmark-json=$RES/kernels_bench.json -p no:cacheprovider \
    -q -rs ${KERNELS_SELECT:+-m "$KERNELS_SELECT"} ${KERNELS_K:+-k "$KERNELS_K"}) > $RES/kernels_bench.log 2>&1
  echo "EXIT $?" >> $RES/kernels_bench.log
  (cd "$ROOT" && PYTHONPATH=$src OUT=$RES python3 experiments/kernels/bench_report.py $RES/kernels_bench.json) \
    >> $RES/kernels_bench.log 2>&1
}

start_queue() {  # once per machine, on its first call
  [ -e $RES/queue.started ] && return 0
  touch $RES/queue.started
  src=$ROOT/packages/tq-core/src:$ROOT/packages/tq-kernels/src
  if [ -n "${FOUR_GPU:-}" ]; then
    # nvidia-h200-x4: GPU 0 timed vLLM runs; GPU 1 queue A (training, quality through vLLM, server,
    # quickstarts); GPU 2 the kernels' GPU test matrix, then queue B (consistency, quality through
    # transformers); GPU 3 the kernel benchmarks.  TP2 runs on GPUs 2 and 3 once both queues are done.
    # The queues and the tests run niced, with 8 test workers: on 2026-11-28 the tests' compiles, the
    # training and the benchmarks drove the host to a load of 175 and slowed the first anchor runs.
    (QUEUE_GPU=1 QUEUE_NAME=a SKIP="consistency quality-hf ${SKIP:-}" setsid nohup nice -n 5 \
      bash "$ROOT/experiments/gpu1_queue.sh" > $RES/queue.log 2>&1 &)
    # GPU_TESTS=0 skips the kernel test matrix (when it already passed on the same kernels)
    (CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$src setsid nohup nice -n 10 bash -c "cd $ROOT && \
      [ '${GPU_TESTS:-1}' = 0 ] || { timeout 480 python3 -m pytest packages/tq-kernels/tests -m gpu -q -n 8 \
      -p no:cacheprovider --durations=5 > $RES/kernels_gpu_tests.log 2>&1; echo EXIT \$? >> $RES/kernels_gpu_tests.log; }; \
      QUEUE_GPU=2 QUEUE_NAME=b SKIP='train quality-vllm serve quickstarts ${SKIP:-}' \
      bash $ROOT/experiments/gpu1_queue.sh > $RES/queue_b.log 2>&1" > /dev/null 2>&1 &)
    (export -f kernel_bench; export ROOT RES; setsid nohup bash -c "kernel_bench 3 540; touch $RES/kernels_bench.done" \
      > /dev/null 2>&1 &)
    echo "GPU 1 queue a, GPU 2 kernel tests then queue b, GPU 3 kernel benchmarks started"
    return 0
  fi
  if [ -z "${NO_QUEUE:-}" ]; then
    (setsid nohup bash "$ROOT/experiments/gpu1_queue.sh" > $RES/queue.log 2>&1 &)
    echo "GPU-1 queue started"
  fi
  # GPU_TESTS_BG=1: GPU 0 runs the kernels' GPU test matrix while the vLLM bundle is still arriving
  # (the `throughput` phase waits for it to finish before timing anything)
  if [ -n "${GPU_TESTS_BG:-}" ]; then
    (CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$src setsid nohup bash -c "cd $ROOT && timeout 480 python3 -m pytest \
      packages/tq-kernels/tests -m gpu -q -n 8 -p no:cacheprovider --durations=5 > $RES/kernels_gpu_tests.log 2>&1; \
      echo EXIT \$? >> $RES/kernels_gpu_tests.log" > /dev/null 2>&1 &)
    echo "GPU-0 kernel test matrix started"
  fi
  # KERNELS_BG=1: GPU 0 runs the kernel benchmarks while the vLLM bundle is still arriving
  if [ -n "${KERNELS_BG:-}" ]; then
    (export -f kernel_bench; export ROOT RES; setsid nohup bash -c "kernel_bench 0 420; touch $RES/kernels_bench.done" \
      > /dev/null 2>&1 &)
    echo "GPU-0 kernel benchmarks started"
  fi
}

case "${1:?phase}" in
  part)  # a whole bundle part (when the working tree is small enough to travel beside 50 MiB)
    cp "$ROOT/.device-bundle/part$2.d/part$2" /tmp/b/ && ls /tmp/b
    start_queue
    nvidia-smi --query-gpu=index,name,memory.used --format=csv
    ;;
  piece)  # a piece of a part (experiments/device_bundle_split.sh), e.g. part0.00
    mkdir -p /tmp/b/pieces && cp "$ROOT/.device-bundle/pieces/$2.d/$2" /tmp/b/pieces/ && ls /tmp/b/pieces
    start_queue
    ;;
  install)  # carry .device-bundle/part3.d/install-vllm-bundle.py, .device-bundle/part3.d/SHA256 and the
    # wheels (plus .device-bundle/part3.d/part3 itself when the parts travel whole)
    [ -e "$ROOT/.device-bundle/part3.d/part3" ] && cp "$ROOT/.device-bundle/part3.d/part3" /tmp/b/
    if compgen -G "/tmp/b/pieces/part?.??" > /dev/null; then
      for k in 0 1 2 3; do cat /tmp/b/pieces/part$k.?? > /tmp/b/part$k; done
    fi
    python3 "$ROOT/.device-bundle/part3.d/install-vllm-bundle.py" > $RES/install.log 2>&1
    tail -2 $RES/install.log
    python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site "$ROOT"/experiments/vllm/.whl-tq/*.whl
    PYTHONPATH=/tmp/site python3 -c 'import vllm, tq_vllm; print("vllm", vllm.__version__, "tq_vllm", tq_vllm.__version__)' \
      && touch $RES/vllm.installed
    tail -5 $RES/queue.log
    ;;
  anchor)
    shift
    export PYTHONPATH=/tmp/site CUDA_VISIBLE_DEVICES=0 OUT_SAVE=${OUT:-}
    OUT=$RES RUN_TIMEOUT=${RUN_TIMEOUT:-240} bash "$ROOT/experiments/vllm/anchor_ours.sh" "$@" > /dev/null
    grep -h '^RESULT\|Error\|error' $RES/vllm_anchor_ours.log | tail -n 20
    tail -3 $RES/queue.log
    OUT=$OUT_SAVE pack
    ;;
  kernels)  # GPU 0: the kernel benchmarks (kernel_bench above; carry experiments/kernels/.whl-bench),
    # then their summary; KERNELS_TIMEOUT (default 420 s) bounds pytest
    kernel_bench 0 "${KERNELS_TIMEOUT:-420}"
    grep -v "^{" $RES/kernels_bench.log | tail -n 60
    cp $RES/kernels_bench.json $RES/kernels_*_20??-??-??*.json $RES/kernels_*_20??-??-??*.png "${OUT:-/tmp}"/ 2>/dev/null
    tail -3 $RES/queue.log 2>/dev/null
    pack
    ;;
  hf)  # GPU 0: tq-hf against DynamicCache + SDPA
    export CUDA_VISIBLE_DEVICES=0
    src=$ROOT/packages/tq-core/src:$ROOT/packages/tq-kernels/src:$ROOT/packages/tq-hf/src
    PYTHONPATH=$src OUT=$RES timeout "${HF_TIMEOUT:-300}" python3 "$ROOT/experiments/hf/bench_hf.py" > $RES/hf_bench.log 2>&1
    tail -n 14 $RES/hf_bench.log
    tail -3 $RES/queue.log
    pack
    ;;
  model)  # the reference model's exported files (each < 16 MiB), once the queue has trained it
    ls -la /tmp/refmodel_export && cp /tmp/refmodel_export/* "$OUT"/
    tail -5 $RES/queue.log
    ;;
  anchor_bg)  # anchor runs on another GPU in the background: anchor_bg GPU NAME ...; results in
    # $RES/gpuGPU/ (picked up by every later `pack`).  CHECK_FIRST=1 runs prefix_flash_check.py there first.
    gpu=$2; shift 2
    mkdir -p $RES/gpu$gpu
    (export PYTHONPATH=/tmp/site CUDA_VISIBLE_DEVICES=$gpu OUT=$RES/gpu$gpu RUN_TIMEOUT=${RUN_TIMEOUT:-240}
     if [ -n "${CHECK_FIRST:-}" ]; then
       timeout 240 python3 "$ROOT/experiments/vllm/prefix_flash_check.py" > $RES/prefix_flash_check.log 2>&1
     fi
     setsid nohup bash "$ROOT/experiments/vllm/anchor_ours.sh" "$@" > /dev/null 2>&1; touch $RES/gpu$gpu/done) \
      > /dev/null 2>&1 &
    echo "GPU $gpu: anchor $* started"
    ;;
  wait_bg)  # waits up to ${2:-300} s for the background anchors, then packs
    t0=$(date +%s)
    for d in $RES/gpu*/; do
      while [ ! -e "$d/done" ] && [ $(($(date +%s) - t0)) -lt "${2:-300}" ]; do sleep 5; done
    done
    grep -h '^RESULT' $RES/gpu*/vllm_anchor_ours.log 2>/dev/null | cut -c1-400
    grep -h '^RESULT' $RES/prefix_flash_check.log 2>/dev/null
    pack
    ;;
  profile)  # GPU 0: per-kernel GPU time of decode steps (experiments/vllm/profile_decode.py), per "KV BACKEND"
    shift
    export PYTHONPATH=/tmp/site CUDA_VISIBLE_DEVICES=0
    for args in "$@"; do
      echo "== profile $args" | tee -a $RES/profile_decode.log
      # shellcheck disable=SC2086
      timeout "${PROFILE_TIMEOUT:-240}" python3 "$ROOT/experiments/vllm/profile_decode.py" $args >> $RES/profile_decode.log 2>&1
      grep -A 25 "^RESULT" $RES/profile_decode.log | tail -n 26 | cut -c1-140; grep "^TIMELINE" $RES/profile_decode.log | tail -n 1
    done
    tail -3 $RES/queue.log
    pack
    ;;
  tp2)  # both GPUs of an x2 machine after its queue; GPUs 2 and 3 of an x4 machine (FOUR_GPU=1);
    # TP2_BG=1 returns at once and leaves it running (its log is packed by later calls)
    export PYTHONPATH=/tmp/site
    if [ -n "${TP2_BG:-}" ]; then
      (TP2_BG='' setsid nohup bash "$0" tp2 > $RES/tp2_driver.log 2>&1 &)
      echo "TP2 started in the background"; exit 0
    fi
    if [ -n "${FOUR_GPU:-}" ]; then
      export CUDA_VISIBLE_DEVICES=2,3
      while [ ! -e $RES/queueb.done ] || pgrep -f "[p]ytest packages/tq-kernels/benchmarks" > /dev/null; do sleep 5; done
    else
      while [ ! -e $RES/queue.done ]; do sleep 5; done
    fi
    for args in "auto FLASH_ATTN" "turboquant_4bit_nc CUSTOM"; do
      echo "== TP2 $args" | tee -a $RES/vllm_anchor_tp2.log
      # shellcheck disable=SC2086
      TP=2 timeout 280 python3 "$ROOT/experiments/vllm/anchor_tp.py" $args 2>&1 | tee -a $RES/vllm_anchor_tp2.log \
        | grep '^RESULT '
    done
    pack
    ;;
  throughput)  # GPU 0, in the background: experiments/vllm/throughput.py ARGS... (rows one after another;
    # each later call, `wait_tp S`, keeps the machine while they run and packs what is done)
    shift
    rm -f $RES/throughput.done
    (export PYTHONPATH=/tmp/site CUDA_VISIBLE_DEVICES=0 OUT=$RES
     while pgrep -f "[p]ytest packages/tq-kernels" > /dev/null; do sleep 2; done  # nothing else on GPU 0
     setsid nohup python3 "$ROOT/experiments/vllm/throughput.py" "$@" > $RES/throughput_driver.log 2>&1
     touch $RES/throughput.done) > /dev/null 2>&1 &
    echo "throughput $* started"
    ;;
  wait_tp)  # waits up to ${2:-540} s for the background throughput rows, then packs
    t0=$(date +%s)
    while [ ! -e $RES/throughput.done ] && [ $(($(date +%s) - t0)) -lt "${2:-540}" ]; do sleep 5; done
    cat $RES/throughput_driver.log; [ -e $RES/throughput.done ] && echo "ALL ROWS DONE"
    pack
    ;;
  collect)  # waits up to ${2:-0} s for the queue(s) to finish
    t0=$(date +%s)
    done_files=$RES/queue.done; [ -n "${FOUR_GPU:-}" ] && done_files="$RES/queuea.done $RES/queueb.done"
    for f in $done_files; do
      while [ ! -e "$f" ] && [ $(($(date +%s) - t0)) -lt "${2:-0}" ]; do sleep 5; done
    done
    tail -12 $RES/queue.log; [ -e $RES/queue_b.log ] && tail -8 $RES/queue_b.log
    pack
    ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
