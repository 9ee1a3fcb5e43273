"""HYPIR's weights: a peft-form rank-256 LoRA of the SD2.1 UNet, read without running code, checked against the
UNet, merged into its weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import describe_checkpoint, load_tensor_file, refuse_non_finite
from .errors import HYPIRLoadError


@dataclass
class LoRA:
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B)
    rank: int
    source: str


def read_lora(path: str | os.PathLike) -> LoRA:
    path = Path(path).expanduser()
    if not path.is_file():
        raise HYPIRLoadError(f"HYPIR weights not found at {path}: download HYPIR_sd2.pth from the Hugging Face "
                             f"repo lxq007/HYPIR (`hypir download`) and give its path")
    state = load_tensor_file(path, "HYPIR weights")
    refuse_non_finite(state.items(), str(path), "HYPIR weights")
    return lora_from_state_dict(state, str(path))


def lora_from_state_dict(state: dict[str, torch.Tensor], source: str) -> LoRA:
    """Pair up peft-form '<module>.lora_A[.adapter].weight' / lora_B tensors."""
    a_keys = {k[: k.index(".lora_A.")]: k for k in state if ".lora_A." in k}
    b_keys = {k[: k.index(".lora_B.")]: k for k in state if ".lora_B." in k}
    if not a_keys:
        raise HYPIRLoadError(f"{source}: this is {describe_checkpoint(list(state))}, not HYPIR weights (no "
                             f"'<module>.lora_A.default.weight' tensors). HYPIR weights are HYPIR_sd2.pth from "
                             f"lxq007/HYPIR; a base model goes in the base model slot")
    unpaired = sorted(set(a_keys) ^ set(b_keys))
    if unpaired:
        raise HYPIRLoadError(f"{source}: {len(unpaired)} LoRA modules lack their A or B half (e.g. {unpaired[0]}); "
                             f"the file is damaged or incomplete: download it again")
    pairs = {m: (state[a_keys[m]], state[b_keys[m]]) for m in a_keys}
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise HYPIRLoadError(f"{source}: LoRA ranks differ between modules ({sorted(ranks)}); not a HYPIR file")
    return LoRA(pairs, ranks.pop(), source)


def check_lora_against_unet(lora: LoRA, unet: torch.nn.Module) -> None:
    """Every LoRA pair must target an existing Linear/Conv2d of matching shape, and every module the
    HYPIR LoRA adapts must be present."""
    modules = dict(unet.named_modules())
    unexpected = [m for m in lora.pairs if m not in modules]
    mismatched = []
    for name, (a, b) in lora.pairs.items():
        module = modules.get(name)
        if module is None:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
            mismatched.append(f"{name}: LoRA {tuple(b.shape[:1]) + tuple(a.shape[1:2])} vs module "
                              f"{tuple(weight.shape[:2]) if weight is not None else 'no weight'}")
    targets = {"to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
               "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"}
    expected = [n for n, m in modules.items()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                and any(n == t or n.endswith("." + t) for t in targets)]
    missing = [n for n in expected if n not in lora.pairs]
    if unexpected or mismatched or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} of {len(expected)} adapted modules (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected modules (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:2]})")
        hint = ("it is a LoRA for a model of another shape (SD 1.5 or SDXL?)" if mismatched or unexpected
                else "the file is incomplete or for another model")
        raise HYPIRLoadError(f"{lora.source}: does not fit the SD2.1 UNet: {'; '.join(parts)}. Probably {hint}; "
                             f"HYPIR needs HYPIR_sd2.pth from lxq007/HYPIR")


@torch.no_grad()
def merge_lora(unet: torch.nn.Module, lora: LoRA, scale: float = 1.0) -> None:
    """W += scale * alpha/rank * (B @ A), computed in float32; HYPIR's alpha equals its rank."""
    check_lora_against_unet(lora, unet)
    modules = dict(unet.named_modules())
    for name, (a, b) in lora.pairs.items():
        weight = modules[name].weight
        a32, b32 = a.to(weight.device, torch.float32), b.to(weight.device, torch.float32)
        if a32.ndim == 4:  # conv: A (r, in, kh, kw), B (out, r, 1, 1)
            delta = torch.einsum("or,rikl->oikl", b32[:, :, 0, 0], a32)
        else:
            delta = b32 @ a32
        weight.copy_((weight.float() + scale * delta).to(weight.dtype))
