"""Fused GPU kernels with their PyTorch fallbacks.

`group_norm_silu` is GroupNorm, optionally preceded by a per-(sample, channel) bias and followed by SiLU, in
one read and one write of the activation. PyTorch's own GroupNorm reduces each (sample, group) in a single
thread block: on the VAE's 1024x1024x128 activations that is 32 blocks for 132 SMs, and it is the largest
part of the VAE's time. Here the reduction is split over the whole GPU (partial Welford statistics per
chunk, merged per group), and any strides work: NCHW and channels_last alike, so the convolutions can run in
the layout cuDNN wants without a transpose around each of them.

The Triton path runs on CUDA tensors in fp16, bf16 and fp32 when Triton is installed; everything else (CPU,
Apple, no Triton, autograd) takes the plain PyTorch path, which is also the reference the kernel is tested
against.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import threading
import types
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .cuda_graphs import tensor_version
from .errors import one_line

logger = logging.getLogger("hypir")

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


_WARM_UP_LOCK = threading.Lock()
_WARM_UP: list[threading.Thread] = []


def start_triton_warm_up() -> threading.Thread | None:
    """Compute Triton's own cache key (a hash of its compiler and its libtriton library) in a background thread,
    once per process. Triton computes it before it loads its first kernel from its disk cache, and a first image
    waited 0.40 s for it on the H200 machine (`benchmarks/first_image.py --profile`); started as the models
    load, it is done by the time they are (hashing and reading release the GIL). Triton is imported by the caller
    first. Returns the thread, or None where it was started before or Triton is not installed. Failing here costs
    nothing: Triton computes the key again when it needs it, and reports its own errors there."""
    if not triton_available():
        return None
    with _WARM_UP_LOCK:
        if _WARM_UP:
            return None
        try:
            # Imported here, not on the thread: a package imported by two threads at once can be seen half-made.
            from triton.runtime.cache import triton_key
        except Exception as exc:  # noqa: BLE001 - only a head start: the first kernel load imports it again
            logger.debug("[HYPIR] Triton's cache key was not computed ahead (%s)", one_line(exc))
            return None

        def warm_up() -> None:
            try:
                triton_key()
            except Exception as exc:  # noqa: BLE001 - only a head start: the first kernel load redoes it
                logger.debug("[HYPIR] Triton's cache key was not computed ahead (%s)", one_line(exc))

        thread = threading.Thread(target=warm_up, name="hypir-triton-warm-up", daemon=True)
        _WARM_UP.append(thread)
    thread.start()
    return thread


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                              groups: int, eps: float, silu: bool, pre_bias: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """The plain PyTorch composition: what diffusers' modules compute."""
    if pre_bias is not None:
        x = x + pre_bias.view(*pre_bias.shape, *([1] * (x.ndim - 2)))
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


# The `matmul` attention's softmax: the fused Triton kernel, or PyTorch's (the `fused_softmax` setting, for
# comparisons and as a way around a problem with the kernel). Per call, never process-wide.
_FUSED_SOFTMAX: contextvars.ContextVar[bool] = contextvars.ContextVar("hypir_fused_softmax", default=True)


@contextlib.contextmanager
def switched(switch: contextvars.ContextVar[bool], enabled: bool) -> Iterator[None]:
    """A per-call switch (a ContextVar) set for the calls made inside, never process-wide."""
    token = switch.set(bool(enabled))
    try:
        yield
    finally:
        switch.reset(token)


def fused_softmax(enabled: bool):
    """Use the fused softmax kernel (where it can run) or PyTorch's, for the calls made inside."""
    return switched(_FUSED_SOFTMAX, enabled)


def fused_softmax_enabled() -> bool:
    return _FUSED_SOFTMAX.get()


# Below this size a Triton launch (several microseconds of Python per kernel) costs more than it saves, so
# the UNet's small activations stay on PyTorch's GroupNorm. The threshold was set from GroupNorm timings on an
# H100 that no committed command reproduces; `hypir bench --speed`'s kernel profile shows its effect on a pass.
TRITON_MIN_ELEMENTS = 1 << 22


_TRITON_FAILURE: list[str] = []  # why Triton could not run here (first failure), once it failed


# Inside a CUDA graph a launch costs nothing at replay, so a graphed model takes the Triton kernels at every size:
# PyTorch's GroupNorm reads channels_last input through an NCHW copy and reduces each group in one thread block.
# Set for every call of such a model, its first (eager) one included, so that all its calls compute the same.
_ALL_SIZES: contextvars.ContextVar[bool] = contextvars.ContextVar("hypir_triton_all_sizes", default=False)


def triton_at_every_size(enabled: bool):
    """The Triton kernels for activations of every size, not only from TRITON_MIN_ELEMENTS, for the calls inside."""
    return switched(_ALL_SIZES, enabled)


def uses_triton(x: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in TRITON_DTYPES and (x.numel() >= TRITON_MIN_ELEMENTS or _ALL_SIZES.get())
            and triton_available() and not _TRITON_FAILURE and x.ndim >= 3
            and not (torch.is_grad_enabled() and x.requires_grad))


def triton_failure() -> str | None:
    """Why the Triton kernels stopped being used in this process (None while they run)."""
    return _TRITON_FAILURE[0] if _TRITON_FAILURE else None


def kernel_fallbacks() -> dict[str, str]:
    """Every kernel that failed in this process and was replaced by its fallback, with the reason."""
    return {"triton": triton_failure()} if triton_failure() else {}


def why_graphs_cannot_hold_triton() -> str | None:
    """Why a CUDA graph cannot capture this process's Triton launches (None when it can).

    Under PyTorch's cudaMallocAsync allocator (ComfyUI's default on NVIDIA cards) memory allocated during a
    capture has no device address until the graph is launched, and Triton's launcher refuses such pointers
    ("Pointer argument ... cannot be accessed from Triton")."""
    if torch.cuda.is_available() and torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        return "the cudaMallocAsync allocator"
    return None


def _run_triton(launch, fallback):
    """Launch a Triton kernel; if Triton cannot compile or launch here (no C compiler or Python headers for
    its launcher, a driver it does not support), warn once and use the PyTorch path from then on. (Raising
    instead during a CUDA graph capture, so that only the capture fails, crashed the process on an H200 under
    cudaMallocAsync: freeing the failed capture's memory aborts in PyTorch. `why_graphs_cannot_hold_triton`
    keeps such captures from being tried.)"""
    try:
        return launch()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - an accelerator that cannot run falls back, loudly, once
        if not _TRITON_FAILURE:
            _TRITON_FAILURE.append(one_line(exc))
            logger.warning("[HYPIR] Triton kernels cannot run here (%s); using PyTorch's GroupNorm instead",
                           _TRITON_FAILURE[0])
        return fallback()


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, silu: bool = False, pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm over (N, C, *spatial) with optional pre-bias (N, C) and SiLU; fused on CUDA with Triton. An
    activation that `add_channel_bias_(..., statistics=True)` wrote carries its per-channel partial statistics:
    then only their merge and the normalisation run, one read of the activation instead of two."""
    reference = lambda: group_norm_silu_reference(x, weight, bias, groups, eps, silu, pre_bias)  # noqa: E731
    if not uses_triton(x) or _flat_strides(x) is None:
        return reference()
    statistics = channel_statistics(x) if pre_bias is None else None
    return _run_triton(lambda: _triton_group_norm_silu(x, weight, bias, groups, eps, silu, pre_bias, statistics),
                       reference)


class ChannelStatistics(NamedTuple):
    """row_stats' per-channel partials (mean and M2 of each chunk of pixels) of the activation they describe,
    with what identifies that activation's storage and contents."""
    data_ptr: int
    shape: tuple
    stride: tuple
    version: int
    partial_mean: torch.Tensor
    partial_m2: torch.Tensor
    chunks: int
    pixels: int


_STATISTICS = "_hypir_channel_statistics"  # the attribute of the tensor they describe


def channel_statistics(x: torch.Tensor) -> ChannelStatistics | None:
    """The statistics the bias add that wrote `x` left on it, if `x` has not changed since (in-place PyTorch ops
    raise its version; inference tensors have none, which is why only callers that write nothing into their
    output before the next GroupNorm ask for statistics)."""
    found = x.__dict__.get(_STATISTICS)
    if found is None or (found.data_ptr, found.shape, found.stride, found.version) != (
            x.data_ptr(), tuple(x.shape), x.stride(), tensor_version(x)):
        return None
    return found


def add_channel_bias_(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None,
                      statistics: bool = False) -> torch.Tensor:
    """x += bias[channel] (+ residual), in place, in one pass: a convolution's bias and a residual block's
    skip connection. PyTorch adds a convolution's bias with a broadcast kernel that, on the VAE's large
    activations, takes about a third as long as the convolution itself. With `statistics`, on a channels_last
    activation, the same pass leaves GroupNorm's partial statistics of the result on it (channel_statistics),
    for the GroupNorm that reads it next; a caller asks only where nothing writes into x before that."""
    x.__dict__.pop(_STATISTICS, None)  # x changes: what it carried is stale
    if bias is None and residual is None:
        return x
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)

    def reference():
        if bias is not None:
            x.add_(bias.view(-1, *([1] * (x.ndim - 2))))
        if residual is not None:
            x.add_(residual)
        return x

    if (uses_triton(x) and dense and (bias is None or bias.is_contiguous())
            and (residual is None or residual.stride() == x.stride())):
        # A launch that fails does so before writing: x is unchanged when the fallback runs.
        if statistics and _row_layout(_flat_strides(x), x.shape[1]):
            return _run_triton(lambda: _triton_add_channel_bias_statistics(x, bias, residual) or x, reference)
        return _run_triton(lambda: _triton_add_channel_bias(x, bias, residual) or x, reference)
    return reference()


def _row_layout(strides: tuple[int, int, int] | None, channels: int) -> bool:
    """Whether `_flat_strides` describe whole pixels contiguous (channels_last) with at most MAX_ROW_CHANNELS
    channels: the row kernels' layout."""
    return strides is not None and strides[1:] == (1, channels) and channels <= MAX_ROW_CHANNELS


def _flat_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(sample, channel, position) strides when the spatial dims flatten into one strided axis, else None."""
    spatial = x.shape[2:]
    strides = x.stride()[2:]
    step = strides[-1] if spatial else 1
    expected = step
    for size, stride in zip(reversed(spatial), reversed(strides)):
        if size != 1 and stride != expected:
            return None
        expected = expected * size
    return x.stride(0), x.stride(1), step


# ----------------------------------------------------------------------------------------------
# Triton


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_stats(x_ptr, pre_ptr, mean_ptr, m2_ptr, C, S, GROUPS, CPG, CHUNKS, s_n, s_c, s_s,
                      HAS_PRE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        group_id = tl.program_id(0)  # n * GROUPS + g: neighbouring programs read neighbouring channels
        chunk = tl.program_id(1)
        n = group_id // GROUPS
        g = group_id % GROUPS
        ci = tl.arange(0, BLOCK_C)
        si = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
        c = g * CPG + ci
        mask = (ci < CPG)[:, None] & (si < S)[None, :]
        offsets = n.to(tl.int64) * s_n + c[:, None].to(tl.int64) * s_c + si[None, :].to(tl.int64) * s_s
        v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_PRE:
            v += tl.load(pre_ptr + n * C + c, mask=ci < CPG, other=0.0).to(tl.float32)[:, None]
            v = tl.where(mask, v, 0.0)
        count = tl.sum(mask.to(tl.float32), axis=1)
        count = tl.sum(count, axis=0)
        mean = tl.sum(tl.sum(v, axis=1), axis=0) / count
        d = tl.where(mask, v - mean, 0.0)
        m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        tl.store(mean_ptr + group_id * CHUNKS + chunk, mean)
        tl.store(m2_ptr + group_id * CHUNKS + chunk, m2)

    @triton.jit
    def merge_stats(mean_ptr, m2_ptr, out_mean_ptr, out_rstd_ptr, S, CPG, CHUNKS, eps,
                    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
        # Chan et al.: merge the chunks' (count, mean, M2); every chunk but the last holds CPG * BLOCK_S values.
        group_id = tl.program_id(0)
        total = tl.cast(S, tl.float32) * CPG  # S * CPG in int32 would overflow from 2**31 values a group
        acc_mean = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, CHUNKS, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            valid = k < CHUNKS
            counts = tl.where(valid, (tl.minimum(S - k * BLOCK_S, BLOCK_S) * CPG).to(tl.float32), 0.0)
            means = tl.load(mean_ptr + group_id * CHUNKS + k, mask=valid, other=0.0)
            acc_mean += counts * means
        mean = tl.sum(acc_mean, axis=0) / total
        acc_m2 = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, CHUNKS, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            valid = k < CHUNKS
            counts = tl.where(valid, (tl.minimum(S - k * BLOCK_S, BLOCK_S) * CPG).to(tl.float32), 0.0)
            means = tl.load(mean_ptr + group_id * CHUNKS + k, mask=valid, other=0.0)
            m2s = tl.load(m2_ptr + group_id * CHUNKS + k, mask=valid, other=0.0)
            acc_m2 += m2s + counts * (means - mean) * (means - mean)
        var = tl.sum(acc_m2, axis=0) / total
        tl.store(out_mean_ptr + group_id, mean)
        tl.store(out_rstd_ptr + group_id, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def normalize(x_ptr, y_ptr, pre_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, S, GROUPS, CPG,
                  s_n, s_c, s_s, o_n, o_c, o_s, HAS_PRE: tl.constexpr, HAS_AFFINE: tl.constexpr,
                  SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        group_id = tl.program_id(0)
        chunk = tl.program_id(1)
        n = group_id // GROUPS
        g = group_id % GROUPS
        ci = tl.arange(0, BLOCK_C)
        si = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
        c = g * CPG + ci
        cmask = ci < CPG
        mask = cmask[:, None] & (si < S)[None, :]
        n64 = n.to(tl.int64)
        c64 = c[:, None].to(tl.int64)
        s64 = si[None, :].to(tl.int64)
        v = tl.load(x_ptr + n64 * s_n + c64 * s_c + s64 * s_s, mask=mask, other=0.0).to(tl.float32)
        if HAS_PRE:
            v += tl.load(pre_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        mean = tl.load(mean_ptr + group_id)
        rstd = tl.load(rstd_ptr + group_id)
        y = (v - mean) * rstd
        if HAS_AFFINE:
            w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
            b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            y = y * w[:, None] + b[:, None]
        y = tl.where(mask, y, 0.0)  # padding lanes: 0 (their (0 - mean) * rstd can overflow exp)
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + n64 * o_n + c64 * o_c + s64 * o_s, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def row_stats(x_ptr, pre_ptr, mean_ptr, m2_ptr, C, S, CHUNKS, s_n, HAS_PRE: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SUB: tl.constexpr):
        # channels_last: each pixel's C channels are contiguous, so a program reads whole pixels (every group at
        # once, full memory sectors): SUB blocks of BLOCK_P pixels in a loop the compiler pipelines, summing each
        # value's distance to a pivot, and its square, in [BLOCK_P, BLOCK_C] accumulators reduced once at the end.
        # The pivot, the chunk's first pixel, lies within the data, so the shifted sums do not cancel the way
        # plain sums of squares do on a mean far from zero.
        chunk = tl.program_id(0)
        n = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        base = x_ptr + n.to(tl.int64) * s_n
        first = chunk * (SUB * BLOCK_P)
        pivot = tl.load(base + first.to(tl.int64) * C + c, mask=cmask, other=0.0).to(tl.float32)
        if HAS_PRE:
            pre = tl.load(pre_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
            pivot += pre
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for sub in range(SUB):
            p = first + sub * BLOCK_P + tl.arange(0, BLOCK_P)
            mask = (p < S)[:, None] & cmask[None, :]
            v = tl.load(base + p[:, None].to(tl.int64) * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_PRE:
                v += pre[None, :]
            d = tl.where(mask, v - pivot[None, :], 0.0)
            acc += d
            acc2 += d * d
        total = tl.sum(acc, axis=0)
        total2 = tl.sum(acc2, axis=0)
        count = tl.minimum(S - first, SUB * BLOCK_P).to(tl.float32)
        shift = total / count
        out = (n * CHUNKS + chunk).to(tl.int64) * C + c
        tl.store(mean_ptr + out, pivot + shift, mask=cmask)
        tl.store(m2_ptr + out, tl.maximum(total2 - total * shift, 0.0), mask=cmask)

    @triton.jit
    def row_bias_add_stats(x_ptr, bias_ptr, res_ptr, mean_ptr, m2_ptr, C, S, CHUNKS, s_n,
                           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_P: tl.constexpr, SUB: tl.constexpr):
        # channel_bias_add over row_stats' chunks of whole channels_last pixels (x and the residual in the same
        # strides), and row_stats' partials of what it stores: the same sums of the same rounded values in the
        # same order, so that the GroupNorm that reads them computes what it would have from the tensor.
        chunk = tl.program_id(0)
        n = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        base = n.to(tl.int64) * s_n
        first = chunk * (SUB * BLOCK_P)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        pivot = tl.load(x_ptr + base + first.to(tl.int64) * C + c, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            pivot += bias
        if HAS_RES:
            pivot += tl.load(res_ptr + base + first.to(tl.int64) * C + c, mask=cmask, other=0.0).to(tl.float32)
        pivot = pivot.to(x_ptr.dtype.element_ty).to(tl.float32)  # the first pixel as stored
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for sub in range(SUB):
            p = first + sub * BLOCK_P + tl.arange(0, BLOCK_P)
            mask = (p < S)[:, None] & cmask[None, :]
            offsets = base + p[:, None].to(tl.int64) * C + c[None, :]
            v = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += bias[None, :]
            if HAS_RES:
                v += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            stored = v.to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + offsets, stored, mask=mask)
            d = tl.where(mask, stored.to(tl.float32) - pivot[None, :], 0.0)
            acc += d
            acc2 += d * d
        total = tl.sum(acc, axis=0)
        total2 = tl.sum(acc2, axis=0)
        count = tl.minimum(S - first, SUB * BLOCK_P).to(tl.float32)
        shift = total / count
        out = (n * CHUNKS + chunk).to(tl.int64) * C + c
        tl.store(mean_ptr + out, pivot + shift, mask=cmask)
        tl.store(m2_ptr + out, tl.maximum(total2 - total * shift, 0.0), mask=cmask)

    @triton.jit
    def row_merge_stats(mean_ptr, m2_ptr, out_mean_ptr, out_rstd_ptr, C, S, GROUPS, CPG, CHUNKS, PIXELS, eps,
                        BLOCK_K: tl.constexpr, BLOCK_CPG: tl.constexpr):
        # One (sample, group): its CPG channels' partials of every chunk; chunk k holds min(S - k*PIXELS, PIXELS)
        # pixels a channel.
        group_id = tl.program_id(0)
        n = group_id // GROUPS
        g = group_id % GROUPS
        ci = tl.arange(0, BLOCK_CPG)
        cmask = ci < CPG
        total = tl.cast(S, tl.float32) * CPG
        acc = tl.zeros([BLOCK_K, BLOCK_CPG], dtype=tl.float32)
        for start in range(0, CHUNKS, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            valid = (k < CHUNKS)[:, None] & cmask[None, :]
            counts = tl.minimum(S - k * PIXELS, PIXELS).to(tl.float32)[:, None]
            offsets = (n * CHUNKS + k)[:, None].to(tl.int64) * C + (g * CPG + ci)[None, :]
            acc += tl.where(valid, counts * tl.load(mean_ptr + offsets, mask=valid, other=0.0), 0.0)
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc = tl.zeros([BLOCK_K, BLOCK_CPG], dtype=tl.float32)
        for start in range(0, CHUNKS, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            valid = (k < CHUNKS)[:, None] & cmask[None, :]
            counts = tl.minimum(S - k * PIXELS, PIXELS).to(tl.float32)[:, None]
            offsets = (n * CHUNKS + k)[:, None].to(tl.int64) * C + (g * CPG + ci)[None, :]
            means = tl.load(mean_ptr + offsets, mask=valid, other=0.0)
            m2s = tl.load(m2_ptr + offsets, mask=valid, other=0.0)
            acc += tl.where(valid, m2s + counts * (means - mean) * (means - mean), 0.0)
        var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        tl.store(out_mean_ptr + group_id, mean)
        tl.store(out_rstd_ptr + group_id, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def row_normalize(x_ptr, y_ptr, pre_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, S, GROUPS, CPG, s_n, o_n,
                      HAS_PRE: tl.constexpr, HAS_AFFINE: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        # Whole pixels again: per channel, y = v * scale + shift with the group's statistics folded in.
        block = tl.program_id(0)
        n = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        stat = n * GROUPS + c // CPG
        scale = tl.load(rstd_ptr + stat, mask=cmask, other=0.0)
        shift = -tl.load(mean_ptr + stat, mask=cmask, other=0.0) * scale
        if HAS_PRE:
            shift += tl.load(pre_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32) * scale
        if HAS_AFFINE:
            w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
            shift = shift * w + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            scale = scale * w
        p = block * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (p < S)[:, None] & cmask[None, :]
        offsets = p[:, None].to(tl.int64) * C + c[None, :]
        v = tl.load(x_ptr + n.to(tl.int64) * s_n + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, v * scale[None, :] + shift[None, :], 0.0)  # padding lanes: 0, not shift (exp overflow)
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + n.to(tl.int64) * o_n + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def channel_bias_add(x_ptr, bias_ptr, res_ptr, numel, C, CHANNEL_STRIDE, HAS_BIAS: tl.constexpr,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        # Dense storage, NCHW or channels_last: the channel of storage offset i is (i // stride(1)) % C.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        v = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + (i // CHANNEL_STRIDE) % C, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            v += tl.load(res_ptr + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + i, v.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def scaled_softmax(scores_ptr, out_ptr, M, scale, BLOCK: tl.constexpr):
        # One row wider than a block: a running max and sum over the row in one read, then the probabilities
        # in a second.
        row = tl.program_id(0).to(tl.int64) * M
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(scores_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
            new_max = tl.maximum(running_max, v)
            pivot = tl.where(new_max > float("-inf"), new_max, 0.0)  # a lane with nothing yet: exp(-inf) = 0
            running_sum = running_sum * tl.exp(running_max - pivot) + tl.exp(v - pivot)
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        row_sum = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
        for start in range(0, M, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(scores_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
            p = tl.exp(v - row_max) * (1.0 / row_sum)
            tl.store(out_ptr + row + cols, p.to(out_ptr.dtype.element_ty), mask=cols < M)

    @triton.jit
    def scaled_softmax_one_read(scores_ptr, out_ptr, M, scale, BLOCK: tl.constexpr):
        # One row that fits one block (BLOCK >= M): read once, held in registers.
        row = tl.program_id(0).to(tl.int64) * M
        cols = tl.arange(0, BLOCK)
        v = tl.load(scores_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
        e = tl.exp(v - tl.max(v, axis=0))
        p = e * (1.0 / tl.sum(e, axis=0))
        tl.store(out_ptr + row + cols, p.to(out_ptr.dtype.element_ty), mask=cols < M)

    @triton.jit
    def shifted_exp(scores_ptr, out_ptr, sums_ptr, M, scale, times, limit, BLOCK: tl.constexpr):
        # A row's exp(score * scale) * times, and their sum, in one read and one write; a row whose largest
        # scaled score passes `limit` (its values would leave fp16) is written again against that largest.
        row = tl.program_id(0).to(tl.int64) * M
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, M, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            v = tl.load(scores_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
            e = tl.exp(v)
            tl.store(out_ptr + row + cols, (e * times).to(out_ptr.dtype.element_ty), mask=cols < M)
            running_sum += e
            running_max = tl.maximum(running_max, v)
        row_max = tl.max(running_max, axis=0)
        total = tl.sum(running_sum, axis=0) * times
        if row_max > limit:  # rare: the shift's sampled keys missed this row's largest score by that much
            running_sum = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, M, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                v = tl.load(scores_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
                e = tl.exp(v - row_max)
                tl.store(out_ptr + row + cols, (e * times).to(out_ptr.dtype.element_ty), mask=cols < M)
                running_sum += e
            total = tl.sum(running_sum, axis=0) * times
        tl.store(sums_ptr + tl.program_id(0), total)

    @triton.jit
    def gated_gelu(x_ptr, out_ptr, numel, F, BLOCK: tl.constexpr):
        # x: (rows, 2F) contiguous; out (rows, F) = x[:, :F] * gelu(x[:, F:]), exact (erf) GELU, in float32.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        source = (i // F) * (2 * F) + i % F
        value = tl.load(x_ptr + source, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(x_ptr + source + F, mask=mask, other=0.0).to(tl.float32)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(out_ptr + i, (value * gelu).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def pad_end(x_ptr, out_ptr, numel, C, H, W, BLOCK: tl.constexpr):
        # channels_last storage: out (N, H + 1, W + 1, C) is x (N, H, W, C) with a zero row below and a zero
        # column to the right; each output element once, in storage order.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        c = i % C
        pixel = i // C
        w = pixel % (W + 1)
        row = pixel // (W + 1)
        h = row % (H + 1)
        n = row // (H + 1)
        inside = (h < H) & (w < W)
        v = tl.load(x_ptr + ((n * H + h) * W + w) * C + c, mask=mask & inside, other=0.0)
        tl.store(out_ptr + i, v, mask=mask)

    return types.SimpleNamespace(
        gated_gelu=gated_gelu, pad_end=pad_end, partial_stats=partial_stats, merge_stats=merge_stats,
        normalize=normalize, row_stats=row_stats, row_merge_stats=row_merge_stats, row_normalize=row_normalize,
        row_bias_add_stats=row_bias_add_stats,
        channel_bias_add=channel_bias_add, scaled_softmax=scaled_softmax,
        scaled_softmax_one_read=scaled_softmax_one_read, shifted_exp=shifted_exp)


def scaled_softmax(scores: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scores * scale) over the last dimension, in float32 from float32 or fp16 scores, returned in
    `dtype`; float32 scores are consumed (scaled in place). With Triton on CUDA: one kernel that reads a row of up
    to SOFTMAX_ONE_READ_MAX scores once (longer rows twice) and writes the probabilities once; else (or with the
    fused_softmax setting off) PyTorch's scale, softmax and cast."""
    def reference():
        return torch.softmax(scores.float().mul_(scale), dim=-1).to(dtype)

    if not _fused_softmax_runs(scores):
        return reference()
    return _run_triton(lambda: _triton_scaled_softmax(scores, scale, dtype), reference)


def _fused_softmax_runs(scores: torch.Tensor) -> bool:
    """Whether the Triton softmax kernels (scaled_softmax, shifted_exp) take these scores."""
    return (fused_softmax_enabled() and uses_triton(scores) and scores.is_contiguous()
            and scores.dtype in (torch.float32, torch.float16))


def shifted_exp(scores: torch.Tensor, scale: float, times: float, limit: float,
                dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """A softmax whose division is left to the caller: exp(scores * scale - ref) * times in `dtype`, and each
    row's sum of them in float32, where ref is 0, or the row's largest scaled score where that passes `limit`.
    For scores already shifted near their row's largest (`matmul`'s fp16 path), so that exp(limit) * times is
    within fp16's range: the probabilities are these values over their row's sum, and dividing P @ V's rows by
    the sums instead spares the softmax a read of every score. With Triton on CUDA one kernel reads the scores
    once and writes the values once (twice for a row past `limit`); else (or with the fused_softmax setting
    off) PyTorch."""
    def reference():
        scaled = scores.float() * scale
        top = scaled.amax(dim=-1, keepdim=True)
        values = torch.exp(scaled - torch.where(top > limit, top, 0.0)).mul_(times)
        return values.to(dtype), values.sum(dim=-1)

    if not _fused_softmax_runs(scores):
        return reference()
    return _run_triton(lambda: _triton_shifted_exp(scores, scale, times, limit, dtype), reference)


def gated_gelu(projected: torch.Tensor) -> torch.Tensor:
    """GEGLU's activation: `value * gelu(gate)` of the two halves of the last dimension (erf GELU, as diffusers'
    GEGLU). With Triton on CUDA: one kernel that reads the projection once and writes the product, where PyTorch
    makes the GELU's output and then the product, each a strided pass over half-rows."""
    def reference():
        value, gate = projected.chunk(2, dim=-1)
        return value * F.gelu(gate)

    if not (uses_triton(projected) and projected.is_contiguous() and projected.shape[-1] % 2 == 0):
        return reference()
    return _run_triton(lambda: _triton_gated_gelu(projected), reference)


def _triton_gated_gelu(projected):
    half = projected.shape[-1] // 2
    out = torch.empty((*projected.shape[:-1], half), device=projected.device, dtype=projected.dtype)
    _launch_elementwise(_kernels().gated_gelu, out.numel(), projected, out, out.numel(), half)
    return out


def pad_bottom_right(x: torch.Tensor) -> torch.Tensor:
    """F.pad(x, (0, 1, 0, 1)): a zero row below and a zero column to the right of (N, C, H, W), as diffusers'
    Downsample2D pads before its stride-2 convolution. On channels_last with Triton: one pass that writes each
    output element once, where PyTorch fills the whole output and then copies x into it with a strided kernel."""
    def reference():
        return F.pad(x, (0, 1, 0, 1))

    if not (uses_triton(x) and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return reference()
    return _run_triton(lambda: _triton_pad_bottom_right(x), reference)


def _triton_pad_bottom_right(x):
    n, c, h, w = x.shape
    out = torch.empty((n, c, h + 1, w + 1), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    _launch_elementwise(_kernels().pad_end, out.numel(), x, out, out.numel(), c, h, w)
    return out


# Rows up to this long are read once, held in registers (16 warps: 32 float32 values a thread); longer rows
# twice. On an H200, 16384 fp16 scores a row: 0.34 ms read once against 0.48 ms read twice for 16384 rows; at
# 65536 a row, once was slower (0.58 against 0.49 ms for 4096 rows). benchmarks/attention_512.py --kernels softmax
SOFTMAX_ONE_READ_MAX = 16384


def _triton_scaled_softmax(scores, scale, dtype):
    m = scores.shape[-1]
    out = torch.empty(scores.shape, device=scores.device, dtype=dtype)
    width = 1 << (m - 1).bit_length()
    with _launch_context(scores):
        if width <= SOFTMAX_ONE_READ_MAX:
            _kernels().scaled_softmax_one_read[(scores.numel() // m,)](
                scores, out, m, scale, BLOCK=width, num_warps=max(4, min(16, width // 1024)))
        else:
            _kernels().scaled_softmax[(scores.numel() // m,)](scores, out, m, scale, BLOCK=4096, num_warps=8)
    return out


def _triton_shifted_exp(scores, scale, times, limit, dtype):
    m = scores.shape[-1]
    values = torch.empty(scores.shape, device=scores.device, dtype=dtype)
    sums = torch.empty(scores.shape[:-1], device=scores.device, dtype=torch.float32)
    with _launch_context(scores):
        _kernels().shifted_exp[(scores.numel() // m,)](scores, values, sums, m, scale, times, limit,
                                                       BLOCK=min(4096, 1 << (m - 1).bit_length()), num_warps=8)
    return values, sums


def _triton_add_channel_bias(x, bias, residual):
    _launch_elementwise(_kernels().channel_bias_add, x.numel(), x, bias if bias is not None else x,
                        residual if residual is not None else x, x.numel(), x.shape[1], x.stride(1),
                        HAS_BIAS=bias is not None, HAS_RES=residual is not None)


def _triton_add_channel_bias_statistics(x, bias, residual):
    n, c = x.shape[:2]
    spatial = x[0, 0].numel()
    block_c, block_p, sub, pixels, chunks = _row_statistics_layout(n, c, spatial)
    partial_mean = torch.empty((n * chunks, c), device=x.device, dtype=torch.float32)
    partial_m2 = torch.empty_like(partial_mean)
    with _launch_context(x):
        _kernels().row_bias_add_stats[(chunks, n)](
            x, bias if bias is not None else x, residual if residual is not None else x, partial_mean, partial_m2,
            c, spatial, chunks, x.stride(0), HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            BLOCK_C=block_c, BLOCK_P=block_p, SUB=sub, num_warps=ROW_STATS_WARPS)
    x.__dict__[_STATISTICS] = ChannelStatistics(x.data_ptr(), tuple(x.shape), x.stride(), tensor_version(x),
                                                partial_mean, partial_m2, chunks, pixels)


ELEMENTWISE_BLOCK = 2048  # values a program of the element-wise kernels (bias add, GEGLU, padding) writes


def _launch_elementwise(kernel, numel: int, *args, **constexprs) -> None:
    """kernel(*args, BLOCK=...) over `numel` output values: one program of 4 warps per ELEMENTWISE_BLOCK, on the
    first argument's GPU."""
    import triton

    with _launch_context(args[0]):
        kernel[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](*args, **constexprs, BLOCK=ELEMENTWISE_BLOCK, num_warps=4)


# A GroupNorm launch is one program per ((sample, group), chunk): the groups on the grid's first axis, so that
# programs launched together read neighbouring channels of the same pixels (in channels_last; with the chunks
# first, a whole pass at 1024x1024 took 122 ms instead of 84 on the H100). The second axis allows at most
# 65535 chunks: very large activations get longer chunks.
MAX_GRID_Y = 65535


def _block_sizes(cpg: int, spatial: int) -> tuple[int, int]:
    block_c = max(1, 1 << (cpg - 1).bit_length())
    block_s = max(16, min(4096 // block_c, 1 << max(0, (spatial - 1).bit_length())))
    block_s = max(block_s, 1 << (-(-spatial // MAX_GRID_Y) - 1).bit_length())  # chunks within the grid
    return block_c, block_s


# channels_last activations (the layout the pass runs in) take the whole-pixel kernels: a program reads rows
# of all C channels, contiguous in memory, instead of one group's few channels of each pixel (4 of 128 in
# the VAE: a quarter of every memory sector it fetched). The normalisation reads tiles of about ROW_TILE values.
# The statistics read steps of ROW_STATS_TILE values (at least ROW_STATS_MIN_PIXELS whole pixels) in 4 warps,
# ROW_SUB steps a program, which keeps the partials (per chunk and channel) few, down to 1 step where that would
# leave fewer than ROW_MIN_PROGRAMS programs (small activations: enough programs to fill the GPU).
# Against 8192 values a step, 8 steps, 8 warps: the pass's GroupNorm kernels took 6.7 instead
# of 8.2 ms at 1024 and 21.2 instead of 26.2 ms at 2048 on an H200, the statistics 2.2 instead of 3.6 and 7.1
# instead of 11.2 ms (benchmarks/groupnorm_sweep.py). Summing each step's tile into per-channel sums (smaller
# accumulators) took twice as long at the large shapes.
ROW_TILE = 8192  # values a normalisation program reads
ROW_STATS_TILE = 4096
ROW_STATS_MIN_PIXELS = 4  # the UNet's 1280 to 2560 channels: 4096 values would be 2 pixels a step, too thin
ROW_SUB = 32
ROW_MIN_PROGRAMS = 512
ROW_STATS_WARPS = 4
MAX_ROW_CHANNELS = 4096  # SD2.1's widest norm: 2560 (the UNet's up blocks normalise concatenated skips)


# The merge of a group's partial statistics: ROW_MERGE_TILE values (chunks x the group's channels) a loop step,
# so that a 1024x1024 activation's 2048 chunks take a few steps, not 32 of 64 chunks (one program per sample
# and group: few programs, each bound by the latency of its loads).
ROW_MERGE_TILE = 4096
ROW_MERGE_WARPS = 8


def _merge_rows(chunks: int, block_cpg: int) -> int:
    return max(64, min(1 << (chunks - 1).bit_length(), ROW_MERGE_TILE // block_cpg))


def _row_blocks(c: int, tile: int, min_pixels: int = 1) -> tuple[int, int]:
    block_c = 1 << (c - 1).bit_length()
    return block_c, max(min_pixels, tile // block_c)


def _row_sub(n: int, spatial: int, block_p: int) -> int:
    sub = ROW_SUB
    while sub > 1 and n * -(-spatial // (sub * block_p)) < ROW_MIN_PROGRAMS:
        sub //= 2
    return sub


def _row_statistics_layout(n: int, c: int, spatial: int) -> tuple[int, int, int, int, int]:
    """row_stats' programs: (BLOCK_C, BLOCK_P, SUB, pixels a program, chunks a sample)."""
    block_c, block_p = _row_blocks(c, ROW_STATS_TILE, ROW_STATS_MIN_PIXELS)
    sub = _row_sub(n, spatial, block_p)
    pixels = block_p * sub
    return block_c, block_p, sub, pixels, -(-spatial // pixels)


def _triton_group_norm_rows(x, y, weight, bias, groups, eps, silu, pre_bias, s_n, o_n, statistics=None):
    import triton

    k = _kernels()
    n, c = x.shape[:2]
    spatial = x[0, 0].numel()
    cpg = c // groups
    block_c, block_p, sub, pixels, chunks = _row_statistics_layout(n, c, spatial)
    if statistics is not None and (statistics.chunks, statistics.pixels) != (chunks, pixels):
        statistics = None  # written in another layout (the tile constants changed since): read x
    partial_mean, partial_m2, mean, rstd, pre, w, b = _statistics_buffers(
        x, (n * chunks, c) if statistics is None else (0, c), n * groups, weight, bias, pre_bias)
    with _launch_context(x):
        if statistics is None:
            k.row_stats[(chunks, n)](x, pre, partial_mean, partial_m2, c, spatial, chunks, s_n,
                                     HAS_PRE=pre_bias is not None, BLOCK_C=block_c, BLOCK_P=block_p, SUB=sub,
                                     num_warps=ROW_STATS_WARPS)
        else:  # written by the bias add that made x, in this layout (same n, c and spatial)
            partial_mean, partial_m2 = statistics.partial_mean, statistics.partial_m2
        block_cpg = max(1, 1 << (cpg - 1).bit_length())
        k.row_merge_stats[(n * groups,)](partial_mean, partial_m2, mean, rstd, c,
                                         spatial, groups, cpg, chunks, pixels, eps,
                                         BLOCK_K=_merge_rows(chunks, block_cpg), BLOCK_CPG=block_cpg,
                                         num_warps=ROW_MERGE_WARPS)
        _, tile_p = _row_blocks(c, ROW_TILE)  # a normalisation program's pixels
        k.row_normalize[(triton.cdiv(spatial, tile_p), n)](
            x, y, pre, w, b, mean, rstd, c, spatial, groups, cpg, s_n, o_n, HAS_PRE=pre_bias is not None,
            HAS_AFFINE=weight is not None, SILU=silu, BLOCK_C=block_c, BLOCK_P=tile_p, num_warps=4)
    return y


def _launch_context(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()  # CPU: Triton's interpreter


def _statistics_buffers(x, partials: tuple[int, int], groups: int, weight, bias, pre_bias):
    """Float32 partial statistics (mean and M2, of shape `partials`) and the mean and rstd of each of `groups`
    (sample, group); the optional pre-bias, weight and bias, with a placeholder pointer (never read) for those
    that are None."""
    partial_mean = torch.empty(partials, device=x.device, dtype=torch.float32)
    partial_m2 = torch.empty_like(partial_mean)
    mean = torch.empty(groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    pre = pre_bias.contiguous() if pre_bias is not None else mean
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    return partial_mean, partial_m2, mean, rstd, pre, w, b


def _triton_group_norm_silu(x, weight, bias, groups, eps, silu, pre_bias, statistics=None):
    import triton

    k = _kernels()
    n, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {groups} groups")
    spatial = x[0, 0].numel()
    cpg = c // groups
    y = torch.empty_like(x)  # same strides as x (dense tensors keep their layout)
    in_strides, out_strides = _flat_strides(x), _flat_strides(y)
    s_n, s_c, s_s = in_strides
    o_n, o_c, o_s = out_strides
    if _row_layout(in_strides, c) and _row_layout(out_strides, c):
        return _triton_group_norm_rows(x, y, weight, bias, groups, eps, silu, pre_bias, s_n, o_n, statistics)
    block_c, block_s = _block_sizes(cpg, spatial)
    chunks = triton.cdiv(spatial, block_s)
    partial_mean, partial_m2, mean, rstd, pre, w, b = _statistics_buffers(x, (n * groups, chunks), n * groups,
                                                                          weight, bias, pre_bias)
    grid = (n * groups, chunks)
    with _launch_context(x):
        k.partial_stats[grid](x, pre, partial_mean, partial_m2, c, spatial, groups, cpg, chunks, s_n, s_c, s_s,
                            HAS_PRE=pre_bias is not None, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
        k.merge_stats[(n * groups,)](partial_mean, partial_m2, mean, rstd, spatial, cpg, chunks, eps,
                                   BLOCK_S=block_s, BLOCK_K=256, num_warps=4)
        k.normalize[grid](x, y, pre, w, b, mean, rstd, c, spatial, groups, cpg, s_n, s_c, s_s, o_n, o_c, o_s,
                        HAS_PRE=pre_bias is not None, HAS_AFFINE=weight is not None, SILU=silu,
                        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return y


__all__ = ["add_channel_bias_", "fused_softmax_enabled", "gated_gelu", "kernel_fallbacks", "group_norm_silu",
           "pad_bottom_right", "scaled_softmax", "shifted_exp", "triton_at_every_size", "triton_failure",
           "group_norm_silu_reference", "triton_available", "uses_triton"]
