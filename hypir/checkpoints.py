"""SD2.1-base model files: a diffusers folder, a Hub id in the cache, or a single-file checkpoint (original LDM
layout, loaded with the configs and tokenizer bundled here); tensor files read without running code; what a
file that is not SD2.1-base seems to be."""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BASE_ALLOW_PATTERNS, HYPIRLoadError, one_line

logger = logging.getLogger("hypir")

BUNDLED_SD21_CONFIG = Path(__file__).resolve().parent / "configs" / "sd21_base"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

@dataclass
class BaseModel:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor  # float32, as diffusers' scheduler computes it
    source: str


def _looks_like_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and all((path / sub).is_dir() for sub in ("unet", "vae", "text_encoder"))


def locate_base_model(source: str | os.PathLike, allow_download: bool = False) -> Path:
    """A local folder or file for ``source``: a path, or a Hub id found in the cache (or downloaded)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).suffix:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, allow_patterns=BASE_ALLOW_PATTERNS, local_files_only=not allow_download))
        except LocalEntryNotFoundError:
            raise HYPIRLoadError(
                f"base model {text!r} is not in the Hugging Face cache and downloads are off. Run "
                f"`hypir download --base-only`, allow downloads (download_if_missing / --download), or "
                f"give a local SD2.1-base diffusers folder or v2-1_512-ema-pruned.safetensors") from None
    raise HYPIRLoadError(f"base model {text!r} not found: give a diffusers folder, an SD2.1-base single-file "
                         f"checkpoint (.safetensors/.ckpt), or a Hugging Face repo id")


V_PREDICTION_PROBE = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"  # LDM output_blocks.11.1...


def warn_if_v_prediction(unet: torch.nn.Module, source: str) -> bool:
    """SD2.1-768 (v-prediction) has the base's keys and shapes; ComfyUI tells them apart by the spread of
    one norm bias (std > 0.09 means v-prediction). HYPIR was trained on the 512 epsilon base."""
    bias = dict(unet.named_parameters()).get(V_PREDICTION_PROBE)
    by_weights = bias is not None and bias.float().std().item() > 0.09
    name = Path(str(source)).name.lower()
    by_name = "768" in name or "v-pred" in name or "vpred" in name
    if by_weights or by_name:
        logger.warning("[HYPIR] %s looks like the SD2.1 768 v-prediction model (%s); HYPIR was trained on "
                       "SD2.1-base (v2-1_512-ema-pruned, epsilon) and gives wrong colours and detail on it",
                       source, "weight statistics" if by_weights else "file name")
    return by_weights or by_name


def load_base_model(source: str | os.PathLike, allow_download: bool = False,
                    config_dir: str | os.PathLike = BUNDLED_SD21_CONFIG) -> BaseModel:
    """Load the SD2.1-base components in float32 on the CPU (the caller casts and moves them)."""
    path = locate_base_model(source, allow_download)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise HYPIRLoadError(f"{path}: not a checkpoint file (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        model = _load_single_file(path, Path(config_dir))
    elif _looks_like_diffusers_folder(path):
        model = _load_diffusers_folder(path)
    else:
        raise HYPIRLoadError(f"{path}: a folder, but not a diffusers model folder (it needs unet/, vae/ and "
                             f"text_encoder/ subfolders); give the folder of an SD2.1-base model or a single-file "
                             f"checkpoint")
    for component, name in ((model.unet, "unet"), (model.vae, "vae"), (model.text_encoder, "text_encoder")):
        refuse_non_finite(((f"{name}.{k}", v) for k, v in component.state_dict().items()), str(path),
                          "base model's weights")
    warn_if_v_prediction(model.unet, str(path))
    return model


def _alphas_cumprod(folder: Path) -> torch.Tensor:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    if scheduler.config.prediction_type != "epsilon":
        logger.warning("[HYPIR] %s: scheduler predicts %r; HYPIR was trained on the epsilon SD2.1-base",
                       folder, scheduler.config.prediction_type)
    return scheduler.alphas_cumprod.to(torch.float32)


def _load_diffusers_folder(folder: Path) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = dict(local_files_only=True, torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", attn_implementation="sdpa", **common)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **common)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **common)
    return BaseModel(tokenizer, text_encoder, unet, vae, _alphas_cumprod(folder), str(folder))


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a checkpoint file, without running code."""
    if path.suffix.lower() == ".safetensors":
        check_model_file(path, "base model")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise HYPIRLoadError(f"{path}: not a readable safetensors file ({exc})") from exc
    state = load_tensor_file(path, "base model")
    return list(state.keys())


def check_model_file(path: Path, role: str) -> None:
    """Refuse, with what the file seems to be and what to do, files that are not a complete model:
    empty, an HTML page or a Git-LFS pointer saved under a model's name, or truncated."""
    size = path.stat().st_size
    again = "delete it and download it again"
    if size == 0:
        raise HYPIRLoadError(f"{path}: the {role} file is empty (0 bytes); the download failed: {again}")
    with open(path, "rb") as f:
        head = f.read(1024)
        f.seek(max(0, size - 65536))
        tail = f.read()
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"{\"error")):
        raise HYPIRLoadError(f"{path}: this {role} file is a web page or an error message ({size} bytes), not a "
                             f"model: the link saved a page instead of the file. Download the file itself "
                             f"(the download button on the Hugging Face file page)")
    if head.startswith(b"version https://git-lfs"):
        raise HYPIRLoadError(f"{path}: this {role} file is a Git LFS pointer ({size} bytes), not the model: the "
                             f"repository was cloned without git-lfs. Run `git lfs pull` there, or download the file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import json
        import struct

        header_len = struct.unpack("<Q", head[:8])[0] if size >= 8 else 0
        if size < 8 or 8 + header_len > size:
            raise HYPIRLoadError(f"{path}: truncated safetensors {role} file ({size} bytes, header incomplete): {again}")
        with open(path, "rb") as f:
            f.seek(8)
            try:
                header = json.loads(f.read(header_len))
            except ValueError as exc:
                raise HYPIRLoadError(f"{path}: not a safetensors file (unreadable header: {exc})") from exc
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise HYPIRLoadError(f"{path}: truncated {role} file: {size} of {8 + header_len + end} bytes: {again}")
    elif suffix in (".pth", ".pt", ".ckpt", ".bin"):
        if head.startswith(b"PK\x03\x04"):
            if b"PK\x05\x06" not in tail:
                raise HYPIRLoadError(f"{path}: truncated {role} file ({size} bytes; the end of its zip archive is "
                                     f"missing): {again}")
        elif not head.startswith(b"\x80"):
            raise HYPIRLoadError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle); "
                                 f"it is {size} bytes starting with {head[:16]!r}")


def load_tensor_file(path: Path, role: str = "model") -> dict[str, torch.Tensor]:
    """A dict of tensors from .safetensors or a torch file, never running pickled code."""
    path = Path(path)
    check_model_file(path, role)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise HYPIRLoadError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise HYPIRLoadError(
            f"{path}: refused: this file holds Python objects that would run code when loaded "
            f"({str(exc).splitlines()[0] if str(exc) else 'unsupported global'}). Nothing was run. Model files "
            f"hold only tensors: use the original file or a .safetensors copy") from exc
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise HYPIRLoadError(
            f"{path}: cannot be read as a torch tensor file without running code "
            f"({one_line(exc)})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HYPIRLoadError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return state


def describe_checkpoint(keys: list[str]) -> str:
    """What a set of tensor names looks like, for error messages."""
    joined = keys[:2000]
    if any(k.startswith("conditioner.embedders.") for k in joined):
        return "an SDXL checkpoint"
    if any(k.startswith("cond_stage_model.transformer.") for k in joined):
        return "a Stable Diffusion 1.x checkpoint (CLIP ViT-L text encoder)"
    if any(k.startswith("cond_stage_model.model.") for k in joined):
        return "a Stable Diffusion 2.x checkpoint"
    if any(k.startswith("model.diffusion_model.") for k in joined):
        return "a Stable Diffusion UNet checkpoint without a text encoder"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in joined):
        return "a kohya-style LoRA for Stable Diffusion"
    if any(".lora_A." in k or ".lora_B." in k for k in joined):
        return "a PEFT LoRA (HYPIR's format)"
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in joined):
        return "a diffusers UNet state dict"
    return "not a Stable Diffusion or HYPIR file"


def _load_single_file(path: Path, config_dir: Path) -> BaseModel:
    from diffusers import StableDiffusionPipeline

    keys = checkpoint_keys(path)
    kind = describe_checkpoint(keys)
    if kind != "a Stable Diffusion 2.x checkpoint":
        raise HYPIRLoadError(f"{path}: this is {kind}; HYPIR needs the Stable Diffusion 2.1-base checkpoint "
                             f"(v2-1_512-ema-pruned.safetensors) or an SD2.1-base diffusers folder")
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.text_encoder.config._attn_implementation = "sdpa"
    return BaseModel(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, _alphas_cumprod(config_dir), str(path))


def refuse_non_finite(named_tensors, source: str, role: str) -> None:
    """HYPIRLoadError naming the file and the first tensor that holds NaN or infinite values: such weights turn
    every output black or grey."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise HYPIRLoadError(f"{source}: the {role} are damaged: tensor {name} holds {bad} NaN or infinite values "
                                 f"(of {tensor.numel()}); download the file again")
