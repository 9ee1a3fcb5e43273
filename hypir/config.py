"""The user's settings: the defaults of settings.py, overridden by the repository's ``hypir_config.py``.

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

from .settings import DEFAULTS, check_setting

logger = logging.getLogger("hypir")

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

# Keys of earlier versions: read with a warning and ignored, so that an older hypir_config.py still loads.
REMOVED_KEYS = {
    "torch_compile": "torch.compile was removed: the compiled pass was slower than the default (CUDA graphs and "
                     "the fused kernels; 82.1 against 80.4 ms at 1024 and 487.8 against 375.8 ms at 2048 on an H100) "
                     "and its first run of each size took minutes",
}


def load_config(path: Path | None = None) -> dict[str, Any]:
    """Built-in defaults updated with HYPIR_CONFIG from the config file; unknown keys are an error.
    The file is read again only when it changes."""
    path = path or config_file()
    if path is None:
        return copy.deepcopy(DEFAULTS)
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _read_config(path)
    return copy.deepcopy(_CACHE[key])


class ConfigError(ValueError):
    """hypir_config.py cannot be used: the message names the file, the line or key, and the fix."""


def _read_config(path: Path) -> dict[str, Any]:
    config = copy.deepcopy(DEFAULTS)
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
    for key in sorted(set(user) & set(REMOVED_KEYS)):
        logger.warning("[HYPIR] %s: HYPIR_CONFIG[%r] is ignored: %s; delete the line", path, key, REMOVED_KEYS[key])
    user = {k: v for k, v in user.items() if k not in REMOVED_KEYS}
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown HYPIR_CONFIG keys {unknown}; valid keys: {sorted(DEFAULTS)}")
    for key, value in user.items():
        try:
            config[key] = check_setting(key, value)
        except ValueError as exc:
            raise ConfigError(f"{path}: HYPIR_CONFIG[{key!r}] {exc}") from None
    return config
