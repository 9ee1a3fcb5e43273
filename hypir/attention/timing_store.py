"""The per-shape attention timings kept on disk, so that a new process (a ComfyUI restart, the next `hypir
restore`) reuses what an earlier one measured on the same GPU and software instead of timing every shape again.

One JSON file per environment (the GPU's name and compute capability, PyTorch, CUDA and cuDNN versions), in
$HYPIR_CACHE_DIR (empty: nothing is kept on disk), else $XDG_CACHE_HOME/hypir, else ~/.cache/hypir. An entry is
keyed by the shape and by the candidates that were timed with their versions, so installing, upgrading or removing
a FlashAttention package times that shape again. Only times and the winner are kept: a kernel that raised is
excluded again by the router when it raises again. The file is plain JSON, read without running anything; a file
that cannot be read or parsed is ignored (and replaced at the next write) with a warning, and a cache folder that
cannot be written is left alone with one warning: the timings then last the process, as without a store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..attention_names import AttentionBackend
from ..loading import gpu_index
from .backends import REGISTRY

if TYPE_CHECKING:  # pragma: no cover
    from .tuning import AttentionShape

logger = logging.getLogger("hypir")

CACHE_DIR_ENV = "HYPIR_CACHE_DIR"
FORMAT = 1
MAX_STORED_SHAPES = 512  # the oldest entries go first beyond this


def cache_dir() -> Path | None:
    """Where the timings are kept: $HYPIR_CACHE_DIR (empty: nowhere), else the user's cache folder."""
    value = os.environ.get(CACHE_DIR_ENV)
    if value is not None:
        return Path(value).expanduser() if value.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hypir"


def environment(index: int) -> dict[str, str]:
    """What a timing on GPU `index` depends on beside the shape and the kernels' own versions: the GPU and the
    CUDA stack."""
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "capability": f"sm{major}{minor}", "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())}


def shape_key(shape: "AttentionShape", candidates: list[AttentionBackend]) -> str:
    """The entry's key: the shape without its device index, and each candidate with its version."""
    kernels = ",".join(f"{b.value}={REGISTRY[b].version()}" for b in candidates)
    return (f"{shape.batch}x{shape.q_tokens}x{shape.kv_tokens}x{shape.heads}x{shape.head_dim} "
            f"{str(shape.dtype).removeprefix('torch.')} [{kernels}]")


class TimingStore:
    """The stored timings of one environment: `get` and `put` by (shape, candidates); safe across threads, and
    across processes as far as a lost update goes (each write replaces the file whole, merged with what another
    process wrote meanwhile)."""

    def __init__(self, folder: Path, env: dict[str, str]):
        digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"attention-timings-{digest}.json"
        self.environment = dict(env)
        self._entries: dict[str, dict] | None = None
        self._lock = threading.Lock()
        self._writable = True

    def get(self, shape: "AttentionShape", candidates: list[AttentionBackend]
            ) -> tuple[dict[AttentionBackend, float], AttentionBackend] | None:
        """(ms per candidate, winner) stored for this shape and these candidates, or None."""
        with self._lock:
            entry = self._load().get(shape_key(shape, candidates))
        if entry is None:
            return None
        try:
            times = {AttentionBackend(name): float(ms) for name, ms in entry["times_ms"].items()}
            winner = AttentionBackend(entry["winner"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return None  # an entry this version cannot read: timed again and overwritten
        if winner not in times or not set(times) <= set(candidates):
            return None
        return times, winner

    def put(self, shape: "AttentionShape", candidates: list[AttentionBackend],
            times: dict[AttentionBackend, float], winner: AttentionBackend) -> None:
        key = shape_key(shape, candidates)
        entry = {"times_ms": {b.value: round(ms, 5) for b, ms in times.items()}, "winner": winner.value}
        with self._lock:
            entries = self._load()
            entries.pop(key, None)
            entries[key] = entry
            if not self._writable:
                return
            merged = {**self._read(quiet=True), **entries}  # what another process stored meanwhile, kept
            while len(merged) > MAX_STORED_SHAPES:
                merged.pop(next(iter(merged)))
            self._save(merged)

    def _save(self, entries: dict[str, dict]) -> None:
        """Write the file, or warn once and keep the timings in memory only."""
        try:
            self._write(entries)
        except OSError as exc:
            self._writable = False
            logger.warning("[HYPIR] cannot keep attention timings in %s (%s); they last this process only. "
                           "Set %s to a writable folder, or to an empty value to keep none",
                           self.path.parent, exc, CACHE_DIR_ENV)

    def drop(self, shape: "AttentionShape", candidates: list[AttentionBackend]) -> None:
        """Forget the timing kept for this shape and these candidates (its winner failed)."""
        key = shape_key(shape, candidates)
        with self._lock:
            self._load().pop(key, None)
            if not self._writable:
                return
            kept = self._read(quiet=True)
            if kept.pop(key, None) is not None:
                self._save(kept)

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = self._read(quiet=False)
        return self._entries

    def _read(self, quiet: bool) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            if not quiet:
                logger.warning("[HYPIR] ignoring the stored attention timings in %s (%s): the shapes are timed "
                               "again", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("shapes"), dict):
            if not quiet:
                logger.warning("[HYPIR] ignoring %s: not attention timings of this version; the shapes are timed "
                               "again", self.path)
            return {}
        return {key: entry for key, entry in data["shapes"].items() if isinstance(entry, dict)}

    def _write(self, entries: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "environment": self.environment, "shapes": entries}
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


_STORES: dict[tuple[str, str], TimingStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(device: str | torch.device) -> TimingStore | None:
    """The store of this CUDA device's environment in the current cache folder (None: nothing kept on disk)."""
    folder = cache_dir()
    device = torch.device(device)
    if folder is None or device.type != "cuda":
        return None
    index = gpu_index(device)
    with _STORES_LOCK:
        store = _STORES.get((str(folder), str(index)))
        if store is None:
            store = _STORES[(str(folder), str(index))] = TimingStore(folder, environment(index))
    return store
