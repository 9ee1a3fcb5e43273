"""SD2.1-architecture models with random weights: the full size for `hypir bench` on a GPU, a small one
for the bench on a CPU, a tiny SD2-shaped one for tests. Nothing is downloaded; the tokenizer is the bundled SD2 tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoints import BUNDLED_SD21_CONFIG, BaseModel

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj")

# The SD2.1 layout (4 levels, 2 resnets a level, linear projections, cross-attention, a single-head
# VAE attention, 23-layer text model) at a few channels, so that every conversion and tiling path
# sees the real structure.
TINY_OVERRIDES = {
    "unet": {"block_out_channels": [16, 16, 32, 32], "attention_head_dim": [2, 2, 4, 4], "cross_attention_dim": 32,
             "norm_num_groups": 8, "sample_size": 64},
    "vae": {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 8},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "projection_dim": 32},
}


# Quarter width with head_dim 64 kept: the CPU default of `hypir bench`, which must finish in a minute.
SMALL_OVERRIDES = {
    "unet": {"block_out_channels": [128, 256, 512, 512], "attention_head_dim": [2, 4, 8, 8], "cross_attention_dim": 256},
    "vae": {"block_out_channels": [32, 64, 128, 128]},
    "text_encoder": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "projection_dim": 256},
}
SIZES = {"tiny": TINY_OVERRIDES, "small": SMALL_OVERRIDES, "sd21": {}}


def _read(folder: Path, sub: str, name: str) -> dict:
    return json.loads((folder / sub / name).read_text())


def write_config_folder(target: Path, size: str = "tiny") -> Path:
    """A config-only diffusers folder (model_index, component configs, scheduler, tokenizer)."""
    target = Path(target)
    shutil.copytree(BUNDLED_SD21_CONFIG, target, dirs_exist_ok=True)
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    for sub, overrides in SIZES[size].items():
        config = _read(target, sub, "config.json")
        config.update(overrides)
        (target / sub / "config.json").write_text(json.dumps(config, indent=2))
    return target


def build_random_base(size: str = "tiny", seed: int = 0, config_folder: Path | None = None) -> BaseModel:
    """Random-weight SD2.1-architecture components in float32 on the CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_config_folder(Path(config_folder or tmp), size)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
        text_config._attn_implementation = "sdpa"
        text_encoder = CLIPTextModel(text_config)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return BaseModel(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(),
                     scheduler.alphas_cumprod.to(torch.float32), f"random {size} SD2.1 (seed {seed})")


def random_lora(unet: torch.nn.Module, rank: int = 4, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A HYPIR-format (peft) LoRA state dict for every module HYPIR adapts."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            continue
        if isinstance(module, torch.nn.Linear):
            a_shape, b_shape = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            a_shape = (rank, module.in_channels, *module.kernel_size)
            b_shape = (module.out_channels, rank, 1, 1)
        else:
            continue
        state[f"{name}.lora_A.default.weight"] = torch.randn(a_shape, generator=gen) * std
        state[f"{name}.lora_B.default.weight"] = torch.randn(b_shape, generator=gen) * std
    return state


def save_diffusers_folder(base: BaseModel, target: Path, size: str = "tiny") -> Path:
    """Write random components as a loadable diffusers model folder."""
    target = Path(target)
    write_config_folder(target, size)
    base.unet.save_pretrained(target / "unet")
    base.vae.save_pretrained(target / "vae")
    base.text_encoder.save_pretrained(target / "text_encoder")
    return target


def write_random_model(folder: Path, weights: Path, size: str = "tiny", seed: int = 0) -> tuple[Path, Path]:
    """A random `size` SD2.1-architecture diffusers folder at `folder` and a rank-4 HYPIR LoRA file for it at
    `weights`, written once (kept when `weights` exists already)."""
    folder, weights = Path(folder), Path(weights)
    if not weights.exists():
        base = build_random_base(size, seed=seed)
        save_diffusers_folder(base, folder, size)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(random_lora(base.unet, rank=4, seed=seed), weights)
    return folder, weights
