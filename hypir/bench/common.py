"""What both benches and the device scripts share: random SD2.1-architecture models placed as loaded ones are,
seeded test images, PSNR, GPU time per call (CUDA events), and the CUDA kernels a call launched (from
torch.profiler), each with its kind."""

from __future__ import annotations

import bisect
import math
import statistics
from typing import Callable

import torch

from ..kernels import start_triton_warm_up
from ..loading import HYPIRModels
from ..lora import lora_from_state_dict, merge_lora
from ..runtime import prepare

ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "softmax", "shifted_exp", "sdpa", "mha")  # not conv/gemm
# Kernel name fragments -> kind, first match wins (cuDNN/CUTLASS/Triton/ATen names on NVIDIA GPUs).
KERNEL_KINDS = (
    ("attention", ATTENTION_KERNEL_WORDS),
    ("convolution", ("conv", "fprop", "implicit_gemm", "xmma", "dgrad", "wgrad", "nchwtonhwc", "nhwctonchw")),
    ("group norm (Triton)", ("partial_stats", "merge_stats", "normalize", "row_stats")),
    ("group/layer norm (PyTorch)", ("group_norm", "groupnorm", "layer_norm", "layernorm")),
    ("bias and skip add (Triton)", ("channel_bias_add", "row_bias_add_stats")),  # the second: with GN statistics
    ("gated GELU (Triton)", ("gated_gelu",)),
    ("padding (Triton)", ("pad_end",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "ampere_", "cublas")),
    ("upsample", ("upsample",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "copy", "cat", "fill", "triton_")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in lowered for w in words)), "other")


def build_models(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> HYPIRModels:
    """Random SD2.1-architecture weights, placed and prepared as loaded models are (runtime.prepare)."""
    from .random_models import build_random_base, random_lora

    if device.type == "cuda":
        start_triton_warm_up()  # as load_weights does
    base = build_random_base(size, seed)
    if size != "sd21":  # a real-size rank-256 LoRA costs minutes to draw and nothing at run time once merged
        merge_lora(base.unet, lora_from_state_dict(random_lora(base.unet, rank=4, seed=seed), "random"), 1.0)
    for module in (base.text_encoder, base.unet, base.vae):
        torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    return prepare(HYPIRModels(base.tokenizer, base.text_encoder, base.unet, base.vae, base.alphas_cumprod, device,
                               dtype, 4, base.source, "random"))


def random_images(side: int, device: torch.device, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def gpu_ms(fn: Callable[[], object], calls: int = 1, groups: int = 5, sleep_cycles: int = 0) -> float:
    """GPU milliseconds per call of fn() (CUDA): after one warm-up call, `groups` groups of `calls` calls back to
    back, each group between two CUDA events; the median group. With `sleep_cycles`, a sleep kernel first holds
    the stream while the CPU queues each group, so that the events time the kernels alone (as a CUDA graph
    replays them), not the CPU's launches of short kernels."""
    fn()
    times = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def cuda_kernels(fn) -> list[tuple[str, float, int]]:
    """(name, GPU ms, calls) of every CUDA kernel that fn() launched, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.key, e.self_device_time_total / 1000, e.count) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def attention_kernel_names(fn) -> list[str]:
    return sorted({name for name, _, _ in cuda_kernels(fn) if kernel_kind(name) == "attention"})


def summarize_kernels(kernels: list[tuple[str, float, int]]) -> dict:
    """(name, ms, calls) per kernel -> ms and share per kind, and the 30 longest kernels."""
    total = sum(ms for _, ms, _ in kernels) or 1.0
    kinds: dict[str, dict] = {}
    for name, ms, calls in kernels:
        entry = kinds.setdefault(kernel_kind(name), {"ms": 0.0, "calls": 0})
        entry["ms"] += ms
        entry["calls"] += calls
    for entry in kinds.values():
        entry["share"] = entry["ms"] / total
    ordered = dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms"]))
    longest = [{"kernel": n[:160], "ms": ms, "calls": c} for n, ms, c in sorted(kernels, key=lambda k: -k[1])[:30]]
    return {"gpu_ms": total, "kinds": ordered, "longest": longest}


GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def trace_events(fn) -> list[dict]:
    """fn() under torch.profiler (CPU and CUDA activity, kernels inside CUDA graph replays included): the
    Chrome-trace events it exports."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text()).get("traceEvents", [])


def annotated_ranges(events: list[dict], prefix: str) -> list[tuple[float, float, str]]:
    """(start, end, name without the prefix) of the record_function ranges whose name starts with `prefix`,
    sorted by start."""
    return sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"][len(prefix):]) for e in events
                  if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name", "").startswith(prefix))


def launcher(events: list[dict], ranges: list[tuple[float, float, str]]) -> Callable[[dict], str | None]:
    """For a GPU activity event: the name of the innermost of the nested `ranges` (annotated_ranges) that holds
    the CPU call which launched it (matched by correlation id), or None."""
    launches = {e["args"]["correlation"]: e["ts"] for e in events if e.get("ph") == "X"
                and e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    starts = [start for start, _, _ in ranges]

    def innermost(activity: dict) -> str | None:
        ts = launches.get(activity.get("args", {}).get("correlation"))
        if ts is None:
            return None
        # walking back from the last range that started by then: the first still open is the innermost
        for index in range(bisect.bisect_right(starts, ts) - 1, -1, -1):
            if ranges[index][1] >= ts:
                return ranges[index][2]
        return None
    return innermost


def gpu_timeline(fn, prefix: str = "hypir.") -> dict:
    """fn() under torch.profiler: how busy the GPU was per pipeline stage (the "hypir.<stage>" ranges), from the
    trace (busy_by_stage)."""
    return busy_by_stage(trace_events(fn), prefix)


def busy_by_stage(events: list[dict], prefix: str = "hypir.", largest: int = 12) -> dict:
    """From Chrome-trace events (torch.profiler's export): each GPU activity (kernel, copy, fill) belongs to the
    stage whose CPU range launched it (its launch call's correlation id), else "outside". Walking the
    activities in time order, the idle time before one (after everything earlier ended) is charged to its stage:
    the GPU waited for that stage's launch. Returns the pass's wall window (first stage start to last activity
    end), busy and idle ms in it, per stage busy/idle ms and activity count, and the largest idle gaps with the
    activities either side."""
    ranges = annotated_ranges(events, prefix)
    launched_in = launcher(events, ranges)
    activities = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", ""), launched_in(e) or "outside") for e in events
                        if e.get("ph") == "X" and e.get("cat") in GPU_ACTIVITY)
    stages: dict[str, dict] = {name: {"busy_ms": 0.0, "idle_ms": 0.0, "activities": 0} for _, _, name in ranges}
    if not activities:
        return {"window_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "busy_fraction": 0.0, "stages": stages, "gaps": []}
    start = min(([ranges[0][0]] if ranges else []) + [activities[0][0]])
    frontier, previous, gaps = start, "(pass start)", []
    for begin, end, name, stage in activities:
        entry = stages.setdefault(stage, {"busy_ms": 0.0, "idle_ms": 0.0, "activities": 0})
        entry["activities"] += 1
        idle = max(0.0, begin - frontier)
        entry["idle_ms"] += idle / 1000
        entry["busy_ms"] += max(0.0, end - max(begin, frontier)) / 1000
        if idle > 0:
            gaps.append({"ms": idle / 1000, "stage": stage, "after": previous[:100], "before": name[:100]})
        if end > frontier:
            frontier, previous = end, name
    window = (frontier - start) / 1000
    busy = sum(entry["busy_ms"] for entry in stages.values())
    return {"window_ms": window, "busy_ms": busy, "idle_ms": window - busy,
            "busy_fraction": busy / window if window else 0.0, "stages": stages,
            "gaps": sorted(gaps, key=lambda g: -g["ms"])[:largest], "cpu": cpu_by_stage(events, ranges)}


def cpu_by_stage(events: list[dict], ranges: list[tuple], longest: int = 6) -> dict:
    """Per stage range: its CPU wall time, and the longest CPU operations and CUDA runtime calls inside it
    (inclusive times: an operation's time includes the ones it called). A stage whose GPU waited while its CPU
    ms exceed its GPU busy ms was launch-bound; these say where the CPU went."""
    calls = [(e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "")) for e in events
             if e.get("ph") == "X" and e.get("cat") in ("cpu_op", *LAUNCH_CATEGORIES)]
    out = {}
    for start, end, name in ranges:
        inside = sorted(((c_end - c_start) / 1000, c_name) for c_start, c_end, c_name in calls
                        if start <= c_start and c_end <= end)
        entry = out.setdefault(name, {"cpu_ms": 0.0, "longest": []})  # a stage run again (a retry) adds up
        entry["cpu_ms"] += (end - start) / 1000
        entry["longest"] = sorted(entry["longest"] + [{"ms": ms, "name": op[:100]} for ms, op in inside[::-1]],
                                  key=lambda c: -c["ms"])[:longest]
    return out
