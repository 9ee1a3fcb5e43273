"""The `hypir` command: restore, doctor, bench, download.

Only the standard library and the settings are imported at start: `hypir --help`, `--version` and
`hypir download` never import torch. `hypir restore` checks everything it can before the models load: the
options, every output path (nothing is overwritten that this tool did not write), and every input, decoded,
with the memory its pass will need.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from . import config as _config
from .errors import BASE_FOLDER, first_line
from .settings import SETTINGS, RestoreOptions, check_setting

logger = logging.getLogger("hypir")


class CLIError(Exception):
    """A user-facing failure: each line printed after `hypir: error: `, exit status 1."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = lines


class Stopped(BaseException):
    """SIGTERM (or SIGHUP) during a command: unwinds like Ctrl-C, so no partial file is left."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _option(key: str, parse=int):
    """An argparse type that parses a flag's text and checks it as hypir_config.py's `key` is checked, so the
    message names the flag the user gave."""

    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        try:
            return check_setting(key, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _tile_size(text: str):
    return "auto" if text == "auto" else _option("tile_size")(text)


def _bounded(low: float, high: float, parse=float):
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (low <= value <= high):  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"must be in {low:g}..{high:g}, got {text}")
        return value
    return convert


FLAG_NAMES = {"use_flash_attention": "--flash-attention"}
FLAG_TYPES = {"upscale": _option("upscale", float), "lora_scale": _option("lora_scale", float), "tile_size": _tile_size}


def _add_setting_flag(group, setting, default) -> None:
    """One setting as a flag: --name-with-dashes (dest: the setting's name), its check as the type."""
    flag = FLAG_NAMES.get(setting.name, "--" + setting.name.replace("_", "-"))
    if isinstance(setting.default, bool):
        group.add_argument(flag, dest=setting.name, action=argparse.BooleanOptionalAction, default=default,
                           help=setting.help)
    elif setting.choices:
        group.add_argument(flag, dest=setting.name, choices=setting.choices, default=default, help=setting.help)
    elif isinstance(setting.default, str) and setting.name != "tile_size":
        group.add_argument(flag, dest=setting.name, default=default, help=setting.help)
    else:
        group.add_argument(flag, dest=setting.name, type=FLAG_TYPES.get(setting.name, _option(setting.name)),
                           default=default, help=f"{setting.help} (default {default})")


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
    r.add_argument("--base", default=None, metavar="PATH|ID",
                   help="SD2.1-base diffusers folder, single-file checkpoint or Hub id (default: found in the "
                        f"model folders, else {cfg['base_model_repo']} from the Hugging Face cache)")
    r.add_argument("--weights", default=None, metavar="PATH", help=f"HYPIR weights (default: {cfg['weights_file']} "
                                                                    "found in the model folders or the HF cache)")
    r.add_argument("--device", default="auto", help="auto, cuda, cuda:N, cpu or mps")
    r.add_argument("--devices", default=None, metavar="all|N|LIST",
                   help="restore with one worker process per device: all GPUs, the first N (N CPU workers without "
                        "a GPU), or a list such as cuda:0,cuda:2")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="restore on Ray, one actor per GPU of the cluster: 'local' (the default) starts Ray here, an "
                        "address joins a cluster (pip install 'comfyui-hypir[ray]')")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--long-side", type=_bounded(1, 65536, int), default=None, help="target longest side in pixels")
    for setting in SETTINGS:  # every setting of a pass and of loading is a flag, with hypir_config.py's default
        if setting.group in ("restore", "load"):
            _add_setting_flag(size if setting.name == "upscale" else r, setting, cfg[setting.name])
    r.add_argument("--vram-budget", type=_bounded(0.25, 65536), default=None, metavar="GIB", dest="vram_budget_gb",
                   help="tile to keep the whole process (models included) within this much memory (GPU memory, or "
                        "RAM on a CPU)")
    r.add_argument("--download", action="store_true", help="download missing models from the Hugging Face Hub")
    r.add_argument("--format", choices=["png", "jpeg", "webp", "tiff"], default="png",
                   help="output format for folder outputs (a single output file's suffix decides its own)")
    r.add_argument("--quality", type=_bounded(1, 100, int), default=95,
                   help="JPEG and WebP quality (100: lossless WebP); PNG and TIFF are lossless")
    r.add_argument("--overwrite", action="store_true",
                   help="replace existing files that hypir did not write (its own outputs are always replaced)")
    r.add_argument("--skip-existing", action="store_true", help="keep outputs that exist already (resume a run)")
    r.add_argument("--keep-going", action="store_true",
                   help="restore every good input even if some are bad; the run ends non-zero with a summary")

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
                   help="CUDA: the fast paths (eager, CUDA graphs) against diffusers' stock modules "
                        "at each --sizes, peak memory, PSNR against float32, a tiled run under --budget-gb")
    b.add_argument("--sizes", default="1024,2048", help="--speed: output sides, comma-separated")
    b.add_argument("--modes", default="eager,eager+graphs", help="--speed: modes, comma-separated")
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
# restore: inputs and outputs, checked before any work


@dataclass
class Job:
    source: Path
    target: Path


@dataclass
class RunPlan:
    jobs: list[Job] = field(default_factory=list)
    problems: list[tuple[Path | None, str]] = field(default_factory=list)  # (file or None, message)
    skipped: list[Job] = field(default_factory=list)  # --skip-existing
    notes: list[str] = field(default_factory=list)

    def fail(self, path: Path | None, message: str) -> None:
        self.problems.append((path, message))


def collect_inputs(inputs: list[str], run: RunPlan) -> tuple[list[Path], list[Path]]:
    """(files, folders) named on the command line; a folder gives its image files (not its subfolders, not
    hidden files such as macOS's ._ companions)."""
    from .images import INPUT_SUFFIXES

    files: list[Path] = []
    folders: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            folders.append(path)
            entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            found = [p for p in entries if p.suffix.lower() in INPUT_SUFFIXES]
            others = sorted({p.suffix.lower() or p.name for p in entries if p not in found})
            if others:
                heic = " (HEIC/HEIF photos: convert them to JPEG or PNG first)" if {".heic", ".heif"} & set(others) \
                    else ""
                run.notes.append(f"{path}: {len(entries) - len(found)} files that are not images of a supported kind "
                                 f"were left alone ({', '.join(others)}){heic}")
            if not found:
                run.fail(path, f"folder holds no images ({', '.join(INPUT_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            run.fail(path, "no such file or folder")
    return files, folders


def plan_outputs(args, run: RunPlan) -> None:
    """Pair every input with its output, refusing anything that could lose a file: an output that is an input,
    a folder restored into itself, an existing file this tool did not write (unless --overwrite)."""
    from .images import FORMAT_SUFFIX, OUTPUT_FORMATS, is_hypir_output

    files, folders = collect_inputs(args.inputs, run)
    out = Path(args.output)
    single = len(args.inputs) == 1 and len(files) == 1 and not folders
    if single and not out.is_dir() and out.suffix:
        if out.suffix.lower() not in OUTPUT_FORMATS:
            run.fail(out, "the output file must end in .png, .jpg, .webp or .tif (the format follows the suffix), "
                          "or name a folder")
            return
        targets = [out]
    else:
        if out.exists() and not out.is_dir():
            run.fail(out, "several inputs or a folder need an output folder, and this is a file")
            return
        for folder in folders:
            if folder.resolve() == out.resolve():
                run.fail(folder, "restoring a folder into itself would put outputs among the originals; choose "
                                 "another output folder")
                return
        suffix = FORMAT_SUFFIX[args.format]
        targets = [out / (f.stem + suffix) for f in files]
        seen: dict[Path, Path] = {}
        for source, target in zip(files, targets):
            if target in seen:
                run.fail(source, f"{seen[target].name} and {source.name} would both be written to {target}; restore "
                                 f"them into separate folders")
            seen.setdefault(target, source)
    inputs = {f.resolve() for f in files}
    for source, target in zip(files, targets):
        if target.resolve() in inputs or (target.exists() and os.path.samefile(target, source)):
            run.fail(source, f"its output {target} is an input file; nothing is ever written over an original: "
                             f"choose another output")
        elif target.is_dir():
            run.fail(source, f"its output {target} is a folder")
        elif target.exists() and args.skip_existing:
            run.skipped.append(Job(source, target))
        elif target.exists() and not args.overwrite and not is_hypir_output(target):
            run.fail(source, f"its output {target} exists and was not written by hypir; it is kept (--overwrite "
                             f"replaces it, --skip-existing keeps it and goes on)")
        else:
            run.jobs.append(Job(source, target))


def check_inputs(args, options: RestoreOptions, run: RunPlan, device, element_bytes: int) -> None:
    """Decode every input (in threads), check that its output format can hold it and that its pass fits in
    memory; failing files move from the jobs to the problems."""
    from .images import ImageError, check_output, read_image
    from .pipeline import memory_available, plan_size
    from .planning import PlanError, model_bytes

    available, where = memory_available(device, options.vram_budget_gb)
    if available is not None:
        available -= model_bytes(element_bytes)  # the models are not loaded yet
        where += f", less {model_bytes(element_bytes) / 2**30:.1f} GiB for the models"

    def check(job: Job) -> str | None:
        try:
            picture = read_image(job.source)
            h, w = picture.size
            plan = plan_size(h, w, 1, options, device, element_bytes, memory=(available, where))
            check_output(job.target, plan.output_size, picture.channels, len(picture.frames))
            del picture
            return None
        except (ImageError, PlanError) as exc:
            return str(exc).removeprefix(f"{job.source}: ")
        except MemoryError:
            return "not enough memory to decode it"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        verdicts = list(pool.map(check, run.jobs))
    good = []
    for job, problem in zip(run.jobs, verdicts):
        if problem is None:
            good.append(job)
        else:
            run.fail(job.source, problem)
    run.jobs = good


def _problem_lines(run: RunPlan) -> list[str]:
    return [f"{path}: {message}" if path is not None else message for path, message in run.problems]


def cmd_restore(args) -> int:
    options = RestoreOptions.from_settings(vars(args))
    run = RunPlan()
    plan_outputs(args, run)
    for note in run.notes:
        logger.info("[HYPIR] %s", note)
    if run.problems and not run.jobs and not run.skipped:
        raise CLIError(*_problem_lines(run), *(["nothing was restored"] if len(run.problems) > 1 else []))
    if run.problems and not args.keep_going:
        raise CLIError(*_problem_lines(run), f"{len(run.problems)} problem(s) found before any work; nothing was "
                                             f"restored (--keep-going restores the other inputs)")

    from .loading import resolve_device, resolve_dtype
    from .model_files import resolve_model_files

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    failed_before = len(run.problems)
    check_inputs(args, options, run, device, dtype.itemsize)
    if len(run.problems) > failed_before and not args.keep_going:
        total = len(run.problems) + len(run.jobs) + len(run.skipped)
        summary = [] if total == 1 else [f"{len(run.problems)} of {total} inputs cannot be restored; nothing was "
                                         f"restored (--keep-going restores the others)"]
        raise CLIError(*_problem_lines(run), *summary)
    for line in _problem_lines(run):  # --keep-going: said now, and again in the closing summary
        print(f"hypir: skipping {line}", file=sys.stderr)
    if run.skipped:
        logger.info("[HYPIR] %d outputs exist already and are kept (--skip-existing)", len(run.skipped))
    if not run.jobs:
        if run.problems:
            raise CLIError(f"none of the {len(run.problems)} inputs can be restored")
        return 0

    from .pipeline import HYPIRPipeline
    from .streaming import spare_the_cpu

    model_files = resolve_model_files(args.base, args.weights, allow_download=args.download)
    if args.devices or args.ray:
        failures = _problem_lines(run) + restore_with_workers(model_files, run.jobs, options, args)
    else:
        pipe = HYPIRPipeline.from_files(model_files.base, model_files.weights, device, dtype,
                                        lora_scale=args.lora_scale, allow_download=args.download)
        spare_the_cpu(device)
        failures = _problem_lines(run) + restore_jobs(pipe, run.jobs, options, args)
    if failures:
        done = len(run.jobs) - (len(failures) - len(run.problems))
        raise CLIError(*failures, f"{len(failures)} of {len(failures) + done} inputs failed; {done} restored"
                                  + (f", {len(run.skipped)} kept" if run.skipped else ""))
    return 0


def restore_jobs(pipe, jobs: list[Job], options: RestoreOptions, args) -> list[str]:
    """Read, restore (every frame) and write each job under a progress bar that messages never print over,
    reading ahead of the GPU and writing behind it (streaming.restore_stream); returns the failures of
    --keep-going, and raises the first failure otherwise."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .pipeline import Callbacks
    from .streaming import restore_stream

    failures: list[str] = []
    with logging_redirect_tqdm(loggers=[logger]), tqdm(total=len(jobs), unit="image", desc="HYPIR") as bar:
        callbacks = Callbacks(progress=lambda stage, done, total: bar.set_postfix_str(f"{stage} {done}/{total}",
                                                                                      refresh=True))
        tasks = ((i, job.source, job.target) for i, job in enumerate(jobs))
        for outcome in restore_stream(pipe, tasks, options, args.quality, callbacks):
            if outcome.ok:
                tqdm.write(f"{outcome.source} -> {outcome.target}"
                           f"{f' ({outcome.frames} frames)' if outcome.frames > 1 else ''}: "
                           f"{outcome.status}")
                for note in outcome.notes:
                    tqdm.write(f"  note: {note}")
            else:
                if not args.keep_going or args.debug:
                    raise CLIError(f"{outcome.source}: {first_line(outcome.error)}") from outcome.error
                failures.append(f"{outcome.source}: {first_line(outcome.error)}")
                tqdm.write(f"hypir: error: {failures[-1]}", file=sys.stderr)
            bar.update(1)
    return failures


def restore_with_workers(model_files, jobs: list[Job], options: RestoreOptions, args) -> list[str]:
    """--devices: one worker process per device (distributed.run_pool); --ray: one actor per GPU of a Ray
    cluster (distributed.run_ray). Returns the failures, each named."""
    from tqdm import tqdm

    from .distributed import WorkerSetup, parse_devices, run_pool, run_ray
    from .streaming import default_writers

    try:
        devices = parse_devices(args.devices or "all")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    threads = 0
    if devices[0] == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // len(devices))
    setup = WorkerSetup(str(model_files.base), str(model_files.weights), args.dtype, args.lora_scale, options,
                        args.quality, threads, default_writers(len(devices)))
    failures: list[str] = []
    with tqdm(total=len(jobs), unit="image", desc="HYPIR on Ray" if args.ray else f"HYPIR x{len(devices)}") as bar:
        def report(outcome, task) -> None:
            if outcome.ok:
                tqdm.write(f"{task[0]} -> {task[1]}: {outcome.message}")
            else:
                failures.append(f"{task[0]}: {outcome.message}")
                tqdm.write(f"hypir: error: {failures[-1]}", file=sys.stderr)
            bar.update(1)

        tasks = [(j.source, j.target) for j in jobs]
        if args.ray:
            outcomes = run_ray(tasks, setup, args.ray, len(devices) if args.devices else None, report, quiet=True)
        else:
            outcomes = run_pool(tasks, devices, setup, report, sizes=[j.source.stat().st_size for j in jobs])
    if failures and not args.keep_going and len(failures) == len(outcomes):
        raise CLIError(*failures)
    return failures


def cmd_doctor(args) -> int:
    import torch

    from .attention import (REGISTRY, AttentionBackend, AttentionPolicy, AttentionRouter, flash_off_reason,
                            tuned_candidates)
    from .attention.timing_store import CACHE_DIR_ENV, store_for
    from .kernels import triton_available
    from .loading import resolve_device, resolve_dtype
    from .model_files import find_models, search_dirs

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
        why = router.why_not(backend, 64)
        spec = REGISTRY[backend]
        state = f"available ({spec.version()})" if why is None else f"not available: {why}"
        print(f"  {backend.value:<15} {state}")
    backend = router.choose("unet.attn1", 64)
    flash = REGISTRY[backend].flash_class
    print(f"auto picks for UNet attention: {backend.value}"
          + ("" if flash else f" (FlashAttention not used: {flash_off_reason(router)})"))
    print(f"auto picks for VAE attention (head_dim 512): {router.choose('vae.mid', 512).value}")
    if device.type == "cuda" and router.per_shape:
        tuned = ", ".join(b.value for b in tuned_candidates(lambda b: router.why_not(b, 64) is None))
        print(f"  (those are the fixed order; on this GPU the first call of each attention shape times {tuned} "
              f"and runs the fastest)")
        store = store_for(device)
        print(f"  timings kept across runs in: {store.path if store else f'nowhere (${CACHE_DIR_ENV} is empty)'}")
    fused = "Triton" if device.type == "cuda" and triton_available() else \
        ("PyTorch (no Triton: pip install triton)" if device.type == "cuda" else "PyTorch (CPU)")
    print(f"fused GroupNorm+SiLU and bias kernels: {fused}")
    print("model folders searched: " + ", ".join(str(d) for d in search_dirs()) + ", Hugging Face cache")
    weights, base = find_models()
    print(f"  HYPIR weights ({cfg['weights_file']}): {weights or 'not found'}")
    print(f"  base model ({cfg['base_model_file']}, a {BASE_FOLDER} folder, or {cfg['base_model_repo']} in the "
          f"cache): {base or 'not found'}")
    if weights is None or base is None:
        print("  missing models: `hypir download` puts them in ./models (or $HYPIR_MODELS_DIR), where restore finds "
              "them; or pass --weights/--base to restore")
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

    from .model_files import search_dirs

    folder = Path(args.dir)
    if not args.base_only:
        print(f"HYPIR weights: {download_weights(folder)}")
    if not args.weights_only:
        print(f"base model: {download_base(folder / BASE_FOLDER)}")
    if folder.resolve() not in {d.resolve() for d in search_dirs()}:
        print(f"hypir restore looks in ./models and $HYPIR_MODELS_DIR: set HYPIR_MODELS_DIR={folder.resolve()} to use "
              f"these, or pass --weights and --base")
    return 0


COMMANDS = {"restore": cmd_restore, "doctor": cmd_doctor, "bench": cmd_bench, "download": cmd_download}


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except Exception as exc:  # noqa: BLE001 - a broken hypir_config.py is reported in one line
        print(f"hypir: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    # Only hypir's own logger is configured (the root logger is left alone, so huggingface_hub, which has its
    # own handler, is not printed twice), and only for this call.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.debug else logging.INFO)
    previous = _catch_stop_signals()
    try:
        return COMMANDS[args.command](args)
    except (KeyboardInterrupt, Stopped) as exc:
        name = f" by {exc}" if isinstance(exc, Stopped) else ""
        print(f"hypir: interrupted{name}; finished outputs are complete and nothing partial was left", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Stopped) else 130
    except CLIError as exc:
        if args.debug:
            raise
        for line in exc.lines:
            print(f"hypir: error: {line}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line and a non-zero status
        if args.debug:
            raise
        print(f"hypir: error: {first_line(exc)}", file=sys.stderr)
        return 1
    finally:
        _restore_signals(previous)
        logger.removeHandler(handler)
        logger.setLevel(level)


def _catch_stop_signals() -> dict:
    """SIGTERM and SIGHUP unwind like Ctrl-C (temporary files are removed on the way out). Only in the main
    thread, and given back when the command ends."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            previous[name] = signal.signal(getattr(signal, name), stop)
    return previous


def _restore_signals(previous: dict) -> None:
    for name, handler in previous.items():
        signal.signal(getattr(signal, name), handler)
