"""GPU time by kernel kind of the warm default pass at a 2048 output (from 1024), and the longest kernels."""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir.pipeline import HYPIRPipeline
from hypir.bench.common import build_models, random_images
from hypir.bench.speed import SPEED_MODES, time_by_kind
models = build_models("sd21", torch.device("cuda"), torch.bfloat16)
pipe = HYPIRPipeline(models)
images = random_images(1024, torch.device("cuda"))
for _ in range(3):
    pipe(images, upscale=2)
prof = time_by_kind(pipe, images, SPEED_MODES["eager+graphs"])
print(json.dumps({k: round(v["ms"], 2) for k, v in prof["kinds"].items()}), prof.get("gpu_ms"))
for r in prof["longest"][:25]:
    print(round(r["ms"], 2), r["calls"], r["kernel"][:110])
Path(sys.argv[1]).write_text(json.dumps(prof, indent=1))
