"""Time the reference implementation (XPixelGroup/HYPIR) on random SD2.1-architecture weights, offline.

Nothing of the reference is copied here: give a folder that holds its `HYPIR/` package (an extracted checkout),
or its git directory (then HEAD is extracted to a temporary folder with `git archive`). The folder is put on
sys.path at run time and the reference's own `HYPIR.enhancer.sd2.SD2Enhancer` does all the work.

What is written for it (random weights, no download):
  * a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) with the SD2.1-base architecture from
    `hypir.bench.random_models.build_random_base`, and a DDPMScheduler config (scaled_linear 0.00085 -> 0.012, 1000 steps);
  * a LoRA file in the reference's format: a torch pickle of a plain dict of peft keys
    `<module>.lora_A.default.weight` / `<module>.lora_B.default.weight`, rank 256, over its 13 target modules.
    The reference asserts its key set equals the LoRA keys of its UNet after `add_adapter`, so a mismatch fails loudly.

Reference defaults used (b61d107): configs/sd2_gradio.yaml `model_t: 200`, `coeff_t: 200`, `lora_rank: 256`,
`lora_modules: [to_k, to_q, to_v, to_out.0, conv, conv1, conv2, conv_shortcut, conv_out, proj_in, proj_out,
ff.net.2, ff.net.0.proj]`; HYPIR/enhancer/base.py `enhance(..., scale_by="factor", patch_size=512, stride=256,
return_type="pt")` and `self.weight_dtype = torch.bfloat16` (hard-coded; --dtype overrides the attribute before
the models load, a deviation recorded in the JSON). The reference has no tiling switch: --untiled passes
patch_size = stride = the output side (square images only), which makes every stage a single tile.

    # on a GPU machine, reference extracted at DIR (DIR/HYPIR/enhancer/sd2.py exists):
    python benchmarks/reference_baseline.py --reference DIR --input 512 --json ref_512.json
    python benchmarks/reference_baseline.py --reference DIR --input 1024 --json ref_1024.json
    python benchmarks/reference_baseline.py --reference DIR --input 512 --untiled --json ref_512_untiled.json
    # CPU smoke test
    python benchmarks/reference_baseline.py --reference DIR --model tiny --device cpu --input 64 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The reference's defaults (configs/sd2_gradio.yaml and README.md's test.py call, commit b61d107).
REF_LORA_MODULES = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
REF_LORA_RANK = 256
REF_MODEL_T = 200
REF_COEFF_T = 200
REF_PATCH_SIZE = 512   # BaseEnhancer.enhance default
REF_STRIDE = 256       # BaseEnhancer.enhance default
REF_SEED = 231         # test.py default

DDPM_SCHEDULER_CONFIG = {  # SD2.1-base, as a DDPMScheduler (the class the reference loads)
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.42.1",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "variance_type": "fixed_small",
    "timestep_spacing": "leading",
    "thresholding": False,
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def log(msg: str) -> None:
    print(f"[reference_baseline] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The reference code


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


def _is_git_dir(path: Path) -> bool:
    try:
        _git(path, "rev-parse", "--git-dir")
        return True
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


def locate_reference(path: Path, scratch: Path) -> tuple[Path, str | None]:
    """A folder holding HYPIR/ (extracting HEAD of a git directory if needed), and its commit when known."""
    path = path.resolve()
    commit = None
    if (path / "HYPIR" / "enhancer" / "sd2.py").is_file():
        if _is_git_dir(path):
            with contextlib.suppress(subprocess.CalledProcessError):
                commit = _git(path, "rev-parse", "HEAD").strip()
        return path, commit
    if _is_git_dir(path):
        commit = _git(path, "rev-parse", "HEAD").strip()
        target = scratch / "reference"
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(path), "archive", "HEAD", "HYPIR"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        log(f"extracted HYPIR/ of {path} at {commit[:7]} to {target}")
        return target, commit
    raise SystemExit(f"--reference {path}: no HYPIR/enhancer/sd2.py there and not a git directory")


def reference_commit(ref_dir: Path, given: str | None, found: str | None) -> str | None:
    if given:
        given_path = Path(given)
        return given_path.read_text().strip() if given_path.is_file() else given
    if found:
        return found
    for name in ("REFERENCE_COMMIT", "COMMIT", ".commit"):
        if (ref_dir / name).is_file():
            return (ref_dir / name).read_text().strip()
    return None


def import_reference(ref_dir: Path):
    sys.path.insert(0, str(ref_dir))
    before = set(sys.modules)
    from HYPIR.enhancer.sd2 import SD2Enhancer  # noqa: E402  (the reference's own code)
    from HYPIR.utils.common import sliding_windows  # noqa: E402
    tops = {m.split(".")[0] for m in set(sys.modules) - before}
    imported = sorted(m for m in tops if m != "HYPIR" and not m.startswith("_") and m not in sys.stdlib_module_names)
    return SD2Enhancer, sliding_windows, imported


# ---------------------------------------------------------------------------------------------------------------
# Random weights in the layouts the reference loads


def write_random_base(target: Path, size: str, seed: int, lora_rank: int, save_dtype: torch.dtype) -> dict:
    """A diffusers SD2.1 folder with random weights plus `lora.pth`; reused when `target` already holds it."""
    from hypir.bench.random_models import build_random_base, random_lora, write_config_folder

    marker = target / "reference_baseline.json"
    meta = {"model": size, "seed": seed, "lora_rank": lora_rank, "save_dtype": str(save_dtype),
            "lora_modules": REF_LORA_MODULES}
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        log(f"reusing random weights in {target}")
        return meta
    t0 = time.perf_counter()
    target.mkdir(parents=True, exist_ok=True)
    base = build_random_base(size, seed)
    write_config_folder(target, size)
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER_CONFIG, indent=2))
    index = json.loads((target / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (target / "model_index.json").write_text(json.dumps(index, indent=2))
    # Same names and shapes as the reference's `add_adapter(LoraConfig(target_modules=...))` makes (peft suffix match).
    lora = random_lora(base.unet, rank=lora_rank, seed=seed + 1)
    torch.save(lora, target / "lora.pth")
    n_lora = sum(v.numel() for v in lora.values())
    del lora
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(base, name).to(save_dtype)
        module.save_pretrained(target / name)
        setattr(base, name, None)
        del module
        gc.collect()
    marker.write_text(json.dumps(meta))
    log(f"wrote random {size} SD2.1 folder + rank-{lora_rank} LoRA ({len(REF_LORA_MODULES)} module names, "
        f"{n_lora / 1e6:.1f} M LoRA parameters) to {target} in {time.perf_counter() - t0:.1f} s")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_stderr(enabled: bool):
    """The reference always draws tqdm bars (progress=True is hard-coded); keep them out of the log."""
    if not enabled:
        yield
        return
    saved = sys.stderr
    sys.stderr = io.StringIO()
    try:
        yield
    finally:
        sys.stderr = saved


def count_tiles(sliding_windows, h: int, w: int, size: int, stride: int) -> int:
    return len(sliding_windows(h, w, size, stride))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, type=Path,
                        help="folder holding the reference's HYPIR/ package, or its git directory")
    parser.add_argument("--reference-commit", default=None,
                        help="commit string (or a file holding it); else read from git or DIR/REFERENCE_COMMIT")
    parser.add_argument("--model", default="sd21", choices=["sd21", "small", "tiny"],
                        help="random architecture from hypir.bench.random_models (sd21 = the real SD2.1-base shapes)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="the reference hard-codes bf16 (BaseEnhancer.weight_dtype); others override it")
    parser.add_argument("--input", type=int, default=512, help="square input side in pixels")
    parser.add_argument("--upscale", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--patch-size", type=int, default=None, help=f"enhance(patch_size=); default {REF_PATCH_SIZE}")
    parser.add_argument("--stride", type=int, default=None, help=f"enhance(stride=); default {REF_STRIDE}")
    parser.add_argument("--untiled", action="store_true",
                        help="patch_size = stride = output side: every stage runs as one tile")
    parser.add_argument("--model-t", type=int, default=REF_MODEL_T)
    parser.add_argument("--coeff-t", type=int, default=REF_COEFF_T)
    parser.add_argument("--lora-rank", type=int, default=REF_LORA_RANK)
    parser.add_argument("--prompt", default="", help="the EmptyCaptioner prompt by default (length is padded to 77)")
    parser.add_argument("--return-type", default="pt", choices=["pt", "np", "pil"],
                        help="enhance's default is pt; app.py/test.py ask for pil")
    parser.add_argument("--input-device", default="cpu", choices=["cpu", "device"],
                        help="cpu: as app.py/test.py pass it (the reference then resizes on the CPU); "
                             "device: already on --device")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=REF_SEED, help="torch.manual_seed before each call, as app.py does")
    parser.add_argument("--weights-seed", type=int, default=0)
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="where the random diffusers folder + LoRA go (kept, and reused on the next run); "
                             "default: a temporary folder, removed at the end")
    parser.add_argument("--show-progress", action="store_true", help="let the reference's tqdm bars through")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu for a smoke test)")
    dtype = DTYPES[args.dtype]

    with tempfile.TemporaryDirectory(prefix="hypir_refbase_") as scratch_name:
        scratch = Path(scratch_name)
        ref_dir, found_commit = locate_reference(args.reference, scratch)
        commit = reference_commit(ref_dir, args.reference_commit, found_commit)
        SD2Enhancer, sliding_windows, imported = import_reference(ref_dir)
        log(f"reference {ref_dir} (commit {commit}); third-party modules its import pulled in: {', '.join(imported)}")

        base_dir = args.base_dir or (scratch / "base")
        # Saved in the dtype the reference will cast to: identical loaded weights, half the disk for bf16.
        write_random_base(base_dir, args.model, args.weights_seed, args.lora_rank,
                          dtype if dtype != torch.float16 else torch.float32)

        enhancer = SD2Enhancer(
            base_model_path=str(base_dir),
            weight_path=str(base_dir / "lora.pth"),
            lora_modules=list(REF_LORA_MODULES),
            lora_rank=args.lora_rank,
            model_t=args.model_t,
            coeff_t=args.coeff_t,
            device=device,
        )
        ref_dtype = enhancer.weight_dtype
        enhancer.weight_dtype = dtype
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with quiet_stderr(not args.show_progress):
            enhancer.init_models()
        sync(device)
        load_s = time.perf_counter() - t0
        loaded_mib = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        log(f"reference models loaded in {load_s:.1f} s" + (f", {loaded_mib:.0f} MiB on the GPU" if loaded_mib else ""))

        side_in = args.input
        side_out = side_in * args.upscale
        if args.untiled:
            if args.patch_size or args.stride:
                raise SystemExit("--untiled sets patch size and stride itself")
            patch = stride = (side_out + 7) // 8 * 8
        else:
            patch = args.patch_size or REF_PATCH_SIZE
            stride = args.stride or REF_STRIDE
        # What enhance() will do with these sizes (square input): short side below the patch is resized up to it.
        side_work = side_out if side_out > patch else patch
        side_pad = (side_work + 7) // 8 * 8
        tiles = {"vae_encode": count_tiles(sliding_windows, side_pad, side_pad, patch, stride),
                 "unet": count_tiles(sliding_windows, side_pad // 8, side_pad // 8, patch // 8, stride // 8),
                 "vae_decode": count_tiles(sliding_windows, side_pad // 8, side_pad // 8, patch // 8, stride // 8)}

        gen = torch.Generator().manual_seed(args.weights_seed + 2)
        lq = torch.rand(args.batch, 3, side_in, side_in, generator=gen)
        if args.input_device == "device":
            lq = lq.to(device)

        def call():
            torch.manual_seed(args.seed)
            return enhancer.enhance(lq=lq, prompt=args.prompt, scale_by="factor", upscale=args.upscale,
                                    patch_size=patch, stride=stride, return_type=args.return_type)

        def timed(count):
            """`count` synchronised calls: their ms and the last output."""
            ms, result = [], None
            for _ in range(count):
                sync(device)
                t = time.perf_counter()
                result = call()
                sync(device)
                ms.append((time.perf_counter() - t) * 1e3)
            return ms, result

        with quiet_stderr(not args.show_progress):
            warm_ms, out = timed(args.warmup)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timings, last = timed(args.repeats)
            out = last if last is not None else out
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

        if out is None:  # --warmup 0 --repeats 0: a load-only check
            out_shape, finite = [args.batch, 3, side_out, side_out], None
        elif isinstance(out, torch.Tensor):
            out_shape, finite = list(out.shape), bool(torch.isfinite(out).all())
        elif isinstance(out, list):  # PIL
            out_shape, finite = [len(out), 3, out[0].height, out[0].width], True
        else:  # numpy (B, H, W, C) uint8
            out_shape, finite = [out.shape[0], out.shape[3], out.shape[1], out.shape[2]], True

        import diffusers
        import peft
        import transformers

        result = {
            "what": "XPixelGroup/HYPIR SD2Enhancer.enhance on random SD2.1-architecture weights",
            "reference_commit": commit,
            "reference_dir": str(args.reference),
            "reference_imports": imported,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "model": args.model,
            "dtype": args.dtype,
            "reference_dtype": str(ref_dtype).replace("torch.", ""),
            "dtype_overridden": dtype != ref_dtype,
            "batch": args.batch,
            "input_size": [side_in, side_in],
            "upscale": args.upscale,
            "output_size": out_shape[2:],
            "output_shape": out_shape,
            "output_finite": finite,
            "processed_size": [side_pad, side_pad],
            "tiled": not args.untiled,
            "patch_size": patch,
            "stride": stride,
            "latent_tile": patch // 8,
            "latent_stride": stride // 8,
            "tiles": tiles,
            "model_t": args.model_t,
            "coeff_t": args.coeff_t,
            "lora_rank": args.lora_rank,
            "lora_modules": REF_LORA_MODULES,
            "lora_merged": False,
            "prompt": args.prompt,
            "return_type": args.return_type,
            "input_device": "cpu" if args.input_device == "cpu" else str(device),
            "load_s": round(load_s, 2),
            "warmup_ms": [round(t, 2) for t in warm_ms],
            "repeats": args.repeats,
            "timings_ms": [round(t, 2) for t in timings],
            "median_ms": round(statistics.median(timings), 2) if timings else None,
            "min_ms": round(min(timings), 2) if timings else None,
            "mean_ms": round(statistics.fmean(timings), 2) if timings else None,
            "peak_mib": round(peak_mib, 1) if peak_mib is not None else None,
            "allocated_after_load_mib": round(loaded_mib, 1) if loaded_mib is not None else None,
            "notes": ("timed from the CPU input tensor to the returned output (pre/post-processing, tiling, "
                      "peft LoRA unmerged, scheduler.step, .cpu() of the result), device synchronised around each "
                      "call; peak = torch.cuda.max_memory_allocated over the timed calls (weights included)"),
        }
        log(f"{args.model} {args.dtype} {side_in}->{out_shape[2]}x{out_shape[3]} "
            f"{'untiled' if args.untiled else f'tiles {patch}/{stride}'} {tiles}: median {result['median_ms']} ms, "
            f"min {result['min_ms']} ms, all {result['timings_ms']}, peak {result['peak_mib']} MiB")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            log(f"wrote {args.json}")
        enhancer = None  # its models go before the scratch folder does (a `del` here read as undefined in call())
    return 0


if __name__ == "__main__":
    sys.exit(main())
