"""web/hypir_migrate.js under Node: a UI workflow saved before the loader's torch_compile input was removed
loads with each value on its own widget (the VRAM budget keeps its number instead of the switch's false)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import load_pack

REPO = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the frontend module")

NODES = load_pack("hypir_pack_web_migration").NODE_CLASS_MAPPINGS


def widgets(node_type: str) -> list[str]:
    """The node's widgets as the frontend lists them: its inputs but links, and the seed's control after it."""
    names = []
    for name, spec in NODES[node_type].INPUT_TYPES()["required"].items():
        if isinstance(spec[0], list) or spec[0] in ("STRING", "INT", "FLOAT", "BOOLEAN"):
            names += [name, "control_after_generate"] if name == "seed" else [name]
    return names


LOADER = widgets("HYPIRModelLoader")


def migrate(node_type: str, names: list[str], values: list):
    script = ("import { migrateWidgetValues } from %s;\n"
              "console.log(JSON.stringify(migrateWidgetValues(%s, %s, %s)));"
              % (json.dumps((REPO / "web" / "hypir_migrate.js").as_uri()), json.dumps(node_type), json.dumps(names),
                 json.dumps(values)))
    done = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_loader_saved_with_torch_compile_gets_its_budget_back():
    saved = ["v2-1_512-ema-pruned.safetensors", "HYPIR_sd2.pth", "auto", "auto", True, False, 1.0, True, True,
             True, True, False, 6.5]  # ..., cuda_graphs, torch_compile, vram_budget_gb
    assert migrate("HYPIRModelLoader", LOADER, saved) == saved[:11] + [6.5]


def test_the_all_in_one_node_saved_with_torch_compile():
    names = widgets("HYPIRAdvancedRestoration")
    today = [f"value {i}" for i in range(len(names))]
    graphs = names.index("cuda_graphs")
    saved = today[:graphs + 1] + [True] + today[graphs + 1:]
    assert migrate("HYPIRAdvancedRestoration", names, saved) == today
    shown = saved + ["FlashAttention: enabled (...)"]  # an older frontend also saved the status text
    assert migrate("HYPIRAdvancedRestoration", names, shown) == today


def test_today_s_workflows_and_other_layouts_are_left_alone():
    today = ["v2-1_512-ema-pruned.safetensors", "HYPIR_sd2.pth", "auto", "auto", True, False, 1.0, True, True,
             True, True, 6.5]
    assert migrate("HYPIRModelLoader", LOADER, today) is None
    odd = today[:11] + ["not a switch", 6.5]  # one value too many, but not the removed switch's
    assert migrate("HYPIRModelLoader", LOADER, odd) is None
    assert migrate("HYPIRRestore", ["prompt"], ["", 1]) is None


def test_the_example_workflows_match_the_nodes_of_today():
    """The UI examples shipped in example_workflows/ hold one value per widget of today's loader."""
    for path in (REPO / "example_workflows").glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "HYPIRModelLoader":
                values = node["widgets_values"]
                assert len(values) == len(LOADER), path
                graphs = LOADER.index("cuda_graphs")  # and as saved before the switch went: migrated back
                assert migrate("HYPIRModelLoader", LOADER, values[:graphs + 1] + [False] + values[graphs + 1:]) == values
