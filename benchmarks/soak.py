"""Soak: many restores of random sizes, tilings and attention backends on one loaded model, checking that
allocated GPU memory does not grow after warm-up and that nothing fails.

    python benchmarks/soak.py --runs 200 --json soak.json      # on a CUDA machine

SD2.1-size random weights (no download), bf16, outputs from 64x64 to 2048x2048.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from hypir.bench import available_backends, build_models
from hypir.pipeline import HYPIRPipeline


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--model", default="sd21")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", default="soak.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device("cuda")
    models = build_models(args.model, device, torch.bfloat16)
    pipe = HYPIRPipeline(models)
    backends = [b for b, why in available_backends(device, torch.bfloat16).items() if why is None]
    rng = random.Random(args.seed)
    records, failures = [], []
    allocated_after_warmup = None
    start = time.perf_counter()
    for i in range(args.runs):
        out_h, out_w = rng.randint(64, 2048), rng.randint(64, 2048)
        scale = rng.choice([1.0, 2.0, 4.0])
        in_h, in_w = max(1, round(out_h / scale)), max(1, round(out_w / scale))
        backend = rng.choice(backends)
        if backend == "standard" and max(out_h, out_w) > 1024:
            backend = "sdpa"  # standard attention materialises N^2 scores: 40 GiB at 2048^2
        tile = rng.choice(["auto", "auto", 512, 768, 1024])
        stride = {512: 256, 768: 512, 1024: 768}.get(tile, 256)
        images = torch.rand(1, 3, in_h, in_w, device=device)
        t0 = time.perf_counter()
        try:
            result = pipe(images, upscale=scale, attention=backend, tile_size=tile, tile_stride=stride,
                          seed=rng.randint(0, 2**31))
            ok = bool(torch.isfinite(result.images).all()) and result.images.shape[2:] == \
                (int(in_h * scale), int(in_w * scale))
            if not ok:
                failures.append(f"run {i}: wrong or non-finite output")
        except Exception as exc:  # noqa: BLE001 - a soak records every failure and goes on
            failures.append(f"run {i}: {type(exc).__name__}: {exc}")
            result = None
        del images, result
        allocated = torch.cuda.memory_allocated(device)
        if i + 1 == args.warmup:
            allocated_after_warmup = allocated
        records.append({"run": i, "input": [in_h, in_w], "scale": scale, "backend": backend, "tile": tile,
                        "seconds": time.perf_counter() - t0, "allocated_mib": allocated / 2**20})
    after = [r["allocated_mib"] for r in records[args.warmup:]]
    summary = {
        "runs": args.runs, "failures": failures, "seconds": time.perf_counter() - start,
        "allocated_after_warmup_mib": (allocated_after_warmup or 0) / 2**20,
        "allocated_max_after_warmup_mib": max(after) if after else None,
        "allocated_final_mib": records[-1]["allocated_mib"],
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
    }
    with open(args.json, "w") as f:
        json.dump({"summary": summary, "records": records}, f, indent=1)
    print(json.dumps(summary, indent=1))
    grew = summary["allocated_max_after_warmup_mib"] - summary["allocated_after_warmup_mib"]
    print(f"allocated memory growth after warm-up: {grew:.1f} MiB; failures: {len(failures)}")
    return 1 if failures or grew > 1.0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
