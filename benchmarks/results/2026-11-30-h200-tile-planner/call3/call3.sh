#!/usr/bin/env bash
# Call 3: the whole GPU suite (the timings store, the warm-up, the router's stored path); where the pass's copies
# come from (.levers/copy_probe.py).
set -uo pipefail
O=$OUT/c3; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl HYPIR_CACHE_DIR=/tmp/hc
timeout 90 python3 .levers/copy_probe.py $O/copies.json > $O/copies.txt 2>&1; head -30 $O/copies.txt | cut -c1-600
echo "probe done at $SECONDS s"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR|E  )" $O/gpu_tests.txt | cut -c1-300 | head -20
echo "tests done at $SECONDS s"
tar -czf /tmp/c3.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c3.tar.gz $O/
