"""What a loaded model gathers while it runs, apart from its weights (loading.py): the prompt embeddings,
a float32 copy of the VAE for fp16 overflows, and the UNet's and VAE's CUDA graphs, each behind its own lock. Also where
the fast paths are put on the weights (`prepare`), and the process-wide cache of ready models that the command
line, the nodes and the Python API share.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from .attention import install_processors
from .checkpoints import BUNDLED_SD21_CONFIG
from .cuda_graphs import GraphedCalls
from .fused_blocks import install_fused_blocks
from .kernels import triton_available
from .loading import HYPIRModels, gpu_index, load_weights, resolve_device, resolve_dtype

logger = logging.getLogger("hypir")

MAX_PROMPTS = 16  # prompt embeddings kept per model


class Runtime:
    """Per-model state that is not weights. Thread-safe: each cache has its own lock."""

    def __init__(self):
        self._prompts: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._prompt_lock = threading.Lock()
        self._vae_fp32: torch.nn.Module | None = None
        self._vae_lock = threading.Lock()
        self.unet_graphs = GraphedCalls()  # locks itself
        self.vae_graphs = GraphedCalls(max_graphs=4)  # encode and decode of the last two sizes
        self._tile_group_limits: dict[int, int] = {}  # tile size -> most tiles sent together (after running out)
        self._tile_group_lock = threading.Lock()

    def tile_group_limits(self) -> dict[int, int]:
        """For each tile size whose tiles, sent through the models together, ran out of GPU memory here: the most
        that later passes send together."""
        with self._tile_group_lock:
            return dict(self._tile_group_limits)

    def tiles_ran_out(self, tile: int, group: int) -> int:
        """`group` tiles of `tile` px sent together ran out of memory: later passes send at most half as many
        (the planner's estimate was too low here; halving again after each failure takes a few passes at most
        to settle, where every pass would otherwise pay for the failed attempt first). Returns the new limit."""
        with self._tile_group_lock:
            limit = max(1, min(group, self._tile_group_limits.get(tile, group)) // 2)
            self._tile_group_limits[tile] = limit
            return limit

    def prompt_embedding(self, models: HYPIRModels, prompt: str, implementation: str) -> torch.Tensor:
        """(1, 77, hidden) text embedding, computed once per prompt and attention implementation."""
        key = (prompt, implementation)
        with self._prompt_lock:
            if key not in self._prompts:
                self._prompts[key] = _encode_prompt(models, prompt, implementation)
                while len(self._prompts) > MAX_PROMPTS:
                    self._prompts.popitem(last=False)
            return self._prompts[key]

    def vae_fp32(self, vae: torch.nn.Module) -> torch.nn.Module:
        """A float32 copy of the VAE, made on first need (an fp16 overflow), for recomputing a stage."""
        with self._vae_lock:
            if self._vae_fp32 is None:
                self._vae_fp32 = copy.deepcopy(vae).float()
            return self._vae_fp32

    def release_graphs(self) -> int:
        """Drop every CUDA graph; each one's private memory pool goes back with it (at the next empty_cache).
        Returns how many there were."""
        count = len(self.unet_graphs) + len(self.vae_graphs)
        self.unet_graphs.clear()
        self.vae_graphs.clear()
        return count

    def clear(self) -> int:
        """Give back what this runtime holds on the device (ComfyUI's unload). Returns how many CUDA graphs
        there were."""
        graphs = self.release_graphs()
        with self._vae_lock:
            self._vae_fp32 = None
        with self._prompt_lock:
            self._prompts.clear()
        return graphs


_RUNTIMES: "weakref.WeakKeyDictionary[HYPIRModels, Runtime]" = weakref.WeakKeyDictionary()
_RUNTIMES_LOCK = threading.Lock()


def runtime_of(models: HYPIRModels) -> Runtime:
    """The runtime of these loaded models (made on first use, dropped with them)."""
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(models)
        if runtime is None:
            runtime = _RUNTIMES[models] = Runtime()
        return runtime


def release_graphs_on(device: torch.device) -> int:
    """Drop the CUDA graphs of every loaded model on this device: what their pools keep reserved no eager
    allocation can use (a pass that ran out of memory retries without them). Returns how many were dropped."""
    def gpu(d: torch.device) -> tuple[str, int | None]:  # "cuda" and "cuda:0" are the same GPU
        return d.type, (gpu_index(d) if d.type == "cuda" else d.index)

    with _RUNTIMES_LOCK:
        runtimes = [runtime for models, runtime in _RUNTIMES.items() if gpu(models.device) == gpu(device)]
    return sum(runtime.release_graphs() for runtime in runtimes)


@torch.no_grad()
def _encode_prompt(models: HYPIRModels, prompt: str, implementation: str) -> torch.Tensor:
    tokenizer, limit = models.tokenizer, models.tokenizer.model_max_length
    tokens = tokenizer(prompt, padding="max_length", max_length=limit, truncation=False, return_tensors="pt").input_ids
    if tokens.shape[1] > limit:
        logger.warning("[HYPIR] prompt has %d tokens; only the first %d are used", tokens.shape[1], limit)
        tokens = tokenizer(prompt, padding="max_length", max_length=limit, truncation=True,
                           return_tensors="pt").input_ids
    encoder = models.text_encoder
    previous = encoder.config._attn_implementation
    encoder.config._attn_implementation = implementation
    try:
        return encoder(tokens.to(models.device))[0]
    finally:
        encoder.config._attn_implementation = previous


# ----------------------------------------------------------------------------------------------
# The fast paths on the weights


def prepare(models: HYPIRModels) -> HYPIRModels:
    """Put the fast paths on loaded weights: routed attention processors (attention/) and fused GroupNorm blocks
    (fused_blocks.py) in the UNet and VAE, and channels_last weights on CUDA with Triton. Each computes what
    diffusers' modules compute, and each call still picks its kernels. The command line, the nodes and the bench
    all get their models through here."""
    for component, name in ((models.unet, "unet"), (models.vae, "vae")):
        install_processors(component, name)
        install_fused_blocks(component)
    if models.device.type == "cuda" and triton_available():
        # cuDNN runs convolutions in NHWC: in channels_last it needs no transpose around each one, and the
        # fused GroupNorm reads either layout (PyTorch's own GroupNorm is slow in channels_last, so without
        # Triton the weights stay NCHW).
        for module in (models.unet, models.vae):
            module.to(memory_format=torch.channels_last)
    return models


def load_models(base: str | os.PathLike, weights: str | os.PathLike, device: str | torch.device = "auto",
                dtype: str | torch.dtype = "auto", lora_scale: float = 1.0, allow_download: bool = False,
                config_dir: str | os.PathLike = BUNDLED_SD21_CONFIG) -> HYPIRModels:
    """Load the weights (loading.load_weights) and prepare them to run."""
    return prepare(load_weights(base, weights, device, dtype, lora_scale, allow_download, config_dir))


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