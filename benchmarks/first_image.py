"""What the first image of a new size costs beyond a warm one, in a fresh process on one CUDA GPU: random SD2.1
weights in bf16, default options, 512->1024 then 1024->2048.

Per size: the first call (per-shape attention timing of the shapes not seen yet, Triton kernels compiled or
loaded from Triton's disk cache, cuDNN's first use of each convolution), the second (the UNet's CUDA graph is
captured), and the median of five warm calls; the seconds the attention timing took, and the first call's stages.
Run it twice with the same TRITON_CACHE_DIR and HYPIR_CACHE_DIR to see cold and warm caches (Triton's compiled
kernels, the attention timings kept on disk) (--time-every-candidate: the attention timing without its stop for
clear losers, the baseline; --profile: where the first call's time goes, under cProfile):

    export TRITON_CACHE_DIR=/tmp/triton_first HYPIR_CACHE_DIR=/tmp/hypir_first
    python3 benchmarks/first_image.py --json OUT/first_cold.json
    python3 benchmarks/first_image.py --json OUT/first_warm.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hypir.attention import autotune_table, tuning  # noqa: E402
from hypir.attention.timing_store import store_for  # noqa: E402
from hypir.bench.common import build_models, random_images  # noqa: E402
from hypir.pipeline import HYPIRPipeline  # noqa: E402


def timed_call(pipe, lq, **options):
    """(seconds, result) of one call, the GPU idle before and done after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = pipe(lq, upscale=2.0, **options)
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def first_call(pipe, lq, profile: bool) -> tuple[float, dict[str, float], list[dict]]:
    """The first call: its seconds, its stages' seconds (each stage waits for the GPU at its end), and with
    `profile` the functions that took longest under cProfile (which slows the call: its seconds are not the
    first image's cost then)."""
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    seconds, result = timed_call(pipe, lq, sync_stages=True)
    top = []
    if profiler is not None:
        profiler.disable()
        stats = pstats.Stats(profiler)
        for (file, line, name), (_, calls, own, cumulative, _) in sorted(
                stats.stats.items(), key=lambda item: item[1][3], reverse=True)[:60]:
            top.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": round(own, 4),
                        "cumulative_s": round(cumulative, 4)})
    return seconds, dict(result.stage_seconds), top


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--time-every-candidate", action="store_true",
                        help="the baseline: time every attention candidate fully (no stop for clear losers)")
    parser.add_argument("--profile", action="store_true",
                        help="profile each size's first call with cProfile (slower: for where the time goes only)")
    args = parser.parse_args()
    if args.time_every_candidate:
        tuning.LOSING_FACTOR = math.inf
    start = time.perf_counter()
    pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
    store = store_for("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton_cache": os.environ.get("TRITON_CACHE_DIR", "default"),
              "attention_timings_file": str(store.path) if store else None,
              "attention_timings_file_existed": bool(store and store.path.exists()),
              "every_candidate_timed_fully": args.time_every_candidate,
              "models_s": time.perf_counter() - start, "sizes": []}
    for side in (512, 1024):
        lq = random_images(side, torch.device("cuda"))
        timed_before = {shape: timing.seconds for shape, timing in autotune_table().items()}
        first, stages, top = first_call(pipe, lq, args.profile)
        new_shapes = [t for shape, t in autotune_table().items() if shape not in timed_before]
        timing_s = sum(t.seconds for t in new_shapes)
        second, _ = timed_call(pipe, lq)
        warm = statistics.median(timed_call(pipe, lq)[0] for _ in range(5))
        row = {"output": side * 2, "first_s": first, "second_s": second, "warm_s": warm,
               "first_beyond_warm_s": first - warm, "second_beyond_warm_s": second - warm,
               "attention_timing_s": timing_s, "shapes_timed": sum(not t.stored for t in new_shapes),
               "shapes_stored": sum(t.stored for t in new_shapes), "first_stage_s": stages}
        print(json.dumps(row), flush=True)
        row["profile"] = top
        result["sizes"].append(row)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
