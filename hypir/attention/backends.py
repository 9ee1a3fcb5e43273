"""The attention kernels and what each needs: one registry, with the constraints declared beside each kernel.

Every backend is a function ``fn(q, k, v, scale) -> out`` on tensors laid out (batch, tokens, heads,
head_dim). Availability is decided from what can actually be called: a package counts only when the
function we call exists in it, and kernels whose builds may lack code for a GPU are tried once per device.
The SDPA kernels are called through their own ATen operators, never through process-wide flags.
"""

from __future__ import annotations

import importlib
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention_names import AUTO, AttentionBackend
from ..errors import one_line
from ..kernels import scaled_softmax, shifted_exp
from ..loading import gpu_index

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class DeviceInfo:
    """What the selection needs to know about the device; built from the real one or given by tests."""

    type: str  # "cuda", "cpu", "mps", ...
    capability: tuple[int, int] | None = None
    name: str = ""

    @classmethod
    def of(cls, device: torch.device | str) -> "DeviceInfo":
        device = torch.device(device)
        if device.type == "cuda":
            index = gpu_index(device)
            return cls("cuda", torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))
        return cls(device.type, None, device.type.upper())

    @property
    def sm(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}" if self.capability else self.type


# ----------------------------------------------------------------------------------------------
# Package lookups: present only when the function we call exists.


def _find_function(module_name: str, attr: str) -> Callable | None:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"; the reason is reported by probe
        return None
    fn = getattr(module, attr, None)
    return fn if callable(fn) else None


def package_version(*dist_names: str) -> str:
    """The installed version of the first of these distributions that is installed (its own metadata)."""
    from importlib import metadata

    for name in dist_names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _module_version(module_name: str, dist_name: str) -> str:
    """The version a module reports, else its distribution's."""
    module = importlib.import_module(module_name)
    return str(getattr(module, "__version__", None) or package_version(dist_name))


def _distribution_version(dist_name: str, module_name: str) -> str:
    """The distribution's version from its metadata, else the version its module reports."""
    version = package_version(dist_name)
    return version if version != "unknown" else _module_version(module_name, dist_name)


# ----------------------------------------------------------------------------------------------
# Registry: each kernel is registered beside its function, with the constraints it needs.


@dataclass(frozen=True)
class BackendSpec:
    backend: AttentionBackend
    fn: Callable
    label: str  # what users read: "FlashAttention 2", "cuDNN attention (PyTorch SDPA)"
    flash_class: bool = False  # a FlashAttention-class kernel
    devices: tuple[str, ...] | None = None  # None: any device
    min_capability: tuple[int, int] | None = None
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    package: tuple[str, str] | None = None  # (module, function) that must exist
    install_hint: str = ""
    version: Callable[[], str] = field(default=lambda: torch.__version__)
    probe: bool = False  # a build may not carry kernels for every GPU: try it once per device
    opt_in: bool = False  # changes numerics beyond fp16/bf16 rounding: runs only when requested by name
    description: str = ""


REGISTRY: dict[AttentionBackend, BackendSpec] = {}


def register(backend: AttentionBackend, label: str, **constraints) -> Callable[[Callable], Callable]:
    """Register the decorated kernel ``fn(q, k, v, scale)`` as `backend`; registering a name twice is refused."""
    def decorate(fn: Callable) -> Callable:
        if backend in REGISTRY:
            raise ValueError(f"attention backend {backend.value!r} registered twice")
        REGISTRY[backend] = BackendSpec(backend, fn, label, **constraints)
        return fn
    return decorate


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype)
    )


def _cudnn_version() -> str:
    version = torch.backends.cudnn.version()
    return f"cuDNN {version}, PyTorch {torch.__version__}" if version else f"PyTorch {torch.__version__}"


# ----------------------------------------------------------------------------------------------
# Kernels. q, k, v: (B, N, H, D); returns (B, N, H, D).


STANDARD_MAX_SCORES = 1 << 30  # scores one `standard` softmax holds at once


@register(AttentionBackend.STANDARD, "standard attention")
def _standard(q, k, v, scale):
    """The textbook computation, softmax(Q K^T * scale) V, with queries in blocks of at most STANDARD_MAX_SCORES
    scores. Unblocked, a 2048 output's attention holds 2**32 or more of them (65536 tokens), where PyTorch's
    CUDA softmax returns wrong values (pytorch/pytorch#84144; measured on the H200: 14.4 dB against every other
    backend), and the pass peaked at 43 GiB."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    b, h, n, _ = q.shape
    rows = max(1, STANDARD_MAX_SCORES // (b * h * k.shape[2]))
    blocks = []
    for start in range(0, n, rows):
        scores = torch.matmul(q[:, :, start:start + rows] * scale, k.transpose(-1, -2))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        del scores
        blocks.append(torch.matmul(probs, v))
    return torch.cat(blocks, dim=2).transpose(1, 2)


@register(AttentionBackend.SDPA, "PyTorch SDPA")
def _sdpa(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


@register(AttentionBackend.SDPA_FLASH, "FlashAttention 2 (PyTorch SDPA)", flash_class=True, devices=("cuda",),
          min_capability=(8, 0), dtypes=HALF_DTYPES, max_head_dim=256, head_dim_multiple=8, probe=True)
def _sdpa_flash(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0].transpose(1, 2)


@register(AttentionBackend.SDPA_EFFICIENT, "memory-efficient attention (PyTorch SDPA)", devices=("cuda",),
          min_capability=(5, 0), probe=True)
def _sdpa_efficient(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, scale=scale)[0]
    return out.transpose(1, 2)


@register(AttentionBackend.SDPA_CUDNN, "cuDNN attention (PyTorch SDPA)", flash_class=True, devices=("cuda",),
          min_capability=(8, 0), dtypes=HALF_DTYPES, max_head_dim=128, head_dim_multiple=8, version=_cudnn_version,
          probe=True)
def _sdpa_cudnn(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, scale=scale)[0]
    return out.transpose(1, 2)


MATMUL_BLOCK_BYTES = 512 << 20  # scores (and fp16 probabilities) held at once by `matmul`
# `matmul` sends its scores through memory in fp16 from this many keys a query, in float32 below: at 16384 keys
# (the VAE at a 1024 output) the conversions to fp16 cost what the smaller scores save (1.25 ms either way on an
# H200), at 36864 fp16 took 7.3 ms against 8.2 and at 65536 21.9 against 24.7 (benchmarks/attention_512.py).
MATMUL_FP16_FROM_KEYS = 32768
MATMUL_SAMPLED_KEYS = 1024  # keys, evenly spaced, whose largest score is a query's shift
FP16_SHIFT_LIMIT = 60000.0  # a shift within fp16's range (65504)
# The fp16 path's exp(score - shift) values are times EXP_TIMES (256 * e**5 = 37994, within fp16's 65504); a row
# whose largest scaled score is more than EXP_LIMIT above its shift is exponentiated against that largest instead.
EXP_TIMES = 256.0
EXP_LIMIT = 5.0


@register(AttentionBackend.MATMUL, "blocked GEMM attention", devices=("cuda",), min_capability=(8, 0),
          dtypes=HALF_DTYPES, probe=True,
          description="exact attention as two tensor-core GEMMs and a float32 softmax, queries in blocks; the "
                      "fastest kernel for the VAE's head_dim 512")
def _matmul(q, k, v, scale):
    """Exact attention as two tensor-core GEMMs, for the VAE's single head of 512 dims, which no flash kernel
    takes: there it runs at GEMM speed where the memory-efficient kernel reaches about a sixth of it."""
    if k.shape[1] >= MATMUL_FP16_FROM_KEYS:
        return shifted_fp16_attention(q, k, v, scale)
    return float32_score_attention(q, k, v, scale)


def float32_score_attention(q, k, v, scale):
    """Scores in float32 (bf16/fp16 inputs, float32 accumulate and output), a float32 softmax, probabilities
    back to the input dtype for P @ V; queries in blocks so the scores stay under MATMUL_BLOCK_BYTES."""
    b, n, h, d = q.shape
    m = k.shape[1]
    qh, kh, vh = (t.transpose(1, 2).reshape(b * h, -1, d) for t in (q, k, v))
    kt = kh.transpose(1, 2)
    out = torch.empty_like(qh)
    rows = _query_rows(n, m, b * h)
    for start in range(0, n, rows):
        scores = torch.bmm(qh[:, start:start + rows], kt, out_dtype=torch.float32)
        probs = scaled_softmax(scores, scale, q.dtype)
        del scores
        out[:, start:start + rows] = torch.bmm(probs, vh)
    return out.view(b, h, n, d).transpose(1, 2)


def _query_rows(queries: int, keys: int, matrices: int) -> int:
    """Queries a block of `matmul` holds, so that its scores (4 bytes each at most) stay under MATMUL_BLOCK_BYTES."""
    return max(1, min(queries, MATMUL_BLOCK_BYTES // (4 * keys * matrices)))


def _bmm_float32(a, b):
    """a @ b of fp16 matrices, accumulated and returned in float32 (PyTorch's CPU bmm has no out_dtype)."""
    return torch.bmm(a, b, out_dtype=torch.float32) if a.is_cuda else torch.bmm(a.float(), b.float())


def shifted_fp16_attention(q, k, v, scale):
    """Scores through memory in fp16, half the bytes of float32, and accurate: each query's scores are shifted
    by the largest of its scores against MATMUL_SAMPLED_KEYS evenly spaced keys, a value at or below its
    largest score, through one more column of Q (-shift) and of K (1), so that the GEMM's float32 accumulator
    subtracts it before the one rounding to fp16. The scores that carry the probability are then small, where
    fp16 is finest, and a score far below the shift that leaves fp16's range is -inf, whose probability 0 is
    right. One read of the scores (kernels.shifted_exp) writes exp(score) in fp16, finer than bf16, and each
    row's sum; P @ V accumulates in float32 and its rows are divided by those sums, so the softmax's division
    costs no second read of the scores. Queries go in blocks so that scores and values stay under
    MATMUL_BLOCK_BYTES. Against float64 its error is lower than float32 scores with bf16 probabilities
    (tests/test_gpu_kernels.py at 65536 tokens), and above it only where logits reach the hundreds
    (tests/test_attention.py)."""
    b, n, h, d = q.shape
    m = k.shape[1]
    half = torch.float16
    qh, kh = (t.transpose(1, 2).reshape(b * h, -1, d) for t in (q, k))
    vh = v.transpose(1, 2).reshape(b * h, -1, d).to(half)
    # Q and K with 8 more columns (rows stay 16-byte aligned): Q's first is -shift, K's is 1; the rest zeros.
    # Most of the scale goes into Q as a power of two (exact), so that fp16's range holds scaled scores up to
    # about 65504; the rest, in [1, 2), into the float32 exponentials.
    exact = 2.0 ** math.floor(math.log2(scale))
    qa = torch.empty(b * h, n, d + 8, device=q.device, dtype=half)
    qs = torch.mul(qh, exact, out=qa[..., :d])
    qa[..., d:] = 0
    ka = torch.empty(b * h, m, d + 8, device=q.device, dtype=half)
    ka[..., :d] = kh
    ka[..., d + 1:] = 0
    ka[..., d] = 1  # fills, not a copy from the host: one would wait for the queued work, or break a capture
    sampled = ka[:, ::max(1, m // MATMUL_SAMPLED_KEYS), :d].transpose(1, 2)
    kt = ka.transpose(1, 2)
    out = torch.empty(b * h, n, d, device=q.device, dtype=q.dtype)
    rows = _query_rows(n, m, b * h)
    for start in range(0, n, rows):
        block = qa[:, start:start + rows]
        # In fp16 a sampled score may be infinite; the clamp keeps the shift finite, and any shift is exact.
        shift = torch.bmm(qs[:, start:start + rows], sampled).amax(dim=-1)
        block[..., d] = shift.clamp_(-FP16_SHIFT_LIMIT, FP16_SHIFT_LIMIT).neg_()
        values, sums = shifted_exp(torch.bmm(block, kt), scale / exact, EXP_TIMES, EXP_LIMIT, half)
        torch.div(_bmm_float32(values, vh), sums.unsqueeze(-1), out=out[:, start:start + rows])
        del values
    return out.view(b, h, n, d).transpose(1, 2)


@register(AttentionBackend.FLASH_ATTN, "FlashAttention 2", flash_class=True, devices=("cuda",),
          min_capability=(8, 0), dtypes=HALF_DTYPES, max_head_dim=256, head_dim_multiple=8,
          package=("flash_attn", "flash_attn_func"),
          install_hint="pip install flash-attn: a prebuilt wheel matching your torch and CUDA",
          version=lambda: _module_version("flash_attn", "flash-attn"))
def _flash_attn(q, k, v, scale):
    fn = _find_function("flash_attn", "flash_attn_func")
    return fn(q, k, v, softmax_scale=scale)


@register(AttentionBackend.FLASH_ATTN3, "FlashAttention 3", flash_class=True, devices=("cuda",),
          min_capability=(8, 0), dtypes=HALF_DTYPES, max_head_dim=256, head_dim_multiple=8,
          package=("flash_attn_interface", "flash_attn_func"),
          install_hint="build FlashAttention 3 from the flash-attention repository's hopper/ folder",
          version=lambda: package_version("flash_attn_3", "flash-attn-3"), probe=True)
def _flash_attn3(q, k, v, scale):
    fn = _find_function("flash_attn_interface", "flash_attn_func")
    out = fn(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


# flash-attn-4's module reports 0.0.0 as its version: its distribution's metadata has the real one.
@register(AttentionBackend.FLASH_ATTN4, "FlashAttention 4", flash_class=True, devices=("cuda",),
          min_capability=(9, 0), dtypes=HALF_DTYPES, max_head_dim=128, head_dim_multiple=8,
          package=("flash_attn.cute", "flash_attn_func"), install_hint="pip install flash-attn-4, Hopper or newer",
          version=lambda: _distribution_version("flash-attn-4", "flash_attn.cute"), probe=True)
def _flash_attn4(q, k, v, scale):
    fn = _find_function("flash_attn.cute", "flash_attn_func")
    out = fn(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


@register(AttentionBackend.SAGE, "SageAttention", devices=("cuda",), min_capability=(8, 0), dtypes=HALF_DTYPES,
          max_head_dim=128, head_dim_multiple=32, package=("sageattention", "sageattn"),
          install_hint="pip install sageattention", version=lambda: package_version("sageattention"), opt_in=True,
          description="8-bit attention (INT8 Q*K^T): changes numerics beyond fp16/bf16 rounding (relative error "
                      "above 1e-3); runs only when requested by name, never under auto")
def _sage(q, k, v, scale):
    fn = _find_function("sageattention", "sageattn")
    return fn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)


# Preference order of "auto". FlashAttention-class kernels first (FA3 and cuDNN lead on Hopper at
# head_dim 64; FA4 compiles on first use for every new shape, so it is last), then the non-flash
# fallbacks. On CUDA the per-shape timing below decides among the usable kernels of TUNED_ORDER; this
# order is what runs without it (CPU, per_shape off, a CUDA graph capture before a shape was timed) and
# breaks ties.
FLASH_ORDER = (
    AttentionBackend.FLASH_ATTN3,
    AttentionBackend.FLASH_ATTN,
    AttentionBackend.SDPA_CUDNN,
    AttentionBackend.SDPA_FLASH,
    AttentionBackend.FLASH_ATTN4,
)
CUDA_FALLBACK_ORDER = (AttentionBackend.SDPA_EFFICIENT, AttentionBackend.SDPA, AttentionBackend.STANDARD)
OTHER_FALLBACK_ORDER = (AttentionBackend.SDPA, AttentionBackend.STANDARD)
# What the per-shape timing measures: the FlashAttention-class kernels, and the two that also run
# head_dim 512 (the VAE): SDPA's memory-efficient kernel and blocked GEMM attention.
TUNED_ORDER = (*FLASH_ORDER, AttentionBackend.SDPA_EFFICIENT, AttentionBackend.MATMUL)


def tuned_candidates(usable: Callable[[AttentionBackend], bool]) -> list[AttentionBackend]:
    """The kernels the per-shape timing measures for a shape: the usable FlashAttention-class ones, or where none
    can run it (the VAE's head_dim 512, GPUs below sm80) the usable others. Where a flash-class kernel ran, no
    other ever won: on every shape of a 1024 and a 2048 output timed on an H200 (GPU time alone), the fastest of
    the memory-efficient and GEMM kernels took 1.29x the best flash-class kernel's time or more, up to 8.6x; their
    warm-up and first timed call were most of the first image's attention timing at 2048 (a call of the GEMM
    kernel at 65536 tokens takes 95 ms)."""
    usable_order = [b for b in TUNED_ORDER if usable(b)]
    return [b for b in usable_order if REGISTRY[b].flash_class] or usable_order

_opt_in_in_auto = [b.value for b in (*TUNED_ORDER, *CUDA_FALLBACK_ORDER, *OTHER_FALLBACK_ORDER) if REGISTRY[b].opt_in]
if _opt_in_in_auto:  # 8-bit attention and the like must never be picked by "auto"
    raise RuntimeError(f"opt-in attention backends in the auto order: {_opt_in_in_auto}")


def parse_backend(name: str | AttentionBackend) -> AttentionBackend | str:
    """'auto' or a backend; raises with the list of valid names otherwise."""
    if isinstance(name, AttentionBackend):
        return name
    name = str(name).strip().lower()
    if name == AUTO:
        return AUTO
    try:
        return AttentionBackend(name)
    except ValueError:
        valid = ", ".join([AUTO] + [b.value for b in AttentionBackend])
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {valid}") from None


# ----------------------------------------------------------------------------------------------
# Probes: one tiny call per (backend, device), cached, for builds whose GPU support we cannot read.

_PROBES: dict[tuple[AttentionBackend, str, str], str | None] = {}
_PROBE_LOCK = threading.Lock()


def _probe(spec: BackendSpec, device: torch.device, dtype: torch.dtype) -> str | None:
    key = (spec.backend, str(device), str(dtype))
    with _PROBE_LOCK:
        if key not in _PROBES:
            try:
                gen = torch.Generator(device="cpu").manual_seed(0)
                q = torch.randn(1, 128, 1, 64, generator=gen).to(device=device, dtype=dtype)
                out = spec.fn(q, q, q, 0.125)
                ref = _sdpa(q.float(), q.float(), q.float(), 0.125)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                _PROBES[key] = None if err < 2e-2 else f"probe gave relative error {err:.1e}"
            except Exception as exc:  # noqa: BLE001 - the probe exists to turn any failure into a reason
                _PROBES[key] = f"probe failed: {one_line(exc)}"
    return _PROBES[key]


# ----------------------------------------------------------------------------------------------
# Why a backend cannot run a call: one answer for the selection, the reports and `hypir doctor`.


def why_not(backend: AttentionBackend, device: DeviceInfo, dtype: torch.dtype, head_dim: int,
            real_device: torch.device | None = None) -> str | None:
    """None when `backend` can run attention of this head_dim in this dtype on this device, else why not, in
    the words a user needs. `real_device` (a CUDA device) lets backends whose builds may lack kernels for the
    GPU be tried once (a probe, cached)."""
    spec = REGISTRY[backend]
    if spec.package and _find_function(*spec.package) is None:
        module, attr = spec.package
        return f"{module}.{attr} not found ({spec.install_hint})"
    if spec.devices is not None and device.type not in spec.devices:
        return f"needs an NVIDIA GPU, not {device.type.upper()}"
    if spec.min_capability and device.capability and device.capability < spec.min_capability:
        need = f"sm{spec.min_capability[0]}{spec.min_capability[1]}"
        return f"GPU {device.sm} ({device.name}) is below {need}" if device.name else f"GPU {device.sm} is below {need}"
    if dtype not in spec.dtypes:
        return f"{dtype_name(dtype)}: {spec.label} needs fp16 or bf16"
    if spec.max_head_dim is not None and head_dim > spec.max_head_dim:
        return f"head_dim {head_dim} > {spec.max_head_dim}"
    if head_dim % spec.head_dim_multiple:
        return f"head_dim {head_dim} is not a multiple of {spec.head_dim_multiple}"
    if spec.probe and real_device is not None and real_device.type == device.type == "cuda":
        return _probe(spec, real_device, dtype)
    return None
