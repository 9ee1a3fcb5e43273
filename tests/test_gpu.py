"""CUDA-only checks, run on a GPU machine: every usable attention kernel against float64 on fresh random
inputs at SD shapes, the whole pass per backend against float32 `standard`, reference seeding on CUDA,
and no global state touched. Skipped where PyTorch sees no CUDA GPU."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from hypir.attention import REGISTRY, AttentionBackend, AttentionPolicy, AttentionRouter  # noqa: E402

SHAPES = {  # (batch, q tokens, k tokens, heads, head_dim)
    "unet-l1-self": (1, 4096, 4096, 5, 64),
    "unet-l3-self": (2, 1024, 1024, 20, 64),
    "unet-cross": (1, 4096, 77, 5, 64),
    "vae-mid": (1, 4096, 4096, 1, 512),
}
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}  # relative, vs float64


def usable(backend, dtype, head_dim):
    router = AttentionRouter(AttentionPolicy(), "cuda", dtype)
    return router.unusable_reason(backend, head_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("backend", list(AttentionBackend), ids=lambda b: b.value)
def test_kernel_against_float64(backend, shape, dtype, record_property):
    b, n, m, h, d = SHAPES[shape]
    why = usable(backend, dtype, d)
    if why is not None:
        pytest.skip(why)
    gen = torch.Generator(device="cuda").manual_seed(hash((backend.value, shape, str(dtype))) % 2**31)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=gen, dtype=torch.float32) for s in (n, m, m))
    out = REGISTRY[backend].fn(q.to(dtype), k.to(dtype), v.to(dtype), d ** -0.5)
    assert out.shape == (b, n, h, d) and torch.isfinite(out).all()
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q.to(dtype), k.to(dtype), v.to(dtype)))
    ref = torch.softmax(q64 @ k64.transpose(-1, -2) * d ** -0.5, dim=-1) @ v64
    err = ((out.double().transpose(1, 2) - ref).norm() / ref.norm()).item()
    record_property("rel_err", err)
    print(f"{backend.value:15s} {shape:13s} {str(dtype):15s} rel err {err:.2e}")
    assert err <= TOLERANCE[dtype]


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    from hypir.loading import load_models
    from hypir.random_models import build_random_base, random_lora, save_diffusers_folder

    root = tmp_path_factory.mktemp("gpu")
    base = build_random_base("tiny", 0)
    folder = save_diffusers_folder(base, root / "tiny")
    torch.save(random_lora(base.unet, 4, 0), root / "lora.pth")
    return {dtype: load_models(folder, root / "lora.pth", device="cuda", dtype=dtype) for dtype in ("fp32", "bf16")}


def _psnr(a, b):
    mse = torch.mean((a - b) ** 2).item()
    return 10 * math.log10(1 / mse) if mse else float("inf")


def test_every_backend_end_to_end_against_fp32_standard(gpu_models):
    """Each bf16 backend lands as close to the fp32 `standard` pass as bf16 `standard` does: the kernel adds
    nothing beyond bf16 rounding (random weights make bf16 itself lossy here)."""
    from hypir.pipeline import HYPIRPipeline

    gen = torch.Generator().manual_seed(0)
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=gen), size=(256, 256), mode="bilinear")
    lq = lq.cuda()
    reference = HYPIRPipeline(gpu_models["fp32"])(lq, upscale=2.0, attention="standard", latent="mode").images
    bf16_standard = HYPIRPipeline(gpu_models["bf16"])(lq, upscale=2.0, attention="standard", latent="mode").images
    floor = _psnr(bf16_standard, reference)
    print(f"bf16 standard vs fp32 standard: {floor:.1f} dB")
    for backend in AttentionBackend:
        if usable(backend, torch.bfloat16, 64) is not None:
            continue
        result = HYPIRPipeline(gpu_models["bf16"])(lq, upscale=2.0, attention=backend.value, latent="mode")
        psnr = _psnr(result.images, reference)
        print(f"{backend.value:15s} end to end vs fp32 standard: {psnr:.1f} dB, vs bf16 standard: "
              f"{_psnr(result.images, bf16_standard):.1f} dB; ran {result.report.backends_by_role()}")
        unet_ran = {b for mod, b in result.report.per_module.items() if mod.startswith("unet.")}
        assert unet_ran == {backend}
        assert psnr > floor - 1.0


def test_auto_picks_a_flash_kernel_on_ampere_or_newer(gpu_models):
    from hypir.pipeline import HYPIRPipeline

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention needs sm80+")
    result = HYPIRPipeline(gpu_models["bf16"])(torch.rand(1, 3, 64, 64, device="cuda"), upscale=2.0)
    assert result.report.flash_enabled, result.report.status_line()
    vae = {b for m, b in result.report.per_module.items() if m.startswith("vae.")}
    assert vae and all(REGISTRY[b].flash_class for b in vae)  # the tiny VAE's head_dim is 32
    print(result.status_line())


def test_seeded_sample_matches_global_seed_on_cuda(gpu_models):
    models = gpu_models["fp32"]
    x = torch.rand(1, 3, 512, 512, device="cuda") * 2 - 1
    with torch.no_grad():
        torch.manual_seed(231)
        expected = models.vae.encode(x).latent_dist.sample()
        gen = torch.Generator(device="cuda").manual_seed(231)
        dist = models.vae.encode(x).latent_dist
        ours = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device="cuda")
    torch.testing.assert_close(ours, expected)


def test_no_global_sdpa_flags_changed(gpu_models):
    from hypir.pipeline import HYPIRPipeline

    flags = lambda: (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),  # noqa
                     torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    before = flags()
    for backend in ("auto", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"):
        HYPIRPipeline(gpu_models["bf16"])(torch.rand(1, 3, 32, 32, device="cuda"), upscale=2.0, attention=backend)
    assert flags() == before


def test_out_of_memory_retries_with_smaller_tiles(gpu_models, caplog):
    """A real CUDA out-of-memory (a per-process cap below what one pass needs) ends in a tiled retry."""
    from hypir.pipeline import HYPIRPipeline

    pipe = HYPIRPipeline(gpu_models["bf16"])
    lq = torch.rand(1, 3, 256, 256, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    one_pass = pipe(lq, upscale=8.0, latent="mode", tile_size="auto")
    assert one_pass.tile_size is None
    need = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((base + need * 0.6) / total)
    try:
        with caplog.at_level("WARNING", logger="hypir"):
            retried = pipe(lq, upscale=8.0, latent="mode", tile_size="auto")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"one pass needs {need / 2**20:.0f} MiB; capped at 60%: retried with tiles {retried.tile_size}/"
          f"{retried.tile_stride}")
    assert "out of GPU memory; retrying with tiles" in caplog.text
    assert retried.tile_size is not None and retried.images.shape == one_pass.images.shape
    assert torch.isfinite(retried.images).all()
