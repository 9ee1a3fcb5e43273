"""`hypir bench`: the HYPIR pass on random SD2.1-architecture weights, every attention backend against
`standard` in the same run, per stage, with peak memory and each output's difference from `standard`.

Random weights, no download: it runs offline. Times are medians of `repeats` runs (after a warm-up run on
a GPU), with the device synchronised at stage boundaries.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..attention import AttentionBackend, DeviceInfo, why_not
from ..errors import one_line
from ..loading import resolve_device, resolve_dtype
from ..pipeline import HYPIRPipeline
from .common import attention_kernel_names, build_models, kernel_kind, psnr, random_images, summarize_kernels
from .speed import SPEED_MODES, run_speed, stock_models

logger = logging.getLogger("hypir")



@dataclass
class BenchRow:
    backend: str
    ran: dict
    total_ms: float
    stage_ms: dict
    peak_mib: float | None
    max_abs_diff: float | None
    psnr_db: float | None
    kernels: list[str] = field(default_factory=list)
    error: str | None = None


def available_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    """Every backend: None when it can run here, else why not."""
    info = DeviceInfo.of(device)
    return {b.value: why_not(b, info, dtype, 64, device) for b in AttentionBackend}


def run_bench(model: str = "auto", output: int | None = None, backends: list[str] | None = None, device="auto",
              dtype="auto", repeats: int | None = None, profile: bool = False, json_path: str | None = None,
              upscale: float = 2.0, batch: int = 1, log=print) -> dict:
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    on_gpu = device.type == "cuda"
    if model == "auto":
        model = "sd21" if on_gpu else "small"
    output = output or (1024 if on_gpu else 512)
    repeats = repeats or (10 if on_gpu else 1)
    info = DeviceInfo.of(device)
    log(f"hypir bench: {model} random weights, {output}x{output} output from {int(output / upscale)}px input, "
        f"batch {batch}, {dtype}, {info.name or device.type} ({info.sm}), torch {torch.__version__}")

    t0 = time.perf_counter()
    models = build_models(model, device, dtype)
    log(f"built models in {time.perf_counter() - t0:.1f} s")
    pipe = HYPIRPipeline(models)
    images = random_images(int(output / upscale), device, batch)

    availability = available_backends(device, dtype)
    wanted = backends or [b for b, why in availability.items() if why is None]
    if "standard" not in wanted:
        wanted = ["standard", *wanted]
    else:
        wanted = ["standard", *[b for b in wanted if b != "standard"]]

    reference = None
    rows: list[BenchRow] = []
    for backend in wanted:
        run = lambda: pipe(images, upscale=upscale, attention=backend, tile_size="auto", sync_stages=True)  # noqa
        try:
            if on_gpu:  # warm-up: kernel selection, probes, allocator, JIT (a CPU has little to warm)
                run()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            totals, stages = [], {}
            for _ in range(repeats):
                result = run()
                totals.append(result.seconds * 1000)
                for k, v in result.stage_seconds.items():
                    stages.setdefault(k, []).append(v * 1000)
            peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
            out = result.images.float().cpu()
            if reference is None:
                reference = out
            kernels = attention_kernel_names(run) if (profile and on_gpu) else []
            rows.append(BenchRow(backend, result.report.backends_by_role(), statistics.median(totals), {k: statistics.median(v) for k, v in stages.items()},
                                 peak, (out - reference).abs().max().item(), psnr(out, reference), kernels))
        except Exception as exc:  # noqa: BLE001 - a backend that fails is a result of the benchmark
            rows.append(BenchRow(backend, {}, float("nan"), {}, None, None, None, [],
                                 one_line(exc)))
            if on_gpu:
                torch.cuda.empty_cache()

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": info.name or device.type, "capability": info.sm, "torch": torch.__version__,
        "model": model, "dtype": str(dtype).removeprefix("torch."), "output": [output, output], "batch": batch,
        "repeats": repeats, "availability": availability,
        "rows": [asdict(r) for r in rows],
    }
    log(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
        log(f"wrote {json_path}")
    return result


def format_table(result: dict) -> str:
    rows = result["rows"]
    base = next((r for r in rows if r["backend"] == "standard" and not r["error"]), None)
    head = f"{'backend':<15}{'total ms':>10}{'encode':>9}{'unet':>9}{'decode':>9}{'speedup':>9}{'peak MiB':>10}{'max|d|':>10}{'PSNR dB':>9}  runs"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['backend']:<15} failed: {r['error']}")
            continue
        s = r["stage_ms"]
        speed = base["total_ms"] / r["total_ms"] if base else float("nan")
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        psnr = "inf" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}"
        runs = ", ".join(f"{k}={v}" for k, v in r["ran"].items() if k != "text_encoder")
        lines.append(f"{r['backend']:<15}{r['total_ms']:>10.1f}{s.get('encode', 0):>9.1f}{s.get('unet', 0):>9.1f}"
                     f"{s.get('decode', 0):>9.1f}{speed:>8.2f}x{peak:>10}{r['max_abs_diff']:>10.2e}{psnr:>9}  {runs}")
        if r["kernels"]:
            lines.append(f"{'':<15}kernels: {'; '.join(k[:90] for k in r['kernels'])}")
    unavailable = {b: why for b, why in result["availability"].items() if why}
    if unavailable:
        lines.append("not available here: " + "; ".join(f"{b} ({why})" for b, why in unavailable.items()))
    return "\n".join(lines)


__all__ = ["run_bench", "format_table", "available_backends", "run_speed", "stock_models", "SPEED_MODES",
           "summarize_kernels", "kernel_kind"]


