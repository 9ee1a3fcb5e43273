"""A large output under a memory budget in each tile size, on one CUDA GPU: the planner's time estimate
(hypir.planning.tiled_ms, which picks the tile size) against the measured pass, and the memory each needs.

Random SD2.1 weights in bf16, default options, 2048 -> 4096 (x2) under an 8 GiB budget by default. The budget is
also enforced on PyTorch's allocator (torch.cuda.set_per_process_memory_fraction): a pass that needs more runs out
of memory and retries, its tiles one at a time and then smaller ones; the row shows a smaller tile as a tile size
other than the one asked for, while its tiles_per_batch is the plan's (the retry's warning says when it ran one
at a time). Per tile
size: two warm-up calls (kernel timing and Triton loads; the second captures the CUDA graphs), then the median of
`--repeats` calls; the CUDA graphs of the previous size are dropped first.

    python3 benchmarks/tile_sizes.py --json OUT/tiles.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hypir.bench.common import build_models, random_images  # noqa: E402
from hypir.loading import gpu_index  # noqa: E402
from hypir.pipeline import HYPIRPipeline  # noqa: E402
from hypir.planning import auto_stride, tiled_ms  # noqa: E402
from hypir.runtime import release_graphs_on  # noqa: E402
from hypir.settings import RestoreOptions  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--input", type=int, default=2048, help="input side; the output is twice it")
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--tiles", default="auto,1024,1216,1280,1536", help="'auto' and tile sizes in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="sd21", help="sd21 (the real architecture), or tiny for a smoke run")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", gpu_index(device))
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * 2**30 / total), device)
    pipe = HYPIRPipeline(build_models(args.model, device, torch.bfloat16 if cuda else torch.float32))
    lq = random_images(args.input, device)
    side = 2 * args.input
    rows = []
    for name in args.tiles.split(","):
        tile = None if name == "auto" else int(name)
        options = {"upscale": 2.0, "vram_budget_gb": args.budget_gb}
        if tile is not None:
            options.update(tile_size=tile, tile_stride=auto_stride(tile))
        if cuda:
            release_graphs_on(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        plan = pipe.plan(lq, RestoreOptions(**options))
        for _ in range(2):
            pipe(lq, **options)
        times, result = [], None
        for _ in range(args.repeats):
            result = pipe(lq, **options)
            times.append(result.seconds * 1000)
        ran = result.tile_size or side
        row = {"asked": name, "tile": result.tile_size, "stride": result.tile_stride,
               "tiles_per_batch": plan.tiles_per_batch, "tiles": plan.tiles,
               "estimated_ms": tiled_ms(side, side, ran), "ms": statistics.median(times), "min_ms": min(times),
               "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
               "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
               "speedups": result.speedups}
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                           "output": side, "budget_gb": args.budget_gb, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
