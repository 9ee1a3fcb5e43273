#!/usr/bin/env bash
# Call 3: the every-size lever's GPU test and its pass with and without it.
set -uo pipefail
O=$OUT/c3; mkdir -p $O
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "every_size or replay or second_gpu_runs" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR|E  )" $O/gpu_tests.txt | cut -c1-300 | head -20
echo "tests done at $SECONDS s"
timeout 200 python3 benchmarks/levers.py --json $O/levers.json --parts pass --off small > $O/levers.txt 2>&1
grep -v '^\[HYPIR\]' $O/levers.txt | grep -v '^\[{' | cut -c1-330 | head -20
echo "done at $SECONDS s"
tar -czf /tmp/c3.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c3.tar.gz $O/
