#!/usr/bin/env bash
# Call 4: main after the finish change: the GPU suite, the speed table, a folder of 200 photos.
set -uo pipefail
O=$OUT/c4; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR|E  )" $O/gpu_tests.txt | cut -c1-300 | head -20
echo "tests done at $SECONDS s"
timeout 250 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 \
  --budget-gb 8 --repeats 10 --json $O/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $O/speed.txt; grep "eager\|stock\|4096\|where" $O/speed.txt | cut -c1-300
echo "speed done at $SECONDS s"
timeout 95 python3 benchmarks/folder_run.py --photos 200 --modes stream --workdir /tmp/f2 --json $O/folder_main.json \
  --logs /tmp/f2/logs --commit main 2>&1 | tail -2 | cut -c1-400
cp /tmp/f2/logs/stream.log $O/folder_main.log 2>/dev/null
echo "folder done at $SECONDS s"
tar -czf /tmp/c4.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c4.tar.gz $O/
