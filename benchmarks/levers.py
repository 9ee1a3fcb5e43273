"""The speed levers of the pass, each against the pass without it, on one CUDA GPU, in one process:

  rows         GroupNorm for channels_last reading whole pixels (kernels.MAX_ROW_CHANNELS) instead of one
               group's channels of each pixel;
  transformer  the UNet transformers' output kept channels_last (fused_blocks.CHANNELS_LAST_TRANSFORMER_OUTPUT)
               instead of diffusers' NCHW copy;
  vae_graphs   the VAE stages replayed from CUDA graphs up to 1024x1024 (pipeline.VAE_GRAPH_MAX_PIXELS);
  decoder_resnets  the VAE decoder's up blocks' resnets (time_embedding_norm "group") on the fused path
               (fused_blocks.FUSED_DECODER_RESNETS) instead of diffusers' forward;
  geglu        the transformers' GEGLU as one kernel (fused_blocks.FUSED_GEGLU) instead of PyTorch's GELU and
               product;
  small        the graphed UNet's small activations on the Triton kernels as well
               (pipeline.TRITON_IN_GRAPHS_AT_EVERY_SIZE) instead of PyTorch's below kernels.TRITON_MIN_ELEMENTS;
  stats_tiles  GroupNorm's statistics in steps of kernels.ROW_STATS_TILE values (4 warps, up to 32 steps a program)
               instead of 8192 values, 8 warps, 8 steps;
  merge        GroupNorm's merge of partial statistics in steps of kernels.ROW_MERGE_TILE values instead of 64
               chunks;
  upsample     nearest 2x + 3x3 convolution as one transposed convolution (fused_blocks.TRANSPOSED_UPSAMPLE)
               instead of diffusers' upsampled copy and 3x3 convolution;

Measured and removed: cuDNN's benchmark mode (-0.4 ms at 1024, +5.5 ms at 2048;
benchmarks/results/2026-11-30-h200-levers), a bias add on channels_last that also writes its output's statistics
for the next GroupNorm (-0.4 / -0.7 ms, branch speed-stats-with-add;
benchmarks/results/2026-11-30-h200-fused-decoder).
"small" was measured there first (-0.5 / -10.8 ms), left out while its GPU test failed, and merged after
(-1.7 / -1.2 ms in the fused-decoder results).

Parts:
  upsample the nearest-2x upsamplers' convolution (diffusers', sub-pixel, transposed) at each SD2.1 shape of a
           1024 and a 2048 output: GPU time and relative error against float64;
  kernels  every GroupNorm shape of SD2.1 at a 1024 output that runs on Triton (bf16, channels_last, affine,
           SiLU): GPU time of each kernel set and PyTorch's F.group_norm, effective bandwidth (one read for the
           statistics, one read and one write for the output), relative error against float64;
  modules  one eager pass at 1024 (no CUDA graphs) under torch.profiler with every UNet and VAE module's
           forward marked: each kernel's GPU time charged to the innermost module that launched it, summed per
           module class and kind of kernel, and the 40 costliest modules with their input shapes;
  memory   the GPU memory the VAE graphs keep at 1024: reserved and allocated after three passes with them and
           without them;
  cpu      a warm default pass at 1024: the CPU time to queue it, and cProfile's costliest functions;
  batch    ms per image of a warm default pass at 1024 for batches of 1, 2 and 4 photos of one size;
  pass     the whole pass (random SD2.1 weights, bf16, default options) at 1024 and 2048 with every lever on,
           then with each one off: median of 10 calls, the PSNR of each against the same weights in float32
           through diffusers' blocks, the GPU time by kind of kernel of the all-on pass at 1024, and how busy
           the GPU was per stage in the all-on (graphed) pass, with its largest idle gaps.

    python3 benchmarks/levers.py --json OUT.json
    python3 benchmarks/levers.py --json OUT.json --parts pass --off ""   # all on only: one tree against another
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hypir import fused_blocks, kernels, pipeline  # noqa: E402
from hypir.bench.common import build_models, gpu_ms, psnr, random_images  # noqa: E402
from hypir.pipeline import HYPIRPipeline  # noqa: E402
from hypir.bench.speed import busy_line, gpu_busy, time_by_kind  # noqa: E402
from hypir.runtime import runtime_of  # noqa: E402

SHAPES = [  # (C, H, W) of SD2.1's GroupNorms at a 1024 output, at or above kernels.TRITON_MIN_ELEMENTS
    (128, 1024, 1024), (256, 1024, 1024), (256, 512, 512), (512, 512, 512), (512, 256, 256), (320, 128, 128),
]
ROWS_ON = kernels.MAX_ROW_CHANNELS


def rows(enabled: bool) -> None:
    kernels.MAX_ROW_CHANNELS = ROWS_ON if enabled else 0


VAE_GRAPH_MAX_PIXELS = pipeline.VAE_GRAPH_MAX_PIXELS
ROW_MERGE_TILE = kernels.ROW_MERGE_TILE
ROW_STATS = (kernels.ROW_STATS_TILE, kernels.ROW_STATS_MIN_PIXELS, kernels.ROW_SUB, kernels.ROW_STATS_WARPS)


def levers(off: str | None) -> None:
    """Every lever on but `off`."""
    rows(off != "rows")
    kernels.ROW_MERGE_TILE = 0 if off == "merge" else ROW_MERGE_TILE
    (kernels.ROW_STATS_TILE, kernels.ROW_STATS_MIN_PIXELS, kernels.ROW_SUB,
     kernels.ROW_STATS_WARPS) = (8192, 1, 8, 8) if off == "stats_tiles" else ROW_STATS
    pipeline.VAE_GRAPH_MAX_PIXELS = 0 if off == "vae_graphs" else VAE_GRAPH_MAX_PIXELS
    fused_blocks.CHANNELS_LAST_TRANSFORMER_OUTPUT = off != "transformer"
    fused_blocks.TRANSPOSED_UPSAMPLE = off != "upsample"
    fused_blocks.FUSED_DECODER_RESNETS = off != "decoder_resnets"
    fused_blocks.FUSED_GEGLU = off != "geglu"
    pipeline.TRITON_IN_GRAPHS_AT_EVERY_SIZE = off != "small"


def part_kernels() -> list[dict]:
    out = []
    for c, h, w in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(c + h)
        x = (torch.randn(1, c, h, w, device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16)
        x = x.to(memory_format=torch.channels_last)
        weight = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16)
        bias = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16)
        exact = kernels.group_norm_silu_reference(x.double(), weight.double(), bias.double(), 32, 1e-6, True)
        row = {"shape": [c, h, w], "mib": x.numel() * 2 / 2**20}
        for name, enabled in (("rows", True), ("groups", False)):
            rows(enabled)
            y = kernels.group_norm_silu(x, weight, bias, 32, 1e-6, True)
            row[f"{name}_rel_err"] = ((y.double() - exact).norm() / exact.norm()).item()
            row[f"{name}_ms"] = gpu_ms(lambda: kernels.group_norm_silu(x, weight, bias, 32, 1e-6, True), calls=50,
                                       groups=1)
            row[f"{name}_gbps"] = 3 * x.numel() * 2 / row[f"{name}_ms"] / 1e6
        rows(True)
        row["pytorch_ms"] = gpu_ms(lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-6)), calls=50, groups=1)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


UPSAMPLE_SHAPES = [  # (C, H, W) of SD2.1's nearest-2x + 3x3 upsamplers' inputs at a 1024 output: VAE decoder, UNet
    (512, 128, 128), (512, 256, 256), (256, 512, 512), (1280, 16, 16), (1280, 32, 32), (640, 64, 64),
]


# Rows (and columns) of the 3x3 kernel that each 2x2 tap of a sub-pixel phase sums: output row 2h+i of
# nearest-2x-then-conv3x3 reads input rows h-1+i and h+i, the first with rows _PHASE_TAPS[i][0], the second
# with _PHASE_TAPS[i][1].
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def subpixel_weights(weight: torch.Tensor) -> torch.Tensor:
    """(4 * out, in, 2, 2) from a 3x3 kernel: the four output phases (i, j), stacked phase-major."""
    phases = []
    for rows in _PHASE_TAPS:
        for cols in _PHASE_TAPS:
            taps = [[weight[:, :, list(r)][:, :, :, list(c)].sum(dim=(2, 3)) for c in cols] for r in rows]
            phases.append(torch.stack([torch.stack(row, dim=-1) for row in taps], dim=-2))
    return torch.cat(phases, dim=0)


def subpixel_conv(x: torch.Tensor, phase_weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The four phases as one 2x2 convolution (padding 1), interleaved into the output by strided copies."""
    n, _, h, w = x.shape
    out_channels = phase_weight.shape[0] // 4
    phases = F.conv2d(x, phase_weight, bias.repeat(4), padding=1)
    y = torch.empty(n, out_channels, 2 * h, 2 * w, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    for index in range(4):
        i, j = divmod(index, 2)
        y[:, :, i::2, j::2] = phases[:, index * out_channels:(index + 1) * out_channels, i:i + h, j:j + w]
    return y


def part_upsample(scale: int = 1) -> list[dict]:
    """Nearest 2x then a 3x3 convolution (bf16, channels_last, bias) three ways: diffusers' (an upsampled copy,
    then the convolution), the sub-pixel convolution (four 2x2 phases, interleaved by strided copies: the pack's
    path until the transposed one measured faster) and one transposed convolution (stride 2, 4x4, the
    interleaving done by cuDNN: the pack's path): GPU time and relative error against float64. `scale` 2: the
    shapes at a 2048 output."""
    from hypir.fused_blocks import transposed_weights

    out = []
    for c, h, w in UPSAMPLE_SHAPES:
        h, w = h * scale, w * scale
        g = torch.Generator(device="cuda").manual_seed(c + h)
        x = torch.randn(1, c, h, w, device="cuda", generator=g).to(torch.bfloat16, memory_format=torch.channels_last)
        weight = (torch.randn(c, c, 3, 3, device="cuda", generator=g) / (3 * c ** 0.5)).to(torch.bfloat16)
        weight = weight.contiguous(memory_format=torch.channels_last)
        bias = torch.randn(c, device="cuda", generator=g).to(torch.bfloat16)
        exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), weight.double(), bias.double(),
                         padding=1)
        phase = subpixel_weights(weight.float()).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        transposed = transposed_weights(weight.float()).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        variants = {
            "diffusers": lambda: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1),
            "subpixel": lambda: subpixel_conv(x, phase, bias),
            "transposed": lambda: F.conv_transpose2d(x, transposed, bias, stride=2, padding=1),
        }
        row = {"shape": [c, h, w]}
        for name, fn in variants.items():
            y = fn()
            row[f"{name}_rel_err"] = ((y.double() - exact).norm() / exact.norm()).item()
            row[f"{name}_channels_last"] = y.is_contiguous(memory_format=torch.channels_last)
            row[f"{name}_ms"] = gpu_ms(fn, calls=20, groups=1)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


# "fused": every fused block off
LEVERS_OFF = ("rows", "stats_tiles", "merge", "decoder_resnets", "geglu", "small", "transformer", "upsample",
              "vae_graphs", "fused")


def part_pass(save, smoke: bool = False, off_names: tuple[str, ...] = LEVERS_OFF) -> dict:
    device = torch.device("cpu" if smoke else "cuda")
    sides = (16, 32) if smoke else (512, 1024)
    size = "tiny" if smoke else "sd21"
    # The same weights in float32 through diffusers' own blocks: what each variant's PSNR is measured against.
    fp32 = HYPIRPipeline(build_models(size, device, torch.float32))
    references = {side: fp32(random_images(side, device), upscale=2.0, latent="mode", fused_kernels=False,
                             cuda_graphs=False).images for side in sides}
    del fp32
    pipe = HYPIRPipeline(build_models(size, device, torch.bfloat16))
    out = {"rows": []}
    for side in sides:
        lq = random_images(side, device)
        row = {"output": side * 2}
        # "fused_off": every fused block off (diffusers' blocks, the same graphs): the PSNR the pass had before them.
        for off in (None, *off_names, None) if off_names else (None,):
            name = "fused_off" if off == "fused" else f"without_{off}" if off else "all_on"
            levers(off)
            options = dict(upscale=2.0, latent="mode", fused_kernels=off != "fused")
            runtime_of(pipe.models).release_graphs()  # a graph holds the kernels it was captured with
            pipe(lq, **options)
            pipe(lq, **options)  # captures this set's graph
            times = []
            for _ in range(10):
                result = pipe(lq, **options)
                times.append(result.seconds * 1000)
            row[f"{name}_ms"] = min(row.get(f"{name}_ms", float("inf")), statistics.median(times))  # all_on twice
            row[f"{name}_psnr_vs_fp32_db"] = psnr(result.images, references[side])
        row["status"] = result.status_line()
        if not smoke:  # every lever on: where the GPU waits in the default (graphed) pass
            levers(None)
            runtime_of(pipe.models).release_graphs()
            row["gpu_busy"] = gpu_busy(pipe, lq)
            print(f"{side * 2}: {busy_line(row['gpu_busy'])}", flush=True)
            print(json.dumps(row["gpu_busy"]["gaps"]), flush=True)
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "status"}), flush=True)
        save(out)
    levers(None)
    runtime_of(pipe.models).release_graphs()
    if smoke:
        return out
    out["profile_1024_all_on"] = time_by_kind(pipe, random_images(512, torch.device("cuda")))
    print(json.dumps({k: round(v["ms"], 2) for k, v in out["profile_1024_all_on"]["kinds"].items()}), flush=True)
    return out


def module_timeline(fn, roots: dict[str, torch.nn.Module]) -> dict:
    """fn() under torch.profiler with every module of `roots` marked ("mod:<root>.<name>|<class>|<input shape>"):
    each CUDA kernel's time charged to the innermost marked module whose range holds its launch."""
    from torch.profiler import record_function

    from hypir.bench.common import GPU_ACTIVITY, annotated_ranges, kernel_kind, launcher, trace_events

    stack, handles = [], []

    def enter(label):
        def hook(module, args):
            shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            marker = record_function(f"mod:{label}|{list(shape)}")
            marker.__enter__()
            stack.append(marker)
        return hook

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    for root_name, root in roots.items():
        for name, module in root.named_modules():
            label = f"{root_name}.{name}|{type(module).__name__}" if name else f"{root_name}|{type(module).__name__}"
            handles += [module.register_forward_pre_hook(enter(label)), module.register_forward_hook(leave)]
    try:
        events = trace_events(fn)
    finally:
        for handle in handles:
            handle.remove()
    launched_in = launcher(events, annotated_ranges(events, "mod:"))
    per_module: dict[str, dict] = {}
    per_class: dict[str, dict] = {}
    per_kernel: dict[tuple, float] = {}
    for e in events:
        if not (e.get("ph") == "X" and e.get("cat") in GPU_ACTIVITY):
            continue
        label = launched_in(e) or "outside|(none)|[]"
        name, cls, shape = label.split("|", 2)
        kind, ms = kernel_kind(e.get("name", "")), e.get("dur", 0) / 1000
        entry = per_module.setdefault(label, {"module": name, "class": cls, "input": shape, "ms": 0.0, "kinds": {}})
        entry["ms"] += ms
        entry["kinds"][kind] = entry["kinds"].get(kind, 0.0) + ms
        by_class = per_class.setdefault(cls, {"ms": 0.0, "kinds": {}})
        by_class["ms"] += ms
        by_class["kinds"][kind] = by_class["kinds"].get(kind, 0.0) + ms
        key = (cls, e.get("name", "")[:90])
        per_kernel[key] = per_kernel.get(key, 0.0) + ms
    return {"gpu_ms": sum(c["ms"] for c in per_class.values()),
            "classes": dict(sorted(per_class.items(), key=lambda kv: -kv[1]["ms"])),
            "modules": sorted(per_module.values(), key=lambda m: -m["ms"])[:40],
            "kernels_by_class": [{"class": c, "kernel": k, "ms": ms}
                                 for (c, k), ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:60]]}


def part_modules() -> dict:
    pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
    lq = random_images(512, torch.device("cuda"))
    options = dict(upscale=2.0, latent="mode", cuda_graphs=False)
    for _ in range(2):
        pipe(lq, **options)
    out = module_timeline(lambda: pipe(lq, **options), {"unet": pipe.models.unet, "vae": pipe.models.vae})
    print(f"modules: {out['gpu_ms']:.1f} ms of kernels", flush=True)
    for cls, entry in list(out["classes"].items())[:14]:
        print(f"  {cls}: {entry['ms']:.2f} ms " + json.dumps({k: round(v, 2) for k, v in entry["kinds"].items()}),
              flush=True)
    return out


def part_memory() -> dict:
    pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
    lq = random_images(512, torch.device("cuda"))
    out = {}
    for name, pixels in (("vae_graphs_off", 0), ("vae_graphs_on", VAE_GRAPH_MAX_PIXELS), ("vae_graphs_off_again", 0)):
        pipeline.VAE_GRAPH_MAX_PIXELS = pixels
        runtime_of(pipe.models).release_graphs()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            result = pipe(lq, upscale=2.0, latent="mode")
        torch.cuda.synchronize()
        out[name] = {"reserved_mib": torch.cuda.memory_reserved() / 2**20,
                     "allocated_mib": torch.cuda.memory_allocated() / 2**20,
                     "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                     "status": result.status_line()}
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "status"}), flush=True)
    pipeline.VAE_GRAPH_MAX_PIXELS = VAE_GRAPH_MAX_PIXELS
    return out


def part_cpu() -> dict:
    """Where the CPU time of a warm default (graphed) pass at 1024 goes: each call's time to queue the pass
    (restore(wait=False) returns once it is queued), and cProfile over five passes, the functions that took
    the most time of their own and in all."""
    import cProfile
    import io
    import pstats

    pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
    lq = random_images(512, torch.device("cuda"))
    options = pipeline.RestoreOptions(upscale=2.0)
    for _ in range(3):
        pipe(lq, options=options)
    queue_ms = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = pipeline.restore(pipe.models, lq, options, wait=False)
        queue_ms.append((time.perf_counter() - start) * 1000)
        torch.cuda.synchronize()
        result.pending()
    from hypir.attention import AttentionPolicy, AttentionRouter, text_encoder_implementation
    from hypir.cuda_graphs import weights_signature

    router = AttentionRouter(AttentionPolicy(), pipe.models.device, pipe.models.dtype)
    steps = {"weights_signature(unet)": lambda: weights_signature(pipe.models.unet),
             "weights_signature(vae)": lambda: weights_signature(pipe.models.vae),
             "memory_available": lambda: pipeline.memory_available(pipe.models.device),
             "plan_for": lambda: pipeline.plan_for(pipe.models, lq, options),
             "AttentionRouter()": lambda: AttentionRouter(AttentionPolicy(), pipe.models.device, pipe.models.dtype),
             "text_encoder_implementation": lambda: text_encoder_implementation(router)}
    step_ms = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        for _ in range(200):
            step()
        step_ms[name] = (time.perf_counter() - start) / 200 * 1000
    print("cpu steps (ms): " + json.dumps({k: round(v, 3) for k, v in step_ms.items()}), flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        pipe(lq, options=options)
    profiler.disable()
    out = {"queue_ms": statistics.median(queue_ms), "step_ms": step_ms, "status": result.status_line()}
    for order in ("tottime", "cumtime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(35)
        out[f"top_{order}"] = text.getvalue()
    print(f"cpu: {out['queue_ms']:.2f} ms to queue a pass (median of 10)", flush=True)
    return out


def part_batch() -> dict:
    """Photos of one size restored together: ms per image of a warm default pass at 1024 for batches of 1, 2
    and 4 (the same photo repeated), and how far each batch's images are from the batch of one (the latent's
    mode: a sampled latent draws other noise for the second photo of a batch than for a photo alone)."""
    pipe = HYPIRPipeline(build_models("sd21", torch.device("cuda"), torch.bfloat16))
    lq = random_images(512, torch.device("cuda"))
    out = {"rows": []}
    single = None
    for batch in (1, 2, 4):
        images = lq.expand(batch, -1, -1, -1).contiguous()
        runtime_of(pipe.models).release_graphs()
        for _ in range(2):
            pipe(images, upscale=2.0, latent="mode")
        times = []
        for _ in range(10):
            result = pipe(images, upscale=2.0, latent="mode")
            times.append(result.seconds * 1000)
        if single is None:
            single = result.images[:1]
        row = {"batch": batch, "ms": statistics.median(times), "ms_per_image": statistics.median(times) / batch,
               "psnr_vs_batch_1_db": min(psnr(result.images[i:i + 1], single) for i in range(batch)),
               "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "status": result.status_line()}
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "status"}), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--parts", default="kernels,pass")
    parser.add_argument("--smoke", action="store_true", help="the pass part's flow on the CPU, tiny models")
    parser.add_argument("--off", default=",".join(LEVERS_OFF),
                        help="the levers the pass part switches off one at a time; empty: all on only (a quick "
                             "comparison of two trees)")
    args = parser.parse_args()
    result = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__}

    def save(part: dict | None = None) -> None:  # as it goes: a run cut short keeps what it measured
        if part is not None:
            result["pass"] = part
        Path(args.json).write_text(json.dumps(result, indent=2))

    try:
        if "kernels" in args.parts and not args.smoke:
            result["kernels"] = part_kernels()
            save()
        if "upsample" in args.parts and not args.smoke:
            result["upsample"] = part_upsample() + part_upsample(scale=2)
            save()
        if "modules" in args.parts and not args.smoke:
            result["modules"] = part_modules()
            save()
        if "memory" in args.parts and not args.smoke:
            result["memory"] = part_memory()
            save()
        if "cpu" in args.parts and not args.smoke:
            result["cpu"] = part_cpu()
            save()
        if "batch" in args.parts and not args.smoke:
            result["batch"] = part_batch()
            save()
        if "pass" in args.parts:
            save(part_pass(save, args.smoke, tuple(name for name in args.off.split(",") if name)))
    finally:
        levers(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
