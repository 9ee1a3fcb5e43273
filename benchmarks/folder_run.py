"""A folder of photos through `hypir restore`, end to end from JPEG files on disk to PNG files on disk, on this
machine's GPUs: images per second, the GPUs' busy fraction and whether every output is byte-identical to the
one-by-one run's.

Modes (each a fresh process, as a user runs it):
  one-by-one  read, restore and write each file in turn in one process (the baseline: no overlap)
  stream      `hypir restore IN -o OUT` (reads ahead of the GPU and writes behind it)
  devicesN    `hypir restore IN -o OUT --devices N` (N worker processes, one per GPU)
  rayN        `hypir restore IN -o OUT --ray local --devices N` (Ray Data, N GPU actors; needs ray[data])
  MODE+omp1   the same with OMP_NUM_THREADS=1 (as Ray sets it for its workers)

  python3 benchmarks/folder_run.py --photos 400 --modes one-by-one,stream,devices1,devices2 --json OUT/folder.json

Models: random SD2.1-architecture weights (full size) written once to --workdir, with the photos: 512 px
crops of scikit-image's bundled pictures, blurred, noised and JPEG-compressed at random (seeded), so every
input differs. Rates: images per second between the 10th output and the last (the steady part: model loading
and the first pass's setup excluded), and for the whole command. Busy: NVML's utilisation of each GPU sampled
every 100 ms over the steady part. A JSON given with --json that exists is updated (modes run in another call
keep their rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ONE_BY_ONE = """
import sys, time
from pathlib import Path
from hypir.cli import build_parser
from hypir.images import read_image, write_image
from hypir.pipeline import HYPIRPipeline
from hypir.settings import RestoreOptions
source, target, base, weights = map(Path, sys.argv[1:5])
args = build_parser().parse_args(["restore", str(source), "-o", str(target)])
options = RestoreOptions.from_settings(vars(args))
pipe = HYPIRPipeline.from_files(base, weights, args.device, args.dtype, lora_scale=args.lora_scale)
target.mkdir(parents=True, exist_ok=True)
for path in sorted(source.iterdir()):
    picture = read_image(path)
    restored, result = pipe.restore_frames(picture.frames, options)
    write_image(target / (path.stem + ".png"), restored, picture)
    print(f"{path} -> {target / (path.stem + '.png')}: {result.status_line()}", flush=True)
"""


def make_models(workdir: Path) -> tuple[Path, Path]:
    from hypir.bench.random_models import write_random_model

    return write_random_model(workdir / "sd21_sd", workdir / "HYPIR_sd21.pth", "sd21")


def make_photos(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    from PIL import Image, ImageFilter

    if folder.exists() and len(list(folder.iterdir())) == count:
        return folder
    import skimage.data

    sources = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
                 "motorcycle", "retina", "cat", "colorwheel", "page"):
        try:
            picture = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - some need a download; use the bundled ones
            continue
        picture = picture[..., :3] if picture.ndim == 3 else np.stack([picture] * 3, -1)
        sources.append(Image.fromarray(picture.astype(np.uint8)))
    if not sources:
        raise SystemExit("no bundled scikit-image pictures found")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        picture = sources[i % len(sources)]
        side = int(min(picture.size) * rng.uniform(0.5, 1.0))
        x, y = rng.integers(0, picture.size[0] - side + 1), rng.integers(0, picture.size[1] - side + 1)
        crop = picture.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop = crop.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
        noisy = np.asarray(crop, np.float32) + rng.normal(0, rng.uniform(2, 10), (size, size, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"photo{i:04d}.jpg",
                                                                  quality=int(rng.integers(30, 90)))
    return folder


class BusySampler:
    """NVML utilisation of every GPU, sampled every 100 ms in a thread."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no NVIDIA driver (a CPU try-out): no busy figures
            self.handles = []
        self.nvml = pynvml if self.handles else None
        self.samples: list[tuple[float, list[int]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.handles and not self.stop.wait(0.1):
            self.samples.append((time.monotonic(), [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu
                                                    for h in self.handles]))

    def mean(self, start: float, end: float) -> list[float]:
        self.stop.set()
        self.thread.join()
        window = [u for t, u in self.samples if start <= t <= end]
        return [round(float(np.mean([u[i] for u in window])), 1) if window else None
                for i in range(len(self.handles))]


def command(mode: str, photos: Path, out: Path, base: Path, weights: Path) -> list[str]:
    mode = mode.split("+")[0]
    hypir = [sys.executable, "-m", "hypir", "restore", str(photos), "-o", str(out), "--base", str(base),
             "--weights", str(weights), "--format", "png"]
    if mode == "one-by-one":
        return [sys.executable, "-c", ONE_BY_ONE, str(photos), str(out), str(base), str(weights)]
    if mode == "stream":
        return hypir
    if mode.startswith("devices"):
        return hypir + ["--devices", mode[len("devices"):]]
    if mode.startswith("ray"):
        return hypir + ["--ray", "local", "--devices", mode[len("ray"):]]
    raise SystemExit(f"unknown mode {mode}")


def run_mode(mode: str, photos: Path, out: Path, base: Path, weights: Path, count: int, log: Path) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PYTHONPATH=path)
    if mode.endswith("+omp1"):
        env["OMP_NUM_THREADS"] = "1"
    sampler = BusySampler()
    started = time.monotonic()
    done: list[float] = []
    with open(log, "w") as log_file:
        process = subprocess.Popen(command(mode, photos, out, base, weights), stdout=subprocess.PIPE,
                                   stderr=log_file, text=True, env=env, cwd=REPO)
        for line in process.stdout:
            log_file.write(line)
            if " -> " in line:
                done.append(time.monotonic())
        code = process.wait()
    ended = time.monotonic()
    skip = min(10, max(0, len(done) - 2))
    steady = (len(done) - 1 - skip) / (done[-1] - done[skip]) if len(done) > skip + 1 else None
    busy = sampler.mean(done[skip], done[-1]) if len(done) > skip + 1 else sampler.mean(started, ended)
    return {"mode": mode, "exit_code": code, "outputs": len(done), "photos": count,
            "steady_images_per_s": round(steady, 2) if steady else None,
            "whole_command_s": round(ended - started, 1),
            "whole_images_per_s": round(len(done) / (ended - started), 2),
            "first_output_s": round(done[0] - started, 1) if done else None,
            "gpu_busy_percent": busy}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def compare(reference: Path, other: Path) -> dict:
    a, b = digests(reference), digests(other)
    same = sum(1 for name in a if b.get(name) == a[name])
    result = {"compared_with": reference.name, "identical": same, "of": len(a), "missing": len(set(a) - set(b))}
    differing = [name for name in a if name in b and b[name] != a[name]]
    if differing:
        from PIL import Image

        worst = 0
        for name in differing[:20]:
            x = np.asarray(Image.open(reference / name), np.int16)
            y = np.asarray(Image.open(other / name), np.int16)
            worst = max(worst, int(np.abs(x - y).max()))
        result["max_abs_diff_8bit_first_20"] = worst
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--modes", default="one-by-one,stream,devices1,devices2")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hypir_folder"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--logs", type=Path, default=None, help="folder for each mode's output")
    parser.add_argument("--commit", default="")
    parser.add_argument("--base", type=Path, help="a model folder to use instead of random SD2.1 weights")
    parser.add_argument("--weights", type=Path, help="with --base: its HYPIR weights")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    base, weights = (args.base, args.weights) if args.base else make_models(args.workdir)
    photos = make_photos(args.workdir / f"photos{args.size}", args.photos, args.size)
    print(f"models and {args.photos} photos ready in {time.monotonic() - t0:.0f} s", flush=True)
    report = json.loads(args.json.read_text()) if args.json and args.json.exists() else {"runs": {}}
    import torch

    report.update({"commit": args.commit, "models": "random SD2.1" if not args.base else str(args.base),
                   "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   "cpus": os.cpu_count(), "photos": args.photos, "size": args.size})
    logs = args.logs or args.workdir
    logs.mkdir(parents=True, exist_ok=True)
    for mode in args.modes.split(","):
        out = args.workdir / f"out-{mode}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        row = run_mode(mode, photos, out, base, weights, args.photos, logs / f"{mode.replace('+', '_')}.log")
        for name in ("one-by-one", "devices1"):  # the one-by-one run's outputs, else one GPU's
            reference = args.workdir / f"out-{name}"
            if mode != name and reference.exists():
                row[f"outputs_vs_{name}"] = compare(reference, out)
                break
        report["runs"][mode] = row
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
