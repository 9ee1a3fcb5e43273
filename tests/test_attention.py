"""Attention backends: numerics on CPU, flash wiring through stand-in modules, selection under injected
conditions, the exact console and status lines, run-time fallback, and no global state touched."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

import hypir.attention.tuning as tuning_module
from hypir.attention import (CUDA_FALLBACK_ORDER, FLASH_ORDER, OTHER_FALLBACK_ORDER, REGISTRY, TUNED_ORDER,
                             AttentionBackend, AttentionPolicy, AttentionReport, AttentionRouter, AttentionShape,
                             DeviceInfo, autotune_table, build_report, clear_autotune_cache, use_router, dispatch,
                             why_not)
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


CPU_BACKENDS = [b for b in AttentionBackend if why_not(b, CPU, torch.float32, 64) is None]


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


def test_standard_attention_in_query_blocks_is_the_same_attention(monkeypatch):
    """`standard` holds at most STANDARD_MAX_SCORES scores at once (PyTorch's CUDA softmax is wrong from 2**32);
    blocks that do not divide the queries evenly give the same result as one block."""
    import hypir.attention.backends as backends

    q, k, v = qkv(2, 300, 77, 3, 16, seed=5)
    whole = REGISTRY[AttentionBackend.STANDARD].fn(q, k, v, 0.25)
    monkeypatch.setattr(backends, "STANDARD_MAX_SCORES", 2 * 3 * 77 * 7)  # 7 query rows a block: 43 blocks
    blocked = REGISTRY[AttentionBackend.STANDARD].fn(q, k, v, 0.25)
    ref = reference_attention(q, k, v, 0.25)
    assert blocked.shape == whole.shape == (2, 300, 3, 16)
    assert torch.allclose(blocked, whole, rtol=0, atol=1e-6)
    assert ((blocked.double() - ref).norm() / ref.norm()).item() <= 1e-6


def _float32_score_attention(q, k, v, scale):
    """What `matmul` computed before its scores went to fp16: float32 scores and softmax, bf16 probabilities."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).to(torch.bfloat16).float()
    return (probs @ v).transpose(1, 2).to(torch.bfloat16)


@pytest.mark.parametrize("logit_std", [0.4, 9.0, 100.0])
def test_matmul_attention_with_shifted_fp16_scores_against_float64(monkeypatch, logit_std):
    """`matmul`'s algorithm (a CUDA backend; its fp16 GEMMs run on the CPU too), in query blocks that do not
    divide the queries, with keys sampled one in ten, several heads. Where the logits are up to a few tens (std
    0.4 and 9), the fp16 scores cost nothing measurable: its error against float64 is within 15 % of rounding
    the exact result to bf16, below the float32 scores' with bf16 probabilities. At logits in the hundreds
    (std 100: nearly one-hot rows whose largest score the sample misses) the shifted scores lose precision: the
    error stays under what float32 scores gave at small logits."""
    import hypir.attention.backends as backends

    q, k, v = qkv(2, 300, 700, 3, 64, seed=7)
    q, k, v = ((q * logit_std ** 0.5).to(torch.bfloat16), (k * logit_std ** 0.5).to(torch.bfloat16),
               v.to(torch.bfloat16))
    monkeypatch.setattr(backends, "MATMUL_BLOCK_BYTES", 4 * 2 * 3 * 700 * 7)  # 7 query rows a block: 43 blocks
    monkeypatch.setattr(backends, "MATMUL_SAMPLED_KEYS", 64)  # every 10th key
    out = backends.shifted_fp16_attention(q, k, v, 64 ** -0.5)
    exact = reference_attention(q, k, v, 64 ** -0.5)
    error = lambda x: ((x.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert out.dtype == torch.bfloat16 and out.shape == (2, 300, 3, 64)
    before = error(_float32_score_attention(q, k, v, 64 ** -0.5))
    if logit_std < 10:
        assert error(out) <= 1.15 * error(exact.to(torch.bfloat16)) and error(out) < before
    else:
        assert error(out) < 2.5e-3


def test_matmul_attention_takes_fp16_scores_from_a_number_of_keys(monkeypatch):
    import hypir.attention.backends as backends

    taken = []
    monkeypatch.setattr(backends, "MATMUL_FP16_FROM_KEYS", 100)
    monkeypatch.setattr(backends, "shifted_fp16_attention", lambda *a: taken.append("fp16"))
    monkeypatch.setattr(backends, "float32_score_attention", lambda *a: taken.append("float32"))
    for keys in (99, 100, 1000):
        q, k, v = qkv(1, 8, keys, 1, 64, seed=9, dtype=torch.bfloat16)
        REGISTRY[AttentionBackend.MATMUL].fn(q, k, v, 0.125)
    assert taken == ["float32", "fp16", "fp16"]


def test_matmul_attention_scores_beyond_fp16_after_the_shift_give_nan_not_a_wrong_result():
    """Scores that overflow fp16 even after the shift (logits near a million) make NaN, which the pass reports
    as an error naming --dtype fp32, never a plausible wrong image."""
    import hypir.attention.backends as backends

    q, k, v = qkv(1, 16, 32, 1, 64, seed=8, dtype=torch.bfloat16)
    assert torch.isfinite(backends.shifted_fp16_attention(q, k, v, 0.125)).all()
    assert torch.isnan(backends.shifted_fp16_attention(q * 3000, k * 3000, v, 0.125)).any()


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

    def __init__(self, fail: bool = False, offset: float = 0.0):
        self.calls = []
        self.fail = fail
        self.offset = offset  # added to the output, so a test can tell which stand-in produced it
        self.attempts = 0

    def __call__(self, q, k, v, softmax_scale=None, **kwargs):
        self.attempts += 1
        if self.fail:
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
        assert q.ndim == k.ndim == v.ndim == 4
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        assert q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:] and k.shape == v.shape
        self.calls.append((tuple(q.shape), tuple(k.shape), q.dtype))
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), scale=softmax_scale)
        return (out.transpose(1, 2) + self.offset).to(q.dtype)


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
    from hypir.runtime import load_models

    folder, weights = tiny_files
    return load_models(folder, weights, device="cpu", dtype="bf16")


def unet_pass(models, info, timer=None, **policy):
    """One UNet call of the bf16 tiny model on a 64x64 latent (a 512 px image) under a router; bf16
    convolutions are slow on CPUs, so the stand-in tests run the UNet alone, and one test the whole pass."""
    router = AttentionRouter(AttentionPolicy(**policy), "cpu", models.dtype, info, timer=timer)
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
    assert router.why_not(AttentionBackend.FLASH_ATTN, 64) == \
        "flash_attn.flash_attn_func not found (pip install flash-attn: a prebuilt wheel matching your torch and CUDA)"
    assert router.why_not(AttentionBackend.FLASH_ATTN4, 64) is None
    assert router.why_not(AttentionBackend.FLASH_ATTN4, 512) == "head_dim 512 > 128"
    _, router = unet_pass(bf16_models, H100, attention="flash_attn4")
    assert ((1, 4096, 2, 8), (1, 77, 2, 8), torch.bfloat16) in flash_attn4.calls
    assert build_report(router, "sdpa").status_line() == "FlashAttention: enabled (flash_attn4 4.0.0b36)"
    ampere = AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, A100)
    assert ampere.why_not(AttentionBackend.FLASH_ATTN4, 64) == "GPU sm80 (NVIDIA A100-SXM4-80GB) is below sm90"


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

    import os
    import warnings

    state = {
        "environment": dict(os.environ),  # no TORCHINDUCTOR_CACHE_DIR or any other variable set for the user
        "warning_filters": list(warnings.filters),
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
    """A router is seen only by the calls of the context that set it: another thread, with its own router or
    none, never runs on it or is recorded in it."""
    router = AttentionRouter(AttentionPolicy("standard"), "cpu", torch.float32, CPU)
    own = AttentionRouter(AttentionPolicy("sdpa"), "cpu", torch.float32, CPU)
    q, k, v = qkv(1, 8, 8, 2, 16, seed=1)
    seen = {}

    def other_thread():
        seen["none"] = dispatch("thread.none", q, k, v, 0.25)  # no router here: plain SDPA
        with use_router(own):
            seen["own"] = dispatch("thread.own", q, k, v, 0.25)

    with use_router(router):
        dispatch("main", q, k, v, 0.25)
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        dispatch("main.after", q, k, v, 0.25)
    assert router.ran == {"main": AttentionBackend.STANDARD, "main.after": AttentionBackend.STANDARD}
    assert own.ran == {"thread.own": AttentionBackend.SDPA}
    assert set(seen) == {"none", "own"}
    torch.testing.assert_close(seen["none"], REGISTRY[AttentionBackend.SDPA].fn(q, k, v, 0.25), rtol=0, atol=0)


# ---- per-shape choice (auto on CUDA): timed once per shape through an injected timer ---------------------

# Every timed kernel that needs no package (the SDPA kernels, ...) gets a stand-in with its own output offset.
BUILTIN_STAND_INS = {b: float(i + 1) for i, b in enumerate(b for b in TUNED_ORDER if REGISTRY[b].package is None)}


@pytest.fixture()
def kernels(monkeypatch, flash_attn2):
    """Stand-ins for every kernel the per-shape timing measures on an A100 (flash-attn 2 as a package, the SDPA
    kernels in the registry), each adding its own offset to the output; and an empty process-wide cache."""
    stand_ins = {AttentionBackend.FLASH_ATTN: flash_attn2}
    for backend, offset in BUILTIN_STAND_INS.items():
        stand_in = StandIn(offset=offset)
        stand_ins[backend] = stand_in
        fn = lambda q, k, v, scale, s=stand_in: s(q, k, v, softmax_scale=scale)  # noqa: E731
        monkeypatch.setitem(REGISTRY, backend, dataclasses.replace(REGISTRY[backend], fn=fn))
    clear_autotune_cache()
    yield stand_ins
    clear_autotune_cache()


class FakeTimer:
    """Says `fastest(shape)` takes 1 ms and every other kernel longer; records what it was asked to time."""

    def __init__(self, fastest):
        self.fastest = fastest
        self.calls = []

    def __call__(self, backend, fn, q, k, v, scale):
        shape = AttentionShape.of(q, k)
        self.calls.append((shape, backend))
        return 1.0 if backend == self.fastest(shape) else 2.0 + TUNED_ORDER.index(backend)


SHAPE_A = (1, 64, 64, 2, 16)  # batch, q tokens, kv tokens, heads, head_dim
SHAPE_B = (1, 96, 77, 2, 16)
SHAPE_VAE = (1, 64, 64, 1, 512)
WINNERS = {64: AttentionBackend.SDPA_CUDNN, 96: AttentionBackend.FLASH_ATTN}


def by_q_tokens(shape):
    return WINNERS.get(shape.q_tokens, AttentionBackend.SDPA_FLASH)


def run_shape(router, module, shape, seed=0):
    """Runs one call; returns its output and what each stand-in gives on the same inputs."""
    b, n, m, h, d = shape
    q, k, v = qkv(b, n, m, h, d, seed=seed, dtype=torch.bfloat16)
    out = router.run(module, q, k, v, d ** -0.5)
    return out, lambda backend: REGISTRY[backend].fn(q, k, v, d ** -0.5)


def tuned_router(timer, policy=None, info=A100):
    return AttentionRouter(policy or AttentionPolicy(), "cpu", torch.bfloat16, info, timer=timer)


def test_per_shape_choice_follows_the_measured_winner(kernels):
    timer = FakeTimer(by_q_tokens)
    router = tuned_router(timer)
    for module, shape in (("unet.a.attn1", SHAPE_A), ("unet.b.attn2", SHAPE_B), ("vae.mid", SHAPE_VAE)):
        out, output_of = run_shape(router, module, shape)
        # The output returned is the winner's (each stand-in adds its own offset).
        assert torch.equal(out, output_of(router.ran[module])), module
    assert router.ran == {"unet.a.attn1": AttentionBackend.SDPA_CUDNN, "unet.b.attn2": AttentionBackend.FLASH_ATTN,
                          "vae.mid": AttentionBackend.SDPA_EFFICIENT}  # head_dim 512: no flash kernel
    assert router.shapes == {"unet.a.attn1": (64, 64, 2, 16), "unet.b.attn2": (96, 77, 2, 16),
                             "vae.mid": (64, 64, 1, 512)}
    # Where FlashAttention-class kernels can run a shape, only they are timed (FA3/FA4 are not installed); where
    # none can (head_dim 512), the others.
    usable = {AttentionBackend.FLASH_ATTN, *BUILTIN_STAND_INS}
    measured = {b for b in usable if REGISTRY[b].flash_class}
    assert measured == {AttentionBackend.FLASH_ATTN, AttentionBackend.SDPA_CUDNN, AttentionBackend.SDPA_FLASH}
    table = autotune_table()
    a = AttentionShape(1, 64, 64, 2, 16, torch.bfloat16, "cpu")
    assert table[a].winner == AttentionBackend.SDPA_CUDNN and set(table[a].times) == measured
    assert table[a].times[AttentionBackend.SDPA_CUDNN] == 1.0 and not table[a].errors
    at_512 = {b for b in usable if router.why_not(b, 512) is None}
    assert at_512 == {AttentionBackend.SDPA_EFFICIENT, AttentionBackend.MATMUL}
    assert set(table[AttentionShape(1, 64, 64, 1, 512, torch.bfloat16, "cpu")].times) == at_512
    assert sorted((s.q_tokens, b.value) for s, b in timer.calls) == sorted(
        [(64, b.value) for b in measured] + [(96, b.value) for b in measured] + [(64, b.value) for b in at_512])
    report = build_report(router, "sdpa")
    assert report.shapes == router.shapes


def test_each_shape_is_measured_once_across_routers(kernels):
    timer = FakeTimer(by_q_tokens)
    first = tuned_router(timer)
    run_shape(first, "unet.a.attn1", SHAPE_A)
    run_shape(first, "unet.b.attn2", SHAPE_B)
    timed = len(timer.calls)
    warm_ups = {b: s.attempts for b, s in kernels.items()}
    second = tuned_router(timer)
    for module, shape in (("unet.a.attn1", SHAPE_A), ("unet.c.attn1", SHAPE_A), ("unet.b.attn2", SHAPE_B)):
        run_shape(second, module, shape, seed=5)
    assert len(timer.calls) == timed  # no timing again
    assert second.ran == {"unet.a.attn1": AttentionBackend.SDPA_CUDNN, "unet.c.attn1": AttentionBackend.SDPA_CUDNN,
                          "unet.b.attn2": AttentionBackend.FLASH_ATTN}
    # Only the winners were called again, once per call: no warm-ups either.
    calls = {AttentionBackend.FLASH_ATTN: 1, AttentionBackend.SDPA_CUDNN: 2}
    assert {b: s.attempts - warm_ups[b] for b, s in kernels.items()} == {b: calls.get(b, 0) for b in kernels}
    assert len(autotune_table()) == 2


def test_a_clear_loser_is_timed_by_one_call():
    """Every candidate's first call is timed together; one more than LOSING_FACTOR times the best of them (and
    STOP_FLOOR_MS or longer) stops there. The others are timed in TIMED_ROUNDS rounds of up to `iters` calls
    each (about a millisecond of GPU work), all candidates in every round, in an order turned by one each
    round; the median of each counts."""
    a, b, c, d = AttentionBackend.SDPA_FLASH, AttentionBackend.SDPA_CUDNN, AttentionBackend.FLASH_ATTN, \
        AttentionBackend.SDPA_EFFICIENT
    per_call = {a: 0.5, b: 0.8, c: 40.0, d: 0.9}
    noise = iter([1.0, 1.0, 1.2, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0])  # outliers in the first two rounds
    asked = []

    def group(calls):
        asked.append(dict(calls))
        return {backend: per_call[backend] * (next(noise) if len(asked) > 1 else 1.0) for backend in calls}

    times = tuning_module.rounds(group, [a, b, c, d], iters=8)
    assert list(times) == [a, b, c, d]
    assert times[c] == 40.0  # 80x the best single call: one call only
    assert times == {a: 0.5, b: 0.8, c: 40.0, d: 0.9}  # the medians: the outliers drop out
    assert asked[0] == {a: 1, b: 1, c: 1, d: 1}
    assert asked[1:] == [{a: 2, b: 1, d: 1}] * 3  # about a millisecond of GPU work each
    assert [list(r) for r in asked[1:]] == [[a, b, d], [b, d, a], [d, a, b]]
    # A 3x loser whose one call is too short to tell (below STOP_FLOOR_MS) is timed fully.
    asked.clear()
    noise = iter([1.0] * 6)
    short = {a: 0.01, b: 0.03}
    per_call.update(short)
    assert tuning_module.rounds(group, [a, b], iters=8) == short
    assert asked[1:] == [{a: 8, b: 8}, {b: 8, a: 8}, {a: 8, b: 8}]


def test_the_candidates_are_timed_together_and_one_failing_alone(kernels, monkeypatch):
    """measure() warms every candidate up, then times them together with time_kernels; should that raise, it
    times each alone, and only the one that fails is excluded (reported through on_error)."""
    joint = []
    times = {AttentionBackend.SDPA_CUDNN: 2.0, AttentionBackend.SDPA_FLASH: 1.0, AttentionBackend.SDPA_EFFICIENT: 5.0}

    def time_kernels(fns, q, k, v, scale):
        joint.append(list(fns))
        if len(fns) > 1 and AttentionBackend.SDPA_EFFICIENT in fns and fail:
            raise RuntimeError("an illegal memory access")
        if list(fns) == [AttentionBackend.SDPA_EFFICIENT] and fail:
            raise RuntimeError("an illegal memory access")
        return {b: times[b] for b in fns}

    failed = []
    monkeypatch.setattr(tuning_module, "time_kernels", time_kernels)
    q, k, v = qkv(1, 8, 8, 1, 16, seed=1, dtype=torch.bfloat16)
    fail = False
    timing = tuning_module.measure(AttentionShape.of(q, k), list(times), q, k, v, 0.25, None,
                                   on_error=lambda b, exc: failed.append(b))
    assert joint == [list(times)] and failed == []
    assert timing.winner == AttentionBackend.SDPA_FLASH and timing.times == times
    clear_autotune_cache()
    joint.clear()
    fail = True
    q, k, v = qkv(1, 8, 8, 1, 16, seed=2, dtype=torch.bfloat16)
    timing = tuning_module.measure(AttentionShape.of(q, k), list(times), q, k, v, 0.25, None,
                                   on_error=lambda b, exc: failed.append(b))
    assert joint == [list(times), *([b] for b in times)]
    assert failed == [AttentionBackend.SDPA_EFFICIENT]
    assert timing.times == {b: t for b, t in times.items() if b != AttentionBackend.SDPA_EFFICIENT}
    assert timing.errors == {AttentionBackend.SDPA_EFFICIENT: "RuntimeError: an illegal memory access"}


def test_concurrent_first_calls_measure_once(kernels):
    def slow_timer(backend, fn, q, k, v, scale):
        time.sleep(0.01)
        return timer(backend, fn, q, k, v, scale)

    timer = FakeTimer(by_q_tokens)
    barrier = threading.Barrier(4)
    routers = [tuned_router(slow_timer) for _ in range(4)]

    def go(router):
        barrier.wait()
        run_shape(router, "unet.a.attn1", SHAPE_A)

    threads = [threading.Thread(target=go, args=(r,)) for r in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(timer.calls) == sum(REGISTRY[b].flash_class for b in kernels)  # each flash-class candidate, once
    assert all(r.ran == {"unet.a.attn1": AttentionBackend.SDPA_CUDNN} for r in routers)


def test_cache_is_bounded(kernels, monkeypatch):
    monkeypatch.setattr(tuning_module, "MAX_TUNED_SHAPES", 2)
    router = tuned_router(FakeTimer(by_q_tokens))
    for n in (64, 96, 128):
        run_shape(router, f"unet.{n}.attn1", (1, n, n, 2, 16))
    assert [s.q_tokens for s in autotune_table()] == [96, 128]


def test_failing_candidate_is_excluded_once(kernels, caplog):
    kernels[AttentionBackend.FLASH_ATTN].fail = True
    timer = FakeTimer(lambda shape: AttentionBackend.FLASH_ATTN if shape.q_tokens == 64 else
                      AttentionBackend.SDPA_FLASH)
    router = tuned_router(timer)
    with caplog.at_level("WARNING", logger="hypir"):
        out, output_of = run_shape(router, "unet.a.attn1", SHAPE_A)
        second = tuned_router(timer)
        run_shape(second, "unet.c.attn1", SHAPE_A)
    # flash_attn would have been fastest, but it raised when measured: the fastest of the rest runs.
    assert router.ran == {"unet.a.attn1": AttentionBackend.SDPA_CUDNN}
    assert second.ran == {"unet.c.attn1": AttentionBackend.SDPA_CUDNN}
    assert torch.equal(out, output_of(AttentionBackend.SDPA_CUDNN))
    timing = next(iter(autotune_table().values()))
    assert AttentionBackend.FLASH_ATTN not in timing.times and timing.winner == AttentionBackend.SDPA_CUDNN
    assert timing.errors == {
        AttentionBackend.FLASH_ATTN: "RuntimeError: FlashAttention only supports Ampere GPUs or newer."}
    assert AttentionBackend.FLASH_ATTN not in {b for _, b in timer.calls}
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["[HYPIR] flash_attn failed in unet.a.attn1 (RuntimeError: FlashAttention only supports "
                      "Ampere GPUs or newer.); falling back"]  # once, by the router that measured
    assert router.fallback_warnings == warned and second.fallback_warnings == []
    assert router.failed == {"unet.a.attn1": {AttentionBackend.FLASH_ATTN}}
    assert kernels[AttentionBackend.FLASH_ATTN].attempts == 1  # the second router did not try it
    assert build_report(router, "sdpa").status_line().startswith("FlashAttention: enabled (sdpa_cudnn ")


def test_winner_failing_at_run_time_falls_to_the_next_fastest(kernels, monkeypatch, caplog):
    timer = FakeTimer(by_q_tokens)
    run_shape(tuned_router(timer), "unet.a.attn1", SHAPE_A)  # measured: sdpa_cudnn wins
    kernels[AttentionBackend.SDPA_CUDNN].fail = True
    router = tuned_router(timer)
    with caplog.at_level("WARNING", logger="hypir"):
        run_shape(router, "unet.a.attn1", SHAPE_A)
    assert router.ran == {"unet.a.attn1": AttentionBackend.FLASH_ATTN}  # 2.0 + index 1: next after cudnn's 1.0
    assert [r.getMessage() for r in caplog.records] == [
        "[HYPIR] sdpa_cudnn failed in unet.a.attn1 (RuntimeError: FlashAttention only supports Ampere GPUs or "
        "newer.); falling back"]


@pytest.mark.parametrize("policy,expected", [
    (AttentionPolicy("sdpa_flash"), AttentionBackend.SDPA_FLASH),  # a requested backend skips measurement
    (AttentionPolicy(per_shape=False), AttentionBackend.FLASH_ATTN),  # first usable of FLASH_ORDER
    (AttentionPolicy(use_flash_attention=False), AttentionBackend.SDPA_EFFICIENT),
], ids=["requested", "per_shape_off", "flash_off"])
def test_no_measurement_outside_auto_flash(kernels, policy, expected):
    timer = FakeTimer(by_q_tokens)
    router = tuned_router(timer, policy)
    run_shape(router, "unet.a.attn1", SHAPE_A)
    assert router.ran == {"unet.a.attn1": expected}
    assert timer.calls == [] and autotune_table() == {}


def test_autotune_setting_switches_per_shape_off(kernels):
    timer = FakeTimer(by_q_tokens)
    router = tuned_router(timer, AttentionPolicy(per_shape=False))
    run_shape(router, "unet.a.attn1", SHAPE_A)
    assert router.ran == {"unet.a.attn1": AttentionBackend.FLASH_ATTN}
    assert timer.calls == [] and autotune_table() == {}


def test_cpu_keeps_first_usable_without_measuring(kernels):
    timer = FakeTimer(by_q_tokens)
    router = AttentionRouter(AttentionPolicy(), "cpu", torch.float32, CPU, timer=timer)
    q, k, v = qkv(1, 64, 64, 2, 16, seed=0)
    router.run("unet.a.attn1", q, k, v, 0.25)
    assert router.ran == {"unet.a.attn1": AttentionBackend.SDPA} and timer.calls == []
    # Without an injected timer, CPU tensors are never timed (the built-in timer uses CUDA events).
    router = AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, A100)
    run_shape(router, "unet.a.attn1", SHAPE_A)
    assert router.ran == {"unet.a.attn1": AttentionBackend.FLASH_ATTN} and autotune_table() == {}


def test_sage_is_opt_in(kernels, monkeypatch):
    spec = REGISTRY[AttentionBackend.SAGE]
    assert spec.opt_in and "numerics" in spec.description
    auto = {*FLASH_ORDER, *TUNED_ORDER, *CUDA_FALLBACK_ORDER, *OTHER_FALLBACK_ORDER}
    assert AttentionBackend.SAGE not in auto
    assert not any(REGISTRY[b].opt_in for b in auto)
    sage = StandIn()
    module = types.ModuleType("sageattention")
    module.sageattn = lambda q, k, v, tensor_layout, is_causal, sm_scale: sage(q, k, v, softmax_scale=sm_scale)
    monkeypatch.setitem(sys.modules, "sageattention", module)
    timer = FakeTimer(lambda shape: AttentionBackend.SAGE)
    router = tuned_router(timer, info=H100)
    assert router.why_not(AttentionBackend.SAGE, 64) is None
    run_shape(router, "unet.a.attn1", (1, 64, 64, 2, 64))
    assert AttentionBackend.SAGE not in {b for _, b in timer.calls} and sage.attempts == 0
    assert router.ran["unet.a.attn1"] != AttentionBackend.SAGE
    named = tuned_router(timer, AttentionPolicy("sage"), info=H100)
    run_shape(named, "unet.a.attn1", (1, 64, 64, 2, 64))
    assert named.ran == {"unet.a.attn1": AttentionBackend.SAGE} and sage.attempts == 1


def test_per_shape_unet_pass_and_exact_lines(bf16_models, kernels):
    """The tiny UNet at a 64x64 latent: flash_attn measured fastest at 4096 query tokens, cuDNN elsewhere."""
    def fastest(shape):
        return AttentionBackend.FLASH_ATTN if shape.q_tokens == 4096 else AttentionBackend.SDPA_CUDNN

    for stand_in in kernels.values():
        stand_in.offset = 0.0
    out, router = unet_pass(bf16_models, A100, timer=FakeTimer(fastest))
    assert router.ran and set(router.ran) == set(router.shapes)
    for module, backend in router.ran.items():
        assert backend == (AttentionBackend.FLASH_ATTN if router.shapes[module][0] == 4096 else
                           AttentionBackend.SDPA_CUDNN), module
    assert {AttentionBackend.FLASH_ATTN, AttentionBackend.SDPA_CUDNN} == set(router.ran.values())
    report = build_report(router, "sdpa")
    roles = report.backends_by_role()
    assert roles["unet.attn1"] == roles["unet.attn2"] == "flash_attn+sdpa_cudnn"
    main = report.unet_self
    other = ({AttentionBackend.FLASH_ATTN, AttentionBackend.SDPA_CUDNN} - {main}).pop()
    assert report.flash_enabled
    lines = report.console_lines()
    assert f"{REGISTRY[main].label} enabled for UNet2DConditionModel" not in lines
    assert (f"{REGISTRY[main].label} + {REGISTRY[other].label} enabled for UNet2DConditionModel, chosen per "
            "attention shape") in lines
    assert len(autotune_table()) == len({AttentionShape(1, *s[:2], s[2], s[3], torch.bfloat16, "cpu")
                                         for s in router.shapes.values()})
    sdpa, _ = unet_pass(bf16_models, A100, attention="sdpa")
    assert ((out.float() - sdpa.float()).norm() / sdpa.float().norm()).item() < 2e-2  # bf16 rounding


def test_non_flash_kernels_are_not_timed_where_a_flash_kernel_runs(kernels):
    """Where a FlashAttention-class kernel can run a shape, the per-shape timing measures only those (the others
    never measured faster there on the H200), so a timer that would call sdpa_efficient fastest never sees it."""
    timer = FakeTimer(lambda shape: AttentionBackend.SDPA_EFFICIENT)
    router = tuned_router(timer)
    run_shape(router, "unet.a.attn1", SHAPE_A)
    run_shape(router, "unet.b.attn2", SHAPE_B)
    assert {backend for _, backend in timer.calls} == {
        AttentionBackend.FLASH_ATTN, AttentionBackend.SDPA_CUDNN, AttentionBackend.SDPA_FLASH}
    assert router.ran == {"unet.a.attn1": AttentionBackend.FLASH_ATTN, "unet.b.attn2": AttentionBackend.FLASH_ATTN}
    assert build_report(router, "sdpa").flash_enabled


def test_candidate_out_of_memory_while_timed_is_skipped_for_that_shape(kernels, caplog):
    def out_of_memory(q, k, v, scale):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cudnn = REGISTRY[AttentionBackend.SDPA_CUDNN]
    REGISTRY[AttentionBackend.SDPA_CUDNN] = dataclasses.replace(cudnn, fn=out_of_memory)  # restored by `kernels`
    router = tuned_router(FakeTimer(by_q_tokens))
    with caplog.at_level("WARNING", logger="hypir"):
        run_shape(router, "unet.a.attn1", SHAPE_A)  # cuDNN would be fastest here
    timing = next(iter(autotune_table().values()))
    assert AttentionBackend.SDPA_CUDNN not in timing.times and not timing.errors
    assert router.ran == {"unet.a.attn1": AttentionBackend.FLASH_ATTN} and not router.failed
    assert [r.getMessage() for r in caplog.records] == [
        "[HYPIR] sdpa_cudnn ran out of GPU memory while timed on 1x64x64 tokens, 2 heads x 16, bf16, cpu; "
        "not used for it"]


def test_status_never_contradicts_what_the_self_attention_ran(kernels, monkeypatch):
    """Some UNet self-attention modules on FlashAttention-class kernels, one on sdpa_efficient because every
    flash-class kernel failed on its shape: the status says so, with the counts, instead of 'disabled'."""
    for backend in (AttentionBackend.FLASH_ATTN, AttentionBackend.SDPA_CUDNN, AttentionBackend.SDPA_FLASH):
        def failing_at_96(q, k, v, scale, fn=REGISTRY[backend].fn):
            if q.shape[1] == 96:
                raise RuntimeError("no kernel image is available for execution on the device")
            return fn(q, k, v, scale)
        monkeypatch.setitem(REGISTRY, backend, dataclasses.replace(REGISTRY[backend], fn=failing_at_96))
    router = tuned_router(FakeTimer(lambda shape: AttentionBackend.SDPA_CUDNN))
    run_shape(router, "unet.down.0.attn1", SHAPE_A)
    run_shape(router, "unet.down.1.attn1", (1, 96, 96, 2, 16))
    run_shape(router, "unet.up.0.attn1", SHAPE_A, seed=1)
    run_shape(router, "vae.mid.attentions.0", SHAPE_VAE)
    report = build_report(router, "sdpa")
    assert {b.value for b in report.self_attention.values()} == {"sdpa_cudnn", "sdpa_efficient"}
    assert report.flash_partly and not report.flash_enabled
    cudnn = REGISTRY[AttentionBackend.SDPA_CUDNN].version()
    assert report.status_line() == (
        f"FlashAttention: partly enabled (sdpa_cudnn {cudnn} for 2 of 3 UNet self-attention modules, sdpa_efficient "
        f"for the rest: flash_attn/sdpa_cudnn/sdpa_flash failed at run time)")
    lines = report.console_lines()
    assert lines[0] == f"cuDNN attention (PyTorch SDPA) {cudnn} is available and will be used for acceleration."
    assert lines[1].startswith("cuDNN attention (PyTorch SDPA) enabled for 2 of 3 UNet self-attention modules; "
                               "the others run sdpa_efficient (")
    assert lines[-1].startswith("AutoencoderKL attention (head_dim 512, beyond FlashAttention kernels) runs on ")


def test_the_documented_line_whenever_the_flash_attn_package_runs(kernels):
    """flash-attn 2 running only the cross-attention still prints the documented line, with its version; the
    VAE line gives the head_dim the VAE really has."""
    def fastest(shape):
        return AttentionBackend.FLASH_ATTN if shape.kv_tokens == 77 else AttentionBackend.SDPA_CUDNN

    router = tuned_router(FakeTimer(fastest))
    run_shape(router, "unet.down.0.attn1", SHAPE_A)
    run_shape(router, "unet.down.0.attn2", SHAPE_B)
    run_shape(router, "vae.mid.attentions.0", (1, 64, 64, 1, 32))
    lines = build_report(router, "sdpa").console_lines()
    assert lines[0] == "FlashAttention 2.8.3 is available and will be used for acceleration."
    assert lines[-1].startswith("AutoencoderKL attention (head_dim 32) runs on ")


# ----------------------------------------------------------------------------------------------
# Timings kept on disk for the next process (hypir/attention/timing_store.py)

GPU_ENV = {"gpu": "NVIDIA H200", "capability": "sm90", "torch": "2.11.0+cu130", "cuda": "13.0", "cudnn": "91900"}


# The flash-class candidates an A100 with flash-attn 2 times (the `kernels` fixture's stand-ins)
A100_CANDIDATES = [AttentionBackend.FLASH_ATTN, AttentionBackend.SDPA_CUDNN, AttentionBackend.SDPA_FLASH]


def measure_with(store, timer, shape=SHAPE_A, candidates=A100_CANDIDATES, probed=None):
    """What the router does on a shape's first call in a process (AttentionRouter._choose_for_shape): the stored
    timing of these candidates, else a measurement of those that passed their probes (`probed`), kept on disk
    under the candidates."""
    b, n, m, h, d = shape
    q, k, v = qkv(b, n, m, h, d, seed=0, dtype=torch.bfloat16)
    shape = AttentionShape.of(q, k)
    return tuning_module.stored(shape, store, candidates) or tuning_module.measure(
        shape, probed or candidates, q, k, v, d ** -0.5, timer, on_error=lambda b, exc: None, store=store,
        key=candidates)


def never_timed(*args):
    raise AssertionError("a stored shape was timed again")


def test_a_timing_is_kept_on_disk_and_read_by_the_next_process(kernels, tmp_path, caplog):
    import json

    from hypir.attention.timing_store import TimingStore

    timer = FakeTimer(by_q_tokens)
    first = measure_with(TimingStore(tmp_path, GPU_ENV), timer)
    assert first.winner == AttentionBackend.SDPA_CUDNN and not first.stored and len(timer.calls) == 3
    files = list(tmp_path.glob("attention-timings-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["format"] == 1 and data["environment"] == GPU_ENV
    (key, entry), = data["shapes"].items()
    assert key.startswith("1x64x64x2x16 bfloat16 [flash_attn=") and "sdpa_cudnn=" in key
    assert entry == {"times_ms": {b.value: ms for b, ms in first.times.items()}, "winner": "sdpa_cudnn"}

    clear_autotune_cache()  # a new process: nothing in memory, a new store on the same folder
    with caplog.at_level("INFO", logger="hypir"):
        again = measure_with(TimingStore(tmp_path, GPU_ENV), never_timed)
    assert again.stored and again.winner == first.winner and again.times == first.times and again.seconds == 0
    assert f"(timed by an earlier process on this GPU, kept in {files[0]})" in caplog.text


def test_a_timing_is_kept_under_the_candidates_before_their_probes(kernels, tmp_path):
    """A kernel whose probe failed on this GPU is not timed; the timing is kept under every candidate, so the next
    process finds it without probing (a probe is a tiny call of each kernel: 0.2 s at a first 1024 image)."""
    from hypir.attention.timing_store import TimingStore

    timer = FakeTimer(by_q_tokens)
    probed = [AttentionBackend.SDPA_CUDNN, AttentionBackend.SDPA_FLASH]  # flash-attn's probe failed
    first = measure_with(TimingStore(tmp_path, GPU_ENV), timer, probed=probed)
    assert {backend for _, backend in timer.calls} == set(probed) and set(first.times) == set(probed)
    clear_autotune_cache()
    again = measure_with(TimingStore(tmp_path, GPU_ENV), never_timed)
    assert again.stored and again.winner == AttentionBackend.SDPA_CUDNN and set(again.times) == set(probed)


def test_another_gpu_or_other_kernels_are_timed_again(kernels, tmp_path, monkeypatch):
    from hypir.attention.timing_store import TimingStore

    measure_with(TimingStore(tmp_path, GPU_ENV), FakeTimer(by_q_tokens))
    clear_autotune_cache()
    other_gpu = FakeTimer(by_q_tokens)
    measure_with(TimingStore(tmp_path, {**GPU_ENV, "gpu": "NVIDIA A100-SXM4-80GB", "capability": "sm80"}), other_gpu)
    assert len(other_gpu.calls) == 3 and len(list(tmp_path.glob("*.json"))) == 2
    clear_autotune_cache()
    # flash-attn upgraded: its version is part of the key
    spec = REGISTRY[AttentionBackend.FLASH_ATTN]
    monkeypatch.setitem(REGISTRY, AttentionBackend.FLASH_ATTN, dataclasses.replace(spec, version=lambda: "9.9.9"))
    upgraded = FakeTimer(by_q_tokens)
    measure_with(TimingStore(tmp_path, GPU_ENV), upgraded)
    assert len(upgraded.calls) == 3
    clear_autotune_cache()
    # one candidate fewer (flash-attn uninstalled): another key
    fewer = FakeTimer(by_q_tokens)
    measure_with(TimingStore(tmp_path, GPU_ENV), fewer, candidates=[AttentionBackend.SDPA_CUDNN,
                                                                     AttentionBackend.SDPA_FLASH])
    assert len(fewer.calls) == 2


def test_a_damaged_timings_file_is_ignored_and_replaced(kernels, tmp_path, caplog):
    import json

    from hypir.attention.timing_store import TimingStore

    store = TimingStore(tmp_path, GPU_ENV)
    store.path.write_text('{"format": 1, "shapes": {"1x64x64x2x16 bf')
    timer = FakeTimer(by_q_tokens)
    with caplog.at_level("WARNING", logger="hypir"):
        timing = measure_with(store, timer)
    assert len(timer.calls) == 3 and timing.winner == AttentionBackend.SDPA_CUDNN
    assert f"ignoring the stored attention timings in {store.path}" in caplog.text
    assert len(json.loads(store.path.read_text())["shapes"]) == 1
    # An entry this version cannot read (a backend it does not know) is timed again, not trusted.
    data = json.loads(store.path.read_text())
    key = next(iter(data["shapes"]))
    data["shapes"][key] = {"times_ms": {"warp_drive": 0.1}, "winner": "warp_drive"}
    store.path.write_text(json.dumps(data))
    clear_autotune_cache()
    retimed = FakeTimer(by_q_tokens)
    assert measure_with(TimingStore(tmp_path, GPU_ENV), retimed).winner == AttentionBackend.SDPA_CUDNN
    assert len(retimed.calls) == 3


def test_an_unwritable_cache_folder_warns_once_and_times_in_memory(kernels, tmp_path, caplog):
    from hypir.attention.timing_store import TimingStore

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    store = TimingStore(blocker / "hypir", GPU_ENV)
    with caplog.at_level("WARNING", logger="hypir"):
        first = measure_with(store, FakeTimer(by_q_tokens))
        second = measure_with(store, FakeTimer(by_q_tokens), shape=SHAPE_B)
    assert first.winner == AttentionBackend.SDPA_CUDNN and second.winner == AttentionBackend.FLASH_ATTN
    warnings = [r.getMessage() for r in caplog.records if "cannot keep attention timings" in r.getMessage()]
    assert len(warnings) == 1 and "HYPIR_CACHE_DIR" in warnings[0]
    assert store.get(AttentionShape(1, 96, 77, 2, 16, torch.bfloat16, "cpu"), A100_CANDIDATES) is not None
    assert not list(tmp_path.glob("**/*.json"))


def test_a_kernel_out_of_memory_while_timed_keeps_the_timing_off_disk(kernels, tmp_path):
    from hypir.attention.timing_store import TimingStore

    def out_of_memory(q, k, v, scale):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cudnn = REGISTRY[AttentionBackend.SDPA_CUDNN]
    REGISTRY[AttentionBackend.SDPA_CUDNN] = dataclasses.replace(cudnn, fn=out_of_memory)  # restored by `kernels`
    store = TimingStore(tmp_path, GPU_ENV)
    assert measure_with(store, FakeTimer(by_q_tokens)).winner == AttentionBackend.FLASH_ATTN
    assert not store.path.exists()


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from pathlib import Path

    from hypir.attention.timing_store import cache_dir, store_for

    monkeypatch.setenv("HYPIR_CACHE_DIR", "")
    assert cache_dir() is None and store_for("cuda:0") is None
    monkeypatch.setenv("HYPIR_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    assert store_for("cpu") is None  # timings are measured on CUDA GPUs only
    monkeypatch.delenv("HYPIR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hypir"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "hypir"


def test_the_router_runs_what_an_earlier_process_timed_without_timing(kernels, tmp_path, caplog):
    from hypir.attention.timing_store import TimingStore

    timer = FakeTimer(by_q_tokens)
    first = AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, A100, timer=timer,
                            store=TimingStore(tmp_path, GPU_ENV))
    out, _ = run_shape(first, "unet.a.attn1", SHAPE_A)
    assert first.ran == {"unet.a.attn1": AttentionBackend.SDPA_CUDNN} and len(timer.calls) == 3
    clear_autotune_cache()  # a new process
    second = AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, A100, timer=never_timed,
                             store=TimingStore(tmp_path, GPU_ENV))
    again, _ = run_shape(second, "unet.b.attn1", SHAPE_A)
    assert second.ran == {"unet.b.attn1": AttentionBackend.SDPA_CUDNN} and torch.equal(out, again)
    timing, = autotune_table().values()
    assert timing.stored and second.tuned["unet.b.attn1"][1] is timing


def test_a_stored_winner_that_fails_is_forgotten_on_disk(kernels, tmp_path, caplog):
    """A kernel an earlier process chose raises here (a driver or library change the key does not see): this
    process falls back to the next fastest stored kernel, and the entry goes, so the next process times again."""
    import json

    from hypir.attention.timing_store import TimingStore

    store = TimingStore(tmp_path, GPU_ENV)
    run_shape(AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, A100, timer=FakeTimer(by_q_tokens),
                              store=store), "unet.a.attn1", SHAPE_A)
    assert len(json.loads(store.path.read_text())["shapes"]) == 1
    clear_autotune_cache()
    kernels[AttentionBackend.SDPA_CUDNN].fail = True
    router = AttentionRouter(AttentionPolicy(), "cpu", torch.bfloat16, A100, timer=never_timed,
                             store=TimingStore(tmp_path, GPU_ENV))
    with caplog.at_level("WARNING", logger="hypir"):
        out, output_of = run_shape(router, "unet.b.attn1", SHAPE_A)
    # the stored times: cudnn 1 ms, then flash_attn 2 ms (FakeTimer: 2 + its place in TUNED_ORDER) before sdpa_flash
    assert router.ran == {"unet.b.attn1": AttentionBackend.FLASH_ATTN}
    assert torch.equal(out, output_of(AttentionBackend.FLASH_ATTN))
    assert "sdpa_cudnn failed in unet.b.attn1" in caplog.text
    assert json.loads(store.path.read_text())["shapes"] == {}


def test_an_injected_timer_never_reads_or_writes_the_disk(kernels, monkeypatch, tmp_path):
    import hypir.attention.router as router_module

    monkeypatch.setenv("HYPIR_CACHE_DIR", str(tmp_path))
    asked = []
    monkeypatch.setattr(router_module, "store_for", lambda device: asked.append(device))
    run_shape(tuned_router(FakeTimer(by_q_tokens)), "unet.a.attn1", SHAPE_A)
    assert asked == [] and list(tmp_path.iterdir()) == []
