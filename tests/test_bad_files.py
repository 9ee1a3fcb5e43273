"""Bad model files end in one clear error that names the file, what it seems to be and what to do."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from hypir.checkpoints import load_base_model, warn_if_v_prediction
from hypir.errors import HYPIRLoadError
from hypir.lora import read_lora
from hypir.bench.random_models import build_random_base


@pytest.fixture()
def good_pth(tmp_path, tiny_files):
    return tiny_files[1]


def test_zero_byte(tmp_path):
    path = tmp_path / "HYPIR_sd2.pth"
    path.write_bytes(b"")
    with pytest.raises(HYPIRLoadError, match="HYPIR_sd2.pth: the HYPIR weights file is empty .0 bytes.*download it again"):
        read_lora(path)


def test_truncated_pth(tmp_path, good_pth):
    data = good_pth.read_bytes()
    path = tmp_path / "HYPIR_sd2.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HYPIRLoadError, match="truncated HYPIR weights file .*download it again"):
        read_lora(path)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "v2-1_512-ema-pruned.safetensors"
    save_file({"model.diffusion_model.x": torch.randn(1000), "cond_stage_model.model.y": torch.randn(10)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(HYPIRLoadError, match=r"truncated base model file: \d+ of \d+ bytes"):
        load_base_model(path)


@pytest.mark.parametrize("content,message", [
    (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>", "is a web page or an error message"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1040000000\n", "is a Git LFS pointer"),
    (b"hello, this is not a model", "not a PyTorch file"),
])
def test_not_a_model(tmp_path, content, message):
    path = tmp_path / "HYPIR_sd2.pth"
    path.write_bytes(content)
    with pytest.raises(HYPIRLoadError, match=message):
        read_lora(path)
    base = tmp_path / "v2-1_512-ema-pruned.safetensors"
    base.write_bytes(content)
    with pytest.raises(HYPIRLoadError):
        load_base_model(base)


@pytest.mark.parametrize("name,load", [("HYPIR_sd2.pth", read_lora), ("v2-1_512-ema-pruned.ckpt", load_base_model)])
def test_pickle_that_runs_code_runs_nothing(tmp_path, name, load):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / name
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(HYPIRLoadError, match="refused: this file holds Python objects that would run code.*Nothing "
                                             "was run"):
        load(path)
    assert not marker.exists()


@pytest.mark.parametrize("keys,kind", [
    (["conditioner.embedders.0.transformer.text_model.x", "model.diffusion_model.x"], "an SDXL checkpoint"),
    (["cond_stage_model.transformer.text_model.x", "model.diffusion_model.x"],
     "a Stable Diffusion 1.x checkpoint \\(CLIP ViT-L text encoder\\)"),
])
def test_checkpoint_of_another_model(tmp_path, keys, kind):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2) for k in keys}, str(path))
    with pytest.raises(HYPIRLoadError, match=f"this is {kind}; HYPIR needs the Stable Diffusion 2.1-base"):
        load_base_model(path)


def test_v_prediction_warning_from_weights_and_name(caplog):
    unet = build_random_base("tiny", 0).unet
    bias = dict(unet.named_parameters())["up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"]
    with torch.no_grad():
        bias.copy_(torch.randn_like(bias) * 0.02)
    with caplog.at_level("WARNING", logger="hypir"):
        assert warn_if_v_prediction(unet, "v2-1_512-ema-pruned.safetensors") is False
        assert caplog.text == ""
        with torch.no_grad():
            bias.copy_(torch.randn_like(bias) * 0.2)  # the spread of a v-prediction model
        assert warn_if_v_prediction(unet, "model.safetensors") is True
    assert "looks like the SD2.1 768 v-prediction model (weight statistics)" in caplog.text
    caplog.clear()
    with torch.no_grad():
        bias.zero_()
    with caplog.at_level("WARNING", logger="hypir"):
        assert warn_if_v_prediction(unet, "v2-1_768-ema-pruned.safetensors") is True
    assert "(file name)" in caplog.text


def test_base_weights_with_inf_are_refused_naming_the_tensor(tmp_path, tiny_files):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged_sd"
    shutil.copytree(tiny_files[0], folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet_file)
    state["conv_in.weight"][0, 0, 0, 0] = float("inf")
    save_file(state, unet_file)
    with pytest.raises(HYPIRLoadError, match=f"{folder}: the base model's weights are damaged: tensor "
                                             f"unet.conv_in.weight holds 1 NaN or infinite values"):
        load_base_model(folder)
