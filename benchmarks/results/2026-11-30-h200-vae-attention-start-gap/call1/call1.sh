set -x
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/tcache HYPIR_CACHE_DIR=/tmp/hcache
mkdir -p $OUT/c1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/c1/gpu.txt
python3 - <<'PY' > $OUT/c1/check.txt 2>&1
import torch
from hypir.attention.tiled_softmax import tiled_softmax_attention
torch.manual_seed(0)
for b, n, nk, h, d, dt in [(2, 1000, 1000, 1, 512, torch.bfloat16), (1, 4100, 3000, 1, 512, torch.float16),
                           (1, 777, 4096, 2, 512, torch.bfloat16), (1, 16384, 16384, 1, 512, torch.bfloat16)]:
    q, k, v = (torch.randn(b, x, h, d, device="cuda").mul(3 if i < 2 else 1).to(dt) for i, x in enumerate((n, nk, nk)))
    out = tiled_softmax_attention(q, k, v, d ** -0.5)
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
    ref = (torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, -1) @ vh).transpose(1, 2)
    print(b, n, nk, h, d, dt, ((out.float() - ref).norm() / ref.norm()).item(), flush=True)
PY
timeout 300 python3 benchmarks/attention_512.py --json $OUT/c1/att.json --kernels tiled --tokens 16384,36864,65536 > $OUT/c1/att.txt 2>&1
timeout 120 python3 .levers/launch_gap.py $OUT/c1/gap.json > $OUT/c1/gap.txt 2>&1
ls -la $OUT/c1
