"""The repository root loads as a ComfyUI custom-node folder (the way ComfyUI imports it), without
ComfyUI's modules present and without putting generic module names on sys.path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_pack

REPO = Path(__file__).resolve().parent.parent

LOAD = f"""
import importlib.util, sys
before = set(sys.modules)
path = {str(REPO)!r}
spec = importlib.util.spec_from_file_location("ComfyUI-HYPIR", path + "/__init__.py",
                                              submodule_search_locations=[path])
module = importlib.util.module_from_spec(spec)
sys.modules["ComfyUI-HYPIR"] = module
spec.loader.exec_module(module)
print(sorted(module.NODE_CLASS_MAPPINGS))
print(sorted(module.NODE_DISPLAY_NAME_MAPPINGS.values()))
inputs = module.NODE_CLASS_MAPPINGS["HYPIRRestore"].INPUT_TYPES()["required"]
print(inputs["coeff_t"][1]["default"], inputs["model_t"][1]["default"], inputs["seed"][1]["default"])
added = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("hypir", "hypir_config", "comfy_nodes"))
print("top-level:", added)
"""


@pytest.mark.slow
def test_root_loads_as_custom_node_package():
    result = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "['HYPIRAdvancedRestoration', 'HYPIRModelLoader', 'HYPIRRestore']"
    assert lines[1] == "['HYPIR Advanced Restoration', 'HYPIR Model Loader', 'HYPIR Restore']"
    assert lines[2] == "200 200 231"  # defaults from hypir_config.py
    assert lines[3] == "top-level: []"  # only ComfyUI-HYPIR.* modules: nothing collides with other packs
    assert "Error" not in result.stderr and "Traceback" not in result.stderr


def test_every_input_has_a_tooltip():
    module = load_pack("hypir_pack_under_test")
    for name, node in module.NODE_CLASS_MAPPINGS.items():
        for key, spec_ in node.INPUT_TYPES()["required"].items():
            assert len(spec_) == 2 and spec_[1].get("tooltip"), f"{name}.{key} has no tooltip"


def test_host_image_is_touched_during_the_pass_and_filled_after(monkeypatch):
    """The node's IMAGE memory (ComfyUI's (B, H, W, C) float32 on the CPU) is made in a thread while the GPU
    works, then filled with the result; a result of another shape (not expected: the plan gives it) still comes
    back whole. Run here with CPU tensors standing for the GPU's: the thread and the copy are the same."""
    import torch

    module = load_pack("hypir_pack_host_image")
    result = torch.rand(2, 3, 12, 10)  # (B, C, H, W) as the pass returns it
    assert module.comfy_nodes.HostImage((2, 12, 10, 3), torch.device("cuda")).thread is None  # small: no thread
    monkeypatch.setattr(module.comfy_nodes.HostImage, "MIN_BYTES", 0)
    host = module.comfy_nodes.HostImage((2, 12, 10, 3), torch.device("cuda"))
    assert host.thread is not None  # started at once, before the pass
    image = host.fill(result.movedim(1, -1))
    assert image is host.tensor and image.dtype == torch.float32 and image.is_contiguous()
    assert torch.equal(image, result.movedim(1, -1))
    other = module.comfy_nodes.HostImage((2, 12, 10, 3), torch.device("cuda")).fill(result[:1].movedim(1, -1))
    assert torch.equal(other, result[:1].movedim(1, -1))
    on_cpu = module.comfy_nodes.HostImage((2, 12, 10, 3), torch.device("cpu"))
    assert on_cpu.thread is None and torch.equal(on_cpu.fill(result.movedim(1, -1)), result.movedim(1, -1))
