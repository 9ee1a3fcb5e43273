"""The `hypir` command: restore, doctor, bench, download."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from . import config as _config

logger = logging.getLogger("hypir")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _attention_choices() -> list[str]:
    from .attention import AttentionBackend

    return ["auto", *[b.value for b in AttentionBackend]]


def build_parser() -> argparse.ArgumentParser:
    cfg = _config.load_config()
    parser = argparse.ArgumentParser(prog="hypir", description="HYPIR one-step image restoration")
    parser.add_argument("--version", action="version", version=f"hypir {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("restore", help="restore image files or folders")
    r.add_argument("inputs", nargs="+", help="image files or folders of images")
    r.add_argument("-o", "--output", required=True,
                   help="output file (one input file) or folder (several inputs or a folder)")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--upscale", type=float, default=None, help=f"upscale factor (default {cfg['upscale']})")
    size.add_argument("--long-side", type=int, default=None, help="target longest side in pixels")
    r.add_argument("--prompt", default=cfg["prompt"])
    r.add_argument("--seed", type=int, default=cfg["seed"])
    r.add_argument("--model-t", type=int, default=cfg["model_t"])
    r.add_argument("--coeff-t", type=int, default=cfg["coeff_t"])
    r.add_argument("--base", default=None, metavar="PATH|ID",
                   help="SD2.1-base diffusers folder, single-file checkpoint or Hub id (default: found in the "
                        f"model folders, else {cfg['base_model_repo']} from the Hugging Face cache)")
    r.add_argument("--weights", default=None, metavar="PATH", help=f"HYPIR weights (default: {cfg['weights_file']} "
                                                                    "found in the model folders or the HF cache)")
    r.add_argument("--tile-size", default=str(cfg["tile_size"]), metavar="auto|N")
    r.add_argument("--tile-stride", type=int, default=cfg["tile_stride"], metavar="N")
    r.add_argument("--attention", default=cfg["attention"], choices=_attention_choices())
    r.add_argument("--no-flash-attention", action="store_true", default=not cfg["use_flash_attention"])
    r.add_argument("--dtype", default=cfg["dtype"], choices=["auto", "bf16", "fp16", "fp32"])
    r.add_argument("--device", default="auto", help="auto, cuda, cuda:N, cpu or mps")
    r.add_argument("--latent", default=cfg["latent"], choices=["sample", "mode"])
    r.add_argument("--no-color-fix", action="store_true", default=not cfg["color_fix"])
    r.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                   help="tile to keep the whole process (models included) within this budget")
    r.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=cfg["fused_kernels"],
                   help="Triton GroupNorm+SiLU and bias kernels on NVIDIA GPUs")
    r.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=cfg["cuda_graphs"],
                   help="replay the UNet as a CUDA graph when an image size repeats")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cfg["torch_compile"],
                   help="torch.compile the UNet and VAE (the first image of each size compiles for minutes)")
    r.add_argument("--download", action="store_true", help="download missing models from the Hugging Face Hub")

    sub.add_parser("doctor", help="what this machine can run, and which models were found")

    b = sub.add_parser("bench", help="time every attention backend against `standard` on random weights")
    b.add_argument("--model", default="auto", choices=["auto", "sd21", "small", "tiny"],
                   help="sd21 (full SD2.1 size; the GPU default), small (the CPU default) or tiny")
    b.add_argument("--size", type=int, default=None, help="output side in pixels (GPU default 1024, CPU 512)")
    b.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    b.add_argument("--repeats", type=int, default=None)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--profile", action="store_true", help="list the attention kernels each backend ran (CUDA)")
    b.add_argument("--json", default="hypir_bench.json", help="where to write the results")
    b.add_argument("--speed", action="store_true",
                   help="CUDA: the fast paths (eager, CUDA graphs, torch.compile) against diffusers' stock modules "
                        "at each --sizes, peak memory, PSNR against float32, a tiled run under --budget-gb")
    b.add_argument("--sizes", default="1024,2048", help="--speed: output sides, comma-separated")
    b.add_argument("--modes", default="eager,eager+graphs,compiled", help="--speed: modes, comma-separated")
    b.add_argument("--baselines", default="standard,sdpa",
                   help="--speed: diffusers stock-module baselines (standard, sdpa), comma-separated; empty: none")
    b.add_argument("--budget-size", type=int, default=4096, help="--speed: output side of the VRAM-budget run (0: none)")
    b.add_argument("--budget-gb", type=float, default=8.0, help="--speed: the VRAM budget of that run")

    d = sub.add_parser("download", help="download the base model and the HYPIR weights from the Hub")
    d.add_argument("--dir", default=os.environ.get("HYPIR_MODELS_DIR", "models"), help="target folder")
    which = d.add_mutually_exclusive_group()
    which.add_argument("--base-only", action="store_true")
    which.add_argument("--weights-only", action="store_true")
    return parser


# ----------------------------------------------------------------------------------------------


def collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CLIError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CLIError(f"{path}: no such file or folder")
    return files


def output_paths(files: list[Path], output: str, single_input_file: bool) -> list[Path]:
    out = Path(output)
    if single_input_file and not out.is_dir():
        if out.suffix.lower() != ".png":
            raise CLIError(f"{out}: the output file must end in .png (or give an existing folder)")
        return [out]
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out}: several inputs need an output folder, and this is a file")
    names = [f.stem + ".png" for f in files]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise CLIError(f"several inputs would write the same output name: {sorted(duplicates)}")
    return [out / n for n in names]


def load_image(path: Path):
    """(1, 3, H, W) float tensor, the alpha channel (1, 1, H, W) or None, and the PIL mode."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            has_alpha = "A" in img.getbands() or (mode == "P" and "transparency" in img.info)
            rgba = img.convert("RGBA") if has_alpha else None
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CLIError(f"{path}: not a readable image ({exc})") from exc
    array = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    alpha = None
    if rgba is not None:
        alpha = torch.from_numpy(np.asarray(rgba, dtype=np.float32)[..., 3] / 255.0)[None, None]
    return array, alpha, mode


def save_image(tensor, alpha, mode: str, path: Path) -> None:
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    rgb = (tensor[0].permute(1, 2, 0).float().cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode in ("L", "I", "I;16", "F", "1"):
        image = image.convert("L")
    if alpha is not None:
        a = F.interpolate(alpha, size=rgb.shape[:2], mode="bicubic", antialias=True).clamp(0, 1)
        image.putalpha(Image.fromarray((a[0, 0].numpy() * 255.0).round().astype(np.uint8), "L"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def cmd_restore(args) -> int:
    from tqdm import tqdm

    from .model_files import resolve_model_files
    from .pipeline import Callbacks, HYPIRPipeline

    files = collect_inputs(args.inputs)
    single = len(args.inputs) == 1 and Path(args.inputs[0]).is_file()
    outputs = output_paths(files, args.output, single)
    tile_size = args.tile_size if args.tile_size == "auto" else _int_arg("--tile-size", args.tile_size)
    model_files = resolve_model_files(args.base, args.weights, allow_download=args.download)
    pipe = HYPIRPipeline.from_files(model_files.base, model_files.weights, args.device, args.dtype,
                                    allow_download=args.download)
    bar = tqdm(total=len(files), unit="image", desc="HYPIR")
    stage_text = {}

    def progress(stage, done, total):
        stage_text["s"] = f"{stage} {done}/{total}"
        bar.set_postfix_str(stage_text["s"], refresh=True)

    for source, target in zip(files, outputs):
        images, alpha, mode = load_image(source)
        result = pipe(images, upscale=args.upscale, long_side=args.long_side, prompt=args.prompt, seed=args.seed,
                      model_t=args.model_t, coeff_t=args.coeff_t, tile_size=tile_size, tile_stride=args.tile_stride,
                      latent=args.latent, color_fix=not args.no_color_fix, attention=args.attention,
                      use_flash_attention=not args.no_flash_attention, vram_budget_gb=args.vram_budget,
                      fused_kernels=args.fused_kernels, cuda_graphs=args.cuda_graphs, torch_compile=args.compile,
                      callbacks=Callbacks(progress=progress))
        save_image(result.images, alpha, mode, target)
        bar.update(1)
        tqdm.write(f"{source} -> {target}: {result.status_line()}")
    bar.close()
    return 0


def _int_arg(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CLIError(f"{name} must be 'auto' or an integer, got {value!r}") from None


def cmd_doctor(args) -> int:
    import torch

    from .attention import TUNED_ORDER, AttentionBackend, AttentionPolicy, AttentionRouter, REGISTRY
    from .kernels import triton_available
    from .loading import resolve_device, resolve_dtype
    from .model_files import _cached_hub_file, _cached_hub_snapshot, find_file, search_dirs

    cfg = _config.load_config()
    print(f"hypir {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"config: {_config.config_file() or 'built-in defaults'}")
    device = resolve_device("auto")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]}), "
              f"cuDNN {torch.backends.cudnn.version()}")
    else:
        print(f"CUDA: not available (torch build: {torch.version.cuda or 'CPU only'})")
    dtype = resolve_dtype("auto", device)
    print(f"device auto: {device}; dtype auto: {str(dtype).removeprefix('torch.')}")
    router = AttentionRouter(AttentionPolicy(), device, dtype)
    print("attention backends:")
    for backend in AttentionBackend:
        why = router.unusable_reason(backend, 64)
        spec = REGISTRY[backend]
        state = f"available ({spec.version()})" if why is None else f"not available: {why}"
        print(f"  {backend.value:<15} {state}")
    backend = router.choose("unet.attn1", 64)
    flash = REGISTRY[backend].flash_class
    print(f"auto picks for UNet attention: {backend.value}"
          + ("" if flash else f" (FlashAttention not used: {router.flash_off_reason()})"))
    print(f"auto picks for VAE attention (head_dim 512): {router.choose('vae.mid', 512).value}")
    if device.type == "cuda" and router.per_shape:
        tuned = ", ".join(b.value for b in TUNED_ORDER if router.unusable_reason(b, 64) is None)
        print(f"  (those are the fixed order; on this GPU the first call of each attention shape times {tuned} "
              f"and runs the fastest)")
    fused = "Triton" if device.type == "cuda" and triton_available() else \
        ("PyTorch (no Triton: pip install triton)" if device.type == "cuda" else "PyTorch (CPU)")
    print(f"fused GroupNorm+SiLU and bias kernels: {fused}")
    print("model folders searched: " + ", ".join(str(d) for d in search_dirs()) + ", Hugging Face cache")
    weights = find_file(cfg["weights_file"]) or _cached_hub_file(cfg["weights_repo"], cfg["weights_file"])
    base = find_file(cfg["base_model_file"]) or _cached_hub_snapshot(cfg["base_model_repo"])
    print(f"  HYPIR weights ({cfg['weights_file']}): {weights or 'not found'}")
    print(f"  base model ({cfg['base_model_file']} or {cfg['base_model_repo']}): {base or 'not found'}")
    return 0


def cmd_bench(args) -> int:
    from .bench import SPEED_MODES, run_bench, run_speed

    if args.speed:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        unknown = [m for m in modes if m not in SPEED_MODES]
        if unknown:
            raise CLIError(f"unknown --modes {unknown}; choose from {', '.join(SPEED_MODES)}")
        sizes = tuple(int(s) for s in args.sizes.split(","))
        baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
        run_speed(model="sd21" if args.model == "auto" else args.model, sizes=sizes, modes=modes, baselines=baselines,
                  budget_size=args.budget_size or None, budget_gb=args.budget_gb, repeats=args.repeats or 10,
                  json_path=args.json)
        return 0

    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    result = run_bench(model=args.model, output=args.size, backends=backends, device=args.device, dtype=args.dtype,
                       repeats=args.repeats, profile=args.profile, json_path=args.json, batch=args.batch)
    failed = [r["backend"] for r in result["rows"] if r["error"]]
    if failed:
        raise CLIError(f"backends failed: {', '.join(failed)} (see the table)")
    return 0


def cmd_download(args) -> int:
    from .model_files import download_base, download_weights

    folder = Path(args.dir)
    if not args.base_only:
        print(f"HYPIR weights: {download_weights(folder)}")
    if not args.weights_only:
        print(f"base model: {download_base(folder / 'stable-diffusion-2-1-base')}")
    return 0


COMMANDS = {"restore": cmd_restore, "doctor": cmd_doctor, "bench": cmd_bench, "download": cmd_download}


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except Exception as exc:  # noqa: BLE001 - a broken hypir_config.py is reported in one line
        print(f"hypir: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("hypir: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line and a non-zero status
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"hypir: error: {message}", file=sys.stderr)
        return 1
