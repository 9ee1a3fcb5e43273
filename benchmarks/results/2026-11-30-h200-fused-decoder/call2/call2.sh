#!/usr/bin/env bash
# Call 2 (main a56e573+: fused decoder resnets, GEGLU, biases, merge, padding): GPU kernel tests and the fused
# paths; the per-module profile again; the pass with each new lever off.
set -uo pipefail
O=$OUT/c2; mkdir -p $O
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl
git log --oneline -1 2>/dev/null
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py \
  -k "not second_gpu and (gated or pad or norm or bias or replay or moved or fused or vae or graph)" > $O/gpu_tests.txt 2>&1
tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR)" $O/gpu_tests.txt | cut -c1-200
echo "tests done at $SECONDS s"
timeout 250 python3 benchmarks/levers.py --json $O/levers.json --parts modules,pass --off decoder_resnets,geglu,merge \
  > $O/levers.txt 2>&1
grep -v '^\[HYPIR\]' $O/levers.txt | grep -v '^\[{' | cut -c1-330 | head -40
echo "done at $SECONDS s"
tar -czf /tmp/c2.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c2.tar.gz $O/
