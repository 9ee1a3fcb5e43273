"""Probe 4: where shifted fp16 attention's time goes at 16384 and 65536 tokens; GPU-only times (a sleep kernel
holds the stream while the CPU queues, as a graph replays) against the float32-score path."""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd())); sys.path.insert(0, str(Path.cwd() / "benchmarks"))
from hypir.attention.backends import shifted_fp16_attention
from hypir.bench.common import gpu_ms, cuda_kernels
from attention_512 import float32_score_attention
out = {}
for n in (16384, 65536):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, 512, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    s = 512 ** -0.5
    row = {}
    for name, fn in (("shifted fp16", lambda: shifted_fp16_attention(q, k, v, s)),
                     ("float32 scores", lambda: float32_score_attention(q, k, v, s))):
        row[name] = {"eager_ms": gpu_ms(fn, groups=7), "gpu_only_ms": gpu_ms(fn, calls=3, groups=7, sleep_cycles=int(2e8)),
                     "kernels": sorted(([k_[:70], round(ms, 4), c] for k_, ms, c in cuda_kernels(fn)), key=lambda r: -r[1])}
        print(n, name, row[name]["eager_ms"], row[name]["gpu_only_ms"], flush=True)
        for r in row[name]["kernels"]:
            print("   ", r, flush=True)
    out[n] = row
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
