"""What handing a restored image to ComfyUI costs on a GPU: ComfyUI's IMAGE is a float32 (B, H, W, C) tensor on
the CPU, so the node copies the pass's (B, C, H, W) GPU result to host memory. Inside ComfyUI on an H200 the
node took 35-55 ms longer than its pass at a 2048 output (benchmarks/results/2026-11-30-h200-comfyui/). This
times the ways of making that copy, each fresh as the node makes it (a new output every run, since ComfyUI keeps
the last one), at 1024 and 2048:

  movedim_cpu        result.movedim(1, -1).cpu() (what the node does): a strided copy into a new pageable tensor
  contiguous_cpu     made contiguous (B, H, W, C) on the GPU first, then one dense copy
  pinned             into a new pinned (page-locked) tensor, from PyTorch's caching host allocator
  reused_pageable    into one pageable tensor reused every time: the copy without first-touch page faults

    python3 benchmarks/image_handoff.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, repeats=15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
        del out
    return round(statistics.median(times), 3)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    for side in (1024, 2048):
        images = torch.rand(1, 3, side, side, device="cuda")
        reused = torch.empty(1, side, side, 3)

        def pinned():
            out = torch.empty(1, side, side, 3, pin_memory=True)
            out.copy_(images.movedim(1, -1))
            return out

        row = {"output": side, "mib": images.numel() * 4 / 2**20,
               "movedim_cpu_ms": timed(lambda: images.movedim(1, -1).cpu()),
               "contiguous_cpu_ms": timed(lambda: images.movedim(1, -1).contiguous().cpu()),
               "pinned_ms": timed(pinned),
               "reused_pageable_ms": timed(lambda: reused.copy_(images.movedim(1, -1)))}
        rows.append(row)
        print(json.dumps(row))
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
