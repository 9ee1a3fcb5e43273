#!/usr/bin/env bash
# Call 1: the new tests on the GPU; the first image (main cold, main warm, base warm; main warm profiled); each tile
# size at 4096 in 8 GiB.
set -uo pipefail
O=$OUT/c1; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl HYPIR_CACHE_DIR=/tmp/hc
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "timings or per_shape or budget or tile" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR|E  )" $O/gpu_tests.txt | cut -c1-300 | head -20
echo "tests done at $SECONDS s"
rm -rf /tmp/tl /tmp/hc
for run in cold warm; do
  timeout 120 python3 benchmarks/first_image.py --json $O/first_main_$run.json > $O/first_main_$run.txt 2>&1
  grep output $O/first_main_$run.txt | cut -c1-400
done
(cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 60 python3 benchmarks/first_image.py --json $O/first_base_warm.json \
  > $O/first_base_warm.txt 2>&1); grep output $O/first_base_warm.txt | cut -c1-400
timeout 60 python3 benchmarks/first_image.py --profile --json $O/first_main_profile.json > $O/first_main_profile.txt 2>&1
grep output $O/first_main_profile.txt | cut -c1-200
echo "first image done at $SECONDS s"
timeout 150 python3 benchmarks/tile_sizes.py --json $O/tiles.json > $O/tiles.txt 2>&1; grep asked $O/tiles.txt | cut -c1-330
echo "tiles done at $SECONDS s"
tar -czf /tmp/c1.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c1.tar.gz $O/
