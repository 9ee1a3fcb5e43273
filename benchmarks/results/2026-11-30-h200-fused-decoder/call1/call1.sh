#!/usr/bin/env bash
# Call 1 (main + the merge step + the module profile): the whole GPU suite; where each module's kernels go at
# 1024; the memory the VAE graphs keep; the GroupNorm merge step swept per shape; the pass with and without it.
set -uo pipefail
O=$OUT/c1; mkdir -p $O
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD TRITON_CACHE_DIR=/tmp/tl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $O/gpu.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py tests/test_gpu.py -k "not second_gpu" \
  > $O/gpu_tests.txt 2>&1; tail -3 $O/gpu_tests.txt | cut -c1-200; grep -E "^(FAILED|ERROR)" $O/gpu_tests.txt | cut -c1-200
echo "tests done at $SECONDS s"
timeout 150 python3 benchmarks/levers.py --json $O/modules.json --parts modules,memory > $O/modules.txt 2>&1
grep -v '^\[HYPIR\]' $O/modules.txt | cut -c1-250 | head -30
echo "modules done at $SECONDS s"
timeout 60 python3 - > $O/merge.txt 2>&1 <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
import torch
from hypir import kernels
from levers import SHAPES, gpu_ms
for c, h, w in SHAPES:
    g = torch.Generator(device="cuda").manual_seed(c + h)
    x = (torch.randn(1, c, h, w, device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16).to(memory_format=torch.channels_last)
    wt = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16); b = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16)
    exact = kernels.group_norm_silu_reference(x.double(), wt.double(), b.double(), 32, 1e-6, True)
    row = {"shape": [c, h, w]}
    for tile, warps in ((0, 4), (1024, 4), (2048, 4), (4096, 4), (2048, 8), (4096, 8), (8192, 8)):
        kernels.ROW_MERGE_TILE, kernels.ROW_MERGE_WARPS = tile, warps
        y = kernels.group_norm_silu(x, wt, b, 32, 1e-6, True)
        err = ((y.double() - exact).norm() / exact.norm()).item()
        row[f"{tile}/{warps}"] = [round(gpu_ms(lambda: kernels.group_norm_silu(x, wt, b, 32, 1e-6, True)), 4), f"{err:.2e}"]
    print(json.dumps(row), flush=True)
PY
cat $O/merge.txt | cut -c1-300
echo "merge done at $SECONDS s"
timeout 120 python3 benchmarks/levers.py --json $O/levers.json --parts pass --off merge > $O/levers.txt 2>&1
grep '^{\|GPU busy' $O/levers.txt | cut -c1-260
echo "done at $SECONDS s"
tar -czf /tmp/c1.tar.gz -C $O . && find $O -mindepth 1 -delete && mv /tmp/c1.tar.gz $O/
