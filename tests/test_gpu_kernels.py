"""The fused Triton kernels on a GPU against PyTorch, on fresh random inputs (CUDA only)."""

import pytest
import torch

from hypir import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()),
                                                  reason="needs CUDA and Triton")]

# (shape, channels_last): the VAE's largest activations at a 1024x1024 output, the UNet's, the VAE attention's
# (N, C, L) norm, and an odd size.
SHAPES = [((1, 128, 1024, 1024), True), ((1, 256, 512, 512), False), ((1, 512, 128, 128), True),
          ((2, 320, 128, 128), True), ((1, 512, 16384), False), ((1, 96, 333, 517), True)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_group_norm_silu_on_gpu(shape, channels_last, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g) * 2 + 0.7
    if channels_last and x.ndim == 4:
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype)
    c = shape[1]
    w, b = (torch.randn(c, device="cuda", generator=g).to(dtype) for _ in range(2))
    pre = torch.randn(shape[0], c, device="cuda", generator=g).to(dtype)
    assert kernels.uses_triton(x)
    for silu, pre_bias in ((True, None), (False, None), (True, pre)):
        y = kernels.group_norm_silu(x, w, b, 32, 1e-6, silu, pre_bias)
        exact = kernels.group_norm_silu_reference(x.double(), w.double(), b.double(), 32, 1e-6, silu,
                                                  None if pre_bias is None else pre_bias.double())
        torch_out = kernels.group_norm_silu_reference(x, w, b, 32, 1e-6, silu, pre_bias)
        assert y.stride() == x.stride() and kernels.triton_failure() is None
        # within the dtype's rounding, and no further from float64 than PyTorch's own kernels
        tolerance = {torch.bfloat16: 3e-3, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
        err, torch_err = _rel(y, exact), _rel(torch_out, exact)
        print(f"group_norm {shape} {dtype} cl={channels_last} silu={silu} "
              f"pre={pre_bias is not None}: "
              f"triton {err:.2e}, pytorch {torch_err:.2e}")
        assert err <= max(tolerance, 1.5 * torch_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_add_channel_bias_on_gpu(dtype, channels_last):
    g = torch.Generator(device="cuda").manual_seed(7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 128, 1024, 1024, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn(1, 128, 1024, 1024, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    b = torch.randn(128, device="cuda", generator=g).to(dtype)
    exact = x.double() + b.double().view(-1, 1, 1) + r.double()
    torch_out = x + b.view(-1, 1, 1) + r
    out = kernels.add_channel_bias_(x, b, r)
    assert out is x and kernels.uses_triton(x)
    assert _rel(out, exact) <= max(_rel(torch_out, exact), 4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.fixture(scope="module")
def cuda_pipe(tiny_models_cuda):
    from hypir.pipeline import HYPIRPipeline

    return HYPIRPipeline(tiny_models_cuda)


@pytest.fixture(scope="module")
def tiny_models_cuda(tiny_files):
    from hypir.runtime import load_models

    base, weights = tiny_files
    return load_models(base, weights, device="cuda", dtype="bf16")


def test_cuda_graph_replay_equals_eager(cuda_pipe):
    """The UNet and the VAE stages replayed from CUDA graphs give the result of the first, eager call of their
    size (which runs the kernels its graphs hold: the UNet's small activations on Triton too, where a pass with
    graphs off keeps PyTorch's GroupNorm), report what the capture ran, and a model moved off and back gets
    new graphs (never a replay of freed weights), whose replays equal its first call after the move."""
    from hypir.runtime import runtime_of

    images = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(0)).cuda()
    runtime = runtime_of(cuda_pipe.models)
    graphs, vae_graphs = runtime.unet_graphs, runtime.vae_graphs
    eager = cuda_pipe(images, upscale=2, cuda_graphs=False)
    first = cuda_pipe(images, upscale=2, cuda_graphs=True)   # eager, shape seen
    second = cuda_pipe(images, upscale=2, cuda_graphs=True)  # captured and replayed
    third = cuda_pipe(images, upscale=2, cuda_graphs=True)   # replayed
    assert graphs.captures >= 1 and graphs.replays >= 2
    assert vae_graphs.captures >= 2 and vae_graphs.replays >= 4  # the encoder and the decoder
    assert "VAE CUDA graphs" in third.speedups and "VAE" not in first.speedups, (first.speedups, third.speedups)
    for result in (second, third):
        assert torch.equal(result.images, first.images)
    for result in (first, second, third):
        assert result.report.backends_by_role() == eager.report.backends_by_role()
    captures, vae_captures = graphs.captures, vae_graphs.captures
    for model in (cuda_pipe.models.unet, cuda_pipe.models.vae):
        model.to("cpu")
        model.to("cuda")
    moved = [cuda_pipe(images, upscale=2, cuda_graphs=True) for _ in range(3)]  # eager, captured, replayed
    assert graphs.captures == captures + 1 and vae_graphs.captures == vae_captures + 2
    for result in moved[1:]:
        assert torch.equal(result.images, moved[0].images)
    # The eager call after the move differed from the one before it by up to 8e-4 in two of four GPU suite runs
    # (5107ac5, 0d77137; benchmarks/results/2026-12-01-h200-levers-and-cards), the cause not found; a replay of
    # freed weights would give unrelated values, not bf16 noise.
    assert (moved[0].images - first.images).abs().max() <= 2e-3


@pytest.mark.parametrize("scores_dtype,dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("rows,width", [(65536, 77), (256, 16384), (64, 65536)])  # 65536: a 2048 output's VAE
def test_scaled_softmax_on_gpu(rows, width, scores_dtype, dtype, monkeypatch):
    calls = []
    original = kernels._triton_scaled_softmax
    monkeypatch.setattr(kernels, "_triton_scaled_softmax", lambda *a: calls.append(1) or original(*a))
    g = torch.Generator(device="cuda").manual_seed(3)
    scores = (torch.randn(1, rows, width, device="cuda", generator=g) * 8).to(scores_dtype)
    expected = torch.softmax(scores.double() * 0.044, dim=-1)
    probs = kernels.scaled_softmax(scores.clone(), 0.044, dtype)
    assert calls and kernels.triton_failure() is None and probs.dtype == dtype
    assert _rel(probs.double(), expected) <= 3e-3


@pytest.mark.parametrize("rows,width", [(512, 36864), (256, 65536)])  # a 1536 and a 2048 output's VAE
def test_shifted_exp_on_gpu(rows, width, monkeypatch):
    """`matmul`'s one-read exponentials at the VAE's widths, rows past the limit included: the values within
    fp16's rounding, the sums within float32's, and the kernel's outputs those of the PyTorch path."""
    calls = []
    original = kernels._triton_shifted_exp
    monkeypatch.setattr(kernels, "_triton_shifted_exp", lambda *a: calls.append(1) or original(*a))
    g = torch.Generator(device="cuda").manual_seed(5)
    scores = torch.randn(rows, width, device="cuda", generator=g, dtype=torch.float64) * 2
    scores -= scores[:, ::64].amax(dim=-1, keepdim=True)
    scores[::17, 100] = 30.0  # past the limit: exponentiated against their largest
    scores = scores.to(torch.float16).unsqueeze(0)
    values, sums = kernels.shifted_exp(scores, 1.4, 256.0, 5.0)
    assert calls and kernels.triton_failure() is None
    scaled = scores.double() * 1.4
    top = scaled.amax(dim=-1, keepdim=True)
    exact = torch.exp(scaled - torch.where(top > 5.0, top, 0.0)) * 256
    torch.testing.assert_close(values.double(), exact, rtol=2 ** -11, atol=2 ** -24)
    torch.testing.assert_close(sums.double(), exact.sum(dim=-1), rtol=1e-5, atol=0)
    with kernels.fused_softmax(False):
        reference_values, reference_sums = kernels.shifted_exp(scores, 1.4, 256.0, 5.0)
    torch.testing.assert_close(values, reference_values, rtol=2 ** -10, atol=2 ** -24)
    torch.testing.assert_close(sums, reference_sums, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,width", [(65536, 2560), (16384, 5120), (4096, 10240)])  # a 2048 output's GEGLUs
def test_gated_gelu_on_gpu(tokens, width, dtype, monkeypatch):
    calls = []
    original = kernels._triton_gated_gelu
    monkeypatch.setattr(kernels, "_triton_gated_gelu", lambda *a: calls.append(1) or original(*a))
    g = torch.Generator(device="cuda").manual_seed(4)
    x = (torch.randn(1, tokens, width, device="cuda", generator=g) * 2).to(dtype)
    value, gate = x.double().chunk(2, dim=-1)
    exact = value * torch.nn.functional.gelu(gate)
    got = kernels.gated_gelu(x)
    value, gate = x.chunk(2, dim=-1)
    pytorch = value * torch.nn.functional.gelu(gate)
    assert calls and kernels.triton_failure() is None
    assert _rel(got, exact) <= _rel(pytorch, exact)  # one rounding where PyTorch has two


def test_pad_bottom_right_on_gpu():
    x = torch.randn(1, 128, 1024, 1024, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    got = kernels.pad_bottom_right(x)
    assert kernels.triton_failure() is None and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.nn.functional.pad(x, (0, 1, 0, 1)))


def test_statistics_from_the_bias_add_at_a_2048_decoder_activation(monkeypatch):
    """A 2048 output's decoder: 128 channels at 2048x2048 plus bias and skip, channels_last. The add with
    statistics writes what the plain add writes, and the GroupNorm that reads them computes, bit for bit, what
    it computes with its own statistics pass."""
    g = torch.Generator(device="cuda").manual_seed(9)
    shape = (1, 128, 2048, 2048)
    x, residual = (torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
                   .contiguous(memory_format=torch.channels_last) for _ in range(2))
    bias, w, b = (torch.randn(128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    plain = kernels.add_channel_bias_(x.clone(), bias, residual)
    kernels.add_channel_bias_(x, bias, residual, statistics=True)
    assert kernels.triton_failure() is None and torch.equal(x, plain)
    assert kernels.channel_statistics(x) is not None and kernels.channel_statistics(plain) is None
    assert torch.equal(kernels.group_norm_silu(x, w, b, 32, 1e-6, True),
                       kernels.group_norm_silu(plain, w, b, 32, 1e-6, True))


def test_a_bicubic_resize_to_the_same_size_is_the_identity_on_gpu():
    """The pass skips the final resize when the processed size is the output size: on CUDA too it would return
    its input, bit for bit."""
    x = torch.rand(1, 3, 1024, 768, device="cuda")
    assert torch.equal(torch.nn.functional.interpolate(x, size=(1024, 768), mode="bicubic", antialias=True), x)


def test_group_norm_at_the_largest_vae_activation():
    """A 2048x2048 output's largest VAE activation: 256 channels at 2048x2048, channels_last."""
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(1, 256, 2048, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(256, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    y = kernels.group_norm_silu(x, w, b, 32, 1e-6, True)
    exact = kernels.group_norm_silu_reference(x.double(), w.double(), b.double(), 32, 1e-6, True)
    assert kernels.triton_failure() is None and _rel(y, exact) <= 3e-3


@pytest.mark.parametrize("tokens", [16384, 65536])  # a 1024 and a 2048 output
@pytest.mark.parametrize("std", [1.0, 3.0])  # logits of std 1 and 9
def test_vae_attention_with_fused_softmax(tokens, std, monkeypatch):
    """The VAE's attention (one head of 512) through `matmul`'s two paths, against float64 on 512 queries.
    Shifted fp16 scores (fp16 probabilities): within 15 % of rounding the exact result to bf16, below float32
    scores with bf16 probabilities. Float32 scores: within 3e-3. `matmul` takes the first from
    MATMUL_FP16_FROM_KEYS keys."""
    from hypir.attention import REGISTRY, AttentionBackend, backends

    g = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(1, tokens, 1, 512, device="cuda", generator=g).mul(std).to(torch.bfloat16)
               for _ in range(3))
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q[:, :512], k, v))
    exact = torch.softmax(qd @ kd.transpose(-1, -2) * 512 ** -0.5, dim=-1) @ vd
    errors = {}
    for path in (backends.shifted_fp16_attention, backends.float32_score_attention):
        errors[path] = _rel(path(q, k, v, 512 ** -0.5)[:, :512].transpose(1, 2), exact)
    shifted, float32 = errors.values()
    print(f"matmul attention at {tokens} tokens, std {std}: shifted fp16 {shifted:.2e}, float32 {float32:.2e}")
    assert kernels.triton_failure() is None
    assert shifted <= 1.15 * _rel(exact.to(torch.bfloat16), exact) and shifted < float32 <= 3e-3
    expected = (backends.shifted_fp16_attention if tokens >= backends.MATMUL_FP16_FROM_KEYS
                else backends.float32_score_attention)
    taken = []
    for path in errors:
        monkeypatch.setattr(backends, path.__name__, lambda *a, path=path: taken.append(path))
    REGISTRY[AttentionBackend.MATMUL].fn(q, k, v, 512 ** -0.5)
    assert taken == [expected]
