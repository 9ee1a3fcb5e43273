"""CPU timeline of a warm default 1024 pass (no profiler): when each step starts, relative to restore()'s entry,
median of 30 passes; plus the pass's wall time with and without the instrumentation."""
import json, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir import pipeline, cuda_graphs
from hypir.bench.common import build_models, random_images

import os
device = torch.device(os.environ.get("DEV", "cuda"))
models = build_models(os.environ.get("SIZE", "sd21"), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
pipe = pipeline.HYPIRPipeline(models)
images = random_images(int(os.environ.get("SIDE", "512")), device)
for _ in range(5):
    pipe(images, upscale=2)
torch.cuda.synchronize() if device.type == "cuda" else None
plain = []
for _ in range(30):
    plain.append(pipe(images, upscale=2).seconds * 1000)
events = []
def mark(label):
    events.append((label, time.perf_counter_ns()))
def wrap(owner, name, label):
    fn = getattr(owner, name)
    def wrapped(*a, **k):
        mark(label + " in")
        try:
            return fn(*a, **k)
        finally:
            mark(label + " out")
    setattr(owner, name, wrapped)
wrap(pipeline, "restore", "restore")
wrap(pipeline, "plan_for", "plan_for")
wrap(pipeline, "_one_pass", "_one_pass")
wrap(pipeline, "resize_to_output", "resize")
wrap(pipeline, "_vae_graph", "_vae_graph")
wrap(pipeline, "vae_stage", "vae_stage")
wrap(pipeline, "_unet_call", "_unet_call")
wrap(pipeline, "require_finite", "require_finite")
wrap(pipeline.FiniteChecks, "add", "checks.add")
wrap(cuda_graphs.GraphedCalls, "__call__", "graph")
wrap(cuda_graphs, "weights_signature", "signature")
wrap(pipeline, "weights_signature", "signature")
wrap(torch.cuda.CUDAGraph, "replay", "replay") if device.type == "cuda" else None
runs, timed = [], []
for _ in range(30):
    events.clear()
    r = pipe(images, upscale=2)
    timed.append(r.seconds * 1000)
    t0 = events[0][1]
    runs.append([(label, (t - t0) / 1e6) for label, t in events])
labels = [l for l, _ in runs[0]]
same = all([l for l, _ in r] == labels for r in runs)
median = [(l, round(statistics.median(r[i][1] for r in runs), 4)) for i, l in enumerate(labels)] if same else None
out = {"plain_ms": statistics.median(plain), "instrumented_ms": statistics.median(timed), "same_sequence": same,
       "timeline_ms": median or runs[-1]}
print(json.dumps(out, indent=1))
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
