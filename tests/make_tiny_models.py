"""Writes tiny random-weight HYPIR models into a ComfyUI-style models folder, for the end-to-end test.

    python tests/make_tiny_models.py MODELS_DIR

creates MODELS_DIR/diffusers/tiny-sd21 (an SD2.1-shaped diffusers folder, a few channels wide) and
MODELS_DIR/HYPIR/HYPIR_tiny.pth (a rank-4 HYPIR-format LoRA for it). Random weights only: nothing is
downloaded. Run with the Python that runs ComfyUI (it needs torch, diffusers and transformers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `hypir`


def main(models_dir: str) -> None:
    import torch

    from hypir.bench.random_models import build_random_base, random_lora, save_diffusers_folder

    models = Path(models_dir)
    base = build_random_base("tiny", seed=0)
    save_diffusers_folder(base, models / "diffusers" / "tiny-sd21")
    (models / "HYPIR").mkdir(parents=True, exist_ok=True)
    torch.save(random_lora(base.unet, rank=4, seed=0), models / "HYPIR" / "HYPIR_tiny.pth")
    print(models / "diffusers" / "tiny-sd21")
    print(models / "HYPIR" / "HYPIR_tiny.pth")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
