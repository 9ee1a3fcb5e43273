"""streaming.restore_stream: files read ahead of the restore and written behind it, with the same outputs as
one-by-one restores, every failure yielded with its stage, and an interrupt that loses no finished output."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hypir import streaming
from hypir.images import read_image, write_image
from hypir.settings import RestoreOptions

OPTIONS = RestoreOptions(upscale=1, latent="mode")


def photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        size = (40 + 8 * (i % 3), 32 + 8 * (i % 2))
        path = folder / f"p{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


class Watched:
    """The real pipeline, with a hook called before each restore (the file's index)."""

    def __init__(self, pipe, before):
        self.pipe, self.before, self.calls = pipe, before, 0

    def restore_frames(self, frames, options, callbacks=None):
        self.calls += 1
        self.before(self.calls - 1)
        return self.pipe.restore_frames(frames, options, callbacks)

    def launch_frame(self, frame, options, callbacks=None):
        self.calls += 1
        self.before(self.calls - 1)
        return self.pipe.launch_frame(frame, options, callbacks)


def test_outputs_equal_one_by_one_restores_in_order_with_failures_named(tmp_path, pipe):
    sources = photos(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    sources.insert(2, tmp_path / "in" / "broken.png")
    (tmp_path / "one").mkdir()
    (tmp_path / "streamed").mkdir()
    for source in sources[:2] + sources[3:]:
        picture = read_image(source)
        restored, _ = pipe.restore_frames(picture.frames, OPTIONS)
        write_image(tmp_path / "one" / (source.stem + ".png"), restored, picture)

    tasks = [(i, s, tmp_path / "streamed" / (s.stem + ".png")) for i, s in enumerate(sources)]
    tasks.append((len(tasks), sources[0], sources[1] / "x.png"))  # its folder is a file: the write fails
    outcomes = list(streaming.restore_stream(pipe, tasks, OPTIONS, writers=2))

    assert [o.key for o in outcomes] == list(range(len(tasks)))
    failed = {o.key: (o.stage, type(o.error).__name__) for o in outcomes if not o.ok}
    assert failed == {2: ("read", "ImageError"), 6: ("write", "FileExistsError")}
    for outcome in outcomes[:2] + outcomes[3:6]:
        assert outcome.frames == 1 and outcome.status.startswith("FlashAttention: ")
        name = Path(outcome.target).name
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_the_next_file_is_read_and_the_last_one_written_while_a_file_is_restored(tmp_path, pipe, monkeypatch):
    sources = photos(tmp_path / "in", 4)
    pulled = [threading.Event() for _ in sources]
    writing = [threading.Event() for _ in sources]
    write_threads = []
    real_write = streaming.write_output

    def write_output(target, frames, picture, quality):
        write_threads.append(threading.current_thread().name)
        writing[int(Path(target).stem[1:])].set()
        real_write(target, frames, picture, quality)

    monkeypatch.setattr(streaming, "write_output", write_output)

    def tasks():
        for i, source in enumerate(sources):
            pulled[i].set()
            yield i, source, tmp_path / f"p{i}.png"

    def before(index):
        if index + 1 < len(sources):  # read ahead: the next file was taken while this one waits for the GPU
            assert pulled[index + 1].wait(10), f"file {index + 1} was not read ahead of file {index}'s restore"
        if index > 1:  # written behind: while this pass is queued, the one before it runs on the GPU and the
            # one before that is being written
            assert writing[index - 2].wait(10), f"file {index - 2} was not written during file {index}'s restore"

    outcomes = list(streaming.restore_stream(Watched(pipe, before), tasks(), OPTIONS, writers=2))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len(write_threads) == 4 and all(name.startswith("hypir-write") for name in write_threads)


def test_an_interrupt_keeps_every_finished_output_and_leaves_nothing_partial(tmp_path, pipe):
    sources = photos(tmp_path / "in", 5)
    out = tmp_path / "out"
    out.mkdir()

    def before(index):
        if index == 3:
            raise KeyboardInterrupt

    tasks = [(i, s, out / f"p{i}.png") for i, s in enumerate(sources)]
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for outcome in streaming.restore_stream(Watched(pipe, before), tasks, OPTIONS, writers=2):
            seen.append(outcome.key)
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p1.png", "p2.png"]  # restored ones: written
    for path in out.iterdir():
        assert Image.open(path).size == Image.open(sources[int(path.stem[1:])]).size


@pytest.mark.parametrize("where", ["consumer", "collect"])
def test_an_interrupt_outside_a_launch_writes_the_pass_already_queued(tmp_path, pipe, monkeypatch, where):
    """A pass is queued before the one before it is collected: an interrupt while the consumer handles an outcome,
    or while a pass is collected, still writes every pass that was queued (it finished or will), and nothing
    partial."""
    from hypir import pipeline as pipeline_module

    sources = photos(tmp_path / "in", 5)
    out = tmp_path / "out"
    out.mkdir()
    launched = []
    real_launch, real_collect = pipe.launch_frame, pipeline_module.FrameInFlight.collect
    collects = []

    def launch_frame(frame, options, callbacks=None):
        launched.append(len(launched))
        return real_launch(frame, options, callbacks)

    def collect(self):
        collects.append(1)
        if where == "collect" and len(collects) == 2:
            raise KeyboardInterrupt
        return real_collect(self)

    monkeypatch.setattr(pipe, "launch_frame", launch_frame)
    monkeypatch.setattr(pipeline_module.FrameInFlight, "collect", collect)
    tasks = [(i, s, out / f"p{i}.png") for i, s in enumerate(sources)]
    with pytest.raises(KeyboardInterrupt):
        for outcome in streaming.restore_stream(pipe, tasks, OPTIONS, writers=1):
            if where == "consumer":
                raise KeyboardInterrupt
    written = sorted(int(p.stem[1:]) for p in out.iterdir())
    assert written == list(range(len(launched))), (written, launched)  # every queued pass is written
    for path in out.iterdir():
        assert Image.open(path).size == Image.open(sources[int(path.stem[1:])]).size


def test_a_failed_restore_is_yielded_and_the_next_files_go_on(tmp_path, pipe):
    sources = photos(tmp_path / "in", 3)

    def before(index):
        if index == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    tasks = [(i, s, tmp_path / f"p{i}.png") for i, s in enumerate(sources)]
    outcomes = list(streaming.restore_stream(Watched(pipe, before), tasks, OPTIONS))
    assert [(o.key, o.ok, o.stage) for o in outcomes] == [(0, True, ""), (1, False, "restore"), (2, True, "")]
    assert not (tmp_path / "p1.png").exists() and (tmp_path / "p2.png").exists()


def test_a_broken_task_source_is_raised(tmp_path, pipe):
    sources = photos(tmp_path / "in", 1)

    def tasks():
        yield 0, sources[0], tmp_path / "p0.png"
        raise OSError("the inbox closed")

    with pytest.raises(OSError, match="the inbox closed"):
        list(streaming.restore_stream(pipe, tasks(), OPTIONS))
    assert (tmp_path / "p0.png").exists()


def test_each_output_is_reported_while_the_task_source_waits_for_more(tmp_path, pipe):
    """A worker's inbox blocks until the parent sends more, and the parent sends more only after outcomes: an
    outcome must not wait for the next task."""
    import queue

    sources = photos(tmp_path / "in", 2)
    inbox: queue.Queue = queue.Queue()
    for i, source in enumerate(sources):
        inbox.put((i, source, tmp_path / f"p{i}.png"))
    stream = streaming.restore_stream(pipe, iter(inbox.get, None), OPTIONS)
    got = []
    consumer = threading.Thread(target=lambda: got.extend(next(stream).key for _ in sources), daemon=True)
    consumer.start()
    consumer.join(60)
    alive = consumer.is_alive()
    inbox.put(None)
    assert not alive and got == [0, 1], "the outcomes waited for the next task"
    assert list(stream) == []


def test_restored_frames_held_for_writing_stay_within_the_byte_bound(tmp_path, pipe, monkeypatch):
    """With room for no restored frames beyond one file, the next restore waits until the last one collected is
    written (the one before the next is still on the GPU when the next is queued)."""
    monkeypatch.setattr(streaming, "HELD_BYTES", 1)
    sources = photos(tmp_path / "in", 4)

    def before(index):
        if index > 1:
            assert (tmp_path / f"p{index - 2}.png").exists(), f"file {index - 2} was still held when {index} began"

    tasks = [(i, s, tmp_path / f"p{i}.png") for i, s in enumerate(sources)]
    outcomes = list(streaming.restore_stream(Watched(pipe, before), tasks, OPTIONS, writers=4))
    assert [o.ok for o in outcomes] == [True] * 4, [o.error for o in outcomes]
