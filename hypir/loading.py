"""Loading: the SD2.1 base (diffusers folder, Hub id, single file), HYPIR weights, LoRA merge, cache.

Nothing here downloads unless the caller passes ``allow_download=True``; untrusted files load without
running code (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cuda_graphs import GraphedCalls
from .errors import BASE_ALLOW_PATTERNS, HYPIRLoadError, one_line
from .kernels import triton_available

logger = logging.getLogger("hypir")

BUNDLED_SD21_CONFIG = Path(__file__).resolve().parent / "configs" / "sd21_base"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


# ----------------------------------------------------------------------------------------------
# Device and dtype


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
# Base model


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


# ----------------------------------------------------------------------------------------------
# HYPIR weights: a peft-form LoRA of the UNet


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


def refuse_non_finite(named_tensors, source: str, role: str) -> None:
    """HYPIRLoadError naming the file and the first tensor that holds NaN or infinite values: such weights turn
    every output black or grey."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise HYPIRLoadError(f"{source}: the {role} are damaged: tensor {name} holds {bad} NaN or infinite values "
                                 f"(of {tensor.numel()}); download the file again")


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


# ----------------------------------------------------------------------------------------------
# Loaded models and their cache


@dataclass
class HYPIRModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    lora_rank: int
    base_source: str
    weights_source: str
    text_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    prompt_cache: dict = field(default_factory=dict, repr=False)
    _vae_fp32: torch.nn.Module | None = field(default=None, repr=False)
    unet_graphs: GraphedCalls = field(default_factory=GraphedCalls, repr=False)  # CUDA graphs of the UNet call
    _compiled: dict = field(default_factory=dict, repr=False)

    def compiled(self, name: str, fn):
        """torch.compile(fn), once per name. Inductor keeps what it compiled on disk: a later process reuses
        it (TORCHINDUCTOR_CACHE_DIR, by default a folder in the user's cache), and skips most of the wait."""
        with self.text_lock:
            if name not in self._compiled:
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                      str(Path.home() / ".cache" / "hypir" / "torchinductor"))
                self._compiled[name] = torch.compile(fn, dynamic=False)
            return self._compiled[name]

    def vae_fp32(self) -> torch.nn.Module:
        """A float32 copy of the VAE, made on first need (fp16 overflow), for recomputing a stage."""
        with self.text_lock:
            if self._vae_fp32 is None:
                import copy

                self._vae_fp32 = copy.deepcopy(self.vae).float()
            return self._vae_fp32


def load_models(base: str | os.PathLike, weights: str | os.PathLike, device: str | torch.device = "auto",
                dtype: str | torch.dtype = "auto", lora_scale: float = 1.0, allow_download: bool = False,
                config_dir: str | os.PathLike = BUNDLED_SD21_CONFIG) -> HYPIRModels:
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    lora = read_lora(weights)
    model = load_base_model(base, allow_download=allow_download, config_dir=config_dir)
    merge_lora(model.unet, lora, lora_scale)
    install_fast_paths(model)
    place(model, device, dtype)
    logger.info("[HYPIR] loaded %s + %s (LoRA rank %d, scale %g) on %s as %s", model.source, lora.source,
                lora.rank, lora_scale, device, dtype)
    return HYPIRModels(model.tokenizer, model.text_encoder, model.unet, model.vae, model.alphas_cumprod, device,
                       dtype, lora.rank, model.source, lora.source)


def install_fast_paths(model) -> None:
    """Routed attention processors (attention.py) and fused GroupNorm blocks (fused_blocks.py) on the UNet and
    VAE. Both compute what diffusers' modules compute; each call picks its kernels."""
    from .attention import install_processors
    from .fused_blocks import install_fused_blocks

    for component, name in ((model.unet, "unet"), (model.vae, "vae")):
        install_processors(component, name)
        install_fused_blocks(component)


def place(model, device: torch.device, dtype: torch.dtype) -> None:
    """Move and cast the components for inference. torch.nn.Module.to, not diffusers' override, which
    warns about fp32-only modules even when a model has none."""
    for module in (model.text_encoder, model.unet, model.vae):
        torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    if device.type == "cuda" and triton_available():
        # cuDNN runs convolutions in NHWC: in channels_last it needs no transpose around each one, and the
        # fused GroupNorm reads either layout (PyTorch's own GroupNorm is slow in channels_last, so without
        # Triton the weights stay NCHW). Measured on an H100, 1024x1024 output: 133 ms NCHW, 109 ms channels_last.
        for module in (model.unet, model.vae):
            module.to(memory_format=torch.channels_last)


def _file_identity(source: str | os.PathLike) -> tuple:
    path = Path(source).expanduser()
    if path.exists():
        stat = path.stat()
        return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return (str(source),)


class ModelCache:
    """Loaded models keyed by (files, dtype, device, lora scale); one load per key, even under threads."""

    def __init__(self):
        self._models: dict[tuple, HYPIRModels] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def key(self, base, weights, device, dtype, lora_scale) -> tuple:
        device = resolve_device(device)
        return (_file_identity(base), _file_identity(weights), str(device), str(resolve_dtype(dtype, device)),
                float(lora_scale))

    def get(self, base, weights, device="auto", dtype="auto", lora_scale=1.0, allow_download=False,
            config_dir=BUNDLED_SD21_CONFIG) -> HYPIRModels:
        key = self.key(base, weights, device, dtype, lora_scale)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._models:
                self._models[key] = load_models(base, weights, device, dtype, lora_scale, allow_download, config_dir)
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)

    def evict(self, models: HYPIRModels) -> None:
        """Forget these loaded models (the caller drops its references to free their memory)."""
        with self._lock:
            for key in [k for k, v in self._models.items() if v is models]:
                del self._models[key]

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._locks.clear()


MODEL_CACHE = ModelCache()
