#!/usr/bin/env bash
# Call 2: the upsampler variants (kernels and the pass) on this tree; a folder of 200 photos, main against
# speed-pipelined-files (.trees/pipelined), alternating.
set -uo pipefail
O=$OUT/u; mkdir -p $O
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import skimage, pynvml; print('skimage', skimage.__version__)" 2>&1 | tail -1
timeout 220 python3 benchmarks/levers.py --json $O/levers.json --parts upsample,pass --off "+transposed" > $O/levers.txt 2>&1
grep '^{' $O/levers.txt | cut -c1-330
folder() {  # tree workdir name
  (cd $1 && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/folder_run.py --photos 200 --modes stream \
    --workdir $2 ${BASE:+--base /tmp/f1/sd21_sd --weights /tmp/f1/HYPIR_sd21.pth} --json $O/folder_$3.json \
    --logs $2/logs --commit $3 2>&1 | tail -1 | cut -c1-400)
  cp $2/logs/stream.log $O/folder_$3.log 2>/dev/null
}
folder . /tmp/f1 main1
BASE=1 folder .trees/pipelined /tmp/f2 pipelined1
BASE=1 folder . /tmp/f3 main2
BASE=1 folder .trees/pipelined /tmp/f4 pipelined2
python3 - <<'PY' | tee $O/identical.txt
import hashlib, pathlib
d = lambda f: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pathlib.Path(f).glob("*.png")}
a = d("/tmp/f1/out-stream")
for f in ("/tmp/f2/out-stream", "/tmp/f3/out-stream", "/tmp/f4/out-stream"):
    b = d(f); print(f, "identical to main1:", sum(b.get(k) == v for k, v in a.items()), "of", len(a), "files", len(b))
PY
echo "done at $SECONDS s"
