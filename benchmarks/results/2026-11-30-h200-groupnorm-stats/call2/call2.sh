#!/usr/bin/env bash
# Call 2: CPU cost of a warm pass's steps; batches (latent mode); GroupNorm settings (GPU time behind a sleep);
# the first image of a new size, base (4fa8b7b) against main, twice each on one Triton cache.
set -uo pipefail
O=$OUT/c2; mkdir -p $O
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD
timeout 120 python3 benchmarks/levers.py --json $O/levers.json --parts cpu,batch > $O/levers.txt 2>&1
echo "levers done at $SECONDS s"; grep -v HYPIR $O/levers.txt | tail -6 | cut -c1-400
for run in 1 2; do for t in base main; do
  dir=.; [ $t = base ] && dir=.levers/base
  (cd $dir && PYTHONPATH=/tmp/site:$PWD timeout 80 python3 benchmarks/first_image.py \
     --json $O/first_${t}_$run.json > $O/first_${t}_$run.txt 2>&1; tail -2 $O/first_${t}_$run.txt | cut -c1-250)
done; done
echo "first done at $SECONDS s"
timeout 300 python3 benchmarks/groupnorm_sweep.py --json $O/sweep.json > $O/sweep.txt 2>&1
echo "sweep done at $SECONDS s"; grep total_ms $O/sweep.txt | cut -c1-1200; tail -3 $O/sweep.txt | cut -c1-300
tar -czf /tmp/c2.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c2.tar.gz $O/
