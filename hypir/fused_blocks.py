"""diffusers blocks computed with the fused kernels of `kernels.py` on CUDA.

`install_fused_blocks(model)` changes the class of a loaded UNet's or VAE's modules in place; parameters, state
dict keys and results stay those of diffusers (the plain PyTorch path computes exactly diffusers' ops):

- every `nn.GroupNorm` becomes `FusedGroupNorm` (one pass instead of PyTorch's one-block-per-group kernel);
- a GroupNorm followed by SiLU (`conv_norm_out` + `conv_act` of the VAE's encoder and decoder and of the UNet)
  becomes one `FusedGroupNorm` with `silu=True`, the SiLU module an identity;
- every `nn.Conv2d` becomes `FusedConv2d`: its bias added in one vectorised pass;
- `ResnetBlock2D` becomes `FusedResnetBlock2D` (the UNet's, and the VAE encoder's and decoder's): norm1+SiLU;
  conv1's bias, the time embedding, norm2 and SiLU; conv2's and the shortcut convolution's biases and the skip
  connection in one add, without diffusers' division by an `output_scale_factor` of 1;
- `Transformer2DModel` (linear projections, as in SD2.1) becomes `FusedTransformer2DModel`: its output keeps
  the channels_last layout the convolutions run in, where diffusers makes an NCHW copy that the next
  convolution and skip connection convert back;
- `Downsample2D` with `padding=0` (the VAE encoder's) becomes `FusedDownsample2D`: its zero padding in one
  pass;
- `GEGLU` (the transformers' feed-forward input) becomes `FusedGEGLU`: `value * gelu(gate)` in one kernel;
- `Upsample2D` (nearest 2x, then a 3x3 convolution) becomes `FusedUpsample2D`: one transposed convolution of
  the small input (stride 2, 4x4 taps summed from the 3x3 ones), 16 multiply-adds a channel pair and input pixel
  instead of 36, no upsampled copy of the input, the interleaved output written by cuDNN, its bias added by the
  vectorised kernel. Exact in float64; in bf16 the summed taps are rounded once more (relative error 2.4e-3
  against 1.7e-3 on random weights), and the 4x4 kernels take 16/9 of the 3x3 weights' memory.

Off CUDA, under a caller's torch.compile, or inside `fused_kernels(False)`, every block runs diffusers' own
forward.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from .cuda_graphs import tensor_version
from .kernels import add_channel_bias_, gated_gelu, group_norm_silu, pad_bottom_right, switched

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("hypir_fused_kernels", default=True)


def fused_kernels(enabled: bool):
    """Use the fused kernels (where they can run) or PyTorch's, for the calls made inside."""
    return switched(_ENABLED, enabled)


def _fast(x: torch.Tensor) -> bool:
    """The fused path for this call: on CUDA, switched on, and not traced by a torch.compile the caller applied
    to the models (the plain ops then go to inductor, which writes its own fused kernels)."""
    return not torch.compiler.is_compiling() and x.is_cuda and _ENABLED.get()  # is_compiling first: dynamo
    # folds it to a constant and never reads the ContextVar


def _conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv._conv_forward(x, conv.weight, None)


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters) computed by the fused kernel; `silu` appends the activation."""

    silu: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            y = super().forward(x)
            return F.silu(y) if self.silu else y
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.silu)


class FusedConv2d(nn.Conv2d):
    """nn.Conv2d whose bias is added by `add_channel_bias_` (one vectorised pass in either memory layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None or not _fast(x):
            return super().forward(x)
        return add_channel_bias_(_conv_without_bias(self, x), self.bias, statistics=True)


FUSED_DECODER_RESNETS = True  # benchmarks/levers.py switches these off to measure what they save
FUSED_GEGLU = True


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D for the configurations SD2.1 uses (the "default" time-embedding norm, or "group"
    without a time embedding as in the VAE decoder's up blocks; SiLU; no up/down-sampling inside the block; see
    `fusable_resnet`). Fused: norm1+SiLU; conv1's bias, the time embedding, norm2 and SiLU; conv2's and the
    shortcut convolution's biases and the skip connection."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
        if not _fast(input_tensor) or (self.time_embedding_norm == "group" and not FUSED_DECODER_RESNETS):
            return super().forward(input_tensor, temb, *args, **kwargs)
        norm1, norm2 = self.norm1, self.norm2
        hidden = group_norm_silu(input_tensor, norm1.weight, norm1.bias, norm1.num_groups, norm1.eps, silu=True)
        hidden = _conv_without_bias(self.conv1, hidden)
        channel_bias = self.conv1.bias[None] if self.conv1.bias is not None else None
        if self.time_emb_proj is not None and temb is not None:
            time_bias = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
            channel_bias = time_bias if channel_bias is None else time_bias + channel_bias
        if channel_bias is not None:
            channel_bias = channel_bias.expand(hidden.shape[0], -1)
        hidden = group_norm_silu(hidden, norm2.weight, norm2.bias, norm2.num_groups, norm2.eps, silu=True,
                                 pre_bias=channel_bias)
        hidden = self.dropout(hidden)
        hidden = _conv_without_bias(self.conv2, hidden)
        skip_bias = self.conv2.bias
        if type(self.conv_shortcut) is FusedConv2d and self.conv_shortcut.bias is not None:
            # the shortcut convolution's bias joins conv2's: one add of both and the skip
            shortcut = _conv_without_bias(self.conv_shortcut, input_tensor)
            skip_bias = self.conv_shortcut.bias if skip_bias is None else skip_bias + self.conv_shortcut.bias
        else:
            shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        if shortcut.stride() != hidden.stride():
            shortcut = shortcut.contiguous(memory_format=_layout(hidden))
        if self.output_scale_factor == 1:  # the next block's GroupNorm reads the statistics the add leaves
            return add_channel_bias_(hidden, skip_bias, shortcut, statistics=True)
        return add_channel_bias_(hidden, skip_bias, shortcut).div_(self.output_scale_factor)


class FusedGEGLU(GEGLU):
    """diffusers' GEGLU (the UNet transformers' feed-forward input): its projection, then `value * gelu(gate)` in
    one kernel (kernels.gated_gelu)."""

    def forward(self, hidden_states, *args, **kwargs) -> torch.Tensor:
        if not (FUSED_GEGLU and _fast(hidden_states)):
            return super().forward(hidden_states, *args, **kwargs)
        return gated_gelu(self.proj(hidden_states))


def fusable_geglu(module: nn.Module) -> bool:
    # diffusers' forward also takes another path on Ascend NPUs (torch_npu), which never reach _fast's CUDA check
    return type(module) is GEGLU and isinstance(module.proj, nn.Linear)


CHANNELS_LAST_TRANSFORMER_OUTPUT = True  # benchmarks/levers.py switches it off to measure what it saves


class FusedTransformer2DModel(Transformer2DModel):
    """diffusers' Transformer2DModel whose output is a channels_last view plus the residual, added in place:
    diffusers ends with `.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()`, an NCHW copy of every
    transformer's output. Same values; only the layout differs."""

    def _get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width, inner_dim):
        if not (CHANNELS_LAST_TRANSFORMER_OUTPUT and self.use_linear_projection and _fast(hidden_states)):
            return super()._get_output_for_continuous_inputs(hidden_states, residual, batch_size, height, width,
                                                             inner_dim)
        out = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        # In place when the sum keeps out's dtype; under autocast (bf16 out, fp32 residual) diffusers' sum is fp32.
        return out.add_(residual) if torch.result_type(out, residual) == out.dtype else out + residual


TRANSPOSED_UPSAMPLE = True  # benchmarks/levers.py switches it off to measure what it saves
# Along each axis the transposed kernel's 4 taps are sums of the 3x3 kernel's: (w2, w1 + w2, w0 + w1, w0).
_TRANSPOSED_TAPS = ((2,), (1, 2), (0, 1), (0,))


def transposed_weights(weight: torch.Tensor) -> torch.Tensor:
    """(in, out, 4, 4) from a 3x3 kernel (out, in, 3, 3): conv_transpose2d(x, ., stride=2, padding=1) is
    conv3x3(nearest_2x(x)) with padding 1. Output row o = 2h + k - 1 reads input row h with tap k, so row 2h
    reads rows h (tap 1: w1 + w2) and h - 1 (tap 3: w0), and row 2h + 1 reads rows h (tap 2: w0 + w1) and h + 1
    (tap 0: w2), as the upsampled image's rows 2h - 1 .. 2h + 2 are x[h - 1], x[h], x[h], x[h + 1]."""
    select = weight.new_zeros(4, 3)
    for tap, rows in enumerate(_TRANSPOSED_TAPS):
        select[tap, list(rows)] = 1
    return torch.einsum("ak,bl,oikl->ioab", select, select, weight)


def nearest2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      transposed_weight: torch.Tensor | None = None) -> torch.Tensor:
    """conv3x3(nearest_2x(x)) with padding 1 as one transposed convolution of x (stride 2, 4x4 taps of which
    each output pixel reads 2x2): no upsampled copy of x, 16 multiply-adds per channel pair and input pixel
    instead of 36, and the output written interleaved by cuDNN."""
    transposed_weight = transposed_weights(weight) if transposed_weight is None else transposed_weight
    return F.conv_transpose2d(x, transposed_weight, bias, stride=2, padding=1)


class FusedUpsample2D(Upsample2D):
    """diffusers' Upsample2D (nearest 2x, 3x3 convolution, no norm) as one transposed convolution. Its 4x4
    kernels are made from the 3x3 weights on first use and again whenever those weights change."""

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        h, w = hidden_states.shape[-2:]
        conv = self.conv
        if not (TRANSPOSED_UPSAMPLE and output_size in (None, (2 * h, 2 * w), [2 * h, 2 * w])
                and _fast(hidden_states) and not (torch.is_grad_enabled() and conv.weight.requires_grad)):
            return super().forward(hidden_states, output_size, *args, **kwargs)
        key = self._weight_key()
        cached = getattr(self, "_transposed_weight", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                transposed = transposed_weights(conv.weight.float()).to(conv.weight.dtype).contiguous(
                    memory_format=_layout(conv.weight))
            # The source storage is kept with its 4x4 kernels: its address cannot be reused for other weights
            # while the cache names it.
            cached = (key, transposed, conv.weight.detach())
            self._transposed_weight = cached
        # cuDNN's transposed convolution adds no bias itself: PyTorch's broadcast add after it is a slow strided
        # pass over the channels_last output; the vectorised one is add_channel_bias_'s.
        return add_channel_bias_(nearest2x_conv3x3(hidden_states, conv.weight, None, cached[1]), conv.bias,
                                 statistics=True)

    def _weight_key(self) -> tuple:
        weight = self.conv.weight
        return weight.data_ptr(), tensor_version(weight), weight.dtype, weight.device

    def _apply(self, fn, recurse=True):
        # A move (.to, .cpu, .half: ComfyUI offloading the model) drops the 4x4 kernels and the weights they
        # hold, which would otherwise keep their GPU memory while the model sits on the CPU; the next call makes
        # them again from the moved weights. A conversion that leaves the weights where they are (.to() the
        # device they are on) keeps them: a captured CUDA graph reads them, and the weights' signature, which
        # would tell it to capture again, has not changed.
        module = super()._apply(fn, recurse)
        cached = getattr(self, "_transposed_weight", None)
        if cached is not None and cached[0] != self._weight_key():
            self._transposed_weight = None
        return module


class FusedDownsample2D(Downsample2D):
    """diffusers' Downsample2D with `padding=0` (the VAE encoder's): its bottom-right zero padding in one pass
    (kernels.pad_bottom_right), then the stride-2 convolution."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not _fast(hidden_states):
            return super().forward(hidden_states, *args, **kwargs)
        return self.conv(pad_bottom_right(hidden_states))


def fusable_downsample(module: nn.Module) -> bool:
    return (type(module) is Downsample2D and module.use_conv and module.padding == 0 and module.norm is None
            and isinstance(module.conv, nn.Conv2d))


def fusable_upsample(module: nn.Module) -> bool:
    conv = getattr(module, "conv", None)
    return (type(module) is Upsample2D and module.use_conv and not module.use_conv_transpose and module.interpolate
            and module.norm is None and module.name == "conv" and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def fusable_transformer(module: nn.Module) -> bool:
    # The method overridden is diffusers' own (0.39 and later); where it is gone, diffusers' forward runs.
    return (type(module) is Transformer2DModel and getattr(module, "is_input_continuous", False)
            and module.use_linear_projection and hasattr(Transformer2DModel, "_get_output_for_continuous_inputs"))


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def fusable_resnet(block: nn.Module) -> bool:
    if type(block) is not ResnetBlock2D:
        return False
    # "group" (the VAE decoder's up blocks) without a time embedding projection computes what "default" does
    # without a time embedding: norm2 of conv1's output.
    time_norm = block.time_embedding_norm
    return ((time_norm == "default" or (time_norm == "group" and block.time_emb_proj is None))
            and block.upsample is None and block.downsample is None and isinstance(block.nonlinearity, nn.SiLU)
            and type(block.norm1) is nn.GroupNorm and type(block.norm2) is nn.GroupNorm
            and block.norm1.affine and block.norm2.affine)


# kind: which modules the fused class computes, and the class
FUSED_CLASSES = (
    ("resnet", fusable_resnet, FusedResnetBlock2D),
    ("transformer", fusable_transformer, FusedTransformer2DModel),
    ("upsample", fusable_upsample, FusedUpsample2D),
    ("downsample", fusable_downsample, FusedDownsample2D),
    ("geglu", fusable_geglu, FusedGEGLU),
)


def install_fused_blocks(model: nn.Module) -> dict[str, int]:
    """Switch a diffusers model's blocks to the fused classes, in place. Returns counts per kind."""
    counts = {kind: 0 for kind, _, _ in FUSED_CLASSES} | {"norm_silu": 0, "norm": 0, "conv": 0}
    for module in list(model.modules()):
        for kind, fusable, fused in FUSED_CLASSES:
            if fusable(module):
                module.__class__ = fused
                counts[kind] += 1
                break
        norm_out, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if type(norm_out) is nn.GroupNorm and isinstance(act, nn.SiLU):
            norm_out.__class__ = FusedGroupNorm
            norm_out.silu = True
            module.conv_act = nn.Identity()
            counts["norm_silu"] += 1
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = FusedGroupNorm
            counts["norm"] += 1
        elif type(module) is nn.Conv2d:
            module.__class__ = FusedConv2d
            counts["conv"] += 1
    return counts


__all__ = ["FusedConv2d", "FusedDownsample2D", "FusedGEGLU", "FusedGroupNorm", "FusedResnetBlock2D",
           "FusedTransformer2DModel", "FusedUpsample2D", "install_fused_blocks", "fused_kernels", "fusable_downsample",
           "fusable_geglu", "fusable_resnet", "fusable_transformer", "fusable_upsample", "nearest2x_conv3x3"]
