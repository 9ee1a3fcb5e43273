"""A folder across every GPU of a host: one worker process per device, each loading the models once, fed a
few files at a time (largest first) by the parent, which keeps track of what each worker holds. Each worker
reads ahead of its GPU and writes behind it (streaming.restore_stream). A worker that dies is replaced: the
files it held go to the others, and a file that fails three times is reported by name. Outputs are written by
the workers, atomically (images.write_image), so a killed worker leaves nothing partial.

On a machine without CUDA the same runs N CPU worker processes (each with its share of the cores).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import first_line
from .images import partial_name

logger = logging.getLogger("hypir")

MAX_ATTEMPTS = 3
RAY_BATCH = 8  # files an actor restores per call at most, reading ahead and writing behind its GPU within it
FEED = 3  # files a worker holds that its GPU has not finished: one on the GPU, two read ahead


def parse_devices(spec: str) -> list[str]:
    """'all', a count N, or a comma-separated list (cuda:0,cuda:1 or cpu,cpu) -> one device name per worker."""
    import torch

    spec = spec.strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "all":
        return [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise ValueError(f"--devices {spec}: give at least one worker")
        if gpus and count > gpus:
            raise ValueError(f"--devices {spec}: this machine has {gpus} CUDA GPU(s)")
        return [f"cuda:{i}" for i in range(count)] if gpus else ["cpu"] * count
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for device in devices:
        if device.startswith("cuda"):
            index = int(device.split(":")[1]) if ":" in device else 0
            if index >= gpus:
                raise ValueError(f"--devices: {device} is not there (this machine has {gpus} CUDA GPU(s))")
        elif device != "cpu":
            raise ValueError(f"--devices: {device!r} is not cpu, cuda or cuda:N")
    return devices


@dataclass
class Outcome:
    index: int
    ok: bool
    message: str  # the status line, or why it failed


@dataclass(frozen=True)
class WorkerSetup:
    base: str
    weights: str
    dtype: str
    lora_scale: float
    options: object  # RestoreOptions
    quality: int
    threads: int  # CPU threads of a CPU worker (0: leave torch's default)
    writers: int = 0  # encoder threads (0: streaming.default_writers)


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: writes under way finish (streaming.restore_stream), no new ones


def remove_partial_files(pid: int, targets) -> None:
    """The temporary files a killed worker (SIGKILL, the out-of-memory killer) left beside the outputs it held
    (images.write_image writes under images.partial_name and renames it when complete)."""
    for target in targets:
        target = Path(target)
        (target.parent / partial_name(target.name, pid)).unlink(missing_ok=True)


def _load(setup: WorkerSetup, device: str):
    """A worker's (or actor's) pipeline, its own process quiet: the parent reports and draws the one bar."""
    import diffusers
    import torch
    import transformers

    from .pipeline import HYPIRPipeline

    from .streaming import spare_the_cpu

    logging.getLogger("hypir").setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if device == "cpu" and setup.threads:
        torch.set_num_threads(setup.threads)
    pipe = HYPIRPipeline.from_files(setup.base, setup.weights, device, setup.dtype, lora_scale=setup.lora_scale)
    spare_the_cpu(pipe.models.device)
    return pipe


def _worker(device: str, setup: WorkerSetup, tasks, results) -> None:
    """One worker: load once, then restore what the parent sends until it sends None, reading ahead and
    writing behind the GPU (streaming.restore_stream). It says when the GPU is done with a file ("restored":
    the parent sends the next) and when its output is written ("done") or the file failed ("fail")."""
    signal.signal(signal.SIGTERM, _stop)
    from .streaming import restore_stream

    pid = os.getpid()
    try:
        pipe = _load(setup, device)
    except Exception as exc:  # noqa: BLE001 - the parent stops the run with it: every worker would fail alike
        results.put(("broken", pid, None, first_line(exc)))
        return
    results.put(("ready", pid, None, ""))
    stream = restore_stream(pipe, iter(tasks.get, None), setup.options, setup.quality, writers=setup.writers,
                            on_restored=lambda index: results.put(("restored", pid, index, "")))
    for outcome in stream:
        if outcome.ok:
            results.put(("done", pid, outcome.key, outcome.status))
        else:
            results.put(("fail", pid, outcome.key, first_line(outcome.error)))


@dataclass
class _Worker:
    process: object
    inbox: object
    device: str
    ready: bool = False
    sent: list[int] = field(default_factory=list)  # indices it holds, in the order it works on them
    restored: set[int] = field(default_factory=set)  # of those, the ones the GPU is done with

    def on_gpu_or_waiting(self) -> int:
        return len(self.sent) - len(self.restored)


def run_pool(tasks: list[tuple[Path, Path]], devices: list[str], setup: WorkerSetup,
             on_outcome: Callable[[Outcome, tuple[Path, Path]], None] | None = None,
             sizes: list[int] | None = None) -> list[Outcome]:
    """Restore every (source, target) with one worker per device; returns one Outcome per task. Each worker
    holds FEED files not yet restored (one on the GPU, the next ones being read), so its GPU never waits for
    the parent or the disk."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked CUDA state
    results = context.Queue()
    order = sorted(range(len(tasks)), key=lambda i: -(sizes[i] if sizes else 0))  # largest first
    pending = collections.deque(order)
    attempts: collections.Counter[int] = collections.Counter()
    outcomes: dict[int, Outcome] = {}
    workers: dict[int, _Worker] = {}  # by pid

    def start(device: str) -> None:
        inbox = context.Queue()
        process = context.Process(target=_worker, args=(device, setup, inbox, results), daemon=True)
        process.start()
        workers[process.pid] = _Worker(process, inbox, device)

    def feed(worker: _Worker) -> None:
        while worker.ready and pending and worker.on_gpu_or_waiting() < FEED:
            index = pending.popleft()
            worker.sent.append(index)
            worker.inbox.put((index, str(tasks[index][0]), str(tasks[index][1])))

    def settle(index: int, ok: bool, message: str, retry_last: bool = False) -> None:
        attempts[index] += 1
        if ok or attempts[index] >= MAX_ATTEMPTS:
            outcomes[index] = Outcome(index, ok, message if ok else f"{message} ({attempts[index]} attempts)")
            if on_outcome is not None:
                on_outcome(outcomes[index], tasks[index])
        elif retry_last:
            pending.append(index)
        else:
            pending.appendleft(index)

    early_deaths: collections.Counter[str] = collections.Counter()  # per device, before the models loaded

    def replace_dead() -> None:
        for pid, worker in list(workers.items()):
            if worker.process.is_alive():
                continue
            del workers[pid]
            exitcode = worker.process.exitcode
            remove_partial_files(pid, [tasks[i][1] for i in worker.sent])
            if not worker.ready:
                early_deaths[worker.device] += 1
                if early_deaths[worker.device] >= MAX_ATTEMPTS:
                    raise RuntimeError(f"the worker on {worker.device} stopped {early_deaths[worker.device]} times "
                                       f"before its models loaded (exit code {exitcode}); its messages are above")
            # Charged an attempt and retried last: the file on its GPU and the ones being written (one of them
            # may have killed it). The files it had not started go back to the front of the queue as they were,
            # so a file that kills a worker while being read is the one on the GPU next time.
            started = [i for i in worker.sent if i in worker.restored]
            unrestored = [i for i in worker.sent if i not in worker.restored]
            started += unrestored[:1]
            logger.warning("[HYPIR] worker %d on %s stopped (exit code %s)%s; starting another", pid, worker.device,
                           exitcode, f" while restoring {tasks[unrestored[0]][0]}" if unrestored else "")
            pending.extendleft(reversed(unrestored[1:]))
            for index in started:
                settle(index, False, f"the worker restoring it stopped (exit code {exitcode})", retry_last=True)
            if len(outcomes) < len(tasks):
                start(worker.device)

    def handle(kind: str, pid: int, index, message: str) -> None:
        worker = workers.get(pid)
        if worker is None:  # a message from a worker already replaced
            return
        if kind == "broken":
            raise RuntimeError(f"the worker on {worker.device} could not load the models: {message}")
        if kind == "ready":
            worker.ready = True
        elif kind == "restored":
            worker.restored.add(index)
        elif kind in ("done", "fail"):
            worker.sent.remove(index)
            worker.restored.discard(index)
            settle(index, kind == "done", message)

    for device in devices:
        start(device)
    finished = False
    try:
        while len(outcomes) < len(tasks):
            try:
                handle(*results.get(timeout=0.5))
                while True:  # all that is there, before looking for dead workers: a worker's last results count
                    handle(*results.get_nowait())
            except queue.Empty:
                pass
            replace_dead()
            for worker in workers.values():  # new work, or work given back by a stopped worker
                feed(worker)
        finished = True
    finally:
        for worker in workers.values():
            if not worker.process.is_alive():
                continue
            if finished:
                worker.inbox.put(None)  # done: let it exit
            else:
                worker.process.terminate()  # interrupted: SIGTERM unwinds it, finishing the writes under way
        deadline = time.monotonic() + 30
        for pid, worker in workers.items():
            worker.process.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=10)
                remove_partial_files(pid, [tasks[i][1] for i in worker.sent])
    return [outcomes[i] for i in range(len(tasks))]


# ----------------------------------------------------------------------------------------------
# Many hosts: the same restore on Ray (an optional extra: pip install -e '.[ray]'), imported only when asked for.


class RayRestorer:
    """A Ray Data actor: loads the models once (on its GPU, else the CPU), then restores each batch's files and
    writes their outputs; a file's own failure is returned with its message, never raised (a raise would retry it)."""

    def __init__(self, setup: WorkerSetup):
        import torch

        self.setup = setup
        self.pipe = _load(setup, "cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict) -> dict:
        from .streaming import restore_stream

        out = {"index": [], "ok": [], "message": []}
        tasks = zip((int(i) for i in batch["index"]), map(str, batch["source"]), map(str, batch["target"]))
        for outcome in restore_stream(self.pipe, tasks, self.setup.options, self.setup.quality,
                                      writers=self.setup.writers):
            out["index"].append(outcome.key)
            out["ok"].append(outcome.ok)
            out["message"].append(outcome.status if outcome.ok else first_line(outcome.error))
        return out


def run_ray(tasks: list[tuple[str, str]], setup: WorkerSetup, address: str = "local", workers: int | None = None,
            on_outcome: Callable[[Outcome, tuple], None] | None = None, quiet: bool = False) -> list[Outcome]:
    """Restore every (source, target), paths or URIs, on Ray Data: one RayRestorer actor per GPU of the cluster
    (or `workers` CPU actors without GPUs). `address`: "local" starts a Ray instance on this machine; anything
    else joins that cluster (ray.init(address=...)). A dead actor is restarted and its files retried by Ray
    (up to MAX_ATTEMPTS attempts each). `quiet` (the command line) keeps Ray Data's progress log out of the
    console."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'comfyui-hypir[ray]' (or pip install 'ray[data]')") from None

    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or gpus or 1
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        items = [{"index": i, "source": str(s), "target": str(t)} for i, (s, t) in enumerate(tasks)]
        batch = max(1, min(RAY_BATCH, len(items) // count))  # every actor gets work, even for a few files
        results = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch))).map_batches(
            RayRestorer, fn_constructor_args=(setup,), batch_size=batch, concurrency=count,
            max_restarts=-1, max_task_retries=MAX_ATTEMPTS - 1, **per_actor)
        outcomes: dict[int, Outcome] = {}
        for row in results.iter_rows():
            outcome = Outcome(int(row["index"]), bool(row["ok"]), str(row["message"]))
            outcomes[outcome.index] = outcome
            if on_outcome is not None:
                on_outcome(outcome, tasks[outcome.index])
        missing = [i for i in range(len(tasks)) if i not in outcomes]
        for index in missing:
            outcomes[index] = Outcome(index, False, "Ray returned no result for it")
        return [outcomes[i] for i in range(len(tasks))]
    finally:
        if started:
            ray.shutdown()
