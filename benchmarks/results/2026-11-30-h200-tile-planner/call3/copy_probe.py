"""Where the pass's strided copies come from: one eager 1024 pass (random SD2.1 weights, bf16) under the
profiler with Python stacks; every aten op that launched a copy kernel, grouped by the innermost frames in
hypir/diffusers, with its GPU time and shapes."""
import collections, json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir.bench.common import build_models, random_images
from hypir.pipeline import HYPIRPipeline

pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
lq = random_images(512, torch.device("cuda"))
for _ in range(3):
    pipe(lq, upscale=2.0)
torch.cuda.synchronize()
acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
with torch.profiler.profile(activities=acts, record_shapes=True, with_stack=True) as prof:
    pipe(lq, upscale=2.0, cuda_graphs=False)
    torch.cuda.synchronize()
groups = collections.defaultdict(lambda: [0.0, 0, set(), set()])
for evt in prof.events():
    if evt.device_type != torch.autograd.DeviceType.CPU or not evt.kernels:
        continue
    names = [k.name for k in evt.kernels]
    if not any("copy" in n or "Copy" in n for n in names):
        continue
    if evt.name not in ("aten::copy_",):
        continue
    frames = [f for f in (evt.stack or []) if ("hypir" in f or "diffusers" in f or "torch/nn" in f)][:4]
    parents, p = [], evt.cpu_parent
    while p is not None and len(parents) < 4:
        parents.append(p.name)
        p = p.cpu_parent
    key = (evt.name + " <- " + " <- ".join(parents), " <- ".join(frames))
    g = groups[key]
    g[0] += sum(k.duration for k in evt.kernels) / 1000.0
    g[1] += 1
    g[2].add(str(evt.input_shapes)[:120])
    g[3].update(n[:90] for n in names)
rows = sorted(({"op": k[0], "stack": k[1], "gpu_ms": v[0], "calls": v[1], "shapes": sorted(v[2])[:4],
                "kernels": sorted(v[3])} for k, v in groups.items()), key=lambda r: -r["gpu_ms"])
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
for r in rows[:25]:
    print(round(r["gpu_ms"], 3), r["calls"], r["stack"][:300], r["shapes"][:2], r["kernels"][:2])
