"""Per-shape kernel choice: on the first call of an attention shape every usable candidate is timed on that
call's q/k/v, and the fastest is kept in one small process-wide table, so later calls and later pipelines
reuse it. Tracing (torch.compile) and CUDA graph capture never time: the fixed order decides there."""

from __future__ import annotations

import logging
import statistics
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..attention_names import AttentionBackend
from ..errors import one_line
from .backends import REGISTRY, dtype_name

logger = logging.getLogger("hypir")

TIMED_ITERS = 5  # timed calls per candidate, after one warm-up call; the median counts
MAX_TUNED_SHAPES = 256  # oldest entries go first beyond this


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
                f"{dtype_name(self.dtype)}, {self.device}")


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


def measure(shape: AttentionShape, candidates: list[AttentionBackend], q, k, v, scale: float,
            timer: Callable[..., float] | None, on_error: Callable[[AttentionBackend, BaseException], None]
            ) -> ShapeTiming:
    """Time every candidate once on this call's q/k/v (one warm-up call, then the timer) and keep the result for
    the shape; a kernel that raises is reported through `on_error` and excluded."""
    with _TUNE_LOCK:
        timing = _TUNED.get(shape)
        if timing is not None:  # another thread measured it meanwhile
            return timing
        timer = timer or time_kernel
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
                    on_error(backend, exc)
        # min() keeps the first of equal times: ties go to the preference order
        timing = ShapeTiming(times, errors, min(times, key=times.__getitem__) if times else None)
        _TUNED[shape] = timing
        while len(_TUNED) > MAX_TUNED_SHAPES:
            _TUNED.popitem(last=False)
    logger.info("[HYPIR] attention %s: %s -> %s", shape.describe(),
                ", ".join(f"{b.value} {ms:.3f} ms" for b, ms in times.items()) or "no kernel ran",
                timing.winner.value if timing.winner else "fixed order")
    return timing


def cached(shape: AttentionShape) -> ShapeTiming | None:
    return _TUNED.get(shape)
