"""The fused kernels (hypir/kernels.py) and the blocks that use them (hypir/fused_blocks.py).

The Triton kernels run here on the CPU through Triton's interpreter (TRITON_INTERPRET=1), so their indexing,
masking and statistics are tested without a GPU; tests/test_gpu_kernels.py checks them on a GPU.
"""

import copy
import math
import os

import pytest
import torch

from hypir import fused_blocks, kernels
from hypir.bench.random_models import build_random_base

triton = pytest.importorskip("triton", reason="the fused kernels need Triton (pip install triton)")


@pytest.fixture()
def interpreted(monkeypatch):
    """The Triton kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1 on machines without a
    GPU), taken for CPU tensors. A kernel that raised would fall back to PyTorch's with nearly the same result:
    the test fails if any did."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU machine: tests/test_gpu_kernels.py runs these kernels on the GPU")
    kernels._kernels.cache_clear()
    monkeypatch.setattr(kernels, "uses_triton", lambda x: True)
    failures = []
    monkeypatch.setattr(kernels, "_TRITON_FAILURE", failures)
    yield
    kernels._kernels.cache_clear()
    assert not failures, f"a Triton kernel fell back to PyTorch: {failures}"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape,groups,channels_last,pre,silu", [
    ((2, 64, 9, 11), 32, False, False, True),   # NCHW, 2 channels a group
    ((1, 40, 17, 5), 8, True, True, True),       # channels_last, 5 channels a group (padded block), time bias
    ((2, 32, 37), 32, False, False, False),      # (N, C, L): the VAE attention's norm
    ((1, 320, 8, 8), 32, True, True, True),      # the UNet's 10 channels a group
    ((2, 96, 7, 9), 32, True, True, False),      # channels_last, two samples, each with its own time bias
])
def test_group_norm_matches_pytorch(interpreted, shape, groups, channels_last, pre, silu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1.5  # an offset mean: the statistics must not cancel
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    pre_bias = torch.randn(shape[0], shape[1], generator=g) if pre else None
    y = kernels.group_norm_silu(x, w, b, groups, 1e-6, silu, pre_bias)
    expected = kernels.group_norm_silu_reference(x.double(), w.double(), b.double(), groups, 1e-6, silu,
                                                 None if pre_bias is None else pre_bias.double())
    assert y.stride() == x.stride()  # the layout is kept
    assert _rel(y, expected) < 1e-6


def test_group_norm_merges_many_chunks(interpreted, monkeypatch):
    """Small blocks force 300 chunks a group: the merge loops over its 256-wide block twice."""
    monkeypatch.setattr(kernels, "_block_sizes", lambda cpg, spatial: (max(1, 1 << (cpg - 1).bit_length()), 16))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 60, 79, generator=g) * 0.5 + 100.0  # mean 200x the spread
    y = kernels.group_norm_silu(x, None, None, 2, 1e-6, False)
    expected = torch.nn.functional.group_norm(x.double(), 2, eps=1e-6)
    assert _rel(y, expected) < 1e-5


def test_group_norm_channels_last_reads_whole_pixels(interpreted, monkeypatch):
    """channels_last takes the whole-pixel kernels; here with tiles of 2 pixels, 16 a statistics program, so
    that 297 chunks a sample make the merge loop over its 64-wide block five times, on a mean 200x the spread."""
    calls = []
    rows = kernels._triton_group_norm_rows
    monkeypatch.setattr(kernels, "_triton_group_norm_rows", lambda *a: calls.append(1) or rows(*a))
    monkeypatch.setattr(kernels, "ROW_TILE", 16)
    monkeypatch.setattr(kernels, "ROW_STATS_TILE", 16)
    monkeypatch.setattr(kernels, "ROW_STATS_MIN_PIXELS", 1)
    monkeypatch.setattr(kernels, "ROW_SUB", 8)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 8, 60, 79, generator=g) * 0.5 + 100.0).to(memory_format=torch.channels_last)
    w, b, pre = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g)
    y = kernels.group_norm_silu(x, w, b, 4, 1e-6, True, pre)
    expected = kernels.group_norm_silu_reference(x.double(), w.double(), b.double(), 4, 1e-6, True, pre.double())
    assert calls and y.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, expected) < 1e-5
    nchw = kernels.group_norm_silu(x.contiguous(), w, b, 4, 1e-6, True, pre)  # the per-group kernels
    assert len(calls) == 1 and _rel(nchw, expected) < 1e-5


def test_group_norm_rows_with_an_outlier_at_each_pivot(interpreted, monkeypatch):
    """The whole-pixel statistics sum distances to each chunk's first pixel: where that pixel is an outlier
    (1000 spreads from the mean), the variance still comes out right."""
    monkeypatch.setattr(kernels, "ROW_STATS_TILE", 64)  # 8 channels: tiles of 8 pixels, 64 a statistics program
    monkeypatch.setattr(kernels, "ROW_SUB", 8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, 40, 48, generator=g) + 3.0
    x.view(1, 8, -1)[:, :, ::64] = 1000.0  # every chunk's first pixel
    x = x.to(memory_format=torch.channels_last)
    y = kernels.group_norm_silu(x, None, None, 2, 1e-6, False)
    expected = torch.nn.functional.group_norm(x.double(), 2, eps=1e-6)
    assert _rel(y, expected) < 1e-5


@pytest.mark.parametrize("cpg", [4, 8, 16, 40])
@pytest.mark.parametrize("side", [64, 2048, 16384, 65536])
def test_group_norm_chunks_fit_the_grid(cpg, side):
    """The chunks of one group go on the launch grid's second axis, which stops at 65535 programs."""
    block_c, block_s = kernels._block_sizes(cpg, side * side)
    assert block_c >= cpg and -(-side * side // block_s) <= kernels.MAX_GRID_Y
    assert block_s == 1 << (block_s.bit_length() - 1)  # a power of two (tl.arange)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias,residual", [(True, True), (True, False), (False, True), (False, False)])
def test_add_channel_bias(interpreted, channels_last, bias, residual):
    g = torch.Generator().manual_seed(2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 5, 7, generator=g).contiguous(memory_format=fmt)
    b = torch.randn(6, generator=g) if bias else None
    r = torch.randn(2, 6, 5, 7, generator=g).contiguous(memory_format=fmt) if residual else None
    expected = x.clone() + (b.view(-1, 1, 1) if bias else 0) + (r if residual else 0)
    out = kernels.add_channel_bias_(x, b, r)
    assert out is x  # in place
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,residual", [(True, True), (True, False), (False, True)])
def test_bias_add_leaves_the_statistics_its_group_norm_reads(interpreted, monkeypatch, dtype, bias, residual):
    """add_channel_bias_(statistics=True) on channels_last: the same sum as without, and GroupNorm's partial
    statistics of it, from which the next GroupNorm skips its statistics pass and computes the same output, bit
    for bit (the same sums of the same rounded values). Small tiles: 31 chunks a sample, the last one short."""
    monkeypatch.setattr(kernels, "ROW_STATS_TILE", 64)  # 16 channels: 4 pixels a step, 8 steps a chunk
    monkeypatch.setattr(kernels, "ROW_SUB", 8)
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 16, 33, 30, generator=g) * 2 + 5).to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(16, generator=g).to(dtype) if bias else None
    r = torch.randn(2, 16, 33, 30, generator=g).to(dtype).contiguous(memory_format=torch.channels_last) \
        if residual else None
    plain = kernels.add_channel_bias_(x.clone(), b, r)
    out = kernels.add_channel_bias_(x, b, r, statistics=True)
    assert out is x and torch.equal(x, plain) and kernels.channel_statistics(x) is not None
    assert kernels.channel_statistics(plain) is None
    passes = []
    row_stats = kernels._kernels().row_stats
    monkeypatch.setattr(kernels._kernels(), "row_stats", _Counted(row_stats, passes))
    w, beta = torch.randn(16, generator=g).to(dtype), torch.randn(16, generator=g).to(dtype)
    with_statistics = kernels.group_norm_silu(x, w, beta, 4, 1e-6, True)
    assert passes == []  # the statistics pass did not run
    without = kernels.group_norm_silu(plain, w, beta, 4, 1e-6, True)
    assert passes == [1] and torch.equal(with_statistics, without)
    exact = kernels.group_norm_silu_reference(plain.double(), w.double(), beta.double(), 4, 1e-6, True)
    assert _rel(with_statistics, exact) < (1e-5 if dtype == torch.float32 else 4e-3)


class _Counted:
    """A Triton kernel whose launches (kernel[grid](...)) are counted."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(1)
        return self.kernel[grid]


def test_statistics_of_a_changed_activation_are_not_read(interpreted, monkeypatch):
    """An in-place PyTorch write after the add (its version moves), a later add without statistics, an NCHW
    activation: the GroupNorm computes its own statistics."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, 8, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    b = torch.randn(8, generator=g)
    kernels.add_channel_bias_(x, b, statistics=True)
    assert kernels.channel_statistics(x) is not None
    x.mul_(2)
    assert kernels.channel_statistics(x) is None
    kernels.add_channel_bias_(x, b, statistics=True)
    kernels.add_channel_bias_(x, b)  # a Triton write moves no version: the add drops what x carried
    assert kernels.channel_statistics(x) is None
    y = torch.randn(1, 8, 6, 5, generator=g)
    kernels.add_channel_bias_(y, b, statistics=True)
    assert kernels.channel_statistics(y) is None  # NCHW: the per-group kernels, no partials to hand over
    expected = kernels.group_norm_silu_reference(x.double(), None, None, 2, 1e-6, False)
    assert _rel(kernels.group_norm_silu(x, None, None, 2, 1e-6, False), expected) < 1e-5


def test_statistics_written_in_another_layout_are_not_read(interpreted, monkeypatch):
    """Partials written with other tile constants than the GroupNorm's (chunks of another size): it reads x."""
    monkeypatch.setattr(kernels, "ROW_STATS_TILE", 64)
    monkeypatch.setattr(kernels, "ROW_SUB", 8)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 16, 20, 20, generator=g).contiguous(memory_format=torch.channels_last)
    kernels.add_channel_bias_(x, torch.randn(16, generator=g), statistics=True)
    assert kernels.channel_statistics(x).chunks == 100  # 400 pixels, 4 a chunk (1 step: enough programs)
    monkeypatch.setattr(kernels, "ROW_STATS_TILE", 128)  # 8 pixels a chunk
    passes = []
    monkeypatch.setattr(kernels._kernels(), "row_stats", _Counted(kernels._kernels().row_stats, passes))
    y = kernels.group_norm_silu(x, None, None, 4, 1e-6, False)
    assert passes == [1]
    assert _rel(y, kernels.group_norm_silu_reference(x.double(), None, None, 4, 1e-6, False)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_gelu(interpreted, dtype):
    """GEGLU's activation in one kernel: the first half of each row times the erf GELU of the second half, as
    diffusers computes it (one rounding to the output dtype instead of two in bf16)."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 37, 2 * 24, generator=g) * 3).to(dtype)
    value, gate = x.double().chunk(2, dim=-1)
    exact = value * torch.nn.functional.gelu(gate)
    got = kernels.gated_gelu(x)
    assert got.dtype == dtype and got.shape == (2, 37, 24)
    assert _rel(got, exact) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("shape", [(1, 8, 6, 4), (2, 5, 3, 7)])
def test_pad_bottom_right(interpreted, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(memory_format=torch.channels_last)
    got = kernels.pad_bottom_right(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.nn.functional.pad(x, (0, 1, 0, 1)))


def test_cpu_takes_the_pytorch_path():
    x = torch.randn(1, 64, 2048, 2048 // 64)  # above the size threshold, but on the CPU
    assert not kernels.uses_triton(x)
    w, b = torch.randn(64), torch.randn(64)
    y = kernels.group_norm_silu(x, w, b, 32, 1e-6, True)
    assert torch.equal(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b, 1e-6)))


@pytest.fixture(scope="module")
def tiny_base():
    return build_random_base("tiny", seed=3)


def _fused_copy(module):
    fused = copy.deepcopy(module)
    counts = fused_blocks.install_fused_blocks(fused)
    return fused, counts


def test_fused_blocks_keep_parameters_and_cpu_results(tiny_base):
    vae, counts = _fused_copy(tiny_base.vae)
    # every resnet: the encoder's ("default") and the decoder's up blocks' ("group", no time embedding)
    resnets = [m for m in tiny_base.vae.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert {m.time_embedding_norm for m in resnets} == {"default", "group"}
    assert counts["resnet"] == len(resnets) and counts["norm_silu"] == 2 and counts["conv"] > 0
    assert any(m.conv_shortcut is not None for m in resnets)  # the fused path folds its bias into the skip add
    assert counts["downsample"] == sum(type(m).__name__ == "Downsample2D" for m in tiny_base.vae.modules()) > 0
    assert vae.state_dict().keys() == tiny_base.vae.state_dict().keys()
    x = torch.rand(1, 3, 48, 40) * 2 - 1
    with torch.no_grad():  # on the CPU every block runs diffusers' own forward: identical results
        assert torch.equal(vae.encode(x).latent_dist.mean, tiny_base.vae.encode(x).latent_dist.mean)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_fused_path_computes_what_diffusers_computes(tiny_base, interpreted, monkeypatch, mode):
    """The fused forward (norm+SiLU, conv biases folded into the next norm and the skip add, the time
    embedding as a pre-norm bias, the channels_last transformer output, the transposed-convolution upsampler)
    through the interpreted kernels equals diffusers' forward in float32; also with models made and run under
    torch.inference_mode(), as ComfyUI loads and runs them."""
    monkeypatch.setattr(fused_blocks, "_fast", lambda x: fused_blocks._ENABLED.get())
    with mode():
        unet, _ = _fused_copy(tiny_base.unet)
        vae, _ = _fused_copy(tiny_base.vae)
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 32, 24, generator=g) * 2 - 1
    latent = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, 32, generator=g)
    with mode():
        got_z = vae.encode(image).latent_dist.mean
        got_x = vae.decode(latent).sample
        got_eps = unet(latent, torch.tensor([200]), encoder_hidden_states=text).sample
        with fused_blocks.fused_kernels(False):  # the switch: diffusers' forward on the same modules
            off_x = vae.decode(latent).sample
        want_z = tiny_base.vae.encode(image).latent_dist.mean
        want_x = tiny_base.vae.decode(latent).sample
        want_eps = tiny_base.unet(latent, torch.tensor([200]), encoder_hidden_states=text).sample
    assert torch.equal(off_x, want_x)
    assert _rel(got_z, want_z) < 1e-5
    assert _rel(got_x, want_x) < 1e-5
    assert _rel(got_eps, want_eps) < 1e-5


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_fused_vae_in_channels_last_computes_what_diffusers_computes(tiny_base, interpreted, monkeypatch, mode):
    """The VAE in channels_last, as the pass runs it: the encoder's padding in one kernel, the decoder's resnets
    and upsamplers fused, through the interpreted kernels, give diffusers' results."""
    monkeypatch.setattr(fused_blocks, "_fast", lambda x: fused_blocks._ENABLED.get())
    pads = []
    original = kernels._triton_pad_bottom_right
    monkeypatch.setattr(kernels, "_triton_pad_bottom_right", lambda x: pads.append(1) or original(x))
    vae, _ = _fused_copy(tiny_base.vae)
    vae.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(10)
    image = (torch.rand(1, 3, 32, 24, generator=g) * 2 - 1).contiguous(memory_format=torch.channels_last)
    latent = torch.randn(1, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    with mode():
        got_z = vae.encode(image).latent_dist.mean
        got_x = vae.decode(latent).sample
        want_z = tiny_base.vae.encode(image).latent_dist.mean
        want_x = tiny_base.vae.decode(latent).sample
    assert pads and _rel(got_z, want_z) < 1e-5 and _rel(got_x, want_x) < 1e-5


def test_fused_blocks_take_every_geglu(tiny_base):
    unet, counts = _fused_copy(tiny_base.unet)
    assert counts["geglu"] == sum(type(m).__name__ == "GEGLU" for m in tiny_base.unet.modules()) > 0
    assert all(type(m).__name__ != "GEGLU" for m in unet.modules())


def test_fused_transformer_keeps_channels_last(tiny_base, monkeypatch):
    """A UNet transformer's output stays channels_last (diffusers' is an NCHW copy) with the same values."""
    monkeypatch.setattr(fused_blocks, "_fast", lambda x: fused_blocks._ENABLED.get())
    unet, counts = _fused_copy(tiny_base.unet)
    assert counts["transformer"] == sum(type(m).__name__ == "Transformer2DModel" for m in tiny_base.unet.modules()) > 0
    name, fused = next((n, m) for n, m in unet.named_modules() if isinstance(m, fused_blocks.FusedTransformer2DModel))
    plain = dict(tiny_base.unet.named_modules())[name]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, fused.config.in_channels, 6, 5, generator=g).to(memory_format=torch.channels_last)
    text = torch.randn(1, 77, fused.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        got = fused(x, encoder_hidden_states=text, return_dict=False)[0]
        want = plain(x, encoder_hidden_states=text, return_dict=False)[0]
    assert got.is_contiguous(memory_format=torch.channels_last) and want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 6, 5, 7), (2, 3, 5, 1, 9), (1, 8, 8, 16, 9)])  # n, in, out, h, w
def test_transposed_upsample_is_nearest_then_conv(shape, channels_last):
    """Nearest 2x then a 3x3 convolution (padding 1) equals the transposed convolution with the summed 4x4 taps,
    borders included, to float64 rounding."""
    n, c, o, h, w = shape
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(o, c, 3, 3, generator=g, dtype=torch.float64), torch.randn(o, generator=g, dtype=torch.float64)
    want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), weight,
                                      bias, padding=1)
    got = fused_blocks.nearest2x_conv3x3(x, weight, bias)
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-12


def test_fused_upsample_follows_its_weights(tiny_base, monkeypatch):
    """The 4x4 kernels are remade when the 3x3 weights change (a LoRA merged later, a reload)."""
    monkeypatch.setattr(fused_blocks, "_fast", lambda x: True)
    vae, counts = _fused_copy(tiny_base.vae)
    assert counts["upsample"] == sum(type(m).__name__ == "Upsample2D" for m in tiny_base.vae.modules()) > 0
    up = next(m for m in vae.modules() if isinstance(m, fused_blocks.FusedUpsample2D))
    x = torch.randn(1, up.channels, 5, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = up(x)
        key = up._transposed_weight[0]
        up.conv.weight.mul_(0.5)
        after = up(x)
        want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"),
                                          up.conv.weight, up.conv.bias, padding=1)
    assert up._transposed_weight[0] != key  # the transposed path ran again, with kernels made from the new weights
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_fused_upsample_holds_nothing_after_a_move(tiny_base, monkeypatch):
    """Moving the model (ComfyUI's offload: .to(), .half()) drops the 4x4 kernels and the weights they keep, so
    no memory of the old device stays held; the next call remakes them from the moved weights. A .to() that
    changes nothing keeps them (a graph captured with them replays against the same weights' signature)."""
    monkeypatch.setattr(fused_blocks, "_fast", lambda x: True)
    vae, _ = _fused_copy(tiny_base.vae)
    up = next(m for m in vae.modules() if isinstance(m, fused_blocks.FusedUpsample2D))
    x = torch.randn(1, up.channels, 5, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = up(x)
        held = up._transposed_weight[2]
        assert held.data_ptr() == up.conv.weight.data_ptr()
        kernels_in_use = up._transposed_weight[1]
        vae.to("cpu")  # where it is already: a captured CUDA graph may still read these kernels
        vae.float()
        assert up._transposed_weight is not None and up._transposed_weight[1] is kernels_in_use
        vae.to(torch.float64)
        assert up._transposed_weight is None
        after = up(x.double())
    assert up._transposed_weight[1].dtype == torch.float64
    torch.testing.assert_close(after.float(), before, rtol=1e-5, atol=1e-5)


def test_weights_made_under_inference_mode():
    """ComfyUI runs its nodes, model loading included, under torch.inference_mode(): such weights have no
    version counter (reading `_version` raises). The upsampler's cache key and the CUDA graphs' weights
    signature still work, inside inference mode and outside it."""
    from diffusers.models.upsampling import Upsample2D

    from hypir.cuda_graphs import weights_signature

    with torch.inference_mode():
        up = Upsample2D(8, use_conv=True)
    assert up.conv.weight.is_inference()
    assert fused_blocks.install_fused_blocks(up)["upsample"] == 1
    x = torch.randn(1, 8, 5, 6, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"),
                                          up.conv.weight, up.conv.bias, padding=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_blocks, "_fast", lambda x: True)
        with torch.inference_mode():
            inside = up(x)
            signature = weights_signature(up)
        with torch.no_grad():
            outside = up(x)
    assert up._transposed_weight is not None  # the transposed path ran
    torch.testing.assert_close(inside, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outside, want, rtol=1e-5, atol=1e-5)
    assert signature == weights_signature(up) and len(signature) == 4  # the weight's and bias's address and version


def test_weights_made_under_inference_mode_move_outside_it():
    """ComfyUI's POST /free and Unload Models move the model outside inference mode, from its prompt worker:
    the weights, made under torch.inference_mode(), keep their parameter objects with new data, whose
    `is_inference()` is then False while reading `_version` still raises. The upsampler's check after the move
    and the weights signature must read 0 for them (the raise ended ComfyUI's prompt worker on the H200), the
    move still drops the 4x4 kernels, and the next run (ComfyUI's loads the model back under inference mode)
    makes them again."""
    from diffusers.models.upsampling import Upsample2D

    from hypir.cuda_graphs import tensor_version, weights_signature

    with torch.inference_mode():
        up = Upsample2D(8, use_conv=True)
    fused_blocks.install_fused_blocks(up)
    x = torch.randn(1, 8, 5, 6, generator=torch.Generator().manual_seed(11))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_blocks, "_fast", lambda x: True)
        with torch.inference_mode():
            up(x)
        assert up._transposed_weight is not None
        up.to(torch.float64)  # outside inference mode, as ComfyUI's unload
        weight = up.conv.weight
        assert not weight.is_inference()
        with pytest.raises(RuntimeError, match="version counter"):
            weight._version  # the state ComfyUI's unload leaves (if PyTorch changes it, this test says so)
        assert tensor_version(weight) == 0 and up._transposed_weight is None
        assert len(weights_signature(up)) == 4
        with torch.inference_mode():  # ComfyUI's next run loads the model back, under inference mode
            up.to(torch.float32)
            after = up(x)
            assert up._transposed_weight is not None
            want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"),
                                              up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_weights_signature_sees_every_change_of_a_weight(tiny_base):
    """The signature is every parameter and buffer slot's address, then every one's version (None ones not at
    all), and changes when a weight is written in place, replaced through setattr or straight in its module's
    dict (as accelerate's offload hooks do), moved, or when a module, parameter or buffer is added: the slots
    gathered once are gathered again after any registration."""
    import copy

    from hypir.cuda_graphs import tensor_version, weights_signature

    unet = copy.deepcopy(tiny_base.unet)
    unet.register_buffer("scale", torch.ones(3))
    unet.register_buffer("absent", None)
    unet.conv_out.register_parameter("extra", None)
    unet.conv_in.alias = unet.conv_out  # a module reachable twice: its slots once
    slots = [t for m in unet.modules() for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
    signature = weights_signature(unet)
    assert signature == tuple([t.data_ptr() for t in slots] + [tensor_version(t) for t in slots])
    assert signature == weights_signature(unet)
    history = [signature]

    def changed() -> bool:
        history.append(weights_signature(unet))
        return history[-1] != history[-2]

    with torch.no_grad():
        unet.conv_in.weight.mul_(1.0)
    assert changed()
    unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight.detach().clone())
    assert changed()
    unet.conv_out._parameters["bias"] = torch.nn.Parameter(unet.conv_out.bias.detach().clone())
    assert changed()
    unet.time_embedding.linear_1.weight.data = unet.time_embedding.linear_1.weight.data.clone()
    assert changed()
    unet.conv_norm_out.register_buffer("added", torch.zeros(2))
    assert changed() and len(history[-1]) == len(signature) + 2
    unet.extra_block = torch.nn.Linear(2, 2)
    assert changed() and len(history[-1]) == len(signature) + 6
    assert not changed()


def test_fused_upsample_paths(tiny_base, monkeypatch):
    """The transposed path also serves an output_size of exactly twice the input (the UNet passes one for latents
    not a multiple of 8) and leaves autograd to diffusers' forward (the 4x4 kernels carry no gradient)."""
    monkeypatch.setattr(fused_blocks, "_fast", lambda x: True)
    vae, _ = _fused_copy(tiny_base.vae)
    up = next(m for m in vae.modules() if isinstance(m, fused_blocks.FusedUpsample2D))
    calls = []
    original = fused_blocks.nearest2x_conv3x3
    monkeypatch.setattr(fused_blocks, "nearest2x_conv3x3", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(1, up.channels, 5, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        sized = up(x, output_size=(10, 12))
        other = up(x, output_size=(11, 12))  # not twice: diffusers' interpolation
    assert len(calls) == 1 and sized.shape[-2:] == (10, 12) and other.shape[-2:] == (11, 12)
    up.conv.weight.requires_grad_(True)
    up(x).sum().backward()
    assert len(calls) == 1 and up.conv.weight.grad is not None


def test_fused_transformer_keeps_diffusers_dtype_under_autocast(tiny_base, monkeypatch):
    """Under autocast the projection comes out in bf16 and the residual stays float32: the sum is float32, as
    diffusers' is (an in-place add would have made it bf16)."""
    monkeypatch.setattr(fused_blocks, "_fast", lambda x: True)
    unet, _ = _fused_copy(tiny_base.unet)
    fused = next(m for m in unet.modules() if isinstance(m, fused_blocks.FusedTransformer2DModel))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, fused.config.in_channels, 4, 4, generator=g)
    text = torch.randn(1, 77, fused.config.cross_attention_dim, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x, encoder_hidden_states=text, return_dict=False)[0]
    assert out.dtype == torch.float32


def test_vae_graphs_up_to_a_1024_pass_with_room_for_them():
    """The VAE stages are graphed (on CUDA, graphs on) for calls of at most VAE_GRAPH_MAX_PIXELS: a 1024x1024
    output, not a 2048 one, nor two 1024 images sent together; and only where the memory a pass may use is
    VAE_GRAPH_MEMORY_PASSES times the pass's working memory (the graphs keep theirs)."""
    import types

    from hypir import pipeline
    from hypir.planning import plan_pass
    from hypir.runtime import Runtime
    from hypir.settings import RestoreOptions

    runtime = Runtime()
    vae = torch.nn.Conv2d(3, 3, 1)
    cuda = types.SimpleNamespace(device=torch.device("cuda"), vae=vae)
    router = types.SimpleNamespace(policy="auto")

    def plan(side: int, batch: int = 1, available: int | None = None):
        return plan_pass(side, side, batch, upscale=2.0, long_side=None, element_bytes=2, available_bytes=available)

    one_pass = plan(512).activation_bytes
    enough = plan(512, available=pipeline.VAE_GRAPH_MEMORY_PASSES * one_pass)  # the memory measured when planned
    assert enough.tile is None and enough.available_bytes == pipeline.VAE_GRAPH_MEMORY_PASSES * one_pass
    options = RestoreOptions()
    assert callable(pipeline._vae_graph(cuda, runtime, router, options, enough))
    assert callable(pipeline._vae_graph(cuda, runtime, router, options, plan(512)))  # memory not known: not gated
    assert pipeline._vae_graph(cuda, runtime, router, options, plan(1024)) is None
    assert pipeline._vae_graph(cuda, runtime, router, options, plan(512, batch=2)) is None
    assert pipeline._vae_graph(cuda, runtime, router, options.replace(cuda_graphs=False), enough) is None
    cpu = types.SimpleNamespace(device=torch.device("cpu"), vae=vae)
    assert pipeline._vae_graph(cpu, runtime, router, options, enough) is None
    short = plan(512, available=pipeline.VAE_GRAPH_MEMORY_PASSES * one_pass - 1)  # an 8 GiB card at 1024: eager
    assert short.tile is None and pipeline._vae_graph(cuda, runtime, router, options, short) is None


def test_graph_capture_failure_runs_eagerly_once_warned(caplog):
    """Where a call cannot be captured (here: no CUDA at all), it runs eagerly, with one warning per shape."""
    from hypir.cuda_graphs import GraphedCalls

    graphs = GraphedCalls()
    calls = []

    def double(x):
        calls.append(x.shape)
        return x * 2

    x = torch.arange(6.0).view(2, 3)
    with caplog.at_level("WARNING", logger="hypir"):
        outs = [graphs("key", double, [x]) for _ in range(4)]
    assert all(torch.equal(o, x * 2) for o in outs)
    assert len(graphs) == 0 and graphs.captures == 0 and graphs.replays == 0
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1
    assert len(calls) == 4  # each call ran the function once


def test_triton_that_cannot_run_falls_back_once(monkeypatch, caplog):
    """Triton present but unable to compile its launcher (no C compiler, no Python headers): one warning,
    then PyTorch's kernels, with the same results, for the rest of the process."""
    monkeypatch.setattr(kernels, "uses_triton", lambda x: not kernels._TRITON_FAILURE)
    monkeypatch.setattr(kernels, "_TRITON_FAILURE", [])

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to compile the launcher: Python.h: No such file or directory")

    monkeypatch.setattr(kernels, "_triton_group_norm_silu", broken)
    monkeypatch.setattr(kernels, "_triton_add_channel_bias", broken)
    x = torch.randn(1, 8, 5, 5)
    w, b = torch.randn(8), torch.randn(8)
    with caplog.at_level("WARNING", logger="hypir"):
        y = kernels.group_norm_silu(x, w, b, 4, 1e-6, True)
        z = kernels.add_channel_bias_(x.clone(), b, x)
        kernels.group_norm_silu(x, w, b, 4, 1e-6, True)
    assert torch.equal(y, kernels.group_norm_silu_reference(x, w, b, 4, 1e-6, True))
    assert torch.equal(z, x + b.view(-1, 1, 1) + x)
    assert kernels.triton_failure().startswith("RuntimeError: Failed to compile the launcher")
    assert sum("Triton kernels cannot run here" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("width,one_read_max", [(77, None), (1000, None), (5000, None), (5000, 1024)])
@pytest.mark.parametrize("scores_dtype,dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                                (torch.float16, torch.float16)])
def test_scaled_softmax(interpreted, monkeypatch, width, one_read_max, scores_dtype, dtype):
    """Rows read once (up to SOFTMAX_ONE_READ_MAX) or twice (5000 with a limit of 1024: two 4096-wide blocks a
    row), from float32 or fp16 scores."""
    calls = []
    original = kernels._triton_scaled_softmax
    monkeypatch.setattr(kernels, "_triton_scaled_softmax", lambda *a: calls.append(1) or original(*a))
    if one_read_max is not None:
        monkeypatch.setattr(kernels, "SOFTMAX_ONE_READ_MAX", one_read_max)
    g = torch.Generator().manual_seed(6)
    scores = (torch.randn(2, 3, width, generator=g) * 20).to(scores_dtype)  # wide logits: the running max rescales
    expected = torch.softmax(scores.double() * 0.125, dim=-1)
    probs = kernels.scaled_softmax(scores.clone(), 0.125, dtype)
    assert calls and probs.dtype == dtype and probs.shape == scores.shape
    tolerance = {torch.bfloat16: 4e-3, torch.float16: 5e-4, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(probs.double(), expected, rtol=tolerance, atol=tolerance * expected.max().item())


def _shifted_scores(rows, width, generator, dtype=torch.float16):
    """Scores as `matmul`'s fp16 path makes them: shifted by a sampled largest, so that most rows' largest is
    near 0 (a little above where the sample missed it). Row 1 is far above its shift (past the limit), row 2
    has a key far below fp16 (-inf), the last row is nearly uniform."""
    scores = torch.randn(rows, width, generator=generator, dtype=torch.float64) * 2
    scores -= scores[:, ::7].amax(dim=-1, keepdim=True)
    scores[1, 5] = 40.0
    scores[2, 3] = float("-inf")
    scores[-1] = torch.rand(width, generator=generator, dtype=torch.float64) * 1e-2
    return scores.to(dtype)


@pytest.mark.parametrize("width", [77, 5000])
def test_shifted_exp_against_float64(interpreted, monkeypatch, width):
    """exp(score * scale) * times and the row sums: each value within fp16's rounding of the exact one, rows
    past the limit taken against their largest, a softmax equal to float64's once divided; the Triton kernel
    (in blocks of 4096: 5000 is two) and the PyTorch path agree."""
    calls = []
    original = kernels._triton_shifted_exp
    monkeypatch.setattr(kernels, "_triton_shifted_exp", lambda *a: calls.append(1) or original(*a))
    scores = _shifted_scores(6, width, torch.Generator().manual_seed(11)).view(2, 3, width)
    values, sums = kernels.shifted_exp(scores, 1.25, 256.0, 5.0)
    assert calls and values.dtype == torch.float16 and sums.dtype == torch.float32 and sums.shape == (2, 3)
    scaled = scores.double() * 1.25
    top = scaled.amax(dim=-1, keepdim=True)
    exact = torch.exp(scaled - torch.where(top > 5.0, top, 0.0)) * 256
    assert exact.max() <= 256 * math.exp(5.0) < 65504  # every value within fp16's range
    torch.testing.assert_close(values.double(), exact, rtol=2 ** -11, atol=2 ** -24)
    torch.testing.assert_close(sums.double(), exact.sum(dim=-1), rtol=1e-6, atol=0)
    softmax = torch.softmax(scaled, dim=-1)
    torch.testing.assert_close(values.double() / sums.double().unsqueeze(-1), softmax, rtol=1e-3, atol=1e-6)
    with kernels.fused_softmax(False):
        reference_values, reference_sums = kernels.shifted_exp(scores, 1.25, 256.0, 5.0)
    assert len(calls) == 1
    torch.testing.assert_close(values, reference_values, rtol=2 ** -10, atol=2 ** -24)
    torch.testing.assert_close(sums, reference_sums, rtol=1e-6, atol=0)


def test_shifted_exp_keeps_nan_and_overflow_visible(interpreted):
    """A NaN score, or an fp16 score that overflowed to inf, makes that row's values or sum NaN, never a finite
    row that looks right (the pass reports NaN as an error)."""
    scores = _shifted_scores(4, 300, torch.Generator().manual_seed(12))
    scores[0, 9] = float("nan")
    scores[3, 1] = float("inf")
    values, sums = kernels.shifted_exp(scores, 1.0, 256.0, 5.0)
    for row in (0, 3):
        assert torch.isnan(values[row]).any() or torch.isnan(sums[row])
    assert torch.isfinite(values[1:3]).all() and torch.isfinite(sums[1:3]).all()


def test_scaled_softmax_switched_off_is_pytorch(interpreted, monkeypatch):
    monkeypatch.setattr(kernels, "_triton_scaled_softmax", lambda *a: pytest.fail("the Triton softmax ran"))
    scores = torch.randn(4, 33)
    expected = torch.softmax(scores * 0.5, dim=-1).to(torch.bfloat16)
    with kernels.fused_softmax(False):
        assert torch.equal(kernels.scaled_softmax(scores.clone(), 0.5, torch.bfloat16), expected)
    assert kernels.fused_softmax_enabled()  # only for the calls inside


def test_every_triton_kernel_has_a_kind_in_the_profile():
    """The speed bench files each kernel of the profile by its name; every Triton kernel of the pack has its
    kind (`row_stats` was counted as "other" once)."""
    from hypir.bench.common import kernel_kind

    names = vars(kernels._kernels())
    assert {"row_stats", "row_merge_stats", "row_normalize", "partial_stats"} <= set(names)
    assert {name: kernel_kind(name) for name in names if kernel_kind(name) == "other"} == {}
    assert kernel_kind("row_stats") == kernel_kind("normalize") == "group norm (Triton)"
    assert kernel_kind("row_bias_add_stats") == kernel_kind("channel_bias_add") == "bias and skip add (Triton)"


def test_transposed_upsample_rounding_in_bf16():
    """In bf16 the transposed path rounds its 4x4 weights (sums of up to four 3x3 taps) once more than diffusers'
    upsampled copy and 3x3 convolution do: its error against exact arithmetic on the same bf16 weights and
    input is larger, by a bounded factor (2.3e-3 against 1.7e-3 here)."""
    g = torch.Generator().manual_seed(12)
    channels = 256
    weight = (torch.randn(channels, channels, 3, 3, generator=g) / (channels * 9) ** 0.5).bfloat16()
    bias = (torch.randn(channels, generator=g) * 0.1).bfloat16()
    x = torch.randn(1, channels, 24, 24, generator=g).bfloat16()
    up = torch.nn.functional.interpolate
    exact = torch.nn.functional.conv2d(up(x.double(), scale_factor=2.0, mode="nearest"), weight.double(),
                                       bias.double(), padding=1)
    plain = torch.nn.functional.conv2d(up(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    taps = fused_blocks.transposed_weights(weight.float()).bfloat16()
    transposed = fused_blocks.nearest2x_conv3x3(x, weight, bias, taps)
    plain_error, transposed_error = _rel(plain, exact), _rel(transposed, exact)
    print(f"bf16 relative error: diffusers' path {plain_error:.2e}, transposed {transposed_error:.2e}")
    assert plain_error < transposed_error < 1.6 * plain_error
    # In float64 the two paths agree to rounding: the difference is the weights' bf16 rounding alone.
    assert _rel(fused_blocks.nearest2x_conv3x3(x.double(), weight.double(), bias.double()), exact) < 1e-12


def test_triton_key_is_computed_once_in_the_background(monkeypatch):
    """start_triton_warm_up computes Triton's cache key on a thread of its own, once per process, so that the first
    kernel loaded from Triton's disk cache does not wait for it; loading models on a GPU starts it."""
    pytest.importorskip("triton")
    from triton.runtime import cache

    from hypir import loading

    monkeypatch.setattr(kernels, "_WARM_UP", [])
    cache.triton_key.cache_clear()
    thread = kernels.start_triton_warm_up()
    assert thread is not None and thread.daemon and thread.name == "hypir-triton-warm-up"
    thread.join(timeout=60)
    assert cache.triton_key.cache_info().currsize == 1
    assert kernels.start_triton_warm_up() is None  # once per process
    started = []
    monkeypatch.setattr(loading, "start_triton_warm_up", lambda: started.append(True))
    monkeypatch.setattr(loading, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.raises(Exception, match="HYPIR weights not found"):
        loading.load_weights("no-such-base", "no-such-weights.pth", device="cuda", dtype="fp32")
    assert started == [True]
