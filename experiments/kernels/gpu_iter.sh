# One short device call for a decode-kernel iteration (run: bash experiments/kernels/gpu_iter.sh):
# the GPU decode tests of the eight-phase loop (4- and 3-bit), then decode rows, the tune sweep and
# the ablation, into $OUT.
set -x
nvidia-smi --query-gpu=name --format=csv
R=$(pwd)
export PYTHONPATH=$R/packages/tq-core/src:$R/packages/tq-kernels/src
(cd packages/tq-kernels && timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode.py -k "nibble or 4bit_nc or 3bit_nc or k3v4_nc" -n 8 > $OUT/gpu_tests.log 2>&1; tail -15 $OUT/gpu_tests.log)
timeout 360 python3 experiments/kernels/bench_kernels.py --only decode,tune,ablate > $OUT/bench.log 2>&1
grep -v "^{" $OUT/bench.log | tail -90
