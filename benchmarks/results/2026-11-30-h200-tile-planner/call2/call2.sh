#!/usr/bin/env bash
# Call 2: the new tests on the GPU; the first image (main and base, each twice on one Triton cache and, for main,
# one attention-timings folder); each tile size at 4096 in 8 GiB; the speed table.
set -uo pipefail
O=$OUT/c2; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl HYPIR_CACHE_DIR=/tmp/hc
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "timings or per_shape or budget or tile" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR|E  )" $O/gpu_tests.txt | cut -c1-300 | head -20
echo "tests done at $SECONDS s"
rm -rf /tmp/hc
for run in 1 2; do
  timeout 120 python3 benchmarks/first_image.py --json $O/first_main_$run.json > $O/first_main_$run.txt 2>&1
  grep output $O/first_main_$run.txt | cut -c1-330
  (cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 benchmarks/first_image.py --json $O/first_base_$run.json \
    > $O/first_base_$run.txt 2>&1); grep output $O/first_base_$run.txt | cut -c1-330
done
echo "first image done at $SECONDS s"
timeout 150 python3 benchmarks/tile_sizes.py --json $O/tiles.json > $O/tiles.txt 2>&1; grep asked $O/tiles.txt | cut -c1-330
tail -3 $O/tiles.txt | cut -c1-300
echo "tiles done at $SECONDS s"
timeout 200 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 \
  --budget-gb 8 --repeats 10 --json $O/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $O/speed.txt; grep "eager\|stock\|4096" $O/speed.txt | cut -c1-200
echo "speed done at $SECONDS s"
tar -czf /tmp/c2.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c2.tar.gz $O/
