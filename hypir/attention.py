"""Attention backends for HYPIR: one registry, one dispatch, per-module choice, honest reports.

Every backend is a function with the signature ``fn(q, k, v, scale) -> out`` on tensors laid out
(batch, tokens, heads, head_dim), registered with the constraints it needs (device, compute
capability, dtypes, head_dim). Availability is decided from what can actually be called: a package
counts only when the function we call exists in it.

Nothing here changes global state. The SDPA kernels are called through their own ATen operators
instead of ``torch.nn.attention.sdpa_kernel`` (which flips process-wide flags), and the backend a
module runs is read from a :class:`contextvars.ContextVar` that the pipeline sets for the duration of
one call: two callers sharing one cached model each get the backend they asked for.

Under ``auto`` on CUDA (FlashAttention on), the kernel is chosen per attention *shape*: the first call of a
shape times every usable FlashAttention-class kernel (plus SDPA's memory-efficient kernel and blocked GEMM
attention, which also run the VAE's head_dim 512) on that call's q/k/v, and the fastest is kept in a small process-wide
cache, so later calls and later pipelines reuse it. ``AttentionPolicy(per_shape=False)`` or
``HYPIR_ATTENTION_AUTOTUNE=0`` keeps the fixed preference order instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import statistics
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .attention_names import AUTO, AttentionBackend
from .errors import one_line
from .kernels import scaled_softmax

logger = logging.getLogger("hypir")


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
            index = device.index if device.index is not None else torch.cuda.current_device()
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


def _package_version(*dist_names: str) -> str:
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
    return str(getattr(module, "__version__", None) or _package_version(dist_name))


# ----------------------------------------------------------------------------------------------
# Kernels. q, k, v: (B, N, H, D); returns (B, N, H, D).


def _standard(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def _sdpa(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def _sdpa_flash(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0].transpose(1, 2)


def _sdpa_efficient(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, scale=scale)[0]
    return out.transpose(1, 2)


def _sdpa_cudnn(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, scale=scale)[0]
    return out.transpose(1, 2)


MATMUL_BLOCK_BYTES = 512 << 20  # float32 scores held at once by `matmul`


def _matmul(q, k, v, scale):
    """Exact attention as two tensor-core GEMMs: scores in float32 (bf16/fp16 inputs, float32 accumulate and
    output), a float32 softmax, probabilities back to the input dtype for P @ V; queries in blocks so the
    scores stay under MATMUL_BLOCK_BYTES. For the VAE's single head of 512 dims, which no flash kernel takes,
    it runs at GEMM speed where the memory-efficient kernel reaches about a sixth of it."""
    b, n, h, d = q.shape
    m = k.shape[1]
    qh, kh, vh = (t.transpose(1, 2).reshape(b * h, -1, d) for t in (q, k, v))
    kt = kh.transpose(1, 2)
    out = torch.empty_like(qh)
    rows = max(1, min(n, MATMUL_BLOCK_BYTES // (4 * m * b * h)))
    for start in range(0, n, rows):
        scores = torch.bmm(qh[:, start:start + rows], kt, out_dtype=torch.float32)
        probs = scaled_softmax(scores, scale, q.dtype)
        del scores
        out[:, start:start + rows] = torch.bmm(probs, vh)
    return out.view(b, h, n, d).transpose(1, 2)


def _flash_attn(q, k, v, scale):
    fn = _find_function("flash_attn", "flash_attn_func")
    return fn(q, k, v, softmax_scale=scale)


def _flash_attn3(q, k, v, scale):
    fn = _find_function("flash_attn_interface", "flash_attn_func")
    out = fn(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


def _flash_attn4(q, k, v, scale):
    fn = _find_function("flash_attn.cute", "flash_attn_func")
    out = fn(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


def _sage(q, k, v, scale):
    fn = _find_function("sageattention", "sageattn")
    return fn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)


# ----------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BackendSpec:
    backend: AttentionBackend
    fn: Callable
    label: str  # what users read: "FlashAttention 2", "cuDNN attention (PyTorch SDPA)"
    flash_class: bool  # a FlashAttention-class kernel
    devices: tuple[str, ...] | None  # None: any device
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

    def unavailable_reason(self, device: DeviceInfo) -> str | None:
        """Why this backend cannot run on the device at all (None when it can)."""
        if self.package and _find_function(*self.package) is None:
            module, attr = self.package
            return f"{module}.{attr} not found ({self.install_hint})"
        if self.devices is not None and device.type not in self.devices:
            return f"needs an NVIDIA GPU, not {device.type.upper()}"
        if self.min_capability and device.capability and device.capability < self.min_capability:
            need = f"sm{self.min_capability[0]}{self.min_capability[1]}"
            return f"GPU {device.sm} ({device.name}) is below {need}" if device.name else f"GPU {device.sm} is below {need}"
        return None

    def shape_reason(self, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this backend cannot run this call's dtype or shape (None when it can)."""
        if dtype not in self.dtypes:
            return f"{_dtype_name(dtype)}: {self.label} needs fp16 or bf16"
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            return f"head_dim {head_dim} > {self.max_head_dim}"
        if head_dim % self.head_dim_multiple:
            return f"head_dim {head_dim} is not a multiple of {self.head_dim_multiple}"
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype)
    )


def _cudnn_version() -> str:
    version = torch.backends.cudnn.version()
    return f"cuDNN {version}, PyTorch {torch.__version__}" if version else f"PyTorch {torch.__version__}"


REGISTRY: dict[AttentionBackend, BackendSpec] = {}


def _register(spec: BackendSpec) -> None:
    if spec.backend in REGISTRY:
        raise ValueError(f"attention backend {spec.backend.value!r} registered twice")
    REGISTRY[spec.backend] = spec


_register(BackendSpec(AttentionBackend.FLASH_ATTN3, _flash_attn3, "FlashAttention 3", True, ("cuda",), (8, 0),
                      HALF_DTYPES, 256, 8, ("flash_attn_interface", "flash_attn_func"),
                      "build FlashAttention 3 from the flash-attention repository's hopper/ folder",
                      lambda: _package_version("flash_attn_3", "flash-attn-3"), probe=True))
_register(BackendSpec(AttentionBackend.FLASH_ATTN, _flash_attn, "FlashAttention 2", True, ("cuda",), (8, 0),
                      HALF_DTYPES, 256, 8, ("flash_attn", "flash_attn_func"),
                      "pip install flash-attn: a prebuilt wheel matching your torch and CUDA",
                      lambda: _module_version("flash_attn", "flash-attn")))
_register(BackendSpec(AttentionBackend.SDPA_CUDNN, _sdpa_cudnn, "cuDNN attention (PyTorch SDPA)", True, ("cuda",),
                      (8, 0), HALF_DTYPES, 128, 8, version=_cudnn_version, probe=True))
_register(BackendSpec(AttentionBackend.SDPA_FLASH, _sdpa_flash, "FlashAttention 2 (PyTorch SDPA)", True, ("cuda",),
                      (8, 0), HALF_DTYPES, 256, 8, probe=True))
_register(BackendSpec(AttentionBackend.FLASH_ATTN4, _flash_attn4, "FlashAttention 4", True, ("cuda",), (9, 0),
                      HALF_DTYPES, 128, 8, ("flash_attn.cute", "flash_attn_func"),
                      "pip install flash-attn-4, Hopper or newer",
                      lambda: _module_version("flash_attn.cute", "flash-attn-4"), probe=True))
_register(BackendSpec(AttentionBackend.SDPA_EFFICIENT, _sdpa_efficient, "memory-efficient attention (PyTorch SDPA)",
                      False, ("cuda",), (5, 0), probe=True))
_register(BackendSpec(AttentionBackend.SDPA, _sdpa, "PyTorch SDPA", False, None))
_register(BackendSpec(AttentionBackend.SAGE, _sage, "SageAttention", False, ("cuda",), (8, 0), HALF_DTYPES, 128, 32,
                      ("sageattention", "sageattn"), "pip install sageattention",
                      lambda: _package_version("sageattention"), opt_in=True,
                      description="8-bit attention (INT8 Q*K^T): changes numerics beyond fp16/bf16 rounding "
                                  "(relative error above 1e-3); runs only when requested by name, never under auto"))
_register(BackendSpec(AttentionBackend.MATMUL, _matmul, "blocked GEMM attention", False, ("cuda",), (8, 0),
                      HALF_DTYPES, probe=True,
                      description="exact attention as two GEMMs with a float32 softmax, queries in blocks; "
                                  "the fastest kernel for the VAE's head_dim 512"))
_register(BackendSpec(AttentionBackend.STANDARD, _standard, "standard attention", False, None))

# Preference order of "auto". FlashAttention-class kernels first (FA3 and cuDNN lead on Hopper at
# head_dim 64; FA4 compiles on first use for every new shape, so it is last), then the non-flash
# fallbacks. On CUDA the per-shape timing below decides among the usable kernels of TUNED_ORDER; this
# order is what runs without it (CPU, per_shape off, inside torch.compile or a CUDA graph capture before a
# shape was timed) and breaks ties.
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
# Per-shape timing: one process-wide cache, shape -> measured times and the winner.

AUTOTUNE_ENV = "HYPIR_ATTENTION_AUTOTUNE"
TIMED_ITERS = 5  # timed calls per candidate, after one warm-up call; the median counts
MAX_TUNED_SHAPES = 256  # oldest entries go first beyond this


def autotune_enabled() -> bool:
    """False when HYPIR_ATTENTION_AUTOTUNE is 0/false/no/off: auto then keeps the fixed preference order."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class AttentionShape(NamedTuple):
    """What the per-shape choice is keyed by."""

    batch: int
    q_tokens: int
    kv_tokens: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: str

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor) -> "AttentionShape":
        return cls(q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], q.dtype, str(q.device))

    def describe(self) -> str:
        return (f"{self.batch}x{self.q_tokens}x{self.kv_tokens} tokens, {self.heads} heads x {self.head_dim}, "
                f"{_dtype_name(self.dtype)}, {self.device}")


@dataclass(frozen=True)
class ShapeTiming:
    """One shape's measurement: median ms per candidate that ran, the error of each that raised, the winner."""

    times: dict[AttentionBackend, float]
    errors: dict[AttentionBackend, str]
    winner: AttentionBackend | None


_TUNED: "OrderedDict[AttentionShape, ShapeTiming]" = OrderedDict()
_TUNE_LOCK = threading.Lock()


def autotune_table() -> dict[AttentionShape, ShapeTiming]:
    """The per-shape timings measured in this process (oldest first): shape -> times (ms), errors, winner."""
    with _TUNE_LOCK:
        return dict(_TUNED)


def clear_autotune_cache() -> None:
    with _TUNE_LOCK:
        _TUNED.clear()


def time_kernel(backend: AttentionBackend, fn: Callable, q, k, v, scale: float, iters: int = TIMED_ITERS) -> float:
    """Median milliseconds of ``fn(q, k, v, scale)`` over ``iters`` calls, timed with CUDA events on the current
    stream of q's device. The caller has made the warm-up call."""
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream()
        events = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn(q, k, v, scale)
            end.record(stream)
            events.append((start, end))
        events[-1][1].synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


# ----------------------------------------------------------------------------------------------
# Selection


@dataclass
class AttentionPolicy:
    """What the caller asked for: a backend name or 'auto', and the FlashAttention switch."""

    attention: str | AttentionBackend = AUTO
    use_flash_attention: bool = True
    per_shape: bool = True  # auto on CUDA: time the candidates once per attention shape, run the fastest

    def __post_init__(self):
        self.attention = parse_backend(self.attention)


class AttentionRouter:
    """Resolves the backend of every attention call for one policy on one device and dtype.

    Keeps, per module, the kernels that failed at run time (each fails over once, with a warning)
    and records which backend each module really ran, and on which shape.

    ``timer(backend, fn, q, k, v, scale) -> ms`` times one candidate for the per-shape choice; None uses
    :func:`time_kernel` (CUDA events, CUDA tensors only). A timer given here also lets the per-shape choice
    run on tensors of other devices (tests time stand-in kernels with a fake one).
    """

    timer: Callable[..., float] | None = None

    def __init__(self, policy: AttentionPolicy, device: torch.device | str, dtype: torch.dtype,
                 device_info: DeviceInfo | None = None, timer: Callable[..., float] | None = None):
        self.policy = policy
        self.device = torch.device(device)
        self.dtype = dtype
        self.info = device_info or DeviceInfo.of(self.device)
        if timer is not None:
            self.timer = timer
        self.per_shape = (policy.per_shape and policy.attention == AUTO and policy.use_flash_attention
                          and self.info.type == "cuda" and autotune_enabled())
        self.ran: dict[str, AttentionBackend] = {}
        self.shapes: dict[str, tuple[int, int, int, int]] = {}  # module -> (q tokens, kv tokens, heads, head_dim)
        self.tuned: dict[str, tuple[AttentionShape, ShapeTiming]] = {}  # modules whose kernel timing chose
        self.failed: dict[str, set[AttentionBackend]] = {}
        self.fallback_warnings: list[str] = []
        self._cache: dict[tuple, AttentionBackend] = {}
        self._lock = threading.Lock()

    # --- the order of candidates for this policy ---
    def candidates(self) -> tuple[list[AttentionBackend], str | None]:
        """Ordered candidates, and (when FlashAttention is off by choice) the reason."""
        fallback = CUDA_FALLBACK_ORDER if self.info.type == "cuda" else OTHER_FALLBACK_ORDER
        requested = self.policy.attention
        if requested != AUTO:
            rest = [b for b in fallback if b != requested]
            return [requested, *rest], None
        if not self.policy.use_flash_attention:
            return list(fallback), "switched off"
        return [*FLASH_ORDER, *fallback], None

    def flash_unavailable_reason(self, head_dim: int = 64) -> str:
        """Why no FlashAttention-class kernel can run here, in the words a user needs."""
        if self.info.type != "cuda":
            return f"{self.info.type.upper()}: FlashAttention needs an NVIDIA GPU"
        if self.info.capability and self.info.capability < (8, 0):
            return f"GPU {self.info.sm} ({self.info.name}) is below sm80" if self.info.name else f"GPU {self.info.sm} is below sm80"
        if self.dtype not in HALF_DTYPES:
            return f"{_dtype_name(self.dtype)}: FlashAttention needs fp16 or bf16"
        reasons = [f"{b.value}: {why}" for b in FLASH_ORDER if (why := self.unusable_reason(b, head_dim))]
        return "; ".join(reasons) if reasons else "no FlashAttention kernel supports this shape"

    def unusable_reason(self, backend: AttentionBackend, head_dim: int) -> str | None:
        spec = REGISTRY[backend]
        why = spec.unavailable_reason(self.info) or spec.shape_reason(self.dtype, head_dim)
        if why is None and spec.probe and self.info.type == self.device.type == "cuda":
            why = _probe(spec, self.device, self.dtype)
        return why

    def choose(self, module: str, head_dim: int) -> AttentionBackend:
        """The first usable candidate for this module, skipping kernels that failed in it."""
        failed = frozenset(self.failed.get(module, ()))
        key = (module, head_dim, failed)
        backend = self._cache.get(key)
        if backend is not None:
            return backend
        order, _ = self.candidates()
        backend = next((b for b in order if b not in failed and self.unusable_reason(b, head_dim) is None), None)
        if backend is None:
            raise RuntimeError(f"no attention backend can run {module} (head_dim {head_dim}, "
                               f"{_dtype_name(self.dtype)}, {self.info.type}); tried {[b.value for b in order]}")
        requested = self.policy.attention
        if requested != AUTO and backend != requested and requested not in failed:
            logger.warning("[HYPIR] %s cannot run %s (%s): using %s", requested.value, module,
                           self.unusable_reason(requested, head_dim), backend.value)
        self._cache[key] = backend
        return backend

    def flash_off_reason(self, module_prefix: str = "unet.", head_dim: int = 64) -> str:
        """Why the modules under this prefix do not run a FlashAttention-class kernel."""
        failed = sorted({b.value for m, bs in self.failed.items() if m.startswith(module_prefix)
                         for b in bs if REGISTRY[b].flash_class})
        slower = sorted({self.ran[m].value for m, (_, timing) in self.tuned.items()
                         if m.startswith(module_prefix) and m in self.ran and not REGISTRY[self.ran[m]].flash_class
                         and any(REGISTRY[b].flash_class for b in timing.times)})
        if slower:
            return f"{'+'.join(slower)} measured faster than the FlashAttention kernels at these shapes"
        if failed:
            return f"{'/'.join(failed)} failed at run time"
        _, off_reason = self.candidates()
        if off_reason:
            return off_reason
        if self.policy.attention != AUTO:
            return f"{self.policy.attention.value} chosen"
        if head_dim > 256 and self.info.type == "cuda" and self.dtype in HALF_DTYPES \
                and (self.info.capability or (0, 0)) >= (8, 0):
            return f"head_dim {head_dim} exceeds what FlashAttention kernels support"
        return self.flash_unavailable_reason(head_dim)

    # --- per-shape choice ---
    def _tunes(self, q: torch.Tensor) -> bool:
        """Whether this call's kernel is chosen by timing: auto + FlashAttention on CUDA, per_shape on; the
        built-in timer needs CUDA tensors, an injected one does not."""
        return self.per_shape and (q.device.type == "cuda" or self.timer is not None)

    def _choose_for_shape(self, module: str, shape: AttentionShape, q, k, v, scale) -> AttentionBackend | None:
        """The fastest measured kernel for this shape that has not failed in this module (None: use the order)."""
        timing = _TUNED.get(shape)
        if timing is None:
            if torch.compiler.is_compiling() or (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                return None  # nothing can be timed while tracing or capturing: the fixed order decides
            timing = self._measure(module, shape, q, k, v, scale)
        if timing.errors:  # kernels that raised on this shape are failed kernels of every module running it
            with self._lock:
                self.failed.setdefault(module, set()).update(timing.errors)
        failed = self.failed.get(module, ())
        for backend in sorted(timing.times, key=timing.times.__getitem__):
            if backend not in failed:
                self.tuned[module] = (shape, timing)
                return backend
        self.tuned.pop(module, None)
        return None

    def _measure(self, module: str, shape: AttentionShape, q, k, v, scale) -> ShapeTiming:
        """Time every usable candidate once on this call's q/k/v (one warm-up call, then the timer), cache it."""
        with _TUNE_LOCK:
            timing = _TUNED.get(shape)
            if timing is not None:  # another thread measured it meanwhile
                return timing
            candidates = [b for b in TUNED_ORDER
                          if not REGISTRY[b].opt_in and self.unusable_reason(b, shape.head_dim) is None]
            timer = self.timer or time_kernel
            times: dict[AttentionBackend, float] = {}
            errors: dict[AttentionBackend, str] = {}
            with torch.no_grad():
                for backend in candidates:
                    fn = REGISTRY[backend].fn
                    try:
                        fn(q, k, v, scale)  # warm-up (FA4 compiles here)
                        times[backend] = float(timer(backend, fn, q, k, v, scale))
                    except torch.cuda.OutOfMemoryError:  # needs more memory than is free now: not a defect
                        logger.warning("[HYPIR] %s ran out of GPU memory while timed on %s; not used for it",
                                       backend.value, shape.describe())
                    except Exception as exc:  # noqa: BLE001 - a kernel that raises is excluded, loudly, once
                        errors[backend] = one_line(exc)
                        self._record_failure(module, backend, exc)
            # min() keeps the first of equal times: ties go to the preference order
            timing = ShapeTiming(times, errors, min(times, key=times.__getitem__) if times else None)
            _TUNED[shape] = timing
            while len(_TUNED) > MAX_TUNED_SHAPES:
                _TUNED.popitem(last=False)
        logger.info("[HYPIR] attention %s: %s -> %s", shape.describe(),
                    ", ".join(f"{b.value} {ms:.3f} ms" for b, ms in times.items()) or "no kernel ran",
                    timing.winner.value if timing.winner else "fixed order")
        return timing

    def _record_failure(self, module: str, backend: AttentionBackend, exc: BaseException) -> None:
        with self._lock:
            self.failed.setdefault(module, set()).add(backend)
        message = f"[HYPIR] {backend.value} failed in {module} ({one_line(exc)}); falling back"
        self.fallback_warnings.append(message)
        logger.warning(message)

    def snapshot(self, prefix: str) -> dict:
        """What the modules under `prefix` ran (backends, shapes, timing choices): a CUDA graph replays the
        kernels of the call that captured it, and `restore` reports them for the replay."""
        pick = lambda d: {m: value for m, value in d.items() if m.startswith(prefix)}  # noqa: E731
        return {"ran": pick(self.ran), "shapes": pick(self.shapes), "tuned": pick(self.tuned)}

    def restore(self, snapshot: dict) -> None:
        self.ran.update(snapshot["ran"])
        self.shapes.update(snapshot["shapes"])
        self.tuned.update(snapshot["tuned"])

    def run(self, module: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        head_dim = q.shape[-1]
        self.shapes[module] = (q.shape[1], k.shape[1], q.shape[2], head_dim)
        shape = AttentionShape.of(q, k) if self._tunes(q) else None
        while True:
            backend = self._choose_for_shape(module, shape, q, k, v, scale) if shape is not None else None
            if backend is None:
                backend = self.choose(module, head_dim)
            try:
                out = REGISTRY[backend].fn(q, k, v, scale)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing kernel falls back, once per module, loudly
                self._record_failure(module, backend, exc)
                continue
            self.ran[module] = backend
            return out


# ----------------------------------------------------------------------------------------------
# The active router for the current call (per thread / task, never global).

_ACTIVE: contextvars.ContextVar[AttentionRouter | None] = contextvars.ContextVar("hypir_attention", default=None)


@contextlib.contextmanager
def use_router(router: AttentionRouter) -> Iterator[AttentionRouter]:
    token = _ACTIVE.set(router)
    try:
        yield router
    finally:
        _ACTIVE.reset(token)


def dispatch(module: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one module, (B, N, H, D) in and out, through the caller's router (SDPA without one)."""
    router = _ACTIVE.get()
    if router is None:
        return _sdpa(q, k, v, scale)
    return router.run(module, q, k, v, scale)


class HYPIRAttnProcessor:
    """A diffusers attention processor that asks the active router for this module's backend.

    Follows diffusers' ``AttnProcessor2_0`` step for step (spatial/group norm, 4-D inputs of the VAE,
    residual, rescale), with the attention product itself routed through :func:`dispatch`.
    """

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("HYPIR attention does not take an attention mask (HYPIR passes none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if torch.compiler.is_compiling():  # torch.compile picks the SDPA kernel and fuses around it
            hidden_states = _sdpa(query, key, value, attn.scale)
        else:
            hidden_states = dispatch(self.name, query, key, value, attn.scale)
        hidden_states = hidden_states.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_processors(model: torch.nn.Module, prefix: str) -> int:
    """Give every attention module of a diffusers model (UNet, VAE) a routed processor; returns the count."""
    processors = {name: HYPIRAttnProcessor(f"{prefix}.{name.removesuffix('.processor')}")
                  for name in model.attn_processors}
    model.set_attn_processor(processors)
    return len(processors)


# ----------------------------------------------------------------------------------------------
# Text encoder: the matching transformers attention implementation.


def text_encoder_implementation(router: AttentionRouter) -> str:
    """transformers' attn_implementation for the CLIP text model under this router's policy."""
    requested = router.policy.attention
    if requested == AttentionBackend.STANDARD:
        return "eager"
    wants_flash = requested == AttentionBackend.FLASH_ATTN or (requested == AUTO and router.policy.use_flash_attention)
    if wants_flash and router.unusable_reason(AttentionBackend.FLASH_ATTN, 64) is None:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():  # transformers' own check of the flash-attn 2 package
            return "flash_attention_2"
    return "sdpa"


# ----------------------------------------------------------------------------------------------
# Reports


@dataclass
class AttentionReport:
    """What ran, in the words of the console lines and the node status."""

    unet_self: AttentionBackend | None
    per_module: dict[str, AttentionBackend]
    text_encoder: str
    reason: str | None  # why FlashAttention is not used for the UNet self-attention
    warnings: list[str]
    # module -> (q tokens, kv tokens, heads, head_dim)
    shapes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def flash_enabled(self) -> bool:
        return self.unet_self is not None and REGISTRY[self.unet_self].flash_class

    def status_line(self) -> str:
        if self.flash_enabled:
            spec = REGISTRY[self.unet_self]
            return f"FlashAttention: enabled ({self.unet_self.value} {spec.version()})"
        backend = self.unet_self.value if self.unet_self else "none"
        return f"FlashAttention: disabled ({self.reason}), using {backend}"

    def backends_by_role(self) -> dict[str, str]:
        """Backend per kind of module: unet.attn1, unet.attn2, vae (joined when they differ)."""
        roles: dict[str, set[str]] = {}
        for module, backend in self.per_module.items():
            role = module.split(".")[0]
            if role == "unet":
                role = "unet." + ("attn2" if module.endswith("attn2") else "attn1")
            roles.setdefault(role, set()).add(backend.value)
        result = {role: "+".join(sorted(names)) for role, names in sorted(roles.items())}
        result["text_encoder"] = self.text_encoder
        return result

    def _unet_backends(self) -> list[AttentionBackend]:
        """The kernels the UNet ran, the main one first."""
        ran = {b for m, b in self.per_module.items() if m.startswith("unet.")}
        return sorted(ran, key=lambda b: (b != self.unet_self, b.value))

    def console_lines(self) -> list[str]:
        unet = self._unet_backends()
        if not self.flash_enabled:
            backend = "+".join(b.value for b in unet) if len(unet) > 1 else \
                (self.unet_self.value if self.unet_self else "none")
            lines = [f"FlashAttention is not used ({self.reason}); attention runs on {backend}."]
            lines.append(f"CLIPTextModel uses {self.text_encoder} attention")
            return lines
        spec = REGISTRY[self.unet_self]
        version = spec.version()
        if self.unet_self == AttentionBackend.FLASH_ATTN:
            lines = [f"FlashAttention {version} is available and will be used for acceleration."]
        else:
            lines = [f"{spec.label} {version} is available and will be used for acceleration."]
        lines.append(f"{spec.label} enabled for this enhancer.")
        if self.text_encoder == "flash_attention_2":
            lines.append("FlashAttention 2 enabled for CLIPTextModel")
        else:
            lines.append(f"CLIPTextModel uses {self.text_encoder} attention "
                         "(transformers runs FlashAttention only through the flash-attn 2 package)")
        if len(unet) > 1:
            lines.append(" + ".join(REGISTRY[b].label for b in unet)
                         + " enabled for UNet2DConditionModel, chosen per attention shape")
        else:
            lines.append(f"{spec.label} enabled for UNet2DConditionModel")
        vae = {b for m, b in self.per_module.items() if m.startswith("vae.")}
        if vae:
            lines.append("AutoencoderKL attention (head_dim 512, beyond FlashAttention kernels) runs on "
                         + "+".join(sorted(b.value for b in vae)))
        return lines


def build_report(router: AttentionRouter, text_encoder: str) -> AttentionReport:
    unet_self = [b for m, b in router.ran.items() if m.startswith("unet.") and m.endswith("attn1")]
    main = max(set(unet_self), key=unet_self.count) if unet_self else None
    reason = None if main is not None and REGISTRY[main].flash_class else router.flash_off_reason("unet.", 64)
    return AttentionReport(main, dict(router.ran), text_encoder, reason, list(router.fallback_warnings),
                           dict(router.shapes))
