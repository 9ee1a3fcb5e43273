#!/usr/bin/env bash
# Call 6: a folder of 200 photos, main before this session (.levers/base, 20edfc4) against this tree; the first
# image of a new size, twice on one Triton cache (the second: warm).
set -uo pipefail
O=$OUT/c6; mkdir -p $O
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export TRITON_CACHE_DIR=/tmp/tl
for t in base .; do
  (cd ${t/base/.levers/base} && PYTHONPATH=/tmp/site:$PWD timeout 80 python3 $OLDPWD/.levers/eager_check.py $O/eager_${t/./main}.json \
     2>&1 | grep -v HYPIR | cut -c1-300)
done
echo "eager done at $SECONDS s"
folder() {  # tree workdir name
  (cd $1 && PYTHONPATH=/tmp/site:$PWD timeout 80 python3 benchmarks/folder_run.py --photos 200 --modes stream \
    --workdir $2 ${BASE:+--base /tmp/f1/sd21_sd --weights /tmp/f1/HYPIR_sd21.pth} --json $O/folder_$3.json \
    --logs $2/logs --commit $3 2>&1 | tail -1 | cut -c1-300)
  cp $2/logs/stream.log $O/folder_$3.log 2>/dev/null
}
folder .levers/base /tmp/f1 base
BASE=1 folder . /tmp/f2 main
python3 - <<'PY' | tee $O/identical.txt
import math, pathlib
import numpy as np
from PIL import Image
a = {p.name: p for p in pathlib.Path("/tmp/f1/out-stream").glob("*.png")}
b = {p.name: p for p in pathlib.Path("/tmp/f2/out-stream").glob("*.png")}
psnrs = []
for name in sorted(a.keys() & b.keys()):
    x, y = (np.asarray(Image.open(f[name]).convert("RGB"), dtype=np.float64) / 255 for f in (a, b))
    mse = float(((x - y) ** 2).mean()) if x.shape == y.shape else float("nan")
    psnrs.append(float("inf") if mse == 0 else 10 * math.log10(1 / mse))
finite = [v for v in psnrs if math.isfinite(v)]
print(f"files: base {len(a)}, main {len(b)}, both {len(psnrs)}; identical {sum(v == float('inf') for v in psnrs)}; "
      f"PSNR main vs base min {min(finite, default=float('nan')):.2f} mean {sum(finite) / max(1, len(finite)):.2f} dB")
PY
echo "folders done at $SECONDS s"
export PYTHONPATH=/tmp/site:$PWD
for n in first second; do
  timeout 100 python3 benchmarks/first_image.py --json $O/first_$n.json > $O/first_$n.txt 2>&1; tail -2 $O/first_$n.txt | cut -c1-250
done
echo "done at $SECONDS s"
tar -czf /tmp/c6.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c6.tar.gz $O/
