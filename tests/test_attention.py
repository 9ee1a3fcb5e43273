"""Attention backends: numerics on CPU, flash wiring through stand-in modules, selection under injected
conditions, the exact console and status lines, run-time fallback, and no global state touched."""

from __future__ import annotations

import sys
import threading
import types

import pytest
import torch
import torch.nn.functional as F

from hypir.attention import (REGISTRY, AttentionBackend, AttentionPolicy, AttentionReport, AttentionRouter,
                             DeviceInfo, build_report, use_router, dispatch)
from hypir.pipeline import HYPIRPipeline

A100 = DeviceInfo("cuda", (8, 0), "NVIDIA A100-SXM4-80GB")
H100 = DeviceInfo("cuda", (9, 0), "NVIDIA H100 80GB HBM3")
RTX2080 = DeviceInfo("cuda", (7, 5), "NVIDIA GeForce RTX 2080")
CPU = DeviceInfo("cpu")


def reference_attention(q, k, v, scale):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    return (torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v).transpose(1, 2)


def qkv(b, n, m, h, d, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=gen)
    k = torch.randn(b, m, h, d, generator=gen)
    v = torch.randn(b, m, h, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


CPU_BACKENDS = [b for b in AttentionBackend if REGISTRY[b].unavailable_reason(CPU) is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("shape", [(2, 300, 300, 4, 64), (2, 256, 77, 5, 64), (1, 1024, 1024, 1, 512)],
                         ids=["self", "cross", "vae"])
def test_cpu_backends_match_float64(backend, shape):
    b, n, m, h, d = shape
    q, k, v = qkv(b, n, m, h, d, seed=sum(shape))
    out = REGISTRY[backend].fn(q, k, v, d ** -0.5)
    ref = reference_attention(q, k, v, d ** -0.5)
    assert out.shape == (b, n, h, d)
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-5


def test_cpu_has_sdpa_and_standard():
    assert {AttentionBackend.SDPA, AttentionBackend.STANDARD} <= set(CPU_BACKENDS)


def test_restore_backends_agree_end_to_end(pipe, image_factory):
    lq = image_factory(1, 32, 40, seed=11)
    std = pipe(lq, upscale=2.0, attention="standard", latent="mode")
    sdpa = pipe(lq, upscale=2.0, attention="sdpa", latent="mode")
    assert set(std.report.per_module.values()) == {AttentionBackend.STANDARD}
    assert set(sdpa.report.per_module.values()) == {AttentionBackend.SDPA}
    rel = ((std.images - sdpa.images).norm() / std.images.norm()).item()
    assert rel <= 1e-5


# ---- stand-in FlashAttention packages ----------------------------------------------------------------

class StandIn:
    """flash_attn_func that checks what a real one requires: (B, N, H, D), fp16/bf16, last dim contiguous."""

    def __init__(self, fail: bool = False):
        self.calls = []
        self.fail = fail

    def __call__(self, q, k, v, softmax_scale=None, **kwargs):
        if self.fail:
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
        assert q.ndim == k.ndim == v.ndim == 4
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        assert q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:] and k.shape == v.shape
        self.calls.append((tuple(q.shape), tuple(k.shape), q.dtype))
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), scale=softmax_scale)
        return out.transpose(1, 2).to(q.dtype)


@pytest.fixture()
def flash_attn2(monkeypatch):
    stand_in = StandIn()
    module = types.ModuleType("flash_attn")
    module.__version__ = "2.8.3"
    module.flash_attn_func = stand_in
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return stand_in


@pytest.fixture()
def flash_attn4(monkeypatch):
    """flash-attn-4 installs `flash_attn` as a namespace package without flash_attn_func at its top."""
    stand_in = StandIn()
    namespace = types.ModuleType("flash_attn")
    namespace.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__version__ = "4.0.0b36"
    cute.flash_attn_func = lambda q, k, v, softmax_scale=None: (stand_in(q, k, v, softmax_scale), None)
    monkeypatch.setitem(sys.modules, "flash_attn", namespace)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return stand_in


@pytest.fixture(scope="module")
def bf16_models(tiny_files):
    from hypir.loading import load_models

    folder, weights = tiny_files
    return load_models(folder, weights, device="cpu", dtype="bf16")


def unet_pass(models, info, **policy):
    """One UNet call of the bf16 tiny model on a 64x64 latent (a 512 px image) under a router; bf16
    convolutions are slow on CPUs, so the stand-in tests run the UNet alone, and one test the whole pass."""
    router = AttentionRouter(AttentionPolicy(**policy), "cpu", models.dtype, info)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=gen).to(models.dtype)
    text = torch.randn(1, 77, 32, generator=gen).to(models.dtype)
    with use_router(router), torch.no_grad():
        out = models.unet(z, torch.tensor([200]), encoder_hidden_states=text).sample
    return out, router


def test_flash_attn2_wiring_and_exact_lines(bf16_models, flash_attn2, image_factory, caplog):
    pipe = HYPIRPipeline(bf16_models, device_info=A100)
    with caplog.at_level("INFO", logger="hypir"):
        result = pipe(image_factory(1, 32, 32), upscale=2.0, latent="mode")
    # (B, N, H, D) as flash-attn wants: the tiny UNet's first level has 2 heads of 8 over 64x64 tokens.
    assert ((1, 4096, 2, 8), (1, 4096, 2, 8), torch.bfloat16) in flash_attn2.calls
    assert ((1, 4096, 2, 8), (1, 77, 2, 8), torch.bfloat16) in flash_attn2.calls
    assert set(result.report.per_module.values()) == {AttentionBackend.FLASH_ATTN}
    assert result.report.status_line() == "FlashAttention: enabled (flash_attn 2.8.3)"
    messages = [r.getMessage() for r in caplog.records]
    assert "[HYPIR] FlashAttention 2.8.3 is available and will be used for acceleration." in messages
    assert "[HYPIR] FlashAttention 2 enabled for this enhancer." in messages
    assert "[HYPIR] FlashAttention 2 enabled for UNet2DConditionModel" in messages
    # A stand-in is not the flash-attn package transformers checks for: the text encoder says what it runs.
    assert "[HYPIR] FlashAttention 2 enabled for CLIPTextModel" not in messages
    assert any(m.startswith("[HYPIR] CLIPTextModel uses sdpa attention") for m in messages)
    assert torch.isfinite(result.images).all()


def test_flash_attn2_output_matches_sdpa(bf16_models, flash_attn2):
    flash, router = unet_pass(bf16_models, A100)
    sdpa, _ = unet_pass(bf16_models, A100, attention="sdpa")
    assert set(router.ran.values()) == {AttentionBackend.FLASH_ATTN}
    assert ((flash.float() - sdpa.float()).norm() / sdpa.float().norm()).item() < 2e-2  # bf16 rounding


def test_clip_line_when_transformers_runs_flash_attention_2(flash_attn2):
    report = AttentionReport(AttentionBackend.FLASH_ATTN, {"unet.x.attn1": AttentionBackend.FLASH_ATTN},
                             "flash_attention_2", None, [])
    lines = report.console_lines()
    assert lines[0] == "FlashAttention 2.8.3 is available and will be used for acceleration."
    assert "FlashAttention 2 enabled for CLIPTextModel" in lines


def test_flash_attn4_namespace_package(bf16_models, flash_attn4):
    router = AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, H100)
    assert router.unusable_reason(AttentionBackend.FLASH_ATTN, 64) == \
        "flash_attn.flash_attn_func not found (pip install flash-attn: a prebuilt wheel matching your torch and CUDA)"
    assert router.unusable_reason(AttentionBackend.FLASH_ATTN4, 64) is None
    assert router.unusable_reason(AttentionBackend.FLASH_ATTN4, 512) == "head_dim 512 > 128"
    _, router = unet_pass(bf16_models, H100, attention="flash_attn4")
    assert ((1, 4096, 2, 8), (1, 77, 2, 8), torch.bfloat16) in flash_attn4.calls
    assert build_report(router, "sdpa").status_line() == "FlashAttention: enabled (flash_attn4 4.0.0b36)"
    ampere = AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, A100)
    assert ampere.unusable_reason(AttentionBackend.FLASH_ATTN4, 64) == "GPU sm80 (NVIDIA A100-SXM4-80GB) is below sm90"


def _status(info, dtype, policy=AttentionPolicy()):
    router = AttentionRouter(policy, "cpu", dtype, info)
    for module, head_dim in (("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1", 64),
                             ("vae.mid_block.attentions.0", 512)):
        router.ran[module] = router.choose(module, head_dim)
    return build_report(router, "sdpa")


@pytest.mark.parametrize("info,dtype,policy,status", [
    (RTX2080, torch.float16, AttentionPolicy(),
     "FlashAttention: disabled (GPU sm75 (NVIDIA GeForce RTX 2080) is below sm80), using sdpa_efficient"),
    (CPU, torch.float32, AttentionPolicy(),
     "FlashAttention: disabled (CPU: FlashAttention needs an NVIDIA GPU), using sdpa"),
    (A100, torch.float32, AttentionPolicy(),
     "FlashAttention: disabled (fp32: FlashAttention needs fp16 or bf16), using sdpa_efficient"),
    (A100, torch.bfloat16, AttentionPolicy(use_flash_attention=False),
     "FlashAttention: disabled (switched off), using sdpa_efficient"),
    (A100, torch.bfloat16, AttentionPolicy("standard"),
     "FlashAttention: disabled (standard chosen), using standard"),
])
def test_status_under_injected_conditions(flash_attn2, info, dtype, policy, status):
    report = _status(info, dtype, policy)
    assert report.status_line() == status
    assert report.console_lines()[0].startswith("FlashAttention is not used (")
    assert not any("enabled" in line for line in report.console_lines())


def test_sm80_bf16_enables_flash_and_vae_falls_back(flash_attn2):
    report = _status(A100, torch.bfloat16)
    assert report.status_line() == "FlashAttention: enabled (flash_attn 2.8.3)"
    assert report.per_module["vae.mid_block.attentions.0"] == AttentionBackend.SDPA_EFFICIENT


def test_explicit_backend_overrides_switch(flash_attn2):
    router = AttentionRouter(AttentionPolicy("flash_attn", use_flash_attention=False), "cpu", torch.bfloat16, A100)
    assert router.choose("unet.attn1", 64) == AttentionBackend.FLASH_ATTN


def test_unknown_backend_named():
    with pytest.raises(ValueError, match="unknown attention backend 'flash2'; choose one of: auto, flash_attn"):
        AttentionPolicy("flash2")


def test_kernel_failure_falls_back_once_per_module(bf16_models, monkeypatch, caplog):
    failing = StandIn(fail=True)
    module = types.ModuleType("flash_attn")
    module.__version__ = "2.8.3"
    module.flash_attn_func = failing
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    with caplog.at_level("WARNING", logger="hypir"):
        out, router = unet_pass(bf16_models, A100, attention="flash_attn")
        with use_router(router), torch.no_grad():  # a second pass does not try the failed kernel again
            router.run("unet.x.attn1", *qkv(1, 8, 8, 2, 16, seed=0, dtype=torch.bfloat16), 0.25)
            router.run("unet.x.attn1", *qkv(1, 8, 8, 2, 16, seed=0, dtype=torch.bfloat16), 0.25)
    warned = [r.getMessage() for r in caplog.records if "flash_attn failed in" in r.getMessage()]
    assert len(warned) == len(router.ran)  # once per attention module
    assert all("FlashAttention only supports Ampere" in w for w in warned)
    report = build_report(router, "sdpa")
    assert report.status_line().startswith("FlashAttention: disabled (flash_attn failed at run time), using")
    expected, _ = unet_pass(bf16_models, CPU, attention="sdpa")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _global_attention_state():
    import diffusers.models.attention_processor as ap

    state = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
        "sdpa_fn": F.scaled_dot_product_attention,
        "torch_sdpa": torch.nn.functional.scaled_dot_product_attention,
        "attnproc": ap.AttnProcessor2_0.__call__,
        "attention_forward": ap.Attention.forward,
    }
    if hasattr(torch.backends.cuda, "cudnn_sdp_enabled"):
        state["cudnn"] = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        state["diffusers_backend"] = _AttentionBackendRegistry.get_active_backend()
    except (ImportError, AttributeError):
        pass
    return state


def test_no_global_state_changes(pipe, bf16_models, flash_attn2, image_factory):
    before = _global_attention_state()
    pipe(image_factory(1, 16, 16), upscale=2.0)
    unet_pass(bf16_models, A100)
    after = _global_attention_state()
    assert before == after
    # A call outside a HYPIR restore (another node using the same module) runs plain SDPA.
    q, k, v = qkv(1, 8, 8, 2, 16, seed=0)
    torch.testing.assert_close(dispatch("unet.x", q, k, v, 0.25),
                               F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                              scale=0.25).transpose(1, 2))


def test_two_callers_share_a_model_with_their_own_backends(pipe, image_factory):
    lq = image_factory(1, 16, 16, seed=1)
    results = {}
    barrier = threading.Barrier(2)

    def run(name):
        barrier.wait()
        results[name] = pipe(lq, upscale=2.0, attention=name, latent="mode")

    threads = [threading.Thread(target=run, args=(n,)) for n in ("standard", "sdpa")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results["standard"].report.per_module.values()) == {AttentionBackend.STANDARD}
    assert set(results["sdpa"].report.per_module.values()) == {AttentionBackend.SDPA}


def test_router_is_context_local():
    router = AttentionRouter(AttentionPolicy("standard"), "cpu", torch.float32, CPU)
    q, k, v = qkv(1, 8, 8, 2, 16, seed=1)
    seen = {}

    def other_thread():
        seen["other"] = dispatch("m", q, k, v, 0.25)

    with use_router(router):
        dispatch("m", q, k, v, 0.25)
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert router.ran == {"m": AttentionBackend.STANDARD}
