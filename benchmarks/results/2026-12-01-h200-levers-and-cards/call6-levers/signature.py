"""CPU us of weights_signature (this tree's) against the loop it replaced, on the SD2.1 VAE and UNet on the GPU."""
import statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir import cuda_graphs
from hypir.bench.common import build_models
m = build_models("sd21", torch.device("cuda"), torch.bfloat16)
def loop(module):
    signature = []
    for slots in cuda_graphs._tensor_slots(module):
        for t in slots.values():
            if t is not None:
                signature.append(t.data_ptr()); signature.append(cuda_graphs.tensor_version(t))
    return tuple(signature)
for name, mod in (("vae", m.vae), ("unet", m.unet)):
    for f in (loop, cuda_graphs.weights_signature):
        f(mod)
        ts = []
        for _ in range(50):
            t = time.perf_counter(); f(mod); ts.append((time.perf_counter() - t) * 1e6)
        print(name, f.__name__, round(statistics.median(ts), 1), "us")
