"""Many image files through one pipeline with the GPU kept busy: the next files are read and decoded in a
thread ahead of the GPU, and finished ones are encoded and written by a few threads behind it, while the
calling thread only restores. A photo's pass is queued on the GPU before the one before it is read back
(HYPIRPipeline.launch_frame), so the GPU does not wait while the CPU reads an output and prepares the next
pass; an animation's frames run one after another. Decoding and encoding (Pillow, zlib, libjpeg) release the
GIL, so they overlap with the GPU work. Used by the command line, the per-GPU worker processes and the Ray actors.

Outputs are the same as restoring the files one by one: the same pipeline call per file, in the same order.
Torch is imported only by spare_the_cpu.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator

from .images import Picture, read_source, write_output

READ_AHEAD = 2  # decoded files waiting for the GPU (and one more in the reader while it waits to queue it)
HELD_BYTES = 2 * 2**30  # restored frames waiting to be written, at most (beyond one file), besides 2 per writer
_END = object()
_BROKEN = object()  # marks ("the task source raised", exception)


def spare_the_cpu(device) -> None:
    """In a process that restores files on a GPU (the command line's, a --devices worker, a Ray actor), once the
    models are loaded: one CPU thread for PyTorch's own operators, unless OMP_NUM_THREADS says otherwise. A pass
    on the GPU has almost no CPU operators, and the default pool of one thread per core wakes and spins on the
    cores the decoders and encoders need: measured on two H200s (benchmarks/folder_run.py, 400 photos),
    6.2 -> 11.6 images per second on one GPU and 9.5 -> 23.6 on two. Never called inside ComfyUI."""
    import torch

    if str(device).startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


MAX_WRITERS = 8


def default_writers(workers: int = 1) -> int:
    """Encoder threads for one of `workers` pipelines on this machine: half of this worker's share of the
    cores, at most MAX_WRITERS. A 1024x1024 PNG took 180 ms to encode on one core of an H200 machine and 38.5
    ms a picture with 8 threads (benchmarks/results/2026-11-30-h200x2-folders/call2_png_encode.txt): with 4
    threads the encoders, not the GPU (53 ms a picture), set a folder's pace."""
    return max(1, min(MAX_WRITERS, (os.cpu_count() or 2) // (2 * max(1, workers))))


@dataclass
class FileOutcome:
    key: Hashable  # what the caller gave with the file (an index, say)
    source: str
    target: str
    status: str = ""  # the last frame's status line (RestoreResult.status_line; not the result, which holds the
    #                   output on the GPU while the file waits to be written)
    frames: int = 0
    notes: list[str] = field(default_factory=list)
    error: Exception | None = None
    stage: str = ""  # where it failed: "read", "restore" or "write"
    held_bytes: int = 0  # its restored frames, while they wait to be written

    @property
    def ok(self) -> bool:
        return self.error is None


def _read_ahead(tasks: Iterable[tuple[Hashable, str, str]], ready: queue.Queue, stop: threading.Event) -> None:
    """The reader thread: decode each task's file (or keep its error) and queue it for the GPU, in order."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for key, source, target in tasks:
            try:
                item = (key, str(source), str(target), read_source(source), None)
            except Exception as exc:  # noqa: BLE001 - yielded as this file's outcome
                item = (key, str(source), str(target), None, exc)
            if not put(item):
                return
    except BaseException as exc:  # noqa: BLE001 - the task source itself broke: raised in the calling thread
        put((_BROKEN, exc))
        return
    put(_END)


def _written(outcome: FileOutcome, future: Future | None) -> FileOutcome:
    if future is not None:
        error = future.exception()
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            outcome.error, outcome.stage = error, "write"
    return outcome


def restore_stream(pipe, tasks: Iterable[tuple[Hashable, str, str]], options, quality: int = 95, callbacks=None,
                   writers: int | None = None, read_ahead: int = READ_AHEAD,
                   on_restored: Callable[[Hashable], None] | None = None) -> Iterator[FileOutcome]:
    """Restore every (key, source, target) of `tasks` with `pipe` (a HYPIRPipeline) and write each output
    atomically; yields one FileOutcome per task, in the tasks' order, once its file is written or has failed.
    A file's failure (reading, restoring or writing it) is yielded, never raised; an interrupt (Ctrl-C,
    SIGTERM) is raised once the outputs already restored are written. `tasks` may block (a worker's inbox);
    `on_restored(key)` is called when the GPU is done with a file, before it is written."""
    writers = writers or default_writers()
    ready: queue.Queue = queue.Queue(maxsize=max(1, read_ahead))
    stop = threading.Event()
    reader = threading.Thread(target=_read_ahead, args=(tasks, ready, stop), name="hypir-read", daemon=True)
    pending: collections.deque[tuple[FileOutcome, Future | None]] = collections.deque()
    in_flight: list = []  # (outcome, picture, FrameInFlight) queued on the GPU, not collected: one, two briefly

    def restored(outcome: FileOutcome, future: Future | None) -> None:
        """A file whose restore is over (its write submitted, or its error set): queued to be reported."""
        pending.append((outcome, future))
        if on_restored is not None:
            on_restored(outcome.key)

    def finish_in_flight(keep: int = 0) -> None:
        """Collect the queued passes but the last `keep`, in order, and submit their writes."""
        while len(in_flight) > keep:  # taken off once its write is submitted: an interrupt here finishes it again
            outcome, picture, launched = in_flight[0]
            future = _collect_and_write(pool, outcome, picture, launched, quality)
            in_flight.pop(0)
            restored(outcome, future)

    reader.start()
    try:
        with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="hypir-write") as pool:
            try:  # an interrupt anywhere (a signal, the consumer closing the stream): the pass on the GPU is
                # done or will be: it is written too, as a restore that finished before the interrupt would be
                while True:
                    try:  # while an output is being written, look in on it now and then: it is reported when done
                        item = ready.get(timeout=0.02 if pending or in_flight else None)
                    except queue.Empty:  # no next file yet: collect the pass on the GPU once it is done (a worker's
                        if in_flight and in_flight[0][2].ready():  # inbox may wait for its outcome)
                            finish_in_flight()
                        while pending and (pending[0][1] is None or pending[0][1].done()):
                            yield _written(*pending.popleft())
                        continue
                    if item is _END:
                        finish_in_flight()
                        break
                    if item[0] is _BROKEN:
                        finish_in_flight()
                        raise item[1]
                    key, source, target, picture, error = item
                    outcome = FileOutcome(key, source, target)
                    if error is not None:
                        outcome.error, outcome.stage = error, "read"
                        finish_in_flight()
                        pending.append((outcome, None))
                    elif len(picture.frames) == 1 and hasattr(pipe, "launch_frame"):
                        # Queue this file's pass, then collect the one before it: the GPU runs this pass while
                        # the CPU reads the last one back and hands it to a writer.
                        launched = _launch(pipe, outcome, picture, options, callbacks)
                        if launched is None:
                            finish_in_flight()
                            restored(outcome, None)
                        else:
                            in_flight.append((outcome, picture, launched))
                            finish_in_flight(keep=1)
                    else:  # an animation's frames, one after another
                        finish_in_flight()
                        restored(outcome, _restore_and_write(pipe, pool, outcome, picture, options, quality,
                                                             callbacks))
                    # Yield what is written; keep at most two files per writer, and HELD_BYTES, waiting to be written.
                    while pending and (pending[0][1] is None or pending[0][1].done() or len(pending) > 2 * writers
                                       or sum(o.held_bytes for o, _ in pending) > HELD_BYTES):
                        yield _written(*pending.popleft())
                while pending:
                    yield _written(*pending.popleft())
            except BaseException:
                finish_in_flight()
                raise
    finally:
        stop.set()


def _launch(pipe, outcome: FileOutcome, picture: Picture, options, callbacks):
    try:
        return pipe.launch_frame(picture.frames[0], options, callbacks)
    except Exception as exc:  # noqa: BLE001 - this file's outcome
        outcome.error, outcome.stage = exc, "restore"
        return None


def _collect_and_write(pool: ThreadPoolExecutor, outcome: FileOutcome, picture: Picture, launched,
                       quality: int) -> Future | None:
    def collected():
        frame, result = launched.collect()
        return [frame], result
    return _write_restored(pool, outcome, picture, quality, collected)


def _restore_and_write(pipe, pool: ThreadPoolExecutor, outcome: FileOutcome, picture: Picture, options,
                       quality: int, callbacks) -> Future | None:
    return _write_restored(pool, outcome, picture, quality,
                           lambda: pipe.restore_frames(picture.frames, options, callbacks))


def _write_restored(pool: ThreadPoolExecutor, outcome: FileOutcome, picture: Picture, quality: int,
                    restored_frames) -> Future | None:
    """Submit the write of restored_frames()'s (frames, result); a failure there is this file's outcome (a
    non-finite pass included)."""
    try:
        restored, result = restored_frames()
    except Exception as exc:  # noqa: BLE001 - this file's outcome
        outcome.error, outcome.stage = exc, "restore"
        return None
    outcome.status, outcome.frames, outcome.notes = result.status_line(), len(restored), picture.notes
    outcome.held_bytes = sum(frame.nbytes for frame in restored)
    return pool.submit(write_output, outcome.target, restored, picture, quality)
