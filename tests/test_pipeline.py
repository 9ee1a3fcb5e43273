"""The restore pass against an independent re-derivation of the method (XPixelGroup/HYPIR's enhancer: upscale,
short side to 512, VAE encode, one UNet call at model_t, x0 at coeff_t, VAE decode, wavelet colour fix)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hypir.pipeline import Callbacks
from hypir.settings import RestoreOptions
from hypir.planning import output_size as target_size


# ---- an independent implementation of the method, written from the specification --------------

def _alphas_cumprod64() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _wavelet_split(image: torch.Tensor, levels: int = 5):
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                          dtype=image.dtype)[None, None].repeat(3, 1, 1, 1)
    high = torch.zeros_like(image)
    for i in range(levels):
        r = 2 ** i
        low = F.conv2d(F.pad(image, (r, r, r, r), mode="replicate"), kernel, groups=3, dilation=r)
        high = high + (image - low)
        image = low
    return high, image


def reference_restore(models, lq, upscale, prompt="", model_t=200, coeff_t=200, dtype=torch.float64,
                      latent="mode", seed=231):
    text_encoder = copy.deepcopy(models.text_encoder).to(dtype)
    vae = copy.deepcopy(models.vae).to(dtype)
    unet = copy.deepcopy(models.unet).to(dtype)
    lq = lq.to(dtype)
    with torch.no_grad():
        ref = F.interpolate(lq, scale_factor=upscale, mode="bicubic")
        h0, w0 = ref.shape[2:]
        x = ref
        if min(h0, w0) <= 512:
            if h0 == w0:
                size = (512, 512)
            elif h0 < w0:
                size = (512, int(w0 * (512 / h0)))
            else:
                size = (int(h0 * (512 / w0)), 512)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True)
        x = x * 2 - 1
        h1, w1 = x.shape[2:]
        x = F.pad(x, (0, (8 - w1 % 8) % 8, 0, (8 - h1 % 8) % 8))
        dist = vae.encode(x).latent_dist
        if latent == "mode":
            z = dist.mode()
        else:
            torch.manual_seed(seed)
            z = dist.sample()
        z_in = z * 0.18215
        ids = models.tokenizer([prompt] * lq.shape[0], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        text = text_encoder(ids)[0]
        eps = unet(z_in, torch.full((lq.shape[0],), model_t), encoder_hidden_states=text).sample
        abar = _alphas_cumprod64()[coeff_t].item()
        x0 = (z_in - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        out = vae.decode(x0 / 0.18215).sample[..., :h1, :w1]
        out = F.interpolate((out + 1) / 2, size=(h0, w0), mode="bicubic", antialias=True)
        high, _ = _wavelet_split(out)
        _, low = _wavelet_split(ref)
        return (high + low).clamp(0, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- tests ----------------------------------------------------------------------------------------

def test_scheduler_constants(tiny_models):
    abar = tiny_models.alphas_cumprod
    assert abar[200].item() == pytest.approx(0.7536920, abs=5e-7)
    assert abar[100].item() == pytest.approx(0.8942235, abs=5e-7)
    assert abar[300].item() == pytest.approx(0.5905011, abs=5e-7)
    assert 1 / math.sqrt(abar[200].item()) == pytest.approx(1.1518689, abs=1e-6)


def test_restore_matches_float64_rederivation(pipe, tiny_models, image_factory):
    lq = image_factory(1, 64, 80, seed=3)
    ours = pipe(lq, upscale=2.0, latent="mode", tile_size="auto").images
    expected = reference_restore(tiny_models, lq, 2.0)
    assert ours.shape == expected.shape == (1, 3, 128, 160)
    assert rel_err(ours, expected) <= 1e-5


def test_restore_batch_prompt_and_steps_at_fp32_precision(pipe, tiny_models, image_factory):
    """Batch 2, a prompt, other t: as close to float64 as an fp32 evaluation of the same math gets
    (random weights amplify rounding here: the fp32 re-derivation itself is ~5e-5 away)."""
    lq = image_factory(2, 24, 20, seed=3)
    args = (lq, 3.0, "a sharp photo of a face", 150, 250)
    ours = pipe(lq, upscale=3.0, prompt=args[2], model_t=150, coeff_t=250, latent="mode").images
    expected = reference_restore(tiny_models, *args)
    floor = rel_err(reference_restore(tiny_models, *args, dtype=torch.float32), expected)
    assert ours.shape == (2, 3, 72, 60)
    assert rel_err(ours, expected) <= max(1e-5, 1.5 * floor)
    assert rel_err(ours[1:], ours[:1]) > 1e-3  # the two images are restored separately


def test_seeded_sample_matches_reference_seeding(pipe, tiny_models, image_factory):
    """One tile: the noise is torch.manual_seed(seed) then one draw, as the reference does."""
    lq = image_factory(1, 40, 56, seed=5)
    ours = pipe(lq, upscale=2.0, seed=77, latent="sample").images
    expected = reference_restore(tiny_models, lq, 2.0, dtype=torch.float32, latent="sample", seed=77)
    assert rel_err(ours, expected) <= 1e-5
    other = pipe(lq, upscale=2.0, seed=78, latent="sample").images
    assert rel_err(other, ours) > 1e-4  # the seed matters


def test_long_side_and_color_fix_switch(pipe, image_factory):
    lq = image_factory(1, 30, 50, seed=1)
    result = pipe(lq, long_side=100, latent="mode")
    assert result.images.shape == (1, 3, 60, 100)
    assert target_size(50, 30, None, 100) == (100, 60)
    no_fix = pipe(lq, long_side=100, latent="mode", color_fix=False).images
    assert rel_err(no_fix, result.images) > 1e-3
    assert result.images.min() >= 0 and result.images.max() <= 1


@pytest.mark.parametrize("height,width,upscale", [(1, 1, 1.0), (7, 13, 1.0), (513, 1025, 1.0)])
def test_odd_sizes(pipe, image_factory, height, width, upscale):
    lq = image_factory(1, height, width, seed=2)
    result = pipe(lq, upscale=upscale, latent="mode")
    assert result.images.shape == (1, 3, height, width)
    assert torch.isfinite(result.images).all()
    assert result.processed_size[0] >= 512 and result.processed_size[1] >= 512


def test_forced_tiles_cover_and_report(pipe, image_factory):
    lq = image_factory(1, 64, 96, seed=4)
    result = pipe(lq, upscale=8.0, tile_size=512, tile_stride=256, latent="mode")
    assert result.images.shape == (1, 3, 512, 768)
    assert (result.tile_size, result.tile_stride) == (512, 256)
    assert torch.isfinite(result.images).all()
    assert "tiles 512/256" in result.status_line()


def test_progress_and_interrupt(pipe, image_factory):
    lq = image_factory(1, 64, 96, seed=4)
    seen = []
    pipe(lq, upscale=8.0, tile_size=512, tile_stride=256, latent="mode",
         callbacks=Callbacks(progress=lambda stage, done, total: seen.append((stage, done, total))))
    assert [s for s in seen if s[1] == s[2]] == [("encode", 2, 2), ("unet", 2, 2), ("decode", 2, 2)]

    class Stop(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        pipe(lq, upscale=8.0, tile_size=512, tile_stride=256, callbacks=Callbacks(check_interrupt=interrupt))


def test_prompt_embedding_cached(pipe):
    a = pipe.encode_prompt("a cat", "sdpa")
    b = pipe.encode_prompt("a cat", "sdpa")
    c = pipe.encode_prompt("a dog", "sdpa")
    assert a is b and c is not a
    assert a.shape == (1, 77, 32)


def test_long_prompt_truncated_with_warning(pipe, caplog):
    with caplog.at_level("WARNING", logger="hypir"):
        pipe.encode_prompt(" ".join(["word"] * 120), "sdpa")
    assert "only the first 77 are used" in caplog.text


@pytest.mark.parametrize("kwargs,message", [
    (dict(upscale=0), "upscale must be"),
    (dict(upscale=100), "upscale must be a number in \\(0, 16\\], got 100"),
    (dict(upscale=2.0, model_t=0), "model_t must be an integer in 1..999"),
    (dict(upscale=2.0, coeff_t=1000), "coeff_t must be an integer in 1..999"),
    (dict(upscale=2.0, latent="median"), "latent must be"),
    (dict(upscale=2.0, tile_size=500), "tile_size must be"),
    (dict(upscale=2.0, tile_size=512, tile_stride=100), "tile_stride must be a multiple of 8"),
])
def test_bad_arguments(pipe, image_factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(image_factory(1, 16, 16), **kwargs)


@pytest.mark.parametrize("images,message", [
    (torch.rand(0, 3, 8, 8), "empty input: batch 0"),
    (torch.rand(1, 3, 0, 8), "empty input: batch 1, size 8x0"),
    (torch.rand(1, 5, 8, 8), "1 \\(grey\\), 2 \\(grey and alpha\\), 3 \\(RGB\\) or 4 \\(RGBA\\) channels, got 5"),
    (torch.full((1, 3, 8, 8), float("nan")), "holds 192 NaN or infinite values"),
    (torch.tensor([0.5, float("inf")]).repeat(96).view(1, 3, 8, 8), "holds 96 NaN or infinite values"),
    (torch.rand(3, 8, 8), "\\(B, 3, H, W\\)"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float"),
])
def test_bad_images(pipe, images, message):
    with pytest.raises(ValueError, match=message):
        pipe(images, upscale=2.0)


def test_grey_and_rgba_keep_their_channels(pipe, image_factory):
    rgb = image_factory(1, 16, 16, seed=12)
    grey = rgb.mean(dim=1, keepdim=True)
    out = pipe(grey, upscale=2.0, latent="mode").images
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()
    alpha = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    rgba = torch.cat([rgb, alpha], dim=1)
    out = pipe(rgba, upscale=2.0, latent="mode").images
    assert out.shape == (1, 4, 32, 32)
    torch.testing.assert_close(out[:, :3], pipe(rgb, upscale=2.0, latent="mode").images)
    assert out[0, 3, :, 0].max() < 0.1 and out[0, 3, :, -1].min() > 0.9  # the alpha ramp, resized


def test_output_too_large_refused_up_front(pipe):
    with pytest.raises(ValueError, match="needs about [0-9.]+ GiB for its image buffers alone"):
        pipe(torch.rand(1, 3, 64, 64), long_side=200000)


def test_fp16_vae_overflow_recomputed_in_fp32(tiny_files, caplog):
    """A real fp16 overflow: a decoder whose last convolution sums to beyond fp16's range (65504)."""
    from hypir.pipeline import vae_stage
    from hypir.runtime import load_models, runtime_of

    models = load_models(*tiny_files, device="cpu", dtype="fp16")
    with torch.no_grad():
        models.vae.decoder.conv_out.weight.fill_(5000.0)
    z = torch.randn(1, 4, 4, 4)
    fp32_stages = set()
    with caplog.at_level("WARNING", logger="hypir"):
        out = vae_stage(models, runtime_of(models), "decode", z, fp32_stages=fp32_stages)
    assert "VAE decode overflowed in fp16; recomputing it in fp32" in caplog.text and fp32_stages == {"decode"}
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.abs().max() > 65504
    assert models.vae.decoder.conv_out.weight.dtype == torch.float16  # the shared model stays fp16


def test_a_broken_input_in_fp16_is_its_error_not_a_vae_overflow(tiny_files, caplog, monkeypatch):
    """On a GPU the NaN checks are read at the end of the pass, but an fp16 VAE stage that went non-finite reads
    them first: a NaN input is the input's error, with no fp32 VAE recompute (a warning that misleads and a
    float32 copy of the VAE kept). The GPU's deferred checks are simulated on the CPU."""
    from hypir import pipeline
    from hypir.runtime import load_models, runtime_of

    def deferred_add(self, tensor, error):
        self._pending.append((torch.isfinite(tensor).logical_not_().sum(), tensor.numel(), error))
        return tensor

    monkeypatch.setattr(pipeline.FiniteChecks, "add", deferred_add)
    models = load_models(*tiny_files, device="cpu", dtype="fp16")
    images = torch.rand(1, 3, 16, 16)
    images[0, 0, 3, 3] = float("nan")
    with caplog.at_level("WARNING", logger="hypir"), pytest.raises(ValueError, match="the input holds 1 NaN"):
        pipeline.HYPIRPipeline(models)(images, upscale=2.0, latent="mode")
    assert "overflowed" not in caplog.text and runtime_of(models)._vae_fp32 is None


def test_a_small_budget_tiles_the_pass(pipe, image_factory):
    """The pass follows the planner (tests/test_planning.py covers its arithmetic): a budget below one pass's
    estimate gives tiles, and the result keeps the full size. The 384 output is processed at 512: 2x2 tiles of 320
    px are the fastest estimate that fits (3x3 of 256 would be the smallest)."""
    result = pipe(image_factory(1, 48, 48, seed=9), upscale=8.0, latent="mode", vram_budget_gb=0.4)
    assert (result.tile_size, result.tile_stride) == (320, 192)
    assert result.images.shape == (1, 3, 384, 384) and torch.isfinite(result.images).all()



def test_the_status_line_names_the_vae_stages_recomputed_in_fp32(pipe):
    """What the fp16 overflow test above records (vae_stage's fp32_stages) reaches the status line."""
    import dataclasses

    result = pipe(torch.rand(1, 3, 32, 32), upscale=1.0, latent="mode")
    assert result.fp32_vae == () and "fp32" not in result.status_line()
    both = dataclasses.replace(result, fp32_vae=("encode", "decode"))
    assert "| VAE encode and decode recomputed in fp32 (fp16 overflowed) |" in both.status_line()


def test_cuda_malloc_async_runs_the_unet_without_a_graph_and_says_why(monkeypatch):
    """The wiring of the GPU test of the same name (tests/test_gpu.py): under cudaMallocAsync a graph cannot
    hold Triton launches, so the UNet runs eagerly on them; with the fused kernels off it is graphed."""
    import types

    from hypir import pipeline
    from hypir.settings import RestoreOptions

    monkeypatch.setattr(pipeline, "why_graphs_cannot_hold_triton", lambda: "the cudaMallocAsync allocator")
    monkeypatch.setattr(pipeline, "triton_available", lambda: True)
    monkeypatch.setattr(pipeline, "triton_failure", lambda: None)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"))
    assert pipeline._graphs_blocked(RestoreOptions()) == "the cudaMallocAsync allocator"
    assert pipeline._speedups(on_gpu, RestoreOptions(), replayed=False) == (
        "Triton norms, no UNet CUDA graph (the cudaMallocAsync allocator cannot hold Triton kernels; "
        "ComfyUI: --disable-cuda-malloc)")
    # The fused softmax (the matmul attention backend's) is a Triton kernel too: still no graph.
    assert pipeline._graphs_blocked(RestoreOptions(fused_kernels=False)) == "the cudaMallocAsync allocator"
    no_triton = RestoreOptions(fused_kernels=False, fused_softmax=False)
    assert pipeline._graphs_blocked(no_triton) is None
    assert pipeline._speedups(on_gpu, no_triton, replayed=True) == (
        "PyTorch norms (fused kernels off), UNet CUDA graph")


def test_every_stage_is_a_profiler_range_in_order(pipe, image_factory):
    """Benchmarks charge GPU time and idle gaps to the stages by these ranges (hypir.bench.common.gpu_timeline)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = pipe(image_factory(1, 24, 20), upscale=2.0)
    names = [e.name for e in sorted(prof.events(), key=lambda e: e.time_range.start) if e.name.startswith("hypir.")]
    assert names == ["hypir.prepare", "hypir.encode", "hypir.unet", "hypir.decode", "hypir.finish"]
    assert list(result.stage_seconds) == ["prepare", "encode", "unet", "decode", "finish"]


def test_finite_checks_of_cpu_tensors_are_at_once():
    """FiniteChecks on the CPU: a CPU tensor is checked when it is added (the GPU's deferred counts:
    tests/test_gpu.py)."""
    from hypir.pipeline import FiniteChecks, NonFiniteError, input_not_finite, require_finite

    checks = FiniteChecks()
    with pytest.raises(ValueError, match="the input holds 2 NaN or infinite values \\(of 6\\)"):
        checks.add(torch.tensor([[1.0, float("nan"), float("inf"), 0, 0, 0]]), input_not_finite)
    same = torch.ones(3)
    assert require_finite(checks, same, "a stage", torch.float32) is same
    with pytest.raises(NonFiniteError, match="the UNet's noise prediction holds 1 NaN or infinite values \\(of 2\\) "
                                             "in float32: nothing was restored. Try the fp32 dtype"):
        require_finite(checks, torch.tensor([0.0, float("inf")]), "the UNet's noise prediction", torch.float32)
    checks.raise_first()  # nothing pending: CPU tensors were checked at once


def test_the_input_check_is_at_once_on_a_cpu_and_queued_once_elsewhere():
    """pipeline._input_check: on a CPU the input is counted before anything is computed from it; on another
    device the check is handed back to be queued after the encoder's first launch, and queued once however many
    tile groups the encoder runs (a "meta" tensor stands for the GPU's; tests/test_gpu.py runs the pass)."""
    from hypir.pipeline import FiniteChecks, _input_check

    checks = FiniteChecks()
    with pytest.raises(ValueError, match="the input holds 1 NaN"):
        _input_check(checks, torch.tensor([[0.5, float("nan")]]))
    queue = _input_check(checks, torch.empty(1, 3, 8, 8, device="meta"))
    assert checks._pending == []
    queue()
    queue()
    assert len(checks._pending) == 1 and checks._pending[0][1] == 3 * 8 * 8


def test_the_colour_fix_kernel_made_under_inference_mode_is_a_normal_tensor():
    """ComfyUI runs nodes under torch.inference_mode(): the blur kernel the colour fix keeps must not be an
    inference tensor, which autograd-recorded uses outside that mode refuse."""
    from hypir import colorfix

    colorfix._blur_kernel.cache_clear()
    with torch.inference_mode():
        kernel = colorfix._blur_kernel(torch.float32, torch.device("cpu"))
    assert not kernel.is_inference() and kernel.sum().item() == pytest.approx(1.0)
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    colorfix.low_frequency(x).sum().backward()
    assert x.grad is not None


def test_a_launched_frame_collects_what_restore_frames_gives(pipe):
    """HYPIRPipeline.launch_frame (the folder pipeline's queued pass) and FrameInFlight.collect: the same
    output as restore_frames, the same status apart from the time."""
    import numpy as np

    frames = [np.random.default_rng(i).random((3, 20, 28), dtype=np.float32) for i in range(2)]
    options = RestoreOptions(upscale=2.0, latent="mode")
    want, result = pipe.restore_frames(frames, options)
    launched = [pipe.launch_frame(frame, options) for frame in frames]
    got = [flight.collect() for flight in launched]
    for (frame, collected), expected in zip(got, want):
        assert frame.dtype == np.float32 and np.array_equal(frame, expected)
    assert got[-1][1].status_line().rsplit("|", 1)[0] == result.status_line().rsplit("|", 1)[0]
    assert got[-1][1].seconds > 0 and got[-1][1].pending is None


def test_colour_fix_blurs_the_difference_once():
    """restored + low(reference - restored) is high(restored) + low(reference): the 5-level blur, replicate
    padding included, is linear. In float64 the two agree to rounding."""
    from hypir import colorfix

    g = torch.Generator().manual_seed(11)
    restored, reference = (torch.rand(2, 3, 70, 90, generator=g, dtype=torch.float64) for _ in range(2))
    two_blurs = restored - colorfix.low_frequency(restored) + colorfix.low_frequency(reference)
    torch.testing.assert_close(colorfix.wavelet_color_fix(restored, reference), two_blurs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bicubic_resize_to_the_same_size_is_the_identity(dtype):
    """Why the pass skips the final resize when the processed size is the output size: it would return its input."""
    x = torch.rand(1, 3, 37, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert torch.equal(F.interpolate(x, size=(37, 64), mode="bicubic", antialias=True), x)
