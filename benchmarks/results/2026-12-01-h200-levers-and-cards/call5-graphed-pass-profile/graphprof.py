"""Kernels of a warm graphed 1024 pass (CUDA graph replays included), and CPU time of the pre-encoder calls."""
import functools, json, statistics, sys, time
from collections import defaultdict
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir import pipeline, cuda_graphs, tiling
from hypir.bench.common import build_models, random_images, cuda_kernels, summarize_kernels
models = build_models("sd21", torch.device("cuda"), torch.bfloat16)
pipe = pipeline.HYPIRPipeline(models)
images = random_images(512, torch.device("cuda"))
for _ in range(5):
    pipe(images, upscale=2)
torch.cuda.synchronize()
kern = cuda_kernels(lambda: pipe(images, upscale=2))
summ = summarize_kernels(kern)
print(json.dumps({k: (round(v["ms"], 3), v["calls"]) for k, v in summ["kinds"].items()}), round(summ["gpu_ms"], 2))
for n, ms, c in sorted(kern, key=lambda k: -k[1])[:60]:
    print(f"{ms:8.3f} {c:4d} {n[:150]}")
Path(sys.argv[1], "graph_kernels.json").write_text(json.dumps(sorted(kern, key=lambda k: -k[1]), indent=0))
# CPU time per wrapped call (us), over 30 warm passes
acc = defaultdict(list)
def wrap(mod, name):
    fn = getattr(mod, name)
    @functools.wraps(fn)
    def inner(*a, **k):
        t = time.perf_counter_ns()
        try:
            return fn(*a, **k)
        finally:
            acc[f"{mod.__name__}.{name}"].append((time.perf_counter_ns() - t) / 1000)
    setattr(mod, name, inner)
for name in ("_vae_graph", "plan_for", "_input_check", "resize_to_output", "vae_stage", "_unet_call", "_graphed",
             "_graph_key", "weights_signature", "run_tiled", "_one_pass", "restore", "as_rgb", "_latent", "require_finite"):
    if hasattr(pipeline, name):
        wrap(pipeline, name)
from hypir import runtime as rt
for name in ("weights_signature",):
    wrap(cuda_graphs, name)
orig_call = cuda_graphs.GraphedCalls.__call__
def gc_call(self, *a, **k):
    t = time.perf_counter_ns()
    try:
        return orig_call(self, *a, **k)
    finally:
        acc["GraphedCalls.__call__"].append((time.perf_counter_ns() - t) / 1000)
cuda_graphs.GraphedCalls.__call__ = gc_call
walls = []
for _ in range(30):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    pipe(images, upscale=2)
    torch.cuda.synchronize(); walls.append((time.perf_counter() - t0) * 1000)
print("wall ms median", round(statistics.median(walls), 3))
rows = {k: (round(statistics.median(v), 1), len(v) // 30) for k, v in acc.items()}
for k, v in sorted(rows.items(), key=lambda kv: -kv[1][0]):
    print(f"{v[0]:9.1f} us x{v[1]} {k}")
Path(sys.argv[1], "cpu_calls.json").write_text(json.dumps(rows, indent=1))
