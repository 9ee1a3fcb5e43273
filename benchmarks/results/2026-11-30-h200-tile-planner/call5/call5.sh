#!/usr/bin/env bash
# Call 5: the 4096 rows of the planner's memory table (call 4 ran out of its time limit before them).
set -uo pipefail
O=$OUT/c5; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl HYPIR_CACHE_DIR=/tmp/hc
timeout 140 python3 benchmarks/cards_check.py memory --sizes 4096 --json $O/memory_4096.json > $O/memory_4096.txt 2>&1
grep output $O/memory_4096.txt | cut -c1-300; tail -2 $O/memory_4096.txt | cut -c1-300
echo "memory done at $SECONDS s"
