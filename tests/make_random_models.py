"""Writes random-weight HYPIR models into a ComfyUI-style models folder, for the end-to-end test.

    python tests/make_random_models.py MODELS_DIR [tiny|sd21]

creates MODELS_DIR/diffusers/SIZE-sd21 (an SD2.1-architecture diffusers folder: a few channels wide for
`tiny`, the default; the real size for `sd21`) and MODELS_DIR/HYPIR/HYPIR_SIZE.pth (a rank-4 HYPIR-format LoRA
for it). Random weights only: nothing is downloaded. Run with the Python that runs ComfyUI (it needs torch,
diffusers and transformers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `hypir`

SIZES = ("tiny", "sd21")


def main(models_dir: str, size: str = "tiny") -> None:
    from hypir.bench.random_models import write_random_model

    models = Path(models_dir)
    for path in write_random_model(models / "diffusers" / f"{size}-sd21", models / "HYPIR" / f"HYPIR_{size}.pth", size):
        print(path)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in SIZES):
        sys.exit(__doc__)
    main(*sys.argv[1:])
