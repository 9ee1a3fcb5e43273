"""A/B: median wall ms of warm default passes (eager+graphs) at 1024 and 2048 output, this tree's code."""
import json, statistics, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir import pipeline
from hypir.bench.common import build_models, random_images
models = build_models("sd21", torch.device("cuda"), torch.bfloat16)
pipe = pipeline.HYPIRPipeline(models)
out = {}
for side in (512, 1024):
    images = random_images(side, torch.device("cuda"))
    for _ in range(4):
        pipe(images, upscale=2)
    times = [pipe(images, upscale=2).seconds * 1000 for _ in range(int(sys.argv[2]))]
    out[side * 2] = {"median_ms": statistics.median(times), "min_ms": min(times)}
print(json.dumps(out))
Path(sys.argv[1]).write_text(json.dumps(out))
