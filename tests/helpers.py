"""What several test modules use: random model files, a natural-ish test image, a child process that gets
Ctrl-C as a terminal would deliver it. Imported as `from helpers import ...` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_pack(name: str):
    """The repository root imported as ComfyUI imports a custom-node folder, under `name`."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_random_model(root, size: str = "tiny"):
    """A random SD2.1-architecture diffusers folder of `size` and a rank-4 HYPIR LoRA file for it, in root."""
    from hypir.bench.random_models import write_random_model as write

    return write(root / f"{size}_sd", root / f"HYPIR_{size}.pth", size)


def smooth_image(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A natural-ish test image: low-resolution noise upsampled, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 8), max(2, width // 8), generator=gen)
    img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (img + 0.05 * torch.rand(batch, 3, height, width, generator=gen)).clamp(0, 1)


def default_sigint() -> None:
    """For Popen(preexec_fn=...): a child that gets Ctrl-C as a user's terminal would deliver it. A test run
    started as a background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
