"""GroupNorm's whole-pixel kernels (channels_last) under other tile sizes and warps, on every
GroupNorm call of a real pass, on one CUDA GPU.

The first (eager) pass at each output size (random SD2.1 weights, bf16, default options) records the calls that take the
whole-pixel kernels (shape, groups, SiLU, affine, pre-bias); then, for each setting, each distinct call is run on
random values of its shape (bf16, channels_last), timed with CUDA events behind a sleep kernel (the GPU's time
alone, as in the graphed pass: the median of 5 groups of 20 calls),
and summed with its count: the GPU time the pass spends in these kernels under that setting. Each setting's
output is compared with the float64 reference (relative error). The statistics alone are timed beside, and the
effective bandwidth of the whole call (a read for the statistics, a read and a write for the output) is given
against a plain copy of the same tensor (a read and a write).

    python3 benchmarks/groupnorm_sweep.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hypir import kernels  # noqa: E402
from hypir.bench.common import build_models, gpu_ms, random_images  # noqa: E402
from hypir.pipeline import HYPIRPipeline  # noqa: E402

# (name, ROW_STATS_TILE, ROW_STATS_MIN_PIXELS, ROW_SUB, ROW_STATS_WARPS, ROW_TILE); the first is the shipped one,
# the second the one before it (2026-11-30: 8192 values a step, 8 steps, 8 warps)
SETTINGS = [
    ("shipped", 4096, 4, 32, 4, 8192),
    ("8192x8 w8", 8192, 1, 8, 8, 8192),
    ("4096x16 w4", 4096, 4, 16, 4, 8192),
    ("4096x64 w4", 4096, 4, 64, 4, 8192),
    ("shipped, normalize 4096", 4096, 4, 32, 4, 4096),
]


def apply(setting) -> None:
    _, stats_tile, min_pixels, sub, warps, tile = setting
    kernels.ROW_STATS_TILE, kernels.ROW_STATS_MIN_PIXELS, kernels.ROW_SUB = stats_tile, min_pixels, sub
    kernels.ROW_STATS_WARPS, kernels.ROW_TILE = warps, tile


def record_calls(pipe, side: int) -> Counter:
    calls: Counter = Counter()
    original = kernels._triton_group_norm_rows

    def recording(x, y, weight, bias, groups, eps, silu, pre_bias, s_n, o_n):
        calls[(tuple(x.shape), groups, float(eps), bool(silu), weight is not None, pre_bias is not None)] += 1
        return original(x, y, weight, bias, groups, eps, silu, pre_bias, s_n, o_n)

    kernels._triton_group_norm_rows = recording
    try:
        pipe(random_images(side, torch.device("cuda")), upscale=2.0)  # a size's first call: eager, every size on Triton
        torch.cuda.synchronize()
    finally:
        kernels._triton_group_norm_rows = original
    return calls


SLEEP_CYCLES = 40_000_000  # about 20 ms: the GPU held while the CPU queues a group's calls


def median_ms(fn) -> float:
    """GPU ms per call, the calls queued behind a sleep kernel: the kernels' own time (as when replayed from a CUDA
    graph), not the CPU's time to launch them; the median of 5 groups of 20."""
    return gpu_ms(fn, calls=20, groups=5, sleep_cycles=SLEEP_CYCLES)


def inputs(call):
    shape, groups, eps, silu, affine, pre = call
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    # Channels last: each pixel's channels contiguous (rank 3: the VAE attention's (B, C, tokens) view)
    x = (torch.randn(shape[0], *shape[2:], shape[1], device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16)
    x = x.movedim(-1, 1)
    c = shape[1]
    w = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16) if affine else None
    b = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16) if affine else None
    p = torch.randn(shape[0], c, device="cuda", generator=g).to(torch.bfloat16) if pre else None
    return x, w, b, p, groups, eps, silu


def stats_only(x, groups):
    """The statistics kernel alone, as the shipped launch makes it."""
    import triton

    n, c = x.shape[:2]
    spatial = x[0, 0].numel()
    block_c, block_p = kernels._row_blocks(c, kernels.ROW_STATS_TILE, kernels.ROW_STATS_MIN_PIXELS)
    sub = kernels._row_sub(n, spatial, block_p)
    chunks = triton.cdiv(spatial, block_p * sub)
    mean = torch.empty(n * chunks, c, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    k = kernels._kernels()
    return lambda: k.row_stats[(chunks, n)](x, mean, mean, m2, c, spatial, chunks, x.stride(0), HAS_PRE=False,
                                            BLOCK_C=block_c, BLOCK_P=block_p, SUB=sub,
                                            num_warps=kernels.ROW_STATS_WARPS)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--sides", default="512,1024")
    args = parser.parse_args()
    pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
    every_size = kernels.triton_at_every_size(True)  # as in the graphed pass: the UNet's small norms too
    every_size.__enter__()
    result = {"device": torch.cuda.get_device_name(), "settings": [s[0] for s in SETTINGS], "sizes": {}}
    for side in (int(s) for s in args.sides.split(",")):
        apply(SETTINGS[0])
        calls = record_calls(pipe, side)
        rows = []
        for call, count in sorted(calls.items(), key=lambda item: -item[1] * torch.Size(item[0][0]).numel()):
            x, w, b, p, groups, eps, silu = inputs(call)
            exact = kernels.group_norm_silu_reference(x.double(), None if w is None else w.double(),
                                                      None if b is None else b.double(), groups, eps, silu,
                                                      None if p is None else p.double())
            copy_ms = median_ms(lambda: torch.empty_like(x).copy_(x))
            row = {"shape": list(call[0]), "groups": groups, "silu": silu, "pre_bias": call[5], "count": count,
                   "mib": x.numel() * 2 / 2**20, "copy_ms": copy_ms, "settings": {}}
            for setting in SETTINGS:
                apply(setting)
                y = kernels.group_norm_silu(x, w, b, groups, eps, silu, p)
                ms = median_ms(lambda: kernels.group_norm_silu(x, w, b, groups, eps, silu, p))
                row["settings"][setting[0]] = {
                    "ms": ms, "stats_ms": median_ms(stats_only(x, groups)),
                    "rel_err": ((y.double() - exact).norm() / exact.norm()).item(),
                    "gbps": 3 * x.numel() * 2 / ms / 1e6}
            row["copy_gbps"] = 2 * x.numel() * 2 / copy_ms / 1e6
            rows.append(row)
            print(json.dumps({"side": side, "shape": row["shape"], "count": count,
                              **{k: round(v["ms"], 4) for k, v in row["settings"].items()}}), flush=True)
        totals = {s[0]: sum(r["count"] * r["settings"][s[0]]["ms"] for r in rows) for s in SETTINGS}
        stats_totals = {s[0]: sum(r["count"] * r["settings"][s[0]]["stats_ms"] for r in rows) for s in SETTINGS}
        result["sizes"][str(side * 2)] = {"calls": rows, "total_ms": totals, "stats_total_ms": stats_totals}
        print(json.dumps({"output": side * 2, "total_ms": totals, "stats_total_ms": stats_totals}), flush=True)
        Path(args.json).write_text(json.dumps(result, indent=2))  # as it goes: a run cut short keeps a size
    apply(SETTINGS[0])
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
