"""`hypir restore --devices N`: one worker process per device (CPU workers here), fed largest file first; a
worker killed mid-run is replaced, its file is done by another, and every output exists once, equal to the
one-worker output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hypir.distributed import parse_devices

pytestmark = pytest.mark.slow  # worker processes start fresh interpreters


def photos(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(count):
        size = (48 + 8 * (i % 3), 40)
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / f"p{i:02d}.png")
    return folder


def restore(tiny_files, inputs: Path, output: Path, *extra: str) -> subprocess.Popen:
    folder, weights = tiny_files
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "hypir", "restore", str(inputs), "-o", str(output), "--base",
                             str(folder), "--weights", str(weights), "--device", "cpu", "--latent", "mode", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def children(pid: int) -> list[int]:
    """The worker processes of `pid` (Linux /proc): multiprocessing's spawned children."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
            if int(fields[1]) == pid and "spawn_main" in command:  # not multiprocessing's resource tracker
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_files):
    """Eight photos and their outputs from one worker, shared by the tests that compare against them."""
    root = tmp_path_factory.mktemp("distributed")
    inputs = photos(root / "in", 8)
    one = restore(tiny_files, inputs, root / "one", "--devices", "1")
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    return inputs, root / "one"


def test_parse_devices_on_a_cpu_machine():
    assert parse_devices("3") == ["cpu", "cpu", "cpu"]
    assert parse_devices("all") == ["cpu"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="cuda:1 is not there"):
        parse_devices("cuda:1")
    with pytest.raises(ValueError, match="give at least one worker"):
        parse_devices("0")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_a_killed_worker_is_replaced_and_every_output_equals_the_one_worker_run(tmp_path, tiny_files, baseline):
    inputs, one = baseline
    two = restore(tiny_files, inputs, tmp_path / "two", "--devices", "2")
    deadline = time.monotonic() + 120
    out = tmp_path / "two"
    while time.monotonic() < deadline and not (out.exists() and len(list(out.glob("*.png"))) >= 2):
        time.sleep(0.05)
    workers = children(two.pid)
    assert len(workers) >= 2, workers
    os.kill(workers[0], signal.SIGKILL)  # a worker dies mid-run, as on a crash
    stdout, err = two.communicate(timeout=300)
    assert two.returncode == 0, err
    assert "stopped (exit code -9)" in err and "starting another" in err
    expected = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in out.iterdir()) == expected and len(expected) == 8  # nothing partial, none missing
    for name in expected:
        assert (out / name).read_bytes() == (one / name).read_bytes(), name
    assert stdout.count(" -> ") == 8  # each file reported done once


def test_a_file_that_keeps_failing_is_named_after_three_attempts(tmp_path, tiny_files, monkeypatch):
    """Run in-process with a worker that fails one file every time: reported by name, the others restored."""
    from hypir import distributed
    from hypir.settings import RestoreOptions

    inputs = photos(tmp_path / "in", 3)
    (tmp_path / "out").mkdir()
    tasks = [(p, tmp_path / "out" / p.name) for p in sorted(inputs.iterdir())]
    broken = tasks[1][0]
    broken.write_bytes(b"not an image any more")  # damaged after the pre-flight check
    setup = distributed.WorkerSetup(str(tiny_files[0]), str(tiny_files[1]), "fp32", 1.0,
                                    RestoreOptions(latent="mode"), 95, 1)
    outcomes = distributed.run_pool(tasks, ["cpu"], setup)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].message.startswith(f"{broken}: not an image") and "(3 attempts)" in outcomes[1].message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [tasks[0][0].name, tasks[2][0].name]


def test_models_that_do_not_load_stop_the_run_with_the_reason(tmp_path, tiny_files):
    """Every worker would fail the same way (here a damaged weights file): the run stops at once with the
    loader's message, instead of starting workers for ever."""
    from hypir import distributed
    from hypir.settings import RestoreOptions

    inputs = photos(tmp_path / "in", 2)
    damaged = tmp_path / "HYPIR_damaged.pth"
    damaged.write_bytes(b"PK\x03\x04 not a checkpoint")
    tasks = [(p, tmp_path / "out" / p.name) for p in sorted(inputs.iterdir())]
    setup = distributed.WorkerSetup(str(tiny_files[0]), str(damaged), "fp32", 1.0, RestoreOptions(latent="mode"), 95, 1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the worker on cpu could not load the models: .*HYPIR_damaged\.pth"):
        distributed.run_pool(tasks, ["cpu", "cpu"], setup)
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out").exists()


# ---- Ray (the [ray] extra): a local Ray instance, as `--ray` starts one ----------------------------------------

def ray_workers() -> list[int]:
    """The Ray worker processes that hold a RayRestorer actor."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if command.startswith("ray::") and "RayRestorer" in command:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the actors through /proc")
def test_ray_local_with_a_killed_actor_equals_the_one_worker_run(tmp_path, tiny_files, baseline):
    pytest.importorskip("ray.data", reason="the [ray] extra is not installed")
    inputs, one = baseline
    run = restore(tiny_files, inputs, tmp_path / "ray", "--ray", "--devices", "2")
    out = tmp_path / "ray"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out.exists() and len(list(out.glob("*.png"))) >= 2):
        time.sleep(0.05)
    actors = ray_workers()
    assert actors, "no RayRestorer actor process found"
    os.kill(actors[0], signal.SIGKILL)  # an actor dies mid-run: Ray restarts it and retries its files
    stdout, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    expected = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in out.iterdir()) == expected and len(expected) == 8
    for name in expected:
        assert (out / name).read_bytes() == (one / name).read_bytes(), name
    assert stdout.count(" -> ") == 8
