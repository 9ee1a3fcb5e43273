"""What the first image of a new size costs beyond a warm one, in a fresh process on one CUDA GPU: random SD2.1
weights in bf16, default options, 512->1024 then 1024->2048.

Per size: the first call (per-shape attention timing of the shapes not seen yet, Triton kernels compiled or
loaded from Triton's disk cache, cuDNN's first use of each convolution), the second (the UNet's CUDA graph is
captured), and the median of five warm calls; and the seconds the attention timing took. Run it twice with the
same TRITON_CACHE_DIR to see a cold and a warm Triton cache (--time-every-candidate: the attention timing
without its stop for clear losers, the baseline):

    TRITON_CACHE_DIR=/tmp/triton_first python3 benchmarks/first_image.py --json OUT/first_cold.json
    TRITON_CACHE_DIR=/tmp/triton_first python3 benchmarks/first_image.py --json OUT/first_warm.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hypir.attention import autotune_table, tuning  # noqa: E402
from hypir.bench.common import build_models, random_images  # noqa: E402
from hypir.pipeline import HYPIRPipeline  # noqa: E402


def call_seconds(pipe, lq) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(lq, upscale=2.0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--time-every-candidate", action="store_true",
                        help="the baseline: time every attention candidate fully (no stop for clear losers)")
    args = parser.parse_args()
    if args.time_every_candidate:
        tuning.LOSING_FACTOR = math.inf
    start = time.perf_counter()
    pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton_cache": os.environ.get("TRITON_CACHE_DIR", "default"), "every_candidate_timed_fully": args.time_every_candidate,
              "models_s": time.perf_counter() - start, "sizes": []}
    for side in (512, 1024):
        lq = random_images(side, torch.device("cuda"))
        timed_before = {shape: timing.seconds for shape, timing in autotune_table().items()}
        first = call_seconds(pipe, lq)
        timing_s = sum(t.seconds for shape, t in autotune_table().items() if shape not in timed_before)
        second = call_seconds(pipe, lq)
        warm = statistics.median(call_seconds(pipe, lq) for _ in range(5))
        row = {"output": side * 2, "first_s": first, "second_s": second, "warm_s": warm,
               "first_beyond_warm_s": first - warm, "second_beyond_warm_s": second - warm,
               "attention_timing_s": timing_s}
        result["sizes"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
