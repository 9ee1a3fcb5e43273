#!/usr/bin/env bash
# Call 4: the planner's memory table (cards_check.py memory: planned against measured under 8/12/24 GiB budgets,
# with the fastest-tile planner); a folder of 200 photos (main; its path is unchanged this session); the first
# image: A cold Triton cache and no stored timings, B Triton warm and no stored timings, C both warm.
set -uo pipefail
O=$OUT/c4; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl HYPIR_CACHE_DIR=/tmp/hc
timeout 240 python3 benchmarks/cards_check.py memory --json $O/memory.json > $O/memory.txt 2>&1; grep output $O/memory.txt | cut -c1-300
tail -3 $O/memory.txt | cut -c1-300
echo "memory done at $SECONDS s"
timeout 120 python3 benchmarks/folder_run.py --photos 200 --modes stream --workdir /tmp/f2 --json $O/folder_main.json \
  --logs /tmp/f2/logs --commit $(cat .levers/commit 2>/dev/null || echo main) > $O/folder.txt 2>&1; tail -5 $O/folder.txt | cut -c1-300
cp /tmp/f2/logs/stream.log $O/folder_main.log 2>/dev/null
echo "folder done at $SECONDS s"
for run in A:/tmp/tlA:/tmp/hcA B:/tmp/tl:/tmp/hcB C:/tmp/tl:/tmp/hcB; do
  IFS=: read name triton store <<< "$run"
  TRITON_CACHE_DIR=$triton HYPIR_CACHE_DIR=$store timeout 120 python3 benchmarks/first_image.py \
    --json $O/first_$name.json > $O/first_$name.txt 2>&1; grep output $O/first_$name.txt | cut -c1-330
done
echo "first image done at $SECONDS s"
tar -czf /tmp/c4.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c4.tar.gz $O/
