"""HYPIR one-step image restoration with FlashAttention-class attention. No ComfyUI imports here."""

__version__ = "0.1.0"

from .attention import AttentionBackend, AttentionPolicy  # noqa: E402
from .loading import HYPIRLoadError, ModelCache, MODEL_CACHE, load_models  # noqa: E402
from .pipeline import Callbacks, HYPIRPipeline, RestoreResult, restore  # noqa: E402

__all__ = ["AttentionBackend", "AttentionPolicy", "Callbacks", "HYPIRLoadError", "HYPIRPipeline", "MODEL_CACHE",
           "ModelCache", "RestoreResult", "load_models", "restore", "__version__"]
