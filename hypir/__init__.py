"""HYPIR one-step image restoration with FlashAttention-class attention. No ComfyUI imports here.

The public names are imported on first use, so that `hypir --help` and `hypir download` start without
loading torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AttentionBackend": "attention_names", "AttentionPolicy": "attention",
    "HYPIRLoadError": "errors", "HYPIRModels": "loading", "load_weights": "loading",
    "ModelCache": "runtime", "MODEL_CACHE": "runtime", "load_models": "runtime",
    "Callbacks": "pipeline", "HYPIRPipeline": "pipeline", "RestoreResult": "pipeline", "restore": "pipeline",
    "restore_files": "pipeline", "RestoreOptions": "settings",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hypir' has no attribute {name!r}")
