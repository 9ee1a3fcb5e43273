"""Per-shape kernel choice: on the first call of an attention shape every usable candidate is timed on that
call's q/k/v, and the fastest is kept in one small process-wide table, so later calls and later pipelines
reuse it, and on disk (timing_store), so later processes on the same GPU and software reuse it too. A CUDA graph
capture never times: the fixed order decides there."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..attention_names import AttentionBackend
from ..errors import one_line
from .backends import REGISTRY, dtype_name
from .timing_store import TimingStore

logger = logging.getLogger("hypir")

TIMED_ITERS = 8  # calls queued back to back per timed group, after one warm-up call
TIMED_ROUNDS = 3  # groups per candidate; the median counts
LOSING_FACTOR = 2.0  # a candidate whose first timed call is this much slower than the best so far stops there,
STOP_FLOOR_MS = 0.05  # if that call took this long: below it one call's time is too close to the events' own
SLEEP_CYCLES = 10_000_000  # GPU clock cycles the stream is held while the calls are queued (about 5 ms)
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
    """One shape's measurement: median ms per candidate that ran, the error of each that raised, the winner, and
    the seconds the measurement took (warm-ups and FA4's compile included)."""

    times: dict[AttentionBackend, float]
    errors: dict[AttentionBackend, str]
    winner: AttentionBackend | None
    seconds: float = 0.0
    stored: bool = False  # read from the timings an earlier process kept on disk (timing_store), not timed here


_TUNED: "OrderedDict[AttentionShape, ShapeTiming]" = OrderedDict()
_TUNE_LOCK = threading.Lock()


def autotune_table() -> dict[AttentionShape, ShapeTiming]:
    """The per-shape timings measured in this process (oldest first): shape -> times (ms), errors, winner."""
    with _TUNE_LOCK:
        return dict(_TUNED)


def clear_autotune_cache() -> None:
    with _TUNE_LOCK:
        _TUNED.clear()


def time_kernels(fns: dict[AttentionBackend, Callable], q, k, v, scale: float, iters: int = TIMED_ITERS
                 ) -> dict[AttentionBackend, float]:
    """GPU milliseconds per call of each ``fn(q, k, v, scale)``: what a pass replayed from a CUDA graph pays. A
    sleep kernel first holds q's stream while the CPU queues a round's calls back to back, every candidate's
    between its own pair of events, so the time between two events is the kernels' own and not the Python
    wrapper's (flash-attn's wrapper costs more CPU time than SDPA's: timed call by call it lost at small shapes
    although its kernel is as fast). All candidates share each round's sleep: one sleep per round instead of
    one per candidate and round (a sleep is about 5 ms, and a 1024 output times about ten shapes of three or
    four candidates). A round whose sleep ended before its calls were all queued (a slow or busy CPU) is run
    once more behind a four times longer sleep. The caller made the warm-up calls."""
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream()

        def group(calls: dict[AttentionBackend, int]) -> dict[AttentionBackend, float]:
            for cycles in (SLEEP_CYCLES, 4 * SLEEP_CYCLES):
                torch.cuda._sleep(cycles)  # a few ms: room for the CPU to queue every call behind it
                slept = torch.cuda.Event()
                slept.record(stream)
                events = {}
                for backend, count in calls.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(stream)
                    for _ in range(count):
                        fns[backend](q, k, v, scale)
                    end.record(stream)
                    events[backend] = (start, end, count)
                covered = not slept.query()  # the sleep still held the stream once every call was queued
                end.synchronize()
                if covered:  # else the GPU may have waited for the CPU between calls: once more, sleeping longer
                    break
            return {backend: start.elapsed_time(end) / count for backend, (start, end, count) in events.items()}

        return rounds(group, list(fns), iters)


def rounds(group: Callable[[dict[AttentionBackend, int]], dict[AttentionBackend, float]],
           backends: list[AttentionBackend], iters: int) -> dict[AttentionBackend, float]:
    """One call of each candidate timed first; a candidate already LOSING_FACTOR times slower than the best of
    them cannot win and is not timed further (at a 2048 output the slow kernels' calls take tens of ms each, and
    the first image of a new size waits for them). The others: the median of TIMED_ROUNDS rounds, each
    candidate with about a millisecond of GPU work (up to `iters` calls of a short kernel, one of a long one),
    in an order turned by one each round. ``group({backend: calls})`` returns ms per call of each."""
    single = group({backend: 1 for backend in backends})
    best = min(single.values())
    times = {b: single[b] for b in backends if single[b] > max(LOSING_FACTOR * best, STOP_FLOOR_MS)}
    timed = [b for b in backends if b not in times]
    calls = {b: max(1, min(iters, int(1.0 / max(single[b], 1e-3)))) for b in timed}
    samples: dict[AttentionBackend, list[float]] = {b: [] for b in timed}
    for turn in range(TIMED_ROUNDS):
        order = timed[turn % len(timed):] + timed[:turn % len(timed)]
        for backend, ms in group({b: calls[b] for b in order}).items():
            samples[backend].append(ms)
    times.update({b: statistics.median(samples[b]) for b in timed})
    return {b: times[b] for b in backends}


def stored(shape: AttentionShape, store: TimingStore, key: list[AttentionBackend]) -> ShapeTiming | None:
    """The timing an earlier process kept in `store` for this shape and these candidates (`key`), now kept in
    this process too; None where there is none."""
    with _TUNE_LOCK:
        timing = _TUNED.get(shape)
        if timing is not None:  # another thread measured or read it meanwhile
            return timing
        kept = store.get(shape, key)
        if kept is None:
            return None
        times, winner = kept
        timing = _TUNED[shape] = ShapeTiming(times, {}, winner, 0.0, stored=True)
        _bound()
    logger.info("[HYPIR] attention %s: %s (timed by an earlier process on this GPU, kept in %s)",
                shape.describe(), winner.value, store.path)
    return timing


def measure(shape: AttentionShape, candidates: list[AttentionBackend], q, k, v, scale: float,
            timer: Callable[..., float] | None, on_error: Callable[[AttentionBackend, BaseException], None],
            store: TimingStore | None = None, key: list[AttentionBackend] | None = None) -> ShapeTiming:
    """Time every candidate on this call's q/k/v (one warm-up call each, then all together with
    :func:`time_kernels`, or one by one with an injected `timer`) and keep the result for the shape; a kernel
    that raises is reported through `on_error` and excluded. Should the joint timing raise after every warm-up
    passed, each candidate is timed alone, so that only the one that fails is excluded. With a `store`, the
    result is kept on disk too, under `key` (the candidates before the probes that exclude kernels failing on this
    GPU; default `candidates`), where :func:`stored` finds it."""
    with _TUNE_LOCK:
        timing = _TUNED.get(shape)
        if timing is not None:  # another thread measured it meanwhile
            return timing
        started = time.perf_counter()
        times: dict[AttentionBackend, float] = {}
        errors: dict[AttentionBackend, str] = {}
        out_of_memory: list[AttentionBackend] = []

        def attempt(backend: AttentionBackend, run: Callable[[], object]) -> bool:
            try:
                run()
                return True
            except torch.cuda.OutOfMemoryError:  # needs more memory than is free now: not a defect
                out_of_memory.append(backend)
                logger.warning("[HYPIR] %s ran out of GPU memory while timed on %s; not used for it",
                               backend.value, shape.describe())
            except Exception as exc:  # noqa: BLE001 - a kernel that raises is excluded, loudly, once
                errors[backend] = one_line(exc)
                on_error(backend, exc)
            return False

        def time_alone(backend: AttentionBackend) -> None:
            fn = REGISTRY[backend].fn
            if timer is not None:
                times[backend] = float(timer(backend, fn, q, k, v, scale))
            else:
                times[backend] = float(time_kernels({backend: fn}, q, k, v, scale)[backend])

        with torch.no_grad():
            # warm-ups (FA4 compiles here)
            ready = [b for b in candidates if attempt(b, lambda fn=REGISTRY[b].fn: fn(q, k, v, scale))]
            if timer is None and ready:
                try:
                    times.update(time_kernels({b: REGISTRY[b].fn for b in ready}, q, k, v, scale))
                except Exception:  # noqa: BLE001 - timed alone below: the failing kernel is named and excluded
                    times.clear()
            if not times:
                for backend in ready:
                    attempt(backend, lambda backend=backend: time_alone(backend))
        # min() keeps the first of equal times: ties go to the preference order
        timing = ShapeTiming(times, errors, min(times, key=times.__getitem__) if times else None,
                             time.perf_counter() - started)
        _TUNED[shape] = timing
        _bound()
        if store is None or timing.winner is None or out_of_memory:
            store = None  # a kernel left out for want of memory now may win with more: not kept on disk
        else:
            store.put(shape, key or candidates, times, timing.winner)
    logger.info("[HYPIR] attention %s: %s -> %s (timed in %.2f s; kept for this shape in this process%s)",
                shape.describe(), ", ".join(f"{b.value} {ms:.3f} ms" for b, ms in times.items()) or "no kernel ran",
                timing.winner.value if timing.winner else "fixed order", timing.seconds,
                f" and in {store.path}" if store is not None else "")
    return timing


def _bound() -> None:
    while len(_TUNED) > MAX_TUNED_SHAPES:
        _TUNED.popitem(last=False)


def cached(shape: AttentionShape) -> ShapeTiming | None:
    return _TUNED.get(shape)
