"""Attention for HYPIR: kernels registered with their constraints (backends.py), the per-shape timing
(tuning.py), the router that picks a kernel per module and call (router.py), the diffusers processor that asks
it (processor.py), and the report of what ran (report.py).

Nothing here changes global state: the SDPA kernels are called through their own ATen operators instead of
``torch.nn.attention.sdpa_kernel`` (which flips process-wide flags), and the router of the current call is
carried by a :class:`contextvars.ContextVar`. Under ``auto`` on CUDA with FlashAttention on, each attention
shape's kernel is chosen by timing (the ``attention_autotune`` setting switches that off).
"""

from ..attention_names import AUTO, AttentionBackend
from .backends import (ALL_DTYPES, CUDA_FALLBACK_ORDER, FLASH_ORDER, HALF_DTYPES, MATMUL_BLOCK_BYTES,
                       OTHER_FALLBACK_ORDER, REGISTRY, TUNED_ORDER, BackendSpec, DeviceInfo, dtype_name,
                       package_version, parse_backend, register, tuned_candidates, why_not)
from .processor import HYPIRAttnProcessor, install_processors
from .report import AttentionReport, build_report, flash_off_reason, text_encoder_implementation
from .router import AttentionPolicy, AttentionRouter, dispatch, use_router
from .tuning import AttentionShape, ShapeTiming, autotune_table, clear_autotune_cache, time_kernels

__all__ = [
    "AUTO", "AttentionBackend", "ALL_DTYPES", "CUDA_FALLBACK_ORDER", "FLASH_ORDER", "HALF_DTYPES",
    "MATMUL_BLOCK_BYTES", "OTHER_FALLBACK_ORDER", "REGISTRY", "TUNED_ORDER", "BackendSpec", "DeviceInfo",
    "dtype_name", "package_version", "parse_backend", "register", "tuned_candidates", "why_not", "HYPIRAttnProcessor",
    "install_processors", "AttentionReport", "build_report", "flash_off_reason", "text_encoder_implementation",
    "AttentionPolicy", "AttentionRouter", "dispatch", "use_router", "AttentionShape", "ShapeTiming",
    "autotune_table", "clear_autotune_cache", "time_kernels",
]
