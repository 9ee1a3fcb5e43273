"""A 24 GiB card emulated by a ballast process (as benchmarks/comfyui_gpu_check.py's cards): in a worker with
PyTorch's native allocator or cudaMallocAsync (ComfyUI's default), CUDA graphs off as in ComfyUI, the cards' sequence
512->1024, 1024->2048, 1024->4096 twice. Per pass: plan, seconds, OOM warnings, peak allocated, reserved, CUDA free.
TRIM=1: torch.cuda.empty_cache() before each pass."""
import json, logging, os, subprocess, sys, time
from pathlib import Path
if sys.argv[1] == "driver":
    out = Path(sys.argv[2]); card = float(sys.argv[3])
    BALLAST = ("import sys, torch\nleave=int(float(sys.argv[1])*2**30)\nfree,total=torch.cuda.mem_get_info()\n"
               "held=torch.empty(max(0,free-leave),dtype=torch.uint8,device='cuda')\n"
               "print('ballast', round(torch.cuda.mem_get_info()[0]/2**30,2), flush=True)\nsys.stdin.read()\n")
    for name, conf, trim in (("async", "backend:cudaMallocAsync", "0"), ("async+trim", "backend:cudaMallocAsync", "1"),
                             ("native", "", "0")):
        ballast = subprocess.Popen([sys.executable, "-c", BALLAST, str(card - 0.5)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        print(name, ballast.stdout.readline().strip(), flush=True)
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf, TRIM=trim)
        r = subprocess.run([sys.executable, __file__, "worker", str(out / f"{name}.json")], env=env, timeout=240)
        ballast.stdin.close(); ballast.wait(timeout=30)
    sys.exit(0)
import torch
sys.path.insert(0, str(Path.cwd()))
from hypir.pipeline import HYPIRPipeline
from hypir.bench.common import build_models, random_images
from hypir.settings import RestoreOptions
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("hypir").addHandler(Keep())
models = build_models("sd21", torch.device("cuda"), torch.bfloat16)
pipe = HYPIRPipeline(models)
rows = []
for side, up in ((512, 2), (1024, 2), (1024, 4), (1024, 4)):
    records.clear()
    images = random_images(side, torch.device("cuda"))
    if os.environ.get("TRIM") == "1":
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    plan = pipe.plan(images, RestoreOptions(upscale=up, cuda_graphs=False))
    start = time.perf_counter()
    result = pipe(images, upscale=up, cuda_graphs=False)
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    row = {"input": side, "upscale": up, "s": round(time.perf_counter() - start, 3),
           "planned": [plan.tile, plan.tiles_per_batch, round((plan.activation_bytes or 0) / 2**30, 2),
                       round((plan.available_bytes or 0) / 2**30, 2)],
           "ran_tile": result.tile_size, "oom": [r[:420] for r in records if "out of GPU memory" in r],
           "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "reserved_gib": round(stats.get("reserved_bytes.all.current", 0) / 2**30, 2),
           "cuda_free_gib": round(torch.cuda.mem_get_info()[0] / 2**30, 2)}
    print(json.dumps(row), flush=True)
    rows.append(row)
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
