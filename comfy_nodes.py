"""ComfyUI nodes (classic V1 API): thin adapters over the `hypir` engine.

No math here: IMAGE (B, H, W, C) <-> (B, C, H, W), ComfyUI's model folders, progress bar and interrupt.
ComfyUI modules are imported inside the functions that need them, so the pack imports (and its tests
run) without ComfyUI.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import torch

from .hypir import config as _config
from .hypir.checkpoints import BUNDLED_SD21_CONFIG
from .hypir.errors import BASE_FOLDER, HYPIRLoadError
from .hypir.pipeline import Callbacks, HYPIRPipeline
from .hypir.runtime import MODEL_CACHE, runtime_of
from .hypir.settings import BY_NAME, RestoreOptions

logger = logging.getLogger("hypir")

CATEGORY = "HYPIR"
MODEL_FOLDER = "HYPIR"


MODEL_EXTENSIONS = {".pth", ".safetensors", ".pt", ".ckpt"}


def register_model_folder() -> None:
    """models/HYPIR in folder_paths, merged with extra_model_paths.yaml entries: the yaml key is
    case-sensitive, so paths under `hypir:` count too, and an entry the yaml made has no extensions yet."""
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI
        return
    import os

    registry = folder_paths.folder_names_and_paths
    paths, extensions = registry.get(MODEL_FOLDER, ([], set()))
    paths = list(paths)
    for alias in ("hypir", "Hypir"):
        paths += [p for p in registry.get(alias, ([], set()))[0] if p not in paths]
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    if default not in paths:
        paths.append(default)
    registry[MODEL_FOLDER] = (paths, set(extensions) | MODEL_EXTENSIONS)


def _folder_files(kind: str) -> list[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    try:
        return list(folder_paths.get_filename_list(kind))
    except KeyError:
        return []


def base_model_choices() -> list[str]:
    """SD2.1 single files in models/checkpoints and models/HYPIR, diffusers folders in models/diffusers."""
    register_model_folder()
    choices = [f"checkpoints/{f}" for f in _folder_files("checkpoints")]
    choices += [f"HYPIR/{f}" for f in _folder_files(MODEL_FOLDER) if "hypir" not in f.lower()]
    try:
        import os

        import folder_paths

        # Diffusers folders in models/diffusers, and in models/HYPIR where `hypir download --dir` puts the base.
        for kind in ("diffusers", MODEL_FOLDER):
            for root in folder_paths.get_folder_paths(kind):
                if os.path.isdir(root):
                    choices += [f"{kind}/{d}" for d in sorted(os.listdir(root))
                                if os.path.isdir(os.path.join(root, d, "unet"))]
    except (ImportError, KeyError):
        pass
    cfg = _config.load_config()
    preferred = [c for c in choices if c.endswith(cfg["base_model_file"])]
    return preferred + [c for c in choices if c not in preferred] or [cfg["base_model_file"]]


def weights_choices() -> list[str]:
    register_model_folder()
    files = [f for f in _folder_files(MODEL_FOLDER) if f.lower().endswith((".pth", ".safetensors", ".pt"))]
    hypir_first = sorted(files, key=lambda f: ("hypir" not in f.lower(), f))
    return hypir_first or [_config.load_config()["weights_file"]]


def resolve_base(choice: str, download: bool) -> str:
    import os

    import folder_paths

    kind, _, name = choice.partition("/")
    if kind == "checkpoints" or kind == MODEL_FOLDER:
        path = folder_paths.get_full_path(kind, name)
        if path:
            return path
    if kind in ("diffusers", MODEL_FOLDER):
        for root in folder_paths.get_folder_paths(kind):
            if os.path.isdir(os.path.join(root, name)):
                return os.path.join(root, name)
    cfg = _config.load_config()
    if download:
        from .hypir.model_files import download_base

        return str(download_base(os.path.join(folder_paths.get_folder_paths("diffusers")[0],
                                              BASE_FOLDER), cfg["base_model_repo"]))
    raise HYPIRLoadError(
        f"base model {choice!r} not found. Put the SD2.1-base checkpoint {cfg['base_model_file']} in "
        f"ComfyUI/models/checkpoints (or a diffusers folder in models/diffusers), or enable download_if_missing")


def resolve_weights(choice: str, download: bool) -> str:
    import folder_paths

    path = folder_paths.get_full_path(MODEL_FOLDER, choice)
    if path:
        return path
    cfg = _config.load_config()
    if download:
        from .hypir.model_files import download_weights

        return str(download_weights(folder_paths.get_folder_paths(MODEL_FOLDER)[0], cfg["weights_repo"],
                                    cfg["weights_file"]))
    raise HYPIRLoadError(
        f"HYPIR weights {choice!r} not found. Download {cfg['weights_file']} from "
        f"https://huggingface.co/{cfg['weights_repo']} into ComfyUI/models/{MODEL_FOLDER}/, or enable "
        f"download_if_missing")


class HYPIRModel:
    """What HYPIR_MODEL carries: the loaded models, their ComfyUI model patcher, and the loader's choices of how
    they run (attention, speed switches, memory budget), which every restore with them uses."""

    def __init__(self, pipeline: HYPIRPipeline, patcher, run_options: dict):
        self.pipeline = pipeline
        self.patcher = patcher
        self.run_options = run_options


# ---- ComfyUI model management: ComfyUI frees VRAM for HYPIR, offloads it when others need the GPU, and
#      releases it on Unload Models (POST /free).

_PATCHERS: dict[int, object] = {}


def _module_container():
    import torch

    class HYPIRComponents(torch.nn.Module):
        """The UNet, VAE and text encoder as one module, so that ComfyUI moves them together."""

        def __init__(self, models):
            super().__init__()
            self.unet, self.vae, self.text_encoder = models.unet, models.vae, models.text_encoder
            self._dtype = models.dtype
            self.hypir_models = models  # not a module: ComfyUI moves the three above

        def get_dtype(self):
            return self._dtype

    return HYPIRComponents


@functools.cache
def _patcher_class():
    import comfy.model_patcher

    class HYPIRModelPatcher(comfy.model_patcher.ModelPatcher):
        """ComfyUI's ModelPatcher for HYPIR's diffusers modules, which run only with all their weights on the GPU
        (they do not cast weights in on the fly as ComfyUI's own layers do):
        - loads are whole: ComfyUI's low-VRAM partial load would leave some modules on the CPU and the pass
          would fail on mixed devices; ComfyUI frees room by offloading other models first;
        - unloads are whole: asked to free part of HYPIR, it frees nothing, and ComfyUI unloads it entirely;
        - an unload also gives back the pass's own GPU memory (CUDA graphs and their activation pools, the fp32
          VAE copy, prompt embeddings), which would otherwise stay held until the next run."""

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            return super().load(device_to, lowvram_model_memory=0, force_patch_weights=force_patch_weights,
                                full_load=True)

        def patch_model_lowvram(self, device_to=None, lowvram_model_memory=0, *args, **kwargs):
            return self.patch_model(device_to)  # 2024 ComfyUI: its low-VRAM path, made a whole load

        def partially_unload(self, device_to, memory_to_free=0):
            return 0

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            result = super().unpatch_model(device_to, unpatch_weights=unpatch_weights)
            # An unload moves the weights to device_to with them restored (model_unload, detach); newer ComfyUI
            # also calls this with unpatch_weights=False on its way to loading more, which is no unload.
            if device_to is not None and unpatch_weights:
                self._release(f"unloaded by ComfyUI to {device_to}")
            return result

        def _release(self, what: str) -> None:
            graphs = runtime_of(self.model.hypir_models).clear()
            logger.info("[HYPIR] %s; released %d CUDA graph(s) and the pass's caches", what, graphs)

    return HYPIRModelPatcher


def model_patcher(models):
    """One ComfyUI ModelPatcher per loaded HYPIR model, created on first use."""
    import comfy.model_management as mm

    key = id(models)
    if key not in _PATCHERS:
        container = _module_container()(models)
        _PATCHERS[key] = _patcher_class()(container, load_device=models.device,
                                          offload_device=mm.unet_offload_device())
    return _PATCHERS[key]


def release(model: HYPIRModel) -> None:
    """Unload from ComfyUI and forget the models (unload_model_after)."""
    import comfy.model_management as mm

    for loaded in list(mm.current_loaded_models):
        if loaded.model is model.patcher:
            loaded.model_unload()
            mm.current_loaded_models.remove(loaded)
    _PATCHERS.pop(id(model.pipeline.models), None)
    runtime_of(model.pipeline.models).clear()  # CUDA graphs, the fp32 VAE: their memory goes with the model
    MODEL_CACHE.evict(model.pipeline.models)
    mm.soft_empty_cache()


LOADER_SETTINGS = ("attention", "use_flash_attention", "attention_autotune", "fused_kernels", "fused_softmax",
                   "cuda_graphs")  # how the models run: chosen on the loader, kept in HYPIR_MODEL


def load_hypir_model(base: str, weights: str, dtype: str, download_if_missing: bool, lora_scale: float = 1.0,
                     vram_budget_gb: float = 0.0, **run_options) -> HYPIRModel:
    import comfy.model_management as mm

    register_model_folder()
    base_path = resolve_base(base, download_if_missing)
    weights_path = resolve_weights(weights, download_if_missing)
    device = mm.get_torch_device()
    models = MODEL_CACHE.get(base_path, weights_path, device, dtype, lora_scale, allow_download=False,
                             config_dir=BUNDLED_SD21_CONFIG)
    return HYPIRModel(HYPIRPipeline(models), model_patcher(models),
                      {**run_options, "vram_budget_gb": vram_budget_gb or None})


@functools.cache
def _whole_load() -> dict:
    """load_models_gpu's request for a whole load, where this ComfyUI has it (2024-08 and newer)."""
    import inspect

    import comfy.model_management as mm

    return {"force_full_load": True} if "force_full_load" in inspect.signature(mm.load_models_gpu).parameters else {}


def run_restore(model: HYPIRModel, image, **inputs):
    """IMAGE (B, H, W, C) in [0, 1] -> restored IMAGE and the status line."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(300)
    stages = {"encode": 0, "unet": 100, "decode": 200}

    def progress(stage, done, total):
        bar.update_absolute(stages[stage] + int(100 * done / max(total, 1)), 300)

    options = RestoreOptions.from_settings(_config.load_config(), **model.run_options, **inputs)
    images = image.movedim(-1, 1)
    pipeline = model.pipeline
    # Ask ComfyUI for what the pass will need, from the engine's own plan (the processed size after the
    # short-side rule, tiles included) on this card's whole memory; ComfyUI offloads other models to make room
    # and brings HYPIR back to the GPU if it was offloaded.
    budget = options.vram_budget_gb or mm.get_total_memory(pipeline.models.device) / 2**30
    plan = pipeline.plan(images, options.replace(vram_budget_gb=budget))
    mm.load_models_gpu([model.patcher], memory_required=plan.total_bytes, **_whole_load())
    host = HostImage((images.shape[0], *plan.output_size, images.shape[1]), pipeline.models.device)
    result = pipeline(images, options=options,
                      callbacks=Callbacks(progress=progress, check_interrupt=mm.throw_exception_if_processing_interrupted))
    return host.fill(result.images.movedim(1, -1)), result.status_line()


class HostImage:
    """The CPU tensor a GPU result is copied into, ComfyUI's IMAGE (B, H, W, C) float32, made while the GPU works.

    Writing a new 48 MiB tensor (a 2048 output) first touches every page of it: on an H200 host `.cpu()` took
    30 ms that way against 3.6 ms into memory already touched (`benchmarks/image_handoff.py`), and the node ran
    35-55 ms beyond its pass. A thread allocates and touches the tensor during the pass (PyTorch's CPU fill
    releases the GIL); the copy after it is then only the transfer. At a 1024 output (12 MiB) the two copies cost
    the same (0.96 and 0.89 ms), so smaller images skip the thread. Pinned memory was not used: ComfyUI keeps
    every output, and PyTorch's pinned cache never gives memory back. If the pass raises, the tensor is dropped
    when the thread ends."""

    MIN_BYTES = 32 * 2**20

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.shape, self.tensor = shape, None
        self.thread = None
        if device.type == "cuda" and 4 * shape[0] * shape[1] * shape[2] * shape[3] >= self.MIN_BYTES:
            self.thread = threading.Thread(target=self._touch, name="hypir-host-image", daemon=True)
            self.thread.start()

    def _touch(self) -> None:
        self.tensor = torch.zeros(self.shape, dtype=torch.float32, device="cpu")  # writes every page

    def fill(self, images: torch.Tensor) -> torch.Tensor:
        if self.thread is None:
            return images.float().cpu()
        self.thread.join()
        if self.tensor is None or tuple(images.shape) != self.shape:  # not expected: the plan gave the size
            return images.float().cpu()
        return self.tensor.copy_(images)


def _setting(name: str, cfg: dict, **widget) -> tuple:
    """A node input for a setting of settings.py: its default from hypir_config.py, its help as the tooltip; the
    widget's range comes from the caller."""
    setting, default = BY_NAME[name], cfg[name]
    tooltip = widget.pop("tooltip", setting.help[:1].upper() + setting.help[1:])
    if setting.choices:
        return (list(setting.choices), {"default": default, "tooltip": tooltip, **widget})
    if isinstance(setting.default, bool):
        return ("BOOLEAN", {"default": default, "tooltip": tooltip, **widget})
    if isinstance(setting.default, float):
        return ("FLOAT", {"default": float(default), "tooltip": tooltip, **widget})
    if isinstance(setting.default, int):
        return ("INT", {"default": int(default), "tooltip": tooltip, **widget})
    return ("STRING", {"default": default, "tooltip": tooltip, **widget})


def _loader_inputs(cfg: dict) -> dict:
    return {
        "base_model": (base_model_choices(), {"tooltip": "Stable Diffusion 2.1-base: a single-file checkpoint "
                                                         "(models/checkpoints) or a diffusers folder (models/diffusers)"}),
        "hypir_weights": (weights_choices(), {"tooltip": "HYPIR_sd2.pth in models/HYPIR"}),
        "dtype": _setting("dtype", cfg),
        "attention": _setting("attention", cfg),
        "use_flash_attention": _setting("use_flash_attention", cfg),
        "download_if_missing": ("BOOLEAN", {"default": False, "tooltip": "Download missing models from the "
                                "Hugging Face Hub into ComfyUI's model folders"}),
        "lora_scale": _setting("lora_scale", cfg, min=0.0, max=2.0, step=0.05),
        "attention_autotune": _setting("attention_autotune", cfg),
        "fused_kernels": _setting("fused_kernels", cfg),
        "fused_softmax": _setting("fused_softmax", cfg),
        "cuda_graphs": _setting("cuda_graphs", cfg),
        "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                     "tooltip": "Plan tiles to keep HYPIR (models included) within this many GiB of "
                                                "VRAM; 0 = the GPU's free memory"}),
    }


class HYPIRModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _loader_inputs(_config.load_config())}

    RETURN_TYPES = ("HYPIR_MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, base_model, hypir_weights, dtype, download_if_missing, lora_scale=1.0, vram_budget_gb=0.0,
             **run_options):
        return (load_hypir_model(base_model, hypir_weights, dtype, download_if_missing, lora_scale, vram_budget_gb,
                                 **run_options),)


def _restore_inputs(cfg: dict) -> dict:
    tile = 0 if cfg["tile_size"] in (None, "auto") else int(cfg["tile_size"])
    return {
        "prompt": _setting("prompt", cfg, multiline=True),
        "upscale": _setting("upscale", cfg, min=0.25, max=16.0, step=0.05),
        "target_long_side": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 8,
                                     "tooltip": "Longest output side in pixels; 0 = use upscale"}),
        "seed": _setting("seed", cfg, min=0, max=2**63 - 1),
        "model_t": _setting("model_t", cfg, min=1, max=999),
        "coeff_t": _setting("coeff_t", cfg, min=1, max=999),
        "tile_size": ("INT", {"default": tile, "min": 0, "max": 8192, "step": 64,
                              "tooltip": "0 = auto: one pass when it fits in GPU memory, else the tile size that "
                                         "fits and runs fastest; N = tiles of N pixels of the processed image"}),
        "tile_stride": _setting("tile_stride", cfg, min=64, max=8192, step=8),
        "color_fix": _setting("color_fix", cfg),
        "latent": _setting("latent", cfg),
    }


def _restore_options(prompt, upscale, target_long_side, seed, model_t, coeff_t, tile_size, tile_stride, color_fix,
                     latent="sample") -> dict:
    """Node inputs -> RestoreOptions fields (0 means auto for the long side and the tile size)."""
    return dict(prompt=prompt, upscale=upscale, long_side=target_long_side or None, seed=seed, model_t=model_t,
                coeff_t=coeff_t, tile_size=tile_size or None, tile_stride=tile_stride, color_fix=color_fix,
                latent=latent)


class HYPIRRestore:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "Images to restore (a batch is processed together)"}),
                             "hypir_model": ("HYPIR_MODEL", {"tooltip": "From HYPIR Model Loader"}),
                             **_restore_inputs(_config.load_config())}}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "status")
    FUNCTION = "restore"
    CATEGORY = CATEGORY

    def restore(self, image, hypir_model, **inputs):
        out, status = run_restore(hypir_model, image, **_restore_options(**inputs))
        logger.info("[HYPIR] %s", status)
        return {"ui": {"text": [status]}, "result": (out, status)}


class HYPIRAdvancedRestoration(HYPIRRestore):
    """All in one: the restore inputs and the loader's (cached, shared with the loader), and a switch to free the
    models afterwards."""

    @classmethod
    def INPUT_TYPES(cls):
        cfg = _config.load_config()
        loader = {k: v for k, v in _loader_inputs(cfg).items() if k != "download_if_missing"}
        return {"required": {"image": ("IMAGE", {"tooltip": "Images to restore"}),
                             **_restore_inputs(cfg), **loader,
                             "unload_model_after": ("BOOLEAN", {"default": False, "tooltip": "Free the models "
                                                                "after this run (slower next time)"})}}

    FUNCTION = "restore_all"

    def restore_all(self, image, base_model, hypir_weights, dtype, unload_model_after, lora_scale=1.0,
                    vram_budget_gb=0.0, **inputs):
        start = time.perf_counter()
        run_options = {k: inputs.pop(k) for k in LOADER_SETTINGS if k in inputs}
        model = load_hypir_model(base_model, hypir_weights, dtype, False, lora_scale, vram_budget_gb, **run_options)
        try:
            out, status = run_restore(model, image, **_restore_options(**inputs))
        finally:
            if unload_model_after:
                release(model)
        logger.info("[HYPIR] %s (%.2f s with loading)", status, time.perf_counter() - start)
        return {"ui": {"text": [status]}, "result": (out, status)}


register_model_folder()

NODE_CLASS_MAPPINGS = {
    "HYPIRModelLoader": HYPIRModelLoader,
    "HYPIRRestore": HYPIRRestore,
    "HYPIRAdvancedRestoration": HYPIRAdvancedRestoration,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HYPIRModelLoader": "HYPIR Model Loader",
    "HYPIRRestore": "HYPIR Restore",
    "HYPIRAdvancedRestoration": "HYPIR Advanced Restoration",
}
