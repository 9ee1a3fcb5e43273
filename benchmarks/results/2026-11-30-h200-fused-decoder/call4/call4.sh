#!/usr/bin/env bash
# Call 4: GPU tests of the new kernels and of the every-size UNet; the pass with and without the statistics
# from the bias add, the every-size UNet and the fused decoder resnets.
set -uo pipefail
O=$OUT/c4; mkdir -p $O
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py \
  -k "not second_gpu and (gated or pad or statistics or norm or bias or every_size or moved or replay or fused)" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR|E  )" $O/gpu_tests.txt | cut -c1-300 | head -20
echo "tests done at $SECONDS s"
timeout 220 python3 benchmarks/levers.py --json $O/levers.json --parts pass --off stats,small,decoder_resnets > $O/levers.txt 2>&1
grep -v '^\[HYPIR\]' $O/levers.txt | grep -v '^\[{' | cut -c1-420 | head -20
echo "done at $SECONDS s"
tar -czf /tmp/c4.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c4.tar.gz $O/
