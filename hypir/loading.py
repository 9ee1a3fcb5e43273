"""Loading the weights: the SD2.1 base (checkpoints.py) with the HYPIR LoRA merged (lora.py), cast and placed
on a device. Only weights: what a model gathers while it runs (prompt cache, CUDA graphs, the fp32 VAE)
and the fast paths installed on it live in runtime.py, which builds on this module and not the reverse.

Nothing here downloads unless the caller passes ``allow_download=True``; untrusted files load without
running code (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .checkpoints import BUNDLED_SD21_CONFIG, load_base_model
from .kernels import start_triton_warm_up
from .lora import merge_lora, read_lora

logger = logging.getLogger("hypir")


# ----------------------------------------------------------------------------------------------
# Device and dtype


def gpu_index(device: torch.device) -> int:
    """The index of a CUDA device: its own, or the current device's where it names none ("cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
    return torch.device(device)


DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, capability: tuple[int, int] | None = None
                  ) -> torch.dtype:
    """'auto': bf16 on sm80+, fp16 on older CUDA GPUs and on Apple MPS, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    if name != "auto":
        if name not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, bf16, fp16 or fp32")
        return DTYPE_NAMES[name]
    if device.type == "cuda":
        capability = capability or torch.cuda.get_device_capability(device)
        return torch.bfloat16 if capability >= (8, 0) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# Loaded weights


@dataclass(eq=False)  # compared and hashed by identity: runtime.py keeps per-model state keyed by it
class HYPIRModels:
    """The loaded components on their device and in their dtype, and the scheduler's alphas."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor  # float32
    device: torch.device
    dtype: torch.dtype
    lora_rank: int
    base_source: str
    weights_source: str


def load_weights(base: str | os.PathLike, weights: str | os.PathLike, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", lora_scale: float = 1.0, allow_download: bool = False,
                 config_dir: str | os.PathLike = BUNDLED_SD21_CONFIG) -> HYPIRModels:
    """The base model with the HYPIR LoRA merged, cast to `dtype` on `device`, ready for inference."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if device.type == "cuda":
        start_triton_warm_up()  # done before the weights are
    lora = read_lora(weights)
    model = load_base_model(base, allow_download=allow_download, config_dir=config_dir)
    merge_lora(model.unet, lora, lora_scale)
    for module in (model.text_encoder, model.unet, model.vae):
        # torch.nn.Module.to, not diffusers' override, which warns about fp32-only modules even when there are none
        torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("[HYPIR] loaded %s + %s (LoRA rank %d, scale %g) on %s as %s", model.source, lora.source,
                lora.rank, lora_scale, device, dtype)
    return HYPIRModels(model.tokenizer, model.text_encoder, model.unet, model.vae, model.alphas_cumprod, device,
                       dtype, lora.rank, model.source, lora.source)
