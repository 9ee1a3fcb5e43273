"""Repeated 4096 outputs (from 1024, tiles of 1024) planned for a 24 GiB card while only 12 GiB are usable
(torch's per-process memory fraction): the planner sends 11 tiles together, they run out, the retry sends them one
at a time. Per call: wall seconds, the tiles sent together, and the warnings. This tree's code."""
import json, logging, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir.pipeline import HYPIRPipeline
from hypir.bench.common import build_models, random_images
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("hypir").addHandler(Keep())
models = build_models("sd21", torch.device("cuda"), torch.bfloat16)
pipe = HYPIRPipeline(models)
images = random_images(1024, torch.device("cuda"))
pipe(random_images(512, torch.device("cuda")), upscale=2)  # kernels compiled, attention timed at 1024
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.empty_cache()
torch.cuda.set_per_process_memory_fraction(12 * 2**30 / total)
out = []
for i in range(5):
    records.clear()
    start = time.perf_counter()
    result = pipe(images, upscale=4, vram_budget_gb=24, cuda_graphs=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"call": i + 1, "s": round(seconds, 3), "tile": result.tile_size, "finite": bool(torch.isfinite(result.images).all()),
           "warnings": [r[:300] for r in records if "out of GPU memory" in r],
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    torch.cuda.reset_peak_memory_stats()
    print(json.dumps(row), flush=True)
    out.append(row)
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
