"""A folder across every GPU of a host: one worker process per device, each loading the models once, fed one
file at a time (largest first) by the parent, which keeps track of what each worker holds. A worker that dies
is replaced and its file is given to another; a file that fails three times is reported by name. Outputs are
written by the workers, atomically (images.write_image), so a killed worker leaves nothing partial.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import first_line

logger = logging.getLogger("hypir")

MAX_ATTEMPTS = 3


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


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: a file being written is removed (images.write_image)


def _load(setup: WorkerSetup, device: str):
    """A worker's (or actor's) pipeline, its own process quiet: the parent reports and draws the one bar."""
    import diffusers
    import torch
    import transformers

    from .pipeline import HYPIRPipeline

    logging.getLogger("hypir").setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if device == "cpu" and setup.threads:
        torch.set_num_threads(setup.threads)
    return HYPIRPipeline.from_files(setup.base, setup.weights, device, setup.dtype, lora_scale=setup.lora_scale)


def _worker(device: str, setup: WorkerSetup, tasks, results) -> None:
    """One worker: load once, then restore what the parent sends until it sends None."""
    signal.signal(signal.SIGTERM, _stop)
    from .images import restore_file

    pipe = _load(setup, device)
    results.put(("ready", os.getpid(), None, ""))
    while True:
        task = tasks.get()
        if task is None:
            return
        index, source, target = task
        try:
            result, _, _ = restore_file(pipe, source, target, setup.options, setup.quality)
            results.put(("done", os.getpid(), index, result.status_line()))
        except Exception as exc:  # noqa: BLE001 - reported by the parent with the file's name
            results.put(("fail", os.getpid(), index, first_line(exc)))


def run_pool(tasks: list[tuple[Path, Path]], devices: list[str], setup: WorkerSetup,
             on_outcome: Callable[[Outcome, tuple[Path, Path]], None] | None = None,
             sizes: list[int] | None = None) -> list[Outcome]:
    """Restore every (source, target) with one worker per device; returns one Outcome per task."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked CUDA state
    results = context.Queue()
    order = sorted(range(len(tasks)), key=lambda i: -(sizes[i] if sizes else 0))  # largest first
    pending = collections.deque(order)
    attempts: collections.Counter[int] = collections.Counter()
    outcomes: dict[int, Outcome] = {}
    workers: dict[int, tuple] = {}  # pid -> (process, its task queue, device)
    holding: dict[int, int | None] = {}  # pid -> index it works on

    def start(device: str) -> None:
        inbox = context.Queue()
        process = context.Process(target=_worker, args=(device, setup, inbox, results), daemon=True)
        process.start()
        workers[process.pid] = (process, inbox, device)
        holding[process.pid] = None

    idle: set[int] = set()  # loaded workers holding nothing

    def give(pid: int) -> None:
        if pending:
            index = pending.popleft()
            holding[pid] = index
            idle.discard(pid)
            workers[pid][1].put((index, str(tasks[index][0]), str(tasks[index][1])))
        else:
            holding[pid] = None
            idle.add(pid)

    def settle(index: int, ok: bool, message: str) -> None:
        attempts[index] += 1
        if ok or attempts[index] >= MAX_ATTEMPTS:
            outcomes[index] = Outcome(index, ok, message if ok else f"{message} ({attempts[index]} attempts)")
            if on_outcome is not None:
                on_outcome(outcomes[index], tasks[index])
        else:
            pending.appendleft(index)

    def replace_dead() -> None:
        for pid, (process, _, device) in list(workers.items()):
            if process.is_alive():
                continue
            lost = holding.pop(pid, None)
            idle.discard(pid)
            del workers[pid]
            logger.warning("[HYPIR] worker %d on %s stopped (exit code %s)%s; starting another", pid, device,
                           process.exitcode, f" while restoring {tasks[lost][0]}" if lost is not None else "")
            if lost is not None:
                settle(lost, False, f"the worker restoring it stopped (exit code {process.exitcode})")
            if len(outcomes) < len(tasks):
                start(device)

    for device in devices:
        start(device)
    finished = False
    try:
        while len(outcomes) < len(tasks):
            try:
                kind, pid, index, message = results.get(timeout=0.5)
            except queue.Empty:
                kind = None
            if kind is not None and pid in workers:  # else: a message from a worker already replaced
                if kind in ("done", "fail"):
                    settle(index, kind == "done", message)
                give(pid)
            replace_dead()
            for pid in list(idle):  # work given back by a stopped worker goes to one that waits
                if pending:
                    give(pid)
        finished = True
    finally:
        for process, inbox, _ in workers.values():
            if not process.is_alive():
                continue
            if finished:
                inbox.put(None)  # done: let it exit
            else:
                process.terminate()  # interrupted: SIGTERM unwinds it, removing a file half written
        deadline = time.monotonic() + 30
        for process, _, _ in workers.values():
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
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
        from .images import restore_file

        out = {"index": [], "ok": [], "message": []}
        for index, source, target in zip(batch["index"], batch["source"], batch["target"]):
            try:
                result, _, _ = restore_file(self.pipe, str(source), str(target), self.setup.options,
                                            self.setup.quality)
                ok, message = True, result.status_line()
            except Exception as exc:  # noqa: BLE001 - reported with the file's name
                ok, message = False, first_line(exc)
            out["index"].append(int(index))
            out["ok"].append(ok)
            out["message"].append(message)
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
        results = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            RayRestorer, fn_constructor_args=(setup,), batch_size=1, concurrency=count,
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
