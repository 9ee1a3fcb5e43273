"""Concurrency on one loaded model, interrupts that lose nothing, and the CLI stopped mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import default_sigint
from hypir.pipeline import Callbacks


def test_two_restores_overlap_and_match_sequential(pipe, image_factory):
    inputs = {"a": (image_factory(1, 24, 24, seed=21), 5), "b": (image_factory(1, 20, 28, seed=22), 6)}
    sequential = {k: pipe(x, upscale=2.0, seed=s).images for k, (x, s) in inputs.items()}
    spans, results = {}, {}
    barrier = threading.Barrier(2)

    def run(key):
        x, seed = inputs[key]
        barrier.wait()
        start = time.perf_counter()
        results[key] = pipe(x, upscale=2.0, seed=seed).images
        spans[key] = (start, time.perf_counter())

    threads = [threading.Thread(target=run, args=(k,)) for k in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1, "the two calls did not overlap in time"
    for key in inputs:
        torch.testing.assert_close(results[key], sequential[key], rtol=0, atol=1e-6)


def test_interrupted_pass_leaves_the_model_usable(pipe, image_factory):
    lq = image_factory(1, 64, 96, seed=4)
    expected = pipe(lq, upscale=8.0, tile_size=512, tile_stride=256, latent="mode").images

    class Stop(Exception):
        pass

    def stop_in_unet(stage, done, total):
        if stage == "unet" and done == 1:
            raise Stop

    with pytest.raises(Stop):
        pipe(lq, upscale=8.0, tile_size=512, tile_stride=256, latent="mode", callbacks=Callbacks(progress=stop_in_unet))
    again = pipe(lq, upscale=8.0, tile_size=512, tile_stride=256, latent="mode").images
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_cli_interrupted_writes_no_file(tiny_files, tmp_path):
    folder, weights = tiny_files
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "hypir", "restore", str(tmp_path / "in.png"), "-o", str(out),
                             "--base", str(folder), "--weights", str(weights), "--device", "cpu", "--upscale", "8",
                             "--tile-size", "512", "--tile-stride", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)
    seen = ""
    deadline = time.time() + 300
    while "unet" not in seen and time.time() < deadline and proc.poll() is None:
        seen += proc.stderr.read(1)  # the progress bar writes its stage to stderr
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "hypir: interrupted" in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def _oom_during(stage_to_fail: str, times: int):
    """A progress callback (the pipeline's own seam) that raises CUDA's out-of-memory error in one stage of
    the first `times` passes, as an allocation there would."""
    state = {"left": times}

    def progress(stage, done, total):
        if stage == stage_to_fail and done == 0 and state["left"] > 0:
            state["left"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    return progress


def test_out_of_memory_retries_with_tiles_then_gives_a_clear_error(pipe, image_factory, caplog, monkeypatch):
    """The retry runs in tiles, after dropping the CUDA graphs (their pool's memory is no use to it)."""
    from hypir.runtime import runtime_of

    released = []
    runtime = runtime_of(pipe.models)
    monkeypatch.setattr(runtime, "release_graphs", lambda: released.append(len(runtime.unet_graphs)) or 0)
    lq = image_factory(1, 64, 128, seed=31)
    with caplog.at_level("WARNING", logger="hypir"):
        result = pipe(lq, upscale=8.0, latent="mode", callbacks=Callbacks(progress=_oom_during("decode", 1)))
    assert "out of GPU memory (CUDA out of memory. Tried to allocate 8.00 GiB); retrying with tiles of 512 px" \
        in caplog.text
    assert released == [0]
    assert (result.tile_size, result.tile_stride) == (512, 384)
    assert result.images.shape == (1, 3, 512, 1024)

    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of GPU memory even with tiles of 256 px, one at a "
                                                          "time .* Free VRAM"):
        pipe(lq, upscale=8.0, latent="mode", callbacks=Callbacks(progress=_oom_during("encode", 10)))


def test_out_of_memory_with_tiles_sent_together_retries_them_one_at_a_time(pipe, image_factory, caplog,
                                                                          monkeypatch):
    """Tiles sent through the models together that run out go one at a time in the same size before any is
    halved: the size is the one the planner found fastest. Later passes with these models send at most half as
    many together, so that they do not pay for the same failure each time (inside ComfyUI on a 24 GiB card, a
    4096 output's tiles of 1024 ran out eleven at a time). Planned as on a GPU with 1 GiB for the pass (a CPU plan
    sends one tile at a time), with the models' own limits as plan_for takes them."""
    from hypir import pipeline
    from hypir.runtime import Runtime, runtime_of

    plans = []

    def plan_as_on_a_gpu(models, images, options, max_group=None):
        plans.append(pipeline.plan_size(images.shape[2], images.shape[3], images.shape[0], options,
                                        torch.device("cuda"), models.dtype.itemsize, memory=(1 << 30, "a test GPU"),
                                        max_group=max_group, group_limits=runtime_of(models).tile_group_limits()))
        return plans[-1]

    monkeypatch.setattr(runtime_of(pipe.models), "_tile_group_limits", {})  # this test's own, whatever ran before
    monkeypatch.setattr(pipeline, "plan_for", plan_as_on_a_gpu)
    lq = image_factory(1, 64, 128, seed=33)
    with caplog.at_level("WARNING", logger="hypir"):
        result = pipe(lq, upscale=8.0, latent="mode", tile_size=256, tile_stride=192,
                      callbacks=Callbacks(progress=_oom_during("unet", 1)))
    assert [(p.tile, p.tiles_per_batch) for p in plans] == [(256, 4), (256, 1)]
    assert ("out of GPU memory with 4 tiles of 256 px together (CUDA out of memory. Tried to allocate 8.00 GiB); "
            "retrying them one at a time; later passes send at most 2 together") in caplog.text
    assert "tiles of 128" not in caplog.text
    assert (result.tile_size, result.tile_stride) == (256, 192) and result.images.shape == (1, 3, 512, 1024)
    again = pipe(lq, upscale=8.0, latent="mode", tile_size=256, tile_stride=192)
    assert [(p.tile, p.tiles_per_batch) for p in plans[2:]] == [(256, 2)]
    assert (again.images - result.images).abs().max() <= 1e-3  # the same tiles through batched kernels: float32 noise
    with pytest.raises(torch.cuda.OutOfMemoryError, match="even with tiles of 256 px, one at a time"):
        pipe(lq, upscale=8.0, latent="mode", tile_size=256, tile_stride=192,
             callbacks=Callbacks(progress=_oom_during("unet", 10)))
    assert runtime_of(pipe.models).tile_group_limits() == {256: 1}  # 2 ran out too
    assert Runtime().tile_group_limits() == {}


def test_out_of_memory_drops_the_graphs_of_every_model_on_that_gpu(monkeypatch):
    """release_graphs_on drops the CUDA graphs of each loaded model on the device that ran out ("cuda" and
    "cuda:0" naming the same GPU), and no others."""
    from hypir import runtime as runtime_module

    class Models:  # weak-referenceable stand-ins for loaded models
        def __init__(self, device):
            self.device = torch.device(device)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    models = [Models("cuda"), Models("cuda:0"), Models("cuda:1"), Models("cpu")]
    released = []
    for m in models:
        runtime = runtime_module.runtime_of(m)
        monkeypatch.setattr(runtime, "release_graphs", lambda m=m: released.append(str(m.device)) or 3)
    assert runtime_module.release_graphs_on(torch.device("cuda:0")) == 6
    assert sorted(released) == ["cuda", "cuda:0"]
    released.clear()
    runtime_module.release_graphs_on(torch.device("cuda:1"))
    assert released == ["cuda:1"]


def test_out_of_memory_with_graphs_given_back_retries_the_same_plan_first(pipe, image_factory, caplog, monkeypatch):
    """Where dropping the CUDA graphs gave memory back, the retry runs the same plan (one pass here) without
    graphs, before any tiling; a second shortage then tiles."""
    from hypir.runtime import runtime_of

    runtime = runtime_of(pipe.models)
    graphs = [2]
    monkeypatch.setattr(runtime, "release_graphs", lambda: graphs.pop() if graphs else 0)
    lq = image_factory(1, 64, 128, seed=32)
    with caplog.at_level("WARNING", logger="hypir"):
        result = pipe(lq, upscale=8.0, latent="mode", callbacks=Callbacks(progress=_oom_during("decode", 1)))
    assert "retrying without CUDA graphs (2 given back)" in caplog.text and "tiles" not in caplog.text
    assert result.tile_size is None and result.images.shape == (1, 3, 512, 1024)
    caplog.clear()
    graphs.append(1)
    with caplog.at_level("WARNING", logger="hypir"):
        result = pipe(lq, upscale=8.0, latent="mode", callbacks=Callbacks(progress=_oom_during("decode", 2)))
    assert "retrying without CUDA graphs (1 given back)" in caplog.text
    assert "retrying with tiles of 512 px" in caplog.text and result.tile_size == 512
