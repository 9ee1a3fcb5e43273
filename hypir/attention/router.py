"""Choosing the kernel of every attention call: the caller's policy, the router that resolves it per module and
shape (falling back, once and loudly, from a kernel that fails), and the context that carries the router of
the current call. Nothing here is global: two callers sharing one model each get the backend they asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..attention_names import AUTO, AttentionBackend
from ..errors import one_line
from . import tuning
from .backends import (CUDA_FALLBACK_ORDER, FLASH_ORDER, OTHER_FALLBACK_ORDER, REGISTRY, DeviceInfo, _sdpa,
                       dtype_name, parse_backend, tuned_candidates, why_not)
from .timing_store import TimingStore, store_for
from .tuning import AttentionShape, ShapeTiming

logger = logging.getLogger("hypir")

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
    :func:`time_kernels` (CUDA events, every candidate in the same rounds; CUDA tensors only). A timer given
    here also lets the per-shape choice run on tensors of other devices (tests time stand-in kernels with a
    fake one). ``store`` is where timings are kept across processes; None: the cache folder's store of the
    GPU (timing_store.store_for) with the built-in timer, none with an injected one (it times stand-ins).
    """

    timer: Callable[..., float] | None = None

    def __init__(self, policy: AttentionPolicy, device: torch.device | str, dtype: torch.dtype,
                 device_info: DeviceInfo | None = None, timer: Callable[..., float] | None = None,
                 store: TimingStore | None = None):
        self.policy = policy
        self.device = torch.device(device)
        self.dtype = dtype
        self.info = device_info or DeviceInfo.of(self.device)
        if timer is not None:
            self.timer = timer
        self.store = store
        self.per_shape = (policy.per_shape and policy.attention == AUTO and policy.use_flash_attention
                          and self.info.type == "cuda")
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

    def why_not(self, backend: AttentionBackend, head_dim: int) -> str | None:
        """backends.why_not on this router's device and dtype."""
        return why_not(backend, self.info, self.dtype, head_dim, self.device)

    def choose(self, module: str, head_dim: int) -> AttentionBackend:
        """The first usable candidate for this module, skipping kernels that failed in it."""
        failed = frozenset(self.failed.get(module, ()))
        key = (module, head_dim, failed)
        backend = self._cache.get(key)
        if backend is not None:
            return backend
        order, _ = self.candidates()
        backend = next((b for b in order if b not in failed and self.why_not(b, head_dim) is None), None)
        if backend is None:
            raise RuntimeError(f"no attention backend can run {module} (head_dim {head_dim}, "
                               f"{dtype_name(self.dtype)}, {self.info.type}); tried {[b.value for b in order]}")
        requested = self.policy.attention
        if requested != AUTO and backend != requested and requested not in failed:
            logger.warning("[HYPIR] %s cannot run %s (%s): using %s", requested.value, module,
                           self.why_not(requested, head_dim), backend.value)
        self._cache[key] = backend
        return backend

    # --- per-shape choice ---
    def _tunes(self, q: torch.Tensor) -> bool:
        """Whether this call's kernel is chosen by timing: auto + FlashAttention on CUDA, per_shape on; the
        built-in timer needs CUDA tensors, an injected one does not."""
        return self.per_shape and (q.device.type == "cuda" or self.timer is not None)

    def _choose_for_shape(self, module: str, shape: AttentionShape, q, k, v, scale) -> AttentionBackend | None:
        """The fastest measured kernel for this shape that has not failed in this module (None: use the order)."""
        timing = tuning.cached(shape)
        if timing is None:
            if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None  # nothing can be timed while capturing: the fixed order decides
            # Kept on disk by an earlier process on this GPU and software? Keyed by the candidates before the
            # probes (a tiny call of each kernel, 0.2 s at a first 1024 image): that process probed them.
            store, key = self._timing_store(q), None
            if store is not None:
                key = self._store_key(shape)
                timing = tuning.stored(shape, store, key)
            if timing is None:
                candidates = tuned_candidates(lambda b: self.why_not(b, shape.head_dim) is None)  # none opt-in
                timing = tuning.measure(shape, candidates, q, k, v, scale, self.timer,
                                        lambda backend, exc: self._record_failure(module, backend, exc), store, key)
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

    def _timing_store(self, q: torch.Tensor) -> TimingStore | None:
        if self.store is not None:
            return self.store
        return store_for(q.device) if self.timer is None else None  # an injected timer times stand-ins

    def _store_key(self, shape: AttentionShape) -> list[AttentionBackend]:
        """The candidates a stored timing of this shape is kept under: those usable here, before their probes."""
        return tuned_candidates(lambda b: why_not(b, self.info, self.dtype, shape.head_dim) is None)

    def _forget_stored(self, shape: AttentionShape, q: torch.Tensor, backend: AttentionBackend) -> None:
        """A kernel that an earlier process's timing chose failed here: its stored timing goes, so that the next
        process times the shape again (and probes the kernels) instead of failing over on every start."""
        timing = tuning.cached(shape)
        store = self._timing_store(q)
        if timing is not None and timing.stored and timing.winner == backend and store is not None:
            store.drop(shape, self._store_key(shape))

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
                if shape is not None:
                    self._forget_stored(shape, q, backend)
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
