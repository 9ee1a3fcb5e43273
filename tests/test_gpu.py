"""CUDA-only checks, run on a GPU machine: every usable attention kernel against float64 on fresh random
inputs at the SD2.1 shapes of a 1024x1024 output, the per-shape kernel choice on those shapes, the whole
pass per backend against float32 `standard`, reference seeding on CUDA, and no global state touched.
Skipped where PyTorch sees no CUDA GPU."""

from __future__ import annotations

import zlib

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import hypir.attention.tuning as tuning_module  # noqa: E402
from helpers import write_random_model  # noqa: E402
from hypir.bench.common import psnr  # noqa: E402
from hypir.attention import (REGISTRY, AttentionBackend, AttentionPolicy, AttentionRouter,  # noqa: E402
                             AttentionShape, autotune_table, clear_autotune_cache, tuned_candidates)

# The attention of SD2.1 at a 1024x1024 output (a 128x128 latent): (batch, q tokens, kv tokens, heads, head_dim).
SHAPES = {
    "unet-l1-self": (1, 16384, 16384, 5, 64),
    "unet-l2-self": (1, 4096, 4096, 10, 64),
    "unet-l3-self": (1, 1024, 1024, 20, 64),
    "unet-l1-cross": (1, 16384, 77, 5, 64),
    "vae-mid": (1, 16384, 16384, 1, 512),
}
# Relative L2 error against float64 on the same (rounded) inputs: what fp16/bf16 rounding of the output and
# of the probabilities allows. fp32 kernels must be near exact.
TOLERANCE = {torch.bfloat16: 3e-3, torch.float16: 1e-3, torch.float32: 1e-4}
# `standard` materialises the scores in the input dtype before the softmax, as diffusers' AttnProcessor does:
# in bf16 that rounding alone doubles the error (measured on an H100: 4.0e-3 to 4.7e-3 at these shapes, against
# 2.1e-3 to 2.3e-3 for the fused kernels; fp16 5e-4 to 6e-4, within TOLERANCE).
STANDARD_TOLERANCE = {**TOLERANCE, torch.bfloat16: 6e-3}
OPT_IN_SANITY = 1e-1  # 8-bit attention (opt-in) exceeds TOLERANCE by design; it must still be attention


def usable(backend, dtype, head_dim):
    router = AttentionRouter(AttentionPolicy(), "cuda", dtype)
    return router.why_not(backend, head_dim)


def inputs_and_reference(shape: str, dtype: torch.dtype):
    """Fresh seeded q, k, v of this shape in dtype, and the float64 attention of exactly those values (not
    cached: tensors kept on the GPU across tests would skew the memory-capped test below)."""
    b, n, m, h, d = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{shape} {dtype}".encode()))
    q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=gen).to(dtype) for s in (n, m, m))
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    ref = torch.cat([torch.softmax(chunk @ k64.transpose(-1, -2) * d ** -0.5, dim=-1) @ v64
                     for chunk in q64.split(2048, dim=2)], dim=2)  # chunks of queries: bounded memory
    return q, k, v, ref.transpose(1, 2)


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("backend", list(AttentionBackend), ids=lambda b: b.value)
def test_kernel_against_float64(backend, shape, dtype, record_property):
    b, n, m, h, d = SHAPES[shape]
    why = usable(backend, dtype, d)
    if why is not None:
        pytest.skip(why)
    q, k, v, ref = inputs_and_reference(shape, dtype)
    out = REGISTRY[backend].fn(q, k, v, d ** -0.5)
    assert out.shape == (b, n, h, d) and torch.isfinite(out).all()
    err = relative_error(out, ref)
    record_property("rel_err", err)
    opt_in = REGISTRY[backend].opt_in
    print(f"rel err vs float64: {backend.value:15s} {shape:14s} {str(dtype).removeprefix('torch.'):9s} {err:.2e}"
          + (" (opt-in, changes numerics)" if opt_in else ""))
    if opt_in:  # expected above TOLERANCE: runs only when asked for by name, never under auto
        assert err <= OPT_IN_SANITY
    elif backend == AttentionBackend.STANDARD:
        assert err <= STANDARD_TOLERANCE[dtype]
    else:
        assert err <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_per_shape_choice_on_sd_shapes(dtype, monkeypatch):
    """auto times the usable FlashAttention-class kernels (and sdpa_efficient) once per shape, runs the fastest,
    and a second router reuses the cached choice without timing again."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention needs sm80+")
    timed = []
    real_timer = tuning_module.time_kernels

    def counting_timer(fns, q, k, v, scale, **options):
        timed.extend((AttentionShape.of(q, k), backend) for backend in fns)
        return real_timer(fns, q, k, v, scale, **options)

    monkeypatch.setattr(tuning_module, "time_kernels", counting_timer)
    clear_autotune_cache()
    router = AttentionRouter(AttentionPolicy(), "cuda", dtype)
    outputs, data = {}, {name: inputs_and_reference(name, dtype) for name in SHAPES}
    for name in SHAPES:
        q, k, v, ref = data[name]
        out = router.run(name, q, k, v, q.shape[-1] ** -0.5)
        assert relative_error(out, ref) <= TOLERANCE[dtype], (name, router.ran[name])
        outputs[name] = out
    table = autotune_table()
    assert len(table) == len(SHAPES)
    for name, (b, n, m, h, d) in SHAPES.items():
        q, k = data[name][:2]
        timing = table[AttentionShape.of(q, k)]
        candidates = set(tuned_candidates(lambda c: router.why_not(c, d) is None))
        assert set(timing.times) | set(timing.errors) == candidates
        assert timing.winner == router.ran[name] == min(timing.times, key=timing.times.get)
        assert router.shapes[name] == (n, m, h, d)
        print(f"per-shape {str(dtype).removeprefix('torch.')} {name:14s} {n}x{m}, {h} heads x {d}: "
              + ", ".join(f"{c.value} {ms:.3f} ms" for c, ms in sorted(timing.times.items(), key=lambda x: x[1]))
              + (f"; failed: {timing.errors}" if timing.errors else "") + f" -> {timing.winner.value}")
    vae = table[AttentionShape.of(*data["vae-mid"][:2])]  # head_dim 512: no FlashAttention-class kernel
    assert AttentionBackend.SDPA_EFFICIENT in vae.times and not any(REGISTRY[b].flash_class for b in vae.times)
    assert REGISTRY[router.ran["unet-l1-self"]].flash_class
    count = len(timed)
    second = AttentionRouter(AttentionPolicy(), "cuda", dtype)
    for name in SHAPES:
        q, k, v, _ = data[name]
        torch.testing.assert_close(second.run(name, q, k, v, q.shape[-1] ** -0.5), outputs[name], rtol=0, atol=0)
    assert len(timed) == count and second.ran == router.ran
    clear_autotune_cache()


def test_timings_kept_on_disk_are_reused_by_a_new_process(monkeypatch, tmp_path):
    """The real router on this GPU with a cache folder: the first router times each shape and keeps it on disk; with
    the process's table cleared (a new process), a new router reads the file, times nothing and runs the same
    kernels, bit for bit."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention needs sm80+")
    from hypir.attention.timing_store import store_for

    monkeypatch.setenv("HYPIR_CACHE_DIR", str(tmp_path))
    timed = []
    real_timer = tuning_module.time_kernels

    def counting_timer(fns, q, k, v, scale, **options):
        timed.append(AttentionShape.of(q, k))
        return real_timer(fns, q, k, v, scale, **options)

    monkeypatch.setattr(tuning_module, "time_kernels", counting_timer)
    clear_autotune_cache()
    data = {name: inputs_and_reference(name, torch.bfloat16) for name in SHAPES}
    first = AttentionRouter(AttentionPolicy(), "cuda", torch.bfloat16)
    outputs = {name: first.run(name, q, k, v, q.shape[-1] ** -0.5) for name, (q, k, v, _) in data.items()}
    assert len(timed) == len(SHAPES) and store_for("cuda").path.is_file()
    clear_autotune_cache()
    timed.clear()
    second = AttentionRouter(AttentionPolicy(), "cuda", torch.bfloat16)
    for name, (q, k, v, _) in data.items():
        torch.testing.assert_close(second.run(name, q, k, v, q.shape[-1] ** -0.5), outputs[name], rtol=0, atol=0)
    assert timed == [] and second.ran == first.ran
    assert all(timing.stored and timing.seconds == 0 for timing in autotune_table().values())
    clear_autotune_cache()


@pytest.fixture(scope="module")
def gpu_models(tiny_files):
    from hypir.runtime import load_models

    folder, weights = tiny_files
    return {dtype: load_models(folder, weights, device="cuda", dtype=dtype) for dtype in ("fp32", "bf16")}


def test_standard_attention_past_four_billion_scores():
    """A 2048 output's first UNet level: 5 heads over 65536 tokens, 5 * 2**32 scores, past the 2**32 from which
    PyTorch's CUDA softmax returns wrong values (pytorch/pytorch#84144). `standard` takes the queries in blocks
    and matches the memory-efficient kernel."""
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory (2**30 scores in float32 and their probabilities)")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(1, 65536, 5, 64, device="cuda", generator=gen, dtype=dtype) for _ in range(3))
    out = REGISTRY[AttentionBackend.STANDARD].fn(q, k, v, 0.125)
    ref = REGISTRY[AttentionBackend.SDPA_EFFICIENT].fn(q, k, v, 0.125)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 0.01


def test_every_backend_end_to_end_against_fp32_standard(gpu_models):
    """Each bf16 backend lands as close to the fp32 `standard` pass as bf16 `standard` does: the kernel adds
    nothing beyond bf16 rounding (random weights make bf16 itself lossy here)."""
    from hypir.pipeline import HYPIRPipeline

    gen = torch.Generator().manual_seed(0)
    lq = torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16, generator=gen), size=(256, 256), mode="bilinear")
    lq = lq.cuda()
    reference = HYPIRPipeline(gpu_models["fp32"])(lq, upscale=2.0, attention="standard", latent="mode").images
    bf16_standard = HYPIRPipeline(gpu_models["bf16"])(lq, upscale=2.0, attention="standard", latent="mode").images
    floor = psnr(bf16_standard, reference)
    print(f"bf16 standard vs fp32 standard: {floor:.1f} dB")
    for backend in AttentionBackend:
        if usable(backend, torch.bfloat16, 64) is not None:
            continue
        result = HYPIRPipeline(gpu_models["bf16"])(lq, upscale=2.0, attention=backend.value, latent="mode")
        db = psnr(result.images, reference)
        print(f"{backend.value:15s} end to end vs fp32 standard: {db:.1f} dB, vs bf16 standard: "
              f"{psnr(result.images, bf16_standard):.1f} dB; ran {result.report.backends_by_role()}")
        unet_ran = {b for mod, b in result.report.per_module.items() if mod.startswith("unet.")}
        assert unet_ran == {backend}
        assert db > floor - 1.0


def test_auto_picks_a_flash_kernel_on_ampere_or_newer(gpu_models, monkeypatch):
    from hypir.pipeline import HYPIRPipeline

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention needs sm80+")
    # The fixed order (per-shape timing off) puts a FlashAttention-class kernel first.
    result = HYPIRPipeline(gpu_models["bf16"])(torch.rand(1, 3, 64, 64, device="cuda"), upscale=2.0,
                                               attention_autotune=False)
    assert result.report.flash_enabled, result.report.status_line()
    vae = {b for m, b in result.report.per_module.items() if m.startswith("vae.")}
    assert vae and all(REGISTRY[b].flash_class for b in vae)  # the tiny VAE's head_dim is 32
    print(result.status_line())
    # Timed per shape, every module runs the FlashAttention-class kernel that measured fastest there (the tiny
    # VAE's head_dim is 32: flash kernels run it too).
    clear_autotune_cache()
    result = HYPIRPipeline(gpu_models["bf16"])(torch.rand(1, 3, 64, 64, device="cuda"), upscale=2.0)
    assert all(REGISTRY[b].flash_class for b in result.report.per_module.values())
    assert result.report.flash_enabled, result.report.status_line()
    print(result.status_line(), "| per shape:", result.report.backends_by_role())


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


@pytest.fixture(scope="module")
def small_models_bf16(tmp_path_factory):
    """Quarter-width SD2.1 models: at a 2048 output their activations, not the image buffers, fill memory."""
    from hypir.runtime import load_models

    folder, weights = write_random_model(tmp_path_factory.mktemp("gpu_small"), "small")
    return load_models(folder, weights, device="cuda", dtype="bf16")


def test_out_of_memory_retries_with_smaller_tiles(small_models_bf16, caplog, monkeypatch):
    """A real CUDA out-of-memory (a per-process cap below what one pass needs, above what 512 px tiles one at
    a time need) ends in a tiled retry."""
    from hypir.pipeline import HYPIRPipeline
    from hypir.planning import finish_bytes

    # Per-shape timing off: the first call of a shape times every candidate kernel, whose peak is not what
    # the pass itself needs, and the tiled retry meets new shapes.
    pipe = HYPIRPipeline(small_models_bf16)
    lq = torch.rand(1, 3, 256, 256, device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    one_pass = pipe(lq, upscale=8.0, latent="mode", tile_size="auto", cuda_graphs=False, attention_autotune=False)
    assert one_pass.tile_size is None
    need = torch.cuda.max_memory_allocated() - base
    # 512 px tiles one at a time (a budget with room for one tile's activations only).
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    one_tile_budget = (base + finish_bytes(1, (2048, 2048))) / 2**30 + 0.5
    pipe(lq, upscale=8.0, latent="mode", tile_size=512, tile_stride=384, vram_budget_gb=one_tile_budget,
         cuda_graphs=False, attention_autotune=False)
    need_tiled = torch.cuda.max_memory_allocated() - base
    assert need_tiled < 0.8 * need
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # A cap between the two: one pass cannot fit, 512 px tiles can.
    torch.cuda.set_per_process_memory_fraction((base + (need + need_tiled) / 2) / total)
    try:
        with caplog.at_level("WARNING", logger="hypir"):
            retried = pipe(lq, upscale=8.0, latent="mode", tile_size="auto", cuda_graphs=False, attention_autotune=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"one pass needs {need / 2**20:.0f} MiB, 512 px tiles {need_tiled / 2**20:.0f} MiB; capped between: "
          f"retried with tiles {retried.tile_size}/{retried.tile_stride}")
    assert "out of GPU memory (CUDA out of memory" in caplog.text and "retrying" in caplog.text
    assert retried.tile_size is not None and retried.images.shape == one_pass.images.shape
    assert torch.isfinite(retried.images).all()


def test_kernel_timing_is_gpu_time_not_wrapper_time():
    """The per-shape choice times what a graphed pass pays: a kernel behind a slow Python wrapper measures as
    fast as the same kernel called directly (flash-attn 2's wrapper made it lose at small shapes when each call
    was timed alone)."""
    import time

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("sdpa_flash needs sm80+")
    fn = REGISTRY[AttentionBackend.SDPA_FLASH].fn

    def slow_wrapper(q, k, v, scale):
        time.sleep(0.0003)  # 0.3 ms of Python before the same kernel
        return fn(q, k, v, scale)

    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, 16384, 5, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(1, 77, 5, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    fn(q, kv, kv, 0.125)
    direct, wrapped = (tuning_module.time_kernels({AttentionBackend.SDPA_FLASH: f}, q, kv, kv, 0.125)[
        AttentionBackend.SDPA_FLASH] for f in (fn, slow_wrapper))
    # Timed together (two candidates' calls behind one sleep), each keeps its own time.
    together = tuning_module.time_kernels({AttentionBackend.SDPA_FLASH: fn, AttentionBackend.SDPA_CUDNN: slow_wrapper},
                                          q, kv, kv, 0.125)
    assert abs(together[AttentionBackend.SDPA_CUDNN] - direct) <= 0.2 * direct + 0.01
    assert abs(together[AttentionBackend.SDPA_FLASH] - direct) <= 0.2 * direct + 0.01
    print(f"16384x77 cross-attention, sdpa_flash: {direct:.4f} ms direct, {wrapped:.4f} ms behind a 0.3 ms wrapper")
    assert direct < 0.3 and abs(wrapped - direct) <= 0.2 * direct + 0.01


def test_no_flash_kernel_anywhere_with_use_flash_attention_off(gpu_models):
    """use_flash_attention=False: the profiler sees no FlashAttention-class kernel in the whole pass (UNet, VAE,
    text encoder), whatever packages are installed."""
    from torch.profiler import ProfilerActivity, profile

    from hypir.pipeline import HYPIRPipeline

    pipe = HYPIRPipeline(gpu_models["bf16"])
    images = torch.rand(1, 3, 64, 64, device="cuda")
    pipe(images, upscale=2.0, use_flash_attention=False, cuda_graphs=False, prompt="no flash")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = pipe(images, upscale=2.0, use_flash_attention=False, cuda_graphs=False, prompt="no flash at all")
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    # FlashAttention 2 and 4 kernels carry "flash" in their names (FA4's CuTe DSL kernels
    # "...FlashAttentionForwardSm90..."), cuDNN's attention "native_sdpa".
    flash = [n for n in names if "flash" in n.lower() or "native_sdpa" in n.lower()]
    assert not flash, flash
    assert any("fmha" in n.lower() or "attention" in n.lower() for n in names), names  # attention was profiled
    assert not any(REGISTRY[b].flash_class for b in result.report.per_module.values())
    assert result.report.text_encoder != "flash_attention_2"
    assert result.report.status_line().startswith("FlashAttention: disabled (switched off)")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_pass_on_the_second_gpu_runs_there_graph_and_kernels_included(tiny_files, caplog):
    """Models on cuda:1 while cuda:0 is the current device (a --devices worker, ComfyUI on its second GPU): the
    CUDA graph is captured and replayed, every kernel runs on cuda:1, and the image equals the cuda:0 pass."""
    from torch.profiler import ProfilerActivity, profile

    from hypir.pipeline import HYPIRPipeline
    from hypir.runtime import load_models

    folder, weights = tiny_files
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for device in ("cuda:0", "cuda:1"):
        pipe = HYPIRPipeline(load_models(folder, weights, device=device, dtype="bf16"))
        options = dict(upscale=2.0, latent="mode", attention="sdpa_efficient", attention_autotune=False)
        pipe(images.to(device), **options)  # this size's first run captures the graph
        assert torch.cuda.current_device() == 0
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            result = pipe(images.to(device), **options)
            torch.cuda.synchronize(device)
        assert "UNet CUDA graph" in result.speedups and "next run" not in result.speedups, result.speedups
        kernel_devices = {e.device_index for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
        print(device, result.status_line(), "kernels on", kernel_devices)
        assert kernel_devices == {int(device[-1])}, (device, kernel_devices)
        results[device] = result.images
    assert "capture failed" not in caplog.text
    assert results["cuda:1"].device == torch.device("cuda:1")
    # cuDNN picks each convolution's algorithm per device by timing: equal within bf16 rounding, not bit for bit.
    torch.testing.assert_close(results["cuda:1"].cpu(), results["cuda:0"].cpu(), rtol=0, atol=2 / 255)


def test_nothing_replays_against_weights_that_moved(tiny_files):
    """ComfyUI offloads HYPIR (its weights go to the CPU) and loads it back (to new addresses), here with
    the weights changed while away: the next pass must use the weights where they now are. A CUDA graph
    replayed against the old addresses would give the first image (or garbage)."""
    from hypir.pipeline import HYPIRPipeline
    from hypir.runtime import load_models, runtime_of

    folder, weights = tiny_files
    models = load_models(folder, weights, device="cuda", dtype="bf16")
    pipe = HYPIRPipeline(models)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).cuda()
    options = dict(upscale=2.0, latent="mode", attention="sdpa_efficient", attention_autotune=False)
    pipe(x, **options)
    before = pipe(x, **options)
    assert runtime_of(models).unet_graphs.replays >= 1 and "next run" not in before.speedups
    addresses = [p.data_ptr() for p in models.unet.parameters()]
    models.unet.to("cpu")
    with torch.no_grad():
        for p in models.unet.parameters():
            p.mul_(0.9)
    models.unet.to("cuda")
    assert [p.data_ptr() for p in models.unet.parameters()] != addresses
    torch.cuda.empty_cache()  # the old addresses' memory goes back to the driver: a stale replay reads freed memory
    after = pipe(x, **options)
    runtime_of(models).unet_graphs.clear()
    eager = pipe(x, **options)  # the first call of its size again: eager, with the kernels a graph holds
    assert "next run" in eager.speedups
    assert (after.images - before.images).abs().max().item() > 1e-2  # the weights changed the image
    torch.testing.assert_close(after.images, eager.images, rtol=0, atol=2 / 255)


CUDA_MALLOC_ASYNC_SCRIPT = r"""
import sys
import torch
import hypir.kernels as kernels
from hypir.pipeline import HYPIRPipeline
from hypir.runtime import load_models

assert torch.cuda.get_allocator_backend() == "cudaMallocAsync"
kernels.TRITON_MIN_ELEMENTS = 1  # the tiny UNet's activations on the Triton kernels, as SD2.1's are at 1024
models = load_models(sys.argv[1], sys.argv[2], device="cuda", dtype="bf16")
pipe = HYPIRPipeline(models)
x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).cuda()
options = dict(upscale=2.0, latent="mode", attention="sdpa_efficient", attention_autotune=False)
results = [pipe(x, **options) for _ in range(3)]
status = results[-1].status_line()
assert kernels.triton_failure() is None, kernels.triton_failure()
assert "Triton norms" in status and "no UNet CUDA graph (the cudaMallocAsync allocator" in status, status
eager = pipe(x, **options, cuda_graphs=False)
assert torch.equal(results[-1].images, eager.images)  # the same kernels as a pass without graphs

print("ok", status)
"""


def test_cuda_malloc_async_keeps_triton_and_drops_the_graph(tiny_files, tmp_path):
    """ComfyUI runs PyTorch's cudaMallocAsync allocator by default. A CUDA graph captured under it cannot hold
    Triton launches (their pointers have no address until the graph runs): on the H200 the first ComfyUI
    capture failed and the process lost its Triton kernels for good (0.22 s a pass against 0.08 s). The pass
    must keep Triton, run the UNet without a graph, and say why."""
    import os
    import subprocess
    import sys

    folder, weights = tiny_files
    script = tmp_path / "cuda_malloc_async.py"
    script.write_text(CUDA_MALLOC_ASYNC_SCRIPT)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    done = subprocess.run([sys.executable, str(script), str(folder), str(weights)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout[-3000:] + done.stderr[-5000:]


def test_a_warm_pass_reads_from_the_gpu_once(small_models_bf16):
    """No synchronisation inside the pass: each one left the GPU idle while the next stage was launched (10 of
    63 ms at 1024 on an H200). The one read left is the stages' NaN/infinity counts, at the end (a blocking
    copy to the GPU, such as the tiles' blending weights made on the CPU, counts too)."""
    import warnings

    from hypir.pipeline import HYPIRPipeline

    pipe = HYPIRPipeline(small_models_bf16)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5)).cuda()
    for _ in range(3):  # timing, then the graph's capture, then a warm pass
        first = pipe(x, upscale=2.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pipe(x, upscale=2.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs
    assert "UNet CUDA graph" in result.status_line()
    torch.testing.assert_close(result.images, first.images, rtol=0, atol=0)


def test_the_first_non_finite_stage_is_the_error_read_at_the_end():
    from hypir.pipeline import FiniteChecks, NonFiniteError, require_finite

    checks = FiniteChecks()
    good, bad = torch.ones(4, device="cuda"), torch.tensor([1.0, float("nan")], device="cuda")
    require_finite(checks, good, "the first stage", torch.bfloat16)
    require_finite(checks, bad, "the second stage", torch.bfloat16)
    require_finite(checks, bad * 0 + float("inf"), "the third stage", torch.bfloat16)
    with pytest.raises(NonFiniteError, match="the second stage holds 1 NaN or infinite values \\(of 2\\) in bfloat16"):
        checks.raise_first()
    checks.raise_first()  # read once


@pytest.mark.parametrize("where,tiled", [("cpu", False), ("cuda", False), ("cuda", True)])
def test_a_broken_input_is_the_error_though_its_check_follows_the_encoder(small_models_bf16, where, tiled):
    """The input's NaN check is queued after the encoder's first launch, on its copy on the GPU (a CPU image,
    ComfyUI's, included: no count on the CPU), once with tiles too; it is still the error raised, ahead of the
    stages its NaN reached."""
    from hypir.pipeline import HYPIRPipeline

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    x[0, 1, 5, 7] = float("nan")
    options = dict(tile_size=128, tile_stride=64) if tiled else {}
    with pytest.raises(ValueError, match="the input holds 1 NaN or infinite values \\(of 12288\\)"):
        HYPIRPipeline(small_models_bf16)(x.to(where), upscale=4.0, **options)


def test_models_loaded_under_inference_mode_unload_outside_it(tiny_files):
    """ComfyUI loads and runs HYPIR under torch.inference_mode() and unloads it outside (POST /free, Unload
    Models: its prompt worker's unload_all_models). The move to the CPU must not raise (it did in the upsamplers'
    check, which ended ComfyUI's prompt worker with 1858 MiB left on the GPU), must give the weights' GPU memory
    back, and a load back under inference mode must restore the same image."""
    from hypir.pipeline import HYPIRPipeline
    from hypir.runtime import load_models, runtime_of

    folder, weights = tiny_files
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)).cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        models = load_models(folder, weights, device="cuda", dtype="bf16")
        pipe = HYPIRPipeline(models)
        for _ in range(3):  # eager, capture, replay: the upsamplers' 4x4 kernels and the graphs exist
            first = pipe(x, upscale=4.0).images.clone()
    parts = (models.unet, models.vae, models.text_encoder)
    weights = sum(t.numel() * t.element_size() for part in parts for t in (*part.parameters(), *part.buffers()))
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    for part in parts:
        part.to("cpu")  # outside inference mode, as ComfyUI's unload
    runtime_of(models).clear()  # the CUDA graphs, as the node's unload does
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # At least the weights' memory came back. About 100 MiB more than before the load stayed allocated with the
    # tiny models on the H200 (not the weights: what it is was not measured; a ComfyUI /free, without graphs,
    # came back within 33 MiB of start-up in benchmarks/results/2026-11-30-h200-comfyui).
    assert torch.cuda.memory_allocated() <= loaded - weights, (before, loaded, weights)
    with torch.inference_mode():
        for part in parts:
            part.to("cuda")
        again = pipe(x, upscale=4.0).images
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_a_queued_pass_does_not_wait_for_the_one_before(small_models_bf16):
    """The folder pipeline queues a photo's pass before reading the last one back: launching a warm pass
    synchronises nothing (the input goes up from pinned memory, the output and the NaN/infinity counts come back
    into pinned memory), and collecting gives restore_frames' output exactly."""
    import warnings

    import numpy as np

    from hypir.pipeline import HYPIRPipeline
    from hypir.settings import RestoreOptions

    pipe = HYPIRPipeline(small_models_bf16)
    frames = [np.random.default_rng(i).random((3, 128, 128), dtype=np.float32) for i in range(2)]
    options = RestoreOptions(upscale=2.0)
    for _ in range(3):  # timing, the graph's capture, warm
        want, _ = pipe.restore_frames(frames, options)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            launched = [pipe.launch_frame(frame, options) for frame in frames]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
    assert syncs == []
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued first: the launch must not wait for it
    behind = pipe.launch_frame(frames[0], options)
    assert not behind.ready()
    assert np.array_equal(behind.collect()[0], want[0])
    for flight, expected in zip(launched, want):
        frame, result = flight.collect()
        assert np.array_equal(frame, expected) and "UNet CUDA graph" in result.status_line()


def test_a_graphed_unet_runs_triton_at_every_size(tiny_files):
    """Inside a CUDA graph a launch costs nothing, so the graphed UNet's small activations take the Triton
    kernels too (its first, eager call as well, so that every call computes the same); without graphs they stay
    on PyTorch's below TRITON_MIN_ELEMENTS. The tiny model's activations are all small."""
    from hypir.bench.common import cuda_kernels
    from hypir.pipeline import HYPIRPipeline
    from hypir.runtime import load_models

    folder, weights = tiny_files
    pipe = HYPIRPipeline(load_models(folder, weights, device="cuda", dtype="bf16"))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).cuda()
    options = dict(upscale=2.0, latent="mode", attention="sdpa_efficient", attention_autotune=False)

    def triton_norms(**extra) -> int:  # each Triton GroupNorm ends in one normalisation kernel
        kernels = cuda_kernels(lambda: pipe(x, **options, **extra))
        return sum(calls for name, _, calls in kernels if name in ("row_normalize", "normalize"))

    without_graphs = triton_norms(cuda_graphs=False)
    # the first call of this size with graphs on: eager, with the kernels its graph will hold
    assert triton_norms(cuda_graphs=True) > without_graphs
    # a new size (inputs below 512 px are processed at 512: 48 px would be the size of x again)
    y = torch.rand(1, 3, 320, 288, generator=torch.Generator().manual_seed(4)).cuda()
    eager, captured, replayed = (pipe(y, **options) for _ in range(3))
    assert "next run" in eager.speedups and "next run" not in replayed.speedups, (eager.speedups, replayed.speedups)
    assert torch.equal(eager.images, replayed.images) and torch.equal(captured.images, replayed.images)


def test_statistics_handed_over_by_the_adds_change_no_output(small_models_bf16, monkeypatch):
    """The bias adds that end convolutions and residual blocks leave GroupNorm's partial statistics of what
    they wrote, and the next GroupNorm skips its statistics pass: the restored image is the same, bit for bit,
    as with every GroupNorm computing its own (eager and replayed from graphs), with fewer statistics passes."""
    from hypir import kernels
    from hypir.bench.common import cuda_kernels
    from hypir.pipeline import HYPIRPipeline
    from hypir.runtime import runtime_of

    pipe = HYPIRPipeline(small_models_bf16)
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(6)).cuda()

    def run(**options):
        names = [(name, calls) for name, _, calls in cuda_kernels(lambda: pipe(x, upscale=2.0, **options))]
        passes = sum(calls for name, calls in names if name == "row_stats")
        return pipe(x, upscale=2.0, **options).images, passes, sum(c for n, c in names if n == "row_bias_add_stats")

    handed, handed_passes, adds = run(cuda_graphs=False)
    graphed = [pipe(x, upscale=2.0).images for _ in range(3)][-1]  # eager, captured, replayed
    monkeypatch.setattr(kernels, "channel_statistics", lambda tensor: None)
    runtime_of(pipe.models).release_graphs()
    own, own_passes, _ = run(cuda_graphs=False)
    graphed_own = [pipe(x, upscale=2.0).images for _ in range(3)][-1]
    assert adds > 0 and handed_passes < own_passes, (adds, handed_passes, own_passes)
    assert torch.equal(handed, own) and torch.equal(graphed, graphed_own)

