"""CUDA graphs for repeated calls of the same shape.

At a 1024x1024 output the UNet's ~1,500 kernels are short: launching them from Python takes longer than
running them, and the GPU waits. A CUDA graph replays the whole call with one launch.

A call is captured the second time its signature is seen (the first runs eagerly: attention kernels are
chosen and measured, Triton compiles, probes run), then replayed. The signature is every input's shape, dtype
and strides and the caller's options (attention policy, fused kernels). The address of every weight is given
with each call: a model moved or reloaded (ComfyUI offloading it, for example) drops the old graphs and gets
new ones, never a stale one.
Each graph keeps its own activation memory (a private pool, given back when the graph is dropped), so only
the last `max_graphs` are kept.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from .errors import one_line

logger = logging.getLogger("hypir")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor
    state: object  # what the capturing call recorded (the attention kernels it ran), replayed with the graph


def tensor_version(t: torch.Tensor) -> int:
    """The in-place write counter of `t`; 0 for a tensor that has none. ComfyUI loads and runs its nodes under
    torch.inference_mode(), so the weights are inference tensors, and reading `_version` raises. When ComfyUI
    then moves them outside inference mode (POST /free, Unload Models: its prompt worker unloads every model),
    each parameter keeps its Python object with new data: `is_inference()` turns False while `_version` still
    raises. That raise, in the upsampler's check after a move, ended ComfyUI's prompt worker on the H200."""
    if t.is_inference():
        return 0
    try:
        return t._version
    except RuntimeError:
        return 0


# How many modules, parameters and buffers were set anywhere in the process since the first signature was taken
# (nn.Module's global registration hooks, which only count here: setattr, add_module, register_parameter,
# register_buffer): a model's tensor slots are gathered again only after one was set.
_REGISTRATIONS = [0]
_SLOTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list[dict]]]" = weakref.WeakKeyDictionary()
_SLOTS_LOCK = threading.Lock()
_COUNTING: list = []  # the hooks' handles, once installed


def _registered(*args) -> None:
    _REGISTRATIONS[0] += 1


def _count_registrations() -> None:
    """Install the counting hooks (once; from the first signature on, so that a process that never takes one,
    on a CPU or a Mac, never has them)."""
    if not _COUNTING:
        module = torch.nn.modules.module
        _COUNTING.extend(register(_registered) for register in (
            module.register_module_module_registration_hook, module.register_module_parameter_registration_hook,
            module.register_module_buffer_registration_hook))


def _tensor_slots(module: torch.nn.Module) -> list[dict]:
    """The parameter and buffer dicts of every module under `module` that has any, kept until a module, parameter
    or buffer is set anywhere in the process. The dicts themselves are read at each use: a tensor put straight
    into an existing slot (accelerate's offload hooks do) is seen."""
    with _SLOTS_LOCK:
        _count_registrations()
        cached = _SLOTS.get(module)
        if cached is None or cached[0] != _REGISTRATIONS[0]:
            slots = [d for m in module.modules() for d in (m._parameters, m._buffers) if d]
            cached = _SLOTS[module] = (_REGISTRATIONS[0], slots)
        return cached[1]


def weights_signature(module: torch.nn.Module) -> tuple:
    """Where the module's weights live, and their in-place versions: changes when any of them is moved, replaced
    or written in place (a graph would replay kernels made from the old values, such as an upsampler's 4x4
    weights made from its 3x3 ones). Every parameter and buffer slot under the module, as a flat tuple of
    addresses then versions (a tensor held in two slots counts twice). It is taken before every graphed UNet and
    VAE call, and the VAE's lies between a pass's first kernels and its encoder's, with the GPU idle: so the slots
    are gathered once (_tensor_slots) and the two lists are made by comprehensions, with the per-tensor
    inference check only where reading a version raised. On the H200 machine's CPU a walk of the modules each
    time took 1.64 ms for the SD2.1 UNet and 0.48 ms for the VAE (benchmarks/levers.py --parts cpu), a loop over
    the gathered slots 432 and 150 us, the comprehensions 228 and 78 us
    (benchmarks/results/2026-12-01-h200-levers-and-cards/call6-levers/signature.py)."""
    tensors = [tensor for slots in _tensor_slots(module) for tensor in slots.values() if tensor is not None]
    addresses = [tensor.data_ptr() for tensor in tensors]
    try:
        versions = [tensor._version for tensor in tensors]
    except RuntimeError:  # an inference tensor, or one that was (see tensor_version)
        versions = [tensor_version(tensor) for tensor in tensors]
    return tuple(addresses + versions)


class GraphedCalls:
    """Captures and replays a function per input signature. Thread-safe; a capture that fails is not retried
    for that signature (the call runs eagerly, with one warning)."""

    def __init__(self, max_graphs: int = 2):
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._seen: set[Hashable] = set()
        self._failed: set[Hashable] = set()
        self._lock = threading.Lock()
        self.replays = 0
        self.captures = 0
        self.weights: tuple | None = None

    def clear(self) -> None:
        """Drop every graph and the memory it keeps."""
        with self._lock:
            self._reset(None)

    def _reset(self, weights: tuple | None) -> None:
        self._graphs.clear()
        self._seen.clear()
        self._failed.clear()
        self.weights = weights

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                 weights: tuple = (), snapshot: Callable[[], object] = lambda: None,
                 restore: Callable[[object], None] = lambda state: None) -> torch.Tensor:
        """fn(*inputs), eagerly or from a graph. `weights` is `weights_signature` of what fn reads: when it
        changes (the model was moved or reloaded), every graph made before is dropped."""
        key = (key, tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs))
        with self._lock:
            if weights != self.weights:
                self._reset(weights)
            entry = self._graphs.get(key)
            if entry is None:
                if key in self._failed or key not in self._seen:
                    if len(self._seen) > 64:
                        self._seen.clear()
                    self._seen.add(key)
                    return fn(*inputs)
                entry = self._capture(key, fn, inputs, snapshot)
                if entry is None:
                    return fn(*inputs)
            self._graphs.move_to_end(key)
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
            entry.graph.replay()
            self.replays += 1
            restore(entry.state)
            return entry.output.clone()

    def _capture(self, key, fn, inputs, snapshot) -> _Graph | None:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        static = [t.clone() for t in inputs]
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device=static[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # a warm-up on the capture's stream, as PyTorch asks
                fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            # On that same stream of the inputs' GPU: torch.cuda.graph's default capture stream is made once per
            # process, on the device current at the first capture, and a later capture for another GPU fails on it.
            with torch.cuda.graph(graph, stream=side):
                output = fn(*static)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model that cannot be captured runs eagerly, loudly
            self._failed.add(key)
            logger.warning("[HYPIR] CUDA graph capture failed (%s); this shape runs without CUDA graphs",
                           one_line(exc))
            return None
        self.captures += 1
        entry = _Graph(graph, static, output, snapshot())
        self._graphs[key] = entry
        return entry


__all__ = ["GraphedCalls", "weights_signature"]
