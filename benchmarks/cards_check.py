"""GPU checks of the engine as users' cards run it (issue: ComfyUI on a GPU), on full-size SD2.1-architecture
random weights, one process per part:

  memory   the planner's figure (what the node asks ComfyUI for) against the measured peak of the pass, for
           512->1024, 1024->2048 and 2048->4096 outputs, untiled and under 8 / 12 / 24 GiB budgets;
  fp16     dtype fp16 forced (as on a Turing card) at 1024 and 2048: finite outputs, whether the fp32 VAE
           recompute ran, the status line, PSNR against the bf16 pass; then a real overflow (the decoder's last
           convolution scaled past fp16's range): a finite output, and the status line naming the fp32 stage;
  notriton the same bf16 pass with Triton unimportable (ComfyUI's Windows portable build has none): the
           PyTorch fallbacks, the status, the time, and the output against the Triton pass's;
  allocator under PyTorch's cudaMallocAsync allocator (ComfyUI's default on NVIDIA cards), where a CUDA graph
           cannot hold Triton launches: the default (Triton kernels, no UNet graph) against a UNet graph on
           PyTorch's norms, at 1024 and 2048; the status line; and the outputs against each other.

    python3 benchmarks/cards_check.py PART --json OUT.json [--reference REF.pt]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

if "--no-triton" in sys.argv:  # before torch: the process sees no Triton at all, as on Windows portable
    sys.modules["triton"] = None
if "allocator" in sys.argv:  # before torch, as ComfyUI's cuda_malloc.py does
    import os
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"

import torch  # noqa: E402

from hypir.bench.common import build_models, psnr, random_images  # noqa: E402
from hypir.pipeline import HYPIRPipeline  # noqa: E402
from hypir.settings import RestoreOptions  # noqa: E402

SIZES = {1024: 512, 2048: 1024, 4096: 2048}  # output side: input side


def images(side: int) -> torch.Tensor:
    return random_images(side, torch.device("cuda"))


def timed(pipe, lq, options, repeats=3):
    pipe(lq, options=options)  # warm-up: kernel choice, Triton compile
    times, result = [], None
    for _ in range(repeats):
        result = pipe(lq, options=options)
        times.append(result.seconds * 1000)
    return result, statistics.median(times)


def memory(pipe, outputs: list[int] | None = None, budgets: tuple = (None, 24.0, 12.0, 8.0)) -> list[dict]:
    rows = []
    for output, side in SIZES.items():
        if outputs and output not in outputs:
            continue
        lq = images(side)
        for budget in budgets:
            options = RestoreOptions(upscale=2.0, vram_budget_gb=budget, cuda_graphs=False)
            plan = pipe.plan(lq, options)
            pipe(lq, options=options)  # warm-up (per-shape timing allocates its own scratch)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = pipe(lq, options=options)
            peak = torch.cuda.max_memory_allocated() - base
            rows.append({"output": output, "budget_gb": budget, "tile": plan.tile, "tiles": plan.tiles,
                         "planned_mib": plan.total_bytes / 2**20, "peak_mib": peak / 2**20,
                         "planned_over_peak": plan.total_bytes / peak, "ms": result.seconds * 1000})
            print(json.dumps(rows[-1]))
    return rows


def fp16() -> list[dict]:
    models = build_models("sd21", torch.device("cuda"), torch.float16)
    pipe = HYPIRPipeline(models)
    rows = []
    for output, side in list(SIZES.items())[:2]:
        lq = images(side)
        result, ms = timed(pipe, lq, RestoreOptions(upscale=2.0))
        rows.append({"output": output, "finite": bool(torch.isfinite(result.images).all()), "ms": ms,
                     "vae_fp32": list(result.fp32_vae), "status": result.status_line()})
        print(json.dumps(rows[-1]))
    # A real overflow: the decoder's last convolution scaled until its sums pass fp16's 65504 (its weights,
    # about 0.03 at most, stay within fp16's range; x2000 was not enough on random weights).
    with torch.no_grad():
        models.vae.decoder.conv_out.weight.mul_(1e5)
    result, ms = timed(pipe, images(512), RestoreOptions(upscale=2.0))
    rows.append({"output": "1024, decoder scaled to overflow fp16", "finite": bool(torch.isfinite(result.images).all()),
                 "ms": ms, "vae_fp32": list(result.fp32_vae), "status": result.status_line()})
    print(json.dumps(rows[-1]))
    return rows


def triton_pass(reference: str | None) -> dict:
    from hypir.bench import stock_models

    models = build_models("sd21", torch.device("cuda"), torch.bfloat16)
    pipe = HYPIRPipeline(models)
    exact = HYPIRPipeline(stock_models(models, "sdpa", torch.float32))  # diffusers' modules in float32
    out = {}
    for output, side in list(SIZES.items())[:2]:
        lq = images(side)
        result, ms = timed(pipe, lq, RestoreOptions(upscale=2.0, latent="mode"))
        fp32 = exact(lq, upscale=2.0, latent="mode", fused_kernels=False, cuda_graphs=False).images
        out[output] = {"ms": ms, "status": result.status_line(), "images": result.images.cpu(),
                       "psnr_vs_fp32_db": psnr(result.images, fp32)}
    if reference:
        ref = torch.load(reference, weights_only=True)
        for output in out:
            out[output]["psnr_vs_reference_db"] = psnr(out[output]["images"], ref[output])
            out[output]["max_abs_diff"] = (out[output]["images"] - ref[output]).abs().max().item()
    return out


def allocator() -> list[dict]:
    models = build_models("sd21", torch.device("cuda"), torch.bfloat16)
    pipe = HYPIRPipeline(models)
    rows = []
    for output, side in list(SIZES.items())[:2]:
        lq = images(side)
        for name, options in (("default: Triton norms, no UNet graph", RestoreOptions(upscale=2.0, latent="mode")),
                              ("UNet graph, PyTorch norms", RestoreOptions(upscale=2.0, latent="mode",
                                                                           fused_kernels=False))):
            result, ms = timed(pipe, lq, options, repeats=5)
            rows.append({"output": output, "mode": name, "ms": ms, "status": result.status_line(),
                         "images": result.images})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "images"}))
        rows[-1]["psnr_vs_default_db"] = psnr(rows[-1]["images"], rows[-2]["images"])
    for row in rows:
        del row["images"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["memory", "fp16", "triton", "notriton", "allocator"])
    parser.add_argument("--json", required=True)
    parser.add_argument("--sizes", type=lambda text: [int(n) for n in text.split(",")],
                        help="memory: these output sizes only (of 1024, 2048, 4096)")
    parser.add_argument("--budgets", default=(None, 24.0, 12.0, 8.0),
                        type=lambda text: tuple(None if n == "none" else float(n) for n in text.split(",")),
                        help="memory: these budgets in GiB only ('none': no budget)")
    parser.add_argument("--reference", help="triton/notriton: the other pass's outputs (.pt), saved with --save")
    parser.add_argument("--save", help="triton/notriton: save this pass's outputs here (.pt)")
    parser.add_argument("--no-triton", action="store_true", help="make Triton unimportable (before torch)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.part == "memory":
        rows = memory(HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16)), args.sizes,
                      args.budgets)
        off = [r for r in rows if not 0.8 <= r["planned_over_peak"] <= 1.2]
        result = {"rows": rows, "within_20_percent": not off}
        print(f"planned within 20 % of the measured peak: {len(rows) - len(off)} of {len(rows)}")
    elif args.part == "fp16":
        result = {"rows": fp16()}
    elif args.part == "allocator":
        result = {"rows": allocator(), "allocator": torch.cuda.get_allocator_backend()}
    else:
        passes = triton_pass(args.reference)
        if args.save:
            torch.save({k: v["images"] for k, v in passes.items()}, args.save)
        result = {str(k): {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in passes.items()}
        for k, v in result.items():
            print(k, json.dumps(v))
    result.update(device=torch.cuda.get_device_name(), torch=torch.__version__, seconds=time.perf_counter() - t0,
                  triton_importable=sys.modules.get("triton", 0) is not None)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    return 0 if result.get("within_20_percent", True) else 1


if __name__ == "__main__":
    sys.exit(main())
