"""What both benches share: random SD2.1-architecture models placed as loaded ones are, seeded test images,
PSNR, and the CUDA kernels a call launched (from torch.profiler), each with its kind."""

from __future__ import annotations

import math

import torch

from ..loading import HYPIRModels
from ..lora import lora_from_state_dict, merge_lora
from ..runtime import prepare

ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "softmax", "sdpa", "mha")  # not conv/gemm kernels
# Kernel name fragments -> kind, first match wins (cuDNN/CUTLASS/Triton/ATen names on NVIDIA GPUs).
KERNEL_KINDS = (
    ("attention", ATTENTION_KERNEL_WORDS),
    ("convolution", ("conv", "fprop", "implicit_gemm", "xmma", "dgrad", "wgrad", "nchwtonhwc", "nhwctonchw")),
    ("group norm (Triton)", ("partial_stats", "merge_stats", "normalize", "row_stats")),
    ("group/layer norm (PyTorch)", ("group_norm", "groupnorm", "layer_norm", "layernorm")),
    ("bias and skip add (Triton)", ("channel_bias_add",)),
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
