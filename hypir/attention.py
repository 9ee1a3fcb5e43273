"""Attention backends for HYPIR: one registry, one dispatch, per-module choice, honest reports.

Every backend is a function with the signature ``fn(q, k, v, scale) -> out`` on tensors laid out
(batch, tokens, heads, head_dim), registered with the constraints it needs (device, compute
capability, dtypes, head_dim). Availability is decided from what can actually be called: a package
counts only when the function we call exists in it.

Nothing here changes global state. The SDPA kernels are called through their own ATen operators
instead of ``torch.nn.attention.sdpa_kernel`` (which flips process-wide flags), and the backend a
module runs is read from a :class:`contextvars.ContextVar` that the pipeline sets for the duration of
one call: two callers sharing one cached model each get the backend they asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import importlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

logger = logging.getLogger("hypir")


class AttentionBackend(str, enum.Enum):
    FLASH_ATTN = "flash_attn"
    FLASH_ATTN3 = "flash_attn3"
    FLASH_ATTN4 = "flash_attn4"
    SDPA_CUDNN = "sdpa_cudnn"
    SDPA_FLASH = "sdpa_flash"
    SDPA_EFFICIENT = "sdpa_efficient"
    SDPA = "sdpa"
    SAGE = "sage"
    STANDARD = "standard"


AUTO = "auto"
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
                      lambda: _package_version("sageattention")))
_register(BackendSpec(AttentionBackend.STANDARD, _standard, "standard attention", False, None))

# Preference order of "auto". FlashAttention-class kernels first (FA3 and cuDNN lead on Hopper at
# head_dim 64; FA4 compiles on first use for every new shape, so it is last and opt-in in practice),
# then the non-flash fallbacks.
FLASH_ORDER = (
    AttentionBackend.FLASH_ATTN3,
    AttentionBackend.FLASH_ATTN,
    AttentionBackend.SDPA_CUDNN,
    AttentionBackend.SDPA_FLASH,
    AttentionBackend.FLASH_ATTN4,
)
CUDA_FALLBACK_ORDER = (AttentionBackend.SDPA_EFFICIENT, AttentionBackend.SDPA, AttentionBackend.STANDARD)
OTHER_FALLBACK_ORDER = (AttentionBackend.SDPA, AttentionBackend.STANDARD)


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
                _PROBES[key] = f"probe failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _PROBES[key]


# ----------------------------------------------------------------------------------------------
# Selection


@dataclass
class AttentionPolicy:
    """What the caller asked for: a backend name or 'auto', and the FlashAttention switch."""

    attention: str | AttentionBackend = AUTO
    use_flash_attention: bool = True

    def __post_init__(self):
        self.attention = parse_backend(self.attention)


class AttentionRouter:
    """Resolves the backend of every attention call for one policy on one device and dtype.

    Keeps, per module, the kernels that failed at run time (each fails over once, with a warning)
    and records which backend each module really ran.
    """

    def __init__(self, policy: AttentionPolicy, device: torch.device | str, dtype: torch.dtype,
                 device_info: DeviceInfo | None = None):
        self.policy = policy
        self.device = torch.device(device)
        self.dtype = dtype
        self.info = device_info or DeviceInfo.of(self.device)
        self.ran: dict[str, AttentionBackend] = {}
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

    def run(self, module: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        head_dim = q.shape[-1]
        while True:
            backend = self.choose(module, head_dim)
            try:
                out = REGISTRY[backend].fn(q, k, v, scale)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing kernel falls back, once per module, loudly
                with self._lock:
                    self.failed.setdefault(module, set()).add(backend)
                message = (f"[HYPIR] {backend.value} failed in {module} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); falling back")
                self.fallback_warnings.append(message)
                logger.warning(message)
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

    def console_lines(self) -> list[str]:
        if not self.flash_enabled:
            backend = self.unet_self.value if self.unet_self else "none"
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
    return AttentionReport(main, dict(router.ran), text_encoder, reason, list(router.fallback_warnings))
