#!/usr/bin/env bash
# Call 3: the GPU suite on main; the pass of base (4fa8b7b) and main in one call, main with the new GroupNorm
# statistics setting switched off as well; the speed table.
set -uo pipefail
O=$OUT/c3; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR|E  )" $O/gpu_tests.txt | cut -c1-300 | head -20
echo "tests done at $SECONDS s"
(cd .levers/base && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/levers.py --parts pass --off "" \
   --json $O/pass_base.json > $O/pass_base.txt 2>&1); grep -v HYPIR $O/pass_base.txt | grep '"output"' | cut -c1-200
timeout 130 python3 benchmarks/levers.py --parts pass --off stats_tiles --json $O/pass_main.json > $O/pass_main.txt 2>&1
grep -v HYPIR $O/pass_main.txt | grep '"output"' | cut -c1-300
echo "pass done at $SECONDS s"
timeout 250 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 \
  --budget-gb 8 --repeats 10 --json $O/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $O/speed.txt; grep "eager\|stock\|4096" $O/speed.txt | cut -c1-200
echo "speed done at $SECONDS s"
tar -czf /tmp/c3.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c3.tar.gz $O/
