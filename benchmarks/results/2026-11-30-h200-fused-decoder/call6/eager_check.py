"""The pass without CUDA graphs at 1024 (median of 10), every lever on and then each off, in one process."""
import json, statistics, sys
sys.path.insert(0, "benchmarks")
import torch
import levers
from hypir.bench.common import build_models, random_images
from hypir.pipeline import HYPIRPipeline

pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
lq = random_images(512, torch.device("cuda"))
out = {}
for off in (None, "geglu", "decoder_resnets", "merge", "small", "upsample", "fused", None):
    levers.levers(off)
    options = dict(upscale=2.0, latent="mode", cuda_graphs=False, fused_kernels=off != "fused")
    pipe(lq, **options)
    runs = [pipe(lq, **options) for _ in range(10)]
    synced = [pipe(lq, sync_stages=True, **options) for _ in range(3)]
    stages = {k: round(statistics.median(r.stage_seconds[k] * 1000 for r in synced), 2) for k in synced[0].stage_seconds}
    out[str(off)] = {"ms": statistics.median(r.seconds * 1000 for r in runs), "stages": stages}
    print(off, json.dumps(out[str(off)]), flush=True)
levers.levers(None)
json.dump(out, open(sys.argv[1], "w"), indent=1)
