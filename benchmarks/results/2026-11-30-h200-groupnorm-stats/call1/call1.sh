#!/usr/bin/env bash
# Call 1 (session of 2026-11-30 evening): the VAE attention as one Triton kernel against matmul; a warm pass's CPU
# time and batches of 1/2/4; GroupNorm's whole-pixel kernels under other settings on a real pass's calls.
set -uo pipefail
O=$OUT/c1; mkdir -p $O
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
timeout 150 python3 benchmarks/attention_512.py --json $O/attention_512.json > $O/attention_512.txt 2>&1
echo "attention done at $SECONDS s"; grep -v "^$" $O/attention_512.txt | cut -c1-200 | tail -40
timeout 130 python3 benchmarks/levers.py --json $O/levers.json --parts cpu,batch > $O/levers.txt 2>&1
echo "levers done at $SECONDS s"; grep -v HYPIR $O/levers.txt | tail -8 | cut -c1-300
timeout 280 python3 benchmarks/groupnorm_sweep.py --json $O/sweep.json > $O/sweep.txt 2>&1
echo "sweep done at $SECONDS s"; grep total_ms $O/sweep.txt | cut -c1-900
tar -czf /tmp/c1.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c1.tar.gz $O/
