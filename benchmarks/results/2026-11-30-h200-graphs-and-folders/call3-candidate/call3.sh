#!/usr/bin/env bash
# Call 3, from the candidate tree (main + VAE graphs + 8 writers): GPU tests; the speed table; the VAE-graph
# lever in one process; a folder, main (.levers/base) against the candidate; first image, the per-candidate
# timing (.levers/old-timing) against the joint one. One archive comes back.
set -uo pipefail
O=$OUT/c3; mkdir -p $O
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt
git_commit=$(cat COMMIT 2>/dev/null); echo "tree $git_commit"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py \
  -k "graph_replay or moved or reads_from or per_shape or kernel_timing or queued" > $O/tests.txt 2>&1; tail -1 $O/tests.txt
echo "tests done at $SECONDS s"
timeout 250 python3 -m hypir bench --speed --sizes 1024,2048 --modes eager,eager+graphs --budget-size 4096 \
  --budget-gb 8 --repeats 10 --json $O/speed.json 2>&1 | grep -v "^\[HYPIR\]" > $O/speed.txt; grep "eager+graphs\|stock" $O/speed.txt | cut -c1-150
echo "speed done at $SECONDS s"
timeout 110 python3 benchmarks/levers.py --json $O/levers.json --parts pass --off vae_graphs > $O/levers.txt 2>&1
grep '^{\|GPU busy' $O/levers.txt | cut -c1-260
echo "levers done at $SECONDS s"
folder() {  # tree workdir name
  (cd $1 && PYTHONPATH=/tmp/site:$PWD timeout 75 python3 benchmarks/folder_run.py --photos 200 --modes stream \
    --workdir $2 ${BASE:+--base /tmp/f1/sd21_sd --weights /tmp/f1/HYPIR_sd21.pth} --json $O/folder_$3.json \
    --logs $2/logs --commit $3 2>&1 | tail -1 | cut -c1-300)
  cp $2/logs/stream.log $O/folder_$3.log 2>/dev/null
}
folder .levers/base /tmp/f1 main
BASE=1 folder . /tmp/f2 candidate
python3 - <<'PY' | tee $O/identical.txt
import hashlib, pathlib
d = lambda f: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(f).glob("*.png")}
a, b = d("/tmp/f1/out-stream"), d("/tmp/f2/out-stream")
print("candidate identical to main:", sum(b.get(k) == v for k, v in a.items()), "of", len(a), "files", len(b))
PY
echo "folders done at $SECONDS s"
for t in old-timing .; do
  n=$([ $t = . ] && echo joint || echo old)
  (cd ${t/old-timing/.levers/old-timing} && PYTHONPATH=/tmp/site:$PWD timeout $(( 590 - SECONDS > 5 ? (590 - SECONDS) / 2 : 1 )) \
    python3 benchmarks/first_image.py --json $O/first_$n.json > $O/first_$n.txt 2>&1); tail -2 $O/first_$n.txt | cut -c1-250
done
echo "done at $SECONDS s"
tar -czf /tmp/c3.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c3.tar.gz $O/
