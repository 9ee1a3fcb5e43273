"""The attention backends' names, importable without torch: the command line lists them in --help and the
settings check them, before anything loads torch."""

from __future__ import annotations

import enum


class AttentionBackend(str, enum.Enum):
    FLASH_ATTN = "flash_attn"
    FLASH_ATTN3 = "flash_attn3"
    FLASH_ATTN4 = "flash_attn4"
    SDPA_CUDNN = "sdpa_cudnn"
    SDPA_FLASH = "sdpa_flash"
    SDPA_EFFICIENT = "sdpa_efficient"
    SDPA = "sdpa"
    SAGE = "sage"
    MATMUL = "matmul"
    STANDARD = "standard"


AUTO = "auto"
ATTENTION_CHOICES = (AUTO, *(b.value for b in AttentionBackend))
