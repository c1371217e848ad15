# One short device call for a decode-kernel iteration (run: bash experiments/kernels/gpu_iter.sh; carry
# experiments/kernels/.whl-bench): the GPU decode tests of the eight-phase loop (4- and 3-bit), then the
# decode benchmarks and the decode tune sweep, and the ablation of the plane loop, into $OUT.
set -x
nvidia-smi --query-gpu=name --format=csv
R=$(pwd)
export PYTHONPATH=$R/packages/tq-core/src:$R/packages/tq-kernels/src:/tmp/benchsite
(cd packages/tq-kernels && timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode.py -k "nibble or 4bit_nc or 3bit_nc or k3v4_nc" -n 8 > $OUT/gpu_tests.log 2>&1; tail -15 $OUT/gpu_tests.log)
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/benchsite experiments/kernels/.whl-bench/*.whl
timeout -s INT -k 30 300 python3 -m pytest packages/tq-kernels/benchmarks --benchmark-only -q -rs -p no:cacheprovider \
  -k "test_decode or test_tune_decode" --benchmark-json=$OUT/kernels_bench.json > $OUT/bench.log 2>&1
python3 experiments/kernels/bench_report.py $OUT/kernels_bench.json >> $OUT/bench.log 2>&1
timeout 60 python3 packages/tq-kernels/benchmarks/ablate_decode.py --results $OUT >> $OUT/bench.log 2>&1
tail -90 $OUT/bench.log
