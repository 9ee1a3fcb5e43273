"""One settings table (hypir/settings.py): hypir_config.py mirrors it, and the command line's flags and the
ComfyUI nodes' inputs cover every setting with its default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import load_pack

from hypir import config
from hypir.cli import build_parser
from hypir.settings import DEFAULTS, SETTINGS, RestoreOptions

REPO = Path(__file__).resolve().parent.parent


def test_hypir_config_mirrors_the_defaults():
    spec = importlib.util.spec_from_file_location("hypir_config_under_test", REPO / "hypir_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.HYPIR_CONFIG == DEFAULTS


def test_every_setting_is_a_flag_with_its_default(monkeypatch):
    monkeypatch.delenv(config.CONFIG_FILE_ENV, raising=False)
    args = vars(build_parser().parse_args(["restore", "in.png", "-o", "out.png"]))
    for setting in SETTINGS:
        if setting.group == "models":  # repo ids and file names: hypir_config.py, --base and --weights
            continue
        assert setting.name in args, f"no flag for {setting.name}"
        assert args[setting.name] == setting.default, setting.name


def test_every_setting_is_a_node_input_with_its_default():
    nodes = load_pack("hypir_pack_settings").NODE_CLASS_MAPPINGS
    inputs = {**nodes["HYPIRModelLoader"].INPUT_TYPES()["required"], **nodes["HYPIRRestore"].INPUT_TYPES()["required"]}
    advanced = nodes["HYPIRAdvancedRestoration"].INPUT_TYPES()["required"]
    as_node = {"tile_size": lambda v: 0 if v == "auto" else v}
    for setting in SETTINGS:
        if setting.group == "models":
            continue
        for where in (inputs, advanced):
            assert setting.name in where, f"no node input for {setting.name}"
            default = where[setting.name][1]["default"]
            assert default == as_node.get(setting.name, lambda v: v)(setting.default), setting.name


def test_restore_options_default_to_the_settings():
    """The options take their defaults from SETTINGS (tile_size's "auto" is None there)."""
    options = RestoreOptions()
    assert options.tile_size is None and DEFAULTS["tile_size"] == "auto"
    assert options == RestoreOptions.from_settings(DEFAULTS)


def test_options_check_what_they_are_given():
    assert RestoreOptions().upscale == 2.0 and RestoreOptions(long_side=100).upscale is None
    assert RestoreOptions(tile_size="auto").tile_size is None
    with pytest.raises(ValueError, match="coeff_t must be an integer in 1..999, got 0"):
        RestoreOptions(coeff_t=0)
    with pytest.raises(ValueError, match="attention must be one of auto, flash_attn"):
        RestoreOptions(attention="fast")
    with pytest.raises(TypeError, match="unknown restore options \\['colour_fix'\\]"):
        RestoreOptions.from_settings(DEFAULTS, colour_fix=False)
    options = RestoreOptions.from_settings({**DEFAULTS, "seed": 7}, seed=None, prompt="a cat")
    assert (options.seed, options.prompt) == (7, "a cat")
