"""`hypir bench --speed`: the fast paths against diffusers' stock modules, per output size, on one GPU: total and
stage times, peak memory, PSNR against float32, a run under a memory budget, the kernel each attention module
ran, and where the GPU time goes by kind of kernel."""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import REGISTRY, DeviceInfo, autotune_table, package_version
from ..errors import one_line
from ..kernels import kernel_fallbacks, triton_available
from ..loading import HYPIRModels, resolve_device, resolve_dtype
from ..pipeline import HYPIRPipeline
from .common import (attention_kernel_names, build_models, cuda_kernels, gpu_timeline, psnr, random_images,
                     summarize_kernels)

@dataclass(frozen=True)
class SpeedMode:
    options: dict  # RestoreOptions fields
    description: str


SPEED_MODES = {
    "eager": SpeedMode(dict(cuda_graphs=False), "fused kernels, per-shape attention, no CUDA graphs"),
    "eager+graphs": SpeedMode(dict(cuda_graphs=True), "the default: the UNet, and the VAE up to 1024x1024, as CUDA "
                                                      "graphs"),
    "pytorch-softmax": SpeedMode(dict(cuda_graphs=True, fused_softmax=False),
                                 "the default with PyTorch's softmax in the VAE attention instead of the fused one")
}


def stock_models(models: HYPIRModels, attention: str, dtype: torch.dtype | None = None) -> HYPIRModels:
    """The same weights in diffusers' stock modules (NCHW, PyTorch GroupNorm, diffusers' own attention
    processor: `AttnProcessor` for "standard", `AttnProcessor2_0` for "sdpa"): the baseline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    dtype = dtype or models.dtype
    processor = {"standard": AttnProcessor, "sdpa": AttnProcessor2_0}[attention]
    parts = []
    for cls, source in ((UNet2DConditionModel, models.unet), (AutoencoderKL, models.vae)):
        stock = cls.from_config(source.config)
        stock.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
        stock.set_attn_processor(processor())
        parts.append(torch.nn.Module.to(stock, device=models.device, dtype=dtype).eval().requires_grad_(False))
    text_encoder = models.text_encoder if dtype == models.dtype else \
        torch.nn.Module.to(copy.deepcopy(models.text_encoder), dtype=dtype)
    return HYPIRModels(models.tokenizer, text_encoder, parts[0], parts[1], models.alphas_cumprod, models.device,
                       dtype, models.lora_rank, models.base_source, f"{models.weights_source} (diffusers stock)")


def _time_pipeline(pipe: HYPIRPipeline, images: torch.Tensor, repeats: int, **options) -> dict:
    """Median wall time of whole calls (the pipeline synchronises at its end), median stage times from
    separate calls synchronised at each stage, peak allocated memory, the first call's time."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe(images, **options)
    first_ms = (time.perf_counter() - t0) * 1000
    pipe(images, **options)  # the second call of a shape captures the CUDA graph
    totals = []
    for _ in range(repeats):
        result = pipe(images, **options)
        totals.append(result.seconds * 1000)
    stages: dict[str, list[float]] = {}
    for _ in range(max(1, min(3, repeats))):
        staged = pipe(images, sync_stages=True, **options)
        for k, v in staged.stage_seconds.items():
            stages.setdefault(k, []).append(v * 1000)
    return {"total_ms": statistics.median(totals), "min_ms": min(totals), "first_call_ms": first_ms,
            "stage_ms": {k: statistics.median(v) for k, v in stages.items()},
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "result": result}


def run_speed(model: str = "sd21", sizes: tuple[int, ...] = (1024, 2048), modes: tuple[str, ...] = tuple(SPEED_MODES),
              baselines: tuple[str, ...] = ("standard", "sdpa"), budget_size: int | None = 4096,
              budget_gb: float = 8.0, repeats: int = 10, json_path: str | None = None, log=print) -> dict:
    """The numbers of the speed issue on one GPU, one process: every mode and baseline at every size."""
    device = resolve_device("cuda")
    dtype = resolve_dtype("auto", device)
    info = DeviceInfo.of(device)
    import diffusers

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "diffusers": diffusers.__version__, "triton": package_version("triton") if triton_available() else None}
    log(f"hypir bench --speed: {model} random weights, {dtype}, {info.name} ({info.sm}), {versions}")
    t0 = time.perf_counter()
    models = build_models(model, device, dtype)
    log(f"built models in {time.perf_counter() - t0:.1f} s")
    pipe = HYPIRPipeline(models)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": info.name, "capability": info.sm,
                    "versions": versions, "model": model, "dtype": str(dtype).removeprefix("torch."),
                    "repeats": repeats, "sizes": {}}
    for size in sizes:
        side = size // 2
        images = random_images(side, device)
        rows: dict[str, dict] = {}
        reference, reference_name = None, None
        for attention in ("standard", "sdpa"):  # the float32 path PSNR is measured against
            try:
                fp32 = HYPIRPipeline(stock_models(models, attention, torch.float32))
                reference = fp32(images, upscale=2, fused_kernels=False, cuda_graphs=False, oom_retry=False).images
                reference_name = f"diffusers stock {attention}, float32"
                break
            except torch.cuda.OutOfMemoryError:
                reference = None
            finally:
                fp32 = None
                torch.cuda.empty_cache()
        log(f"{size}: PSNR reference: {reference_name}")
        for name in baselines:
            stock = HYPIRPipeline(stock_models(models, name))
            rows[f"stock {name}"] = _measure(stock, images, repeats, reference, fused_kernels=False,
                                             cuda_graphs=False, oom_retry=False,
                                             description=f"diffusers' stock modules, {name} attention")
            stock = None
            torch.cuda.empty_cache()
            log(_row_line(size, f"stock {name}", rows[f"stock {name}"]))
        for mode in modes:
            speed_mode = SPEED_MODES[mode]
            rows[mode] = _measure(pipe, images, repeats, reference, description=speed_mode.description,
                                  oom_retry=False, **speed_mode.options)
            log(_row_line(size, mode, rows[mode]))
        busy = gpu_busy(pipe, images)
        log(f"{size}: {busy_line(busy)}")
        result["sizes"][str(size)] = {"input": side, "psnr_reference": reference_name, "rows": rows, "gpu_busy": busy}
        reference = None
        torch.cuda.empty_cache()
        _write(result, json_path)  # as it goes: a run cut short keeps what it measured
    if budget_size:
        default = SPEED_MODES["eager+graphs"]
        torch.cuda.empty_cache()
        row = _measure(pipe, random_images(budget_size // 2, device), 1, None,
                       description=f"{default.description}, VRAM budget {budget_gb:g} GiB", vram_budget_gb=budget_gb,
                       **default.options)
        row["budget_gb"] = budget_gb
        row["within_budget"] = row.get("peak_mib") is not None and row["peak_mib"] <= budget_gb * 1024
        result[f"budget_{budget_size}"] = row
        log(_row_line(budget_size, f"eager+graphs budget {budget_gb:g} GiB", row))
    first = random_images(sizes[0] // 2, device)
    result["attention"] = attention_table(pipe, first)
    mode_rows = {m: r for m, r in result["sizes"][str(sizes[0])]["rows"].items()
                 if m in SPEED_MODES and "total_ms" in r}
    fastest = min(mode_rows, key=lambda m: mode_rows[m]["total_ms"], default="eager+graphs")
    result["profile"] = {"mode": fastest, **time_by_kind(pipe, first, SPEED_MODES[fastest])}
    log(f"where the GPU time goes ({fastest}, the fastest mode, {sizes[0]}): " +
        ", ".join(f"{k} {v['ms']:.1f} ms" for k, v in result["profile"]["kinds"].items()))
    _write(result, json_path)
    if json_path:
        log(f"wrote {json_path}")
    return result


def _write(result: dict, json_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))


def _measure(pipe, images, repeats, reference, description="", **options) -> dict:
    try:
        timed = _time_pipeline(pipe, images, repeats, upscale=2, **options)
    except Exception as exc:  # noqa: BLE001 - out of memory (the standard baseline at 2048) is a result
        torch.cuda.empty_cache()
        return {"description": description, "error": one_line(exc)}
    out = timed.pop("result")
    row = {"description": description, **timed, "ran": out.report.backends_by_role(),
           "tiles": out.tile_size, "tile_stride": out.tile_stride, "speedups": out.speedups,
           "kernel_fallbacks": kernel_fallbacks()}
    if reference is not None:
        row["psnr_db"] = psnr(out.images, reference)
        row["max_abs_diff"] = (out.images.float() - reference.float()).abs().max().item()
    return row


def _row_line(size, name, row) -> str:
    if "error" in row:
        return f"{size:>5} {name:<28} {row['error']}"
    s = row["stage_ms"]
    psnr = f"{row['psnr_db']:.1f} dB" if "psnr_db" in row else "-"
    fallbacks = "".join(f", FALLBACK {k}: {v}" for k, v in row.get("kernel_fallbacks", {}).items())
    return (f"{size:>5} {name:<28} {row['total_ms']:8.1f} ms (enc {s.get('encode', 0):.1f}, unet {s.get('unet', 0):.1f}, "
            f"dec {s.get('decode', 0):.1f}) first {row['first_call_ms'] / 1000:.1f} s, peak {row['peak_mib']:.0f} MiB, "
            f"PSNR {psnr}{fallbacks}")


def time_by_kind(pipe: HYPIRPipeline, images: torch.Tensor, mode: SpeedMode = SPEED_MODES["eager+graphs"]) -> dict:
    """One pass of an eager mode under torch.profiler: GPU time per kind of kernel, and the 30 longest kernels."""
    options = {**mode.options, "cuda_graphs": False}  # the profiler sees kernels, not CUDA graph replays
    pipe(images, upscale=2, **options)
    torch.cuda.synchronize()
    return summarize_kernels(cuda_kernels(lambda: pipe(images, upscale=2, **options)))


def gpu_busy(pipe: HYPIRPipeline, images: torch.Tensor, mode: SpeedMode = SPEED_MODES["eager+graphs"]) -> dict:
    """One warm call of a mode (its CUDA graph captured first) under torch.profiler: how busy the GPU was in
    each stage and the largest idle gaps (common.busy_by_stage)."""
    for _ in range(2):
        pipe(images, upscale=2, **mode.options)
    return gpu_timeline(lambda: pipe(images, upscale=2, **mode.options))


def busy_line(busy: dict) -> str:
    cpu = busy.get("cpu", {})
    stages = ", ".join(f"{name} {entry['busy_ms']:.1f}/{entry['busy_ms'] + entry['idle_ms']:.1f}"
                       + (f"/{cpu[name]['cpu_ms']:.1f}" if name in cpu else "") + " ms"
                       for name, entry in busy["stages"].items())
    return (f"GPU busy {busy['busy_fraction']:.0%} of {busy['window_ms']:.1f} ms (per stage, GPU busy/with its idle "
            f"time/CPU time: {stages})")


def attention_table(pipe: HYPIRPipeline, images: torch.Tensor) -> dict:
    """Per attention module: its shape, the backend that ran it and the CUDA kernel that backend launched
    (from torch.profiler); per shape: every candidate's measured time."""
    report = pipe(images, upscale=2, cuda_graphs=False).report
    kernels: dict[tuple, list[str]] = {}
    modules = []
    for module, backend in sorted(report.per_module.items()):
        q_tokens, kv_tokens, heads, head_dim = report.shapes[module]
        key = (q_tokens, kv_tokens, heads, head_dim, backend.value)
        if key not in kernels:
            q = torch.randn(1, q_tokens, heads, head_dim, device=images.device, dtype=pipe.models.dtype)
            kv = torch.randn(1, kv_tokens, heads, head_dim, device=images.device, dtype=pipe.models.dtype)
            run = functools.partial(REGISTRY[backend].fn, q, kv, kv, head_dim ** -0.5)
            run()
            torch.cuda.synchronize()
            kernels[key] = attention_kernel_names(run)
        modules.append({"module": module, "shape": [q_tokens, kv_tokens, heads, head_dim], "backend": backend.value,
                        "kernels": kernels[key]})
    timings = [{"shape": shape.describe(), "times_ms": {b.value: t for b, t in timing.times.items()},
                "errors": {b.value: e for b, e in timing.errors.items()},
                "winner": timing.winner.value if timing.winner else None, "stored": timing.stored}
               for shape, timing in autotune_table().items()]
    return {"modules": modules, "per_shape_timings": timings}
