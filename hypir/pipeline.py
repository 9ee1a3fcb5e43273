"""The HYPIR restore pass: `restore(models, images, options, callbacks)`, readable top to bottom as the method.

upscale -> short side to 512 -> pad to 8 -> VAE encode (seeded sample or mode) -> one UNet call at
model_t -> x0 with the scheduler's alphas at coeff_t -> VAE decode -> crop -> resize back ->
wavelet colour fix -> clamp. Sizes, tiles and memory are planned before (planning.py); the kernels each
module runs are chosen per call (attention/, fused_blocks.py); what the models gather while running is in
runtime.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import (AttentionPolicy, AttentionReport, AttentionRouter, DeviceInfo, build_report,
                        text_encoder_implementation, use_router)
from .colorfix import wavelet_color_fix
from .cuda_graphs import weights_signature
from .fused_blocks import fused_kernels
from .kernels import (fused_softmax, triton_at_every_size, triton_available, triton_failure,
                      why_graphs_cannot_hold_triton)
from .loading import HYPIRModels
from .planning import MIN_TILE, PATCH, VAE_SCALE, PassPlan, auto_stride, available_ram, gib, output_size, plan_pass, \
    round_to, short_side_size
from .runtime import MODEL_CACHE, Runtime, release_graphs_on, runtime_of
from .settings import RestoreOptions
from .tiling import run_tiled

logger = logging.getLogger("hypir")

MAX_OOM_RETRIES = 4


class NonFiniteError(RuntimeError):
    """A stage of the pass produced NaN or infinite values: nothing is returned as if it were a result."""


@dataclass
class Callbacks:
    """Hooks for front ends: progress per stage and tile, and an interrupt check that raises."""

    progress: Callable[[str, int, int], None] | None = None  # (stage, done, total)
    check_interrupt: Callable[[], None] | None = None

    def step(self, stage: str, done: int, total: int) -> None:
        if self.check_interrupt is not None:
            self.check_interrupt()
        if self.progress is not None:
            self.progress(stage, done, total)


@dataclass
class RestoreResult:
    images: torch.Tensor  # (B, C, H, W) float32 in [0, 1] with the input's channels, on the model's device
    report: AttentionReport
    seconds: float
    stage_seconds: dict[str, float]
    tile_size: int | None  # None: one pass
    tile_stride: int | None
    processed_size: tuple[int, int]  # (h1, w1), the size the VAE and UNet saw
    speedups: str = ""  # what else ran on the GPU: "Triton norms, UNet CUDA graph"
    fp32_vae: tuple[str, ...] = ()  # VAE stages recomputed in float32 after an fp16 overflow ("encode", "decode")
    pending: Callable[[], None] | None = None  # restore(wait=False): raises a non-finite stage's error when done

    def status_line(self) -> str:
        b, _, h, w = self.images.shape
        tiles = f"tiles {self.tile_size}/{self.tile_stride}" if self.tile_size else "one pass"
        roles = ", ".join(f"{k} {v}" for k, v in self.report.backends_by_role().items())
        extra = f" | {self.speedups}" if self.speedups else ""
        if self.fp32_vae:
            extra += f" | VAE {' and '.join(self.fp32_vae)} recomputed in fp32 (fp16 overflowed)"
        return f"{self.report.status_line()} | {roles} | {w}x{h} x{b} | {tiles}{extra} | {self.seconds:.3f} s"


# ----------------------------------------------------------------------------------------------
# The pass


@torch.no_grad()
def restore(models: HYPIRModels, images: torch.Tensor, options: RestoreOptions = RestoreOptions(),
            callbacks: Callbacks | None = None, device_info: DeviceInfo | None = None,
            wait: bool = True) -> RestoreResult:
    """Restore a (B, C, H, W) batch in [0, 1] (C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA) with loaded models.
    wait=False returns once the pass is queued on the GPU: the result's `pending` raises the first non-finite
    stage's error once the GPU is done (HYPIRPipeline.launch_frame), and its `seconds` is not known yet (NaN)."""
    check_images(images)
    callbacks = callbacks or Callbacks()
    runtime = runtime_of(models)
    plan = plan_for(models, images, options)
    policy = AttentionPolicy(options.attention, options.use_flash_attention, per_shape=options.attention_autotune)
    router = AttentionRouter(policy, models.device, models.dtype, device_info)
    replays_before = runtime.unet_graphs.replays, runtime.vae_graphs.replays
    start = time.perf_counter()
    for attempt in range(MAX_OOM_RETRIES + 1):
        try:
            with on_device(models.device):
                out, stages, fp32_vae, checks = _one_pass(models, runtime, images, plan, options, router,
                                                          callbacks)
            break
        except torch.cuda.OutOfMemoryError as exc:
            current = plan.tile or max(plan.padded_size)
            if not options.oom_retry:
                raise
            if attempt == MAX_OOM_RETRIES or (current <= MIN_TILE and plan.tiles_per_batch == 1):
                raise torch.cuda.OutOfMemoryError(
                    f"out of GPU memory even with tiles of {current} px, one at a time (a {plan.describe()}). Free "
                    f"VRAM (close other programs, unload other models), restore a smaller batch, or use fp16/bf16"
                ) from exc
            why = " ".join(str(exc).split())[:240]  # PyTorch's: what it tried to allocate, what was free
        # Out of the except block, the failed pass's tensors (held by the traceback) are free. The CUDA graphs of
        # the models on this GPU go too: their pools' memory stays reserved, and no eager allocation can use it.
        # Where some were given back, the same plan is tried again first, without graphs (a capture would take
        # that memory again); then tiles sent together go one at a time, in the size the planner found fastest
        # (halving it instead ran a 4096 output in tiles of 512, 8.4 s, in ComfyUI on a 12 GiB card, where tiles
        # of 1024 four at a time ran out); then tiles, halved each time.
        dropped = release_graphs_on(models.device)
        torch.cuda.empty_cache()
        if dropped:
            options = options.replace(cuda_graphs=False)
            logger.warning("[HYPIR] out of GPU memory (%s); retrying without CUDA graphs (%d given back)", why,
                           dropped)
            continue
        if plan.tile and plan.tiles_per_batch > 1:
            limit = runtime.tiles_ran_out(plan.tile, plan.tiles_per_batch)
            together = plan.tiles_per_batch
            plan = plan_for(models, images, options.replace(tile_size=plan.tile, tile_stride=plan.stride,
                                                            vram_budget_gb=None), max_group=1)
            logger.warning("[HYPIR] out of GPU memory with %d tiles of %d px together (%s); retrying them one at a "
                           "time; later passes send at most %d together", together, plan.tile, why, limit)
            continue
        tile = round_to(current // 2, 64)
        plan = plan_for(models, images, options.replace(tile_size=tile, tile_stride=auto_stride(tile),
                                                        vram_budget_gb=None), max_group=1)
        logger.warning("[HYPIR] out of GPU memory (%s); retrying with tiles of %d px", why, plan.tile)
    out = restore_channels(images, out)
    pending = None
    if wait:
        checks.raise_first()
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        seconds = time.perf_counter() - start
    else:
        pending, seconds = checks.deferred(), float("nan")
    report = build_report(router, text_encoder_implementation(router))
    speedups = _speedups(models, options, runtime.unet_graphs.replays > replays_before[0],
                         runtime.vae_graphs.replays > replays_before[1])
    return RestoreResult(out, report, seconds, stages, plan.tile, plan.stride, plan.processed_size, speedups,
                         tuple(stage for stage in ("encode", "decode") if stage in fp32_vae), pending)


def on_device(device: torch.device):
    """The models' GPU as the current CUDA device for the pass (restored after it): CUDA graph capture, Triton
    launches and current-stream calls use the current device, which for models on cuda:1 is otherwise cuda:0
    (the capture then fails and Triton kernels run on the other GPU, reading across the link)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _one_pass(models: HYPIRModels, runtime: Runtime, images: torch.Tensor, plan: PassPlan, options: RestoreOptions,
              router: AttentionRouter, callbacks: Callbacks
              ) -> tuple[torch.Tensor, dict[str, float], set[str], FiniteChecks]:
    """The method's steps, in the order of the reference implementation (XPixelGroup/HYPIR's enhancer); also
    returns the VAE stages recomputed in fp32 and the stages' NaN/infinity checks, not read yet."""
    device, dtype = models.device, models.dtype
    clock = _StageClock(device if options.sync_stages else None)
    tiles = _Tiles(plan, callbacks)
    fp32_vae: set[str] = set()
    checks = FiniteChecks()

    # 1. Upscale; this is the colour reference and fixes the output size.
    with clock.stage("prepare"):
        source = images.to(device=device, dtype=torch.float32)
        check_input = _input_check(checks, source)
        ref = resize_to_output(as_rgb(source), options.upscale, options.long_side)
        h0, w0 = ref.shape[2:]
        # 2. Short side up to the reference's patch size.
        lq = resize_short_side(ref, PATCH) if min(h0, w0) <= PATCH else ref
        # 3. [-1, 1], padded to a multiple of 8.
        h1, w1 = lq.shape[2:]
        x = lq * 2 - 1
        if h1 % VAE_SCALE or w1 % VAE_SCALE:  # a pad of nothing would still copy the image
            x = F.pad(x, (0, -w1 % VAE_SCALE, 0, -h1 % VAE_SCALE))
        if (h0, w0) != plan.output_size or tuple(x.shape[2:]) != plan.padded_size:
            raise RuntimeError(f"internal: pass sizes {(h0, w0)}/{tuple(x.shape[2:])} differ from the plan {plan}")

    vae_graph = _vae_graph(models, runtime, router, options, plan)
    with use_router(router), fused_kernels(options.fused_kernels), fused_softmax(options.fused_softmax):
        # 4. VAE encode; the sample's noise is drawn per tile in grid order, as the reference does after
        #    torch.manual_seed(seed).
        with clock.stage("encode"):
            generator = (torch.Generator(device=device).manual_seed(options.seed) if options.latent == "sample"
                         else None)
            encode = functools.partial(vae_stage, models, runtime, "encode", fp32_stages=fp32_vae, checks=checks,
                                       graph=vae_graph, launched=check_input)
            z = tiles.run("encode", encode, x, 1 / VAE_SCALE, 4,
                          per_tile=lambda moments, index: _latent(moments, generator, dtype))
            require_finite(checks, z, "the VAE encoder's latent", dtype)

        # 5. One UNet call at model_t on the scaled latent.
        with clock.stage("unet"):
            scaling = models.vae.config.scaling_factor
            z_in = z * scaling
            text = runtime.prompt_embedding(models, options.prompt, text_encoder_implementation(router)).to(dtype)
            unet = _unet_call(models, runtime, router, options, text)
            eps = require_finite(checks, tiles.run("unet", unet, z_in, 1, 4, latent=True),
                                 "the UNet's noise prediction", dtype)

        # 6. x0 from the scheduler's alphas at coeff_t (blending eps then stepping equals stepping per tile then
        #    blending: the step is linear). 7. VAE decode.
        with clock.stage("decode"):
            abar = float(models.alphas_cumprod[options.coeff_t])
            z_out = (z_in - math.sqrt(1 - abar) * eps) / math.sqrt(abar) / scaling
            decode = functools.partial(vae_stage, models, runtime, "decode", fp32_stages=fp32_vae, checks=checks,
                                       graph=vae_graph)
            out = tiles.run("decode", decode, z_out, VAE_SCALE, 3, latent=True)
            require_finite(checks, out, "the VAE decoder's image", dtype)

    with clock.stage("finish"):
        # 7. (cont.) Crop the padding, back to [0, 1] in float32 at the output size (a resize to the same size is
        #    the identity: bicubic weights at whole pixels are 0, 1, 0, 0).
        out = (out[:, :, :h1, :w1].float() + 1) / 2
        if (h1, w1) != (h0, w0):
            out = F.interpolate(out, size=(h0, w0), mode="bicubic", antialias=True)
        # 8. Colour fix: the restored high frequencies on the upscaled input's low frequencies.
        if options.color_fix:
            out = wavelet_color_fix(out, ref)
        # 9. Clamp.
        out = require_finite(checks, out, "the restored image", dtype).clamp(0, 1)
    return out, clock.stages, fp32_vae, checks


# ----------------------------------------------------------------------------------------------
# The steps' parts


def _input_check(checks: FiniteChecks, source: torch.Tensor) -> Callable[[], None]:
    """The input's NaN/infinity check, on its copy on the pass's device: on a CPU, made at once (nothing is
    computed from a broken input); on a GPU, returned to be queued once the encoder's first work is (its first
    kernels then wait for nothing but its launch: the check's five launches delayed them by 0.23 ms of CPU at a
    1024 output on the H200 machine). It is still the first check queued, so it is the error reported. A CPU
    image (ComfyUI's) is checked on the GPU: a count on the CPU took 6 ms for a 1024x1024 image and 52 ms at 2048
    on this project's 2-core build machine."""
    if source.device.type == "cpu":
        checks.add(source, input_not_finite)
        return lambda: None
    queued: list[bool] = []

    def queue() -> None:
        if not queued:
            queued.append(True)
            checks.add(source, input_not_finite)
    return queue


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    b, c, h, w = images.shape
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"empty input: batch {b}, size {w}x{h}")
    if c not in CHANNELS:
        raise ValueError(f"images must have 1 (grey), 2 (grey and alpha), 3 (RGB) or 4 (RGBA) channels, got {c}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got {images.dtype}")


def input_not_finite(bad: int, total: int) -> Exception:
    return ValueError(f"the input holds {bad} NaN or infinite values (of {total}); the node or file that produced it "
                      f"is broken: nothing was restored")


class FiniteChecks:
    """The pass's NaN/infinity checks without stopping the GPU between stages: each check of a GPU tensor queues
    a count of its non-finite values, and `raise_first` reads them at the end of the pass (where the output is
    read anyway) and raises the first one's error. A CPU tensor is checked at once. A stage that went
    non-finite makes the rest of the pass compute on it before the error; nothing is returned either way. (A
    read per stage kept the GPU idle while the next stage was launched: 10 of 63 ms at 1024 on an H200.)"""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, int, Callable[[int, int], Exception]]] = []

    def add(self, tensor: torch.Tensor, error: Callable[[int, int], Exception]) -> torch.Tensor:
        bad = torch.isfinite(tensor).logical_not_().sum()
        if tensor.device.type == "cpu":
            if int(bad):
                raise error(int(bad), tensor.numel())
        else:
            self._pending.append((bad, tensor.numel(), error))
        return tensor

    def deferred(self) -> Callable[[], None]:
        """Queue the counts' copy to the host without waiting; the returned call raises the first error once the
        GPU has done the copy (wait for an event recorded after this first)."""
        pending, counts = self._taken()
        if counts is None:
            return lambda: None
        cuda = counts.device.type == "cuda"  # MPS needs a synchronisation before a non-blocking copy is read
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=cuda)
        host.copy_(counts, non_blocking=cuda)
        return lambda: _raise_first_counted(host.tolist(), pending)

    def raise_first(self) -> None:
        pending, counts = self._taken()
        if counts is not None:
            _raise_first_counted(counts.tolist(), pending)  # the one read

    def _taken(self) -> tuple[list, torch.Tensor | None]:
        """The queued checks, taken off the queue, and their counts stacked on their device (None: none)."""
        pending, self._pending = self._pending, []
        if not pending:
            return pending, None
        device = pending[0][0].device
        return pending, torch.stack([bad.to(device) for bad, _, _ in pending])


def _raise_first_counted(counts: list[int], pending: list) -> None:
    for count, (_, total, error) in zip(counts, pending):
        if count:
            raise error(count, total)


def plan_for(models: HYPIRModels, images: torch.Tensor, options: RestoreOptions, max_group: int | None = None
             ) -> PassPlan:
    """The pass's sizes, tiles and memory (planning.plan_pass) within what this device has now, sending no more
    tiles together than ran out of memory with these models before."""
    return plan_size(images.shape[2], images.shape[3], images.shape[0], options, models.device,
                     models.dtype.itemsize, max_group=max_group,
                     group_limits=runtime_of(models).tile_group_limits())


def plan_size(height: int, width: int, batch: int, options: RestoreOptions, device: torch.device,
              element_bytes: int, memory: tuple[int | None, str] | None = None, max_group: int | None = None,
              group_limits: dict[int, int] | None = None) -> PassPlan:
    """plan_for by sizes, before the models are loaded (the command line checks every input first); `memory` is
    (bytes available, where) when the caller has worked it out, else the device's now."""
    available, where = memory or memory_available(device, options.vram_budget_gb)
    if device.type != "cuda":
        max_group = 1  # sending tiles together fills a GPU; on a CPU it only holds more memory
    return plan_pass(height, width, batch, upscale=options.upscale, long_side=options.long_side,
                     element_bytes=element_bytes, available_bytes=available, tile_size=options.tile_size,
                     tile_stride=options.tile_stride, max_group=max_group, where=where, group_limits=group_limits)


def memory_available(device: torch.device, vram_budget_gb: float | None = None) -> tuple[int | None, str]:
    """Bytes a pass may use beside what is already allocated (the resident weights), and where they are:
    the budget less what is allocated, else the GPU's free memory, else the system's available RAM."""
    held, reserved = allocator_bytes(device) if device.type == "cuda" else (0, 0)
    if vram_budget_gb:
        return int(vram_budget_gb * 2**30) - held, (f"a memory budget of {vram_budget_gb:g} GiB (of which the models "
                                                    f"hold {gib(held)})")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + reserved - held, f"{device} ({torch.cuda.get_device_name(device)})"
    return available_ram(), "this machine's available memory"


def allocator_bytes(device: torch.device) -> tuple[int, int]:
    """(allocated, reserved) bytes of PyTorch's CUDA allocator on this GPU, from one read of its statistics
    (torch.cuda.memory_allocated and memory_reserved each flatten all of them into a new dict first)."""
    stats = torch.cuda.memory_stats_as_nested_dict(device)
    current = lambda name: stats.get(name, {}).get("all", {}).get("current", 0)  # noqa: E731
    return current("allocated_bytes"), current("reserved_bytes")


class _StageClock:
    """Seconds per stage; with a device, the GPU is synchronised at the end of each stage so the times are
    exact. Each stage is also a torch.profiler range, "hypir.<stage>" (benchmarks attribute GPU time and idle
    gaps to stages by them; outside a profiler it costs microseconds)."""

    def __init__(self, sync_device: torch.device | None):
        self.sync = sync_device if sync_device is not None and sync_device.type == "cuda" else None
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        with torch.profiler.record_function(f"hypir.{name}"):
            yield
        if self.sync is not None:
            torch.cuda.synchronize(self.sync)
        self.stages[name] = time.perf_counter() - start


class _Tiles:
    """Runs a stage over the plan's tiles (one tile: the whole image), reporting progress per group of tiles."""

    def __init__(self, plan: PassPlan, callbacks: Callbacks):
        self.callbacks = callbacks
        self.count, self.group = plan.tiles, plan.tiles_per_batch
        self.tile = plan.tile or max(plan.padded_size)
        self.stride = plan.stride or self.tile

    def run(self, stage: str, fn, x: torch.Tensor, scale: float, channels: int, latent: bool = False,
            per_tile=None) -> torch.Tensor:
        tile, stride = (self.tile // VAE_SCALE, self.stride // VAE_SCALE) if latent else (self.tile, self.stride)
        done = [0]

        def on_tile(n: int) -> None:
            done[0] += n
            self.callbacks.step(stage, done[0], self.count)

        self.callbacks.step(stage, 0, self.count)
        return run_tiled(fn, x, tile, stride, scale, channels, self.group, on_tile, per_tile)


def _latent(moments: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    """The encoder's moments (mean, std) to a latent: the mean, or a sample with the seeded generator."""
    mean, std = moments.chunk(2, dim=1)
    if generator is None:
        return mean.float()
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=dtype)
    return mean.float() + std.float() * noise.float()


def _vae_forward(vae: torch.nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
    if stage == "encode":
        dist = vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)
    return vae.decode(x).sample


def vae_stage(models: HYPIRModels, runtime: Runtime, stage: str, x: torch.Tensor,
              fp32_stages: set[str] | None = None, checks: FiniteChecks | None = None,
              graph: Callable[[str, Callable, torch.Tensor], torch.Tensor] | None = None,
              launched: Callable[[], None] | None = None) -> torch.Tensor:
    """VAE encode (moments: mean and std) or decode in the model dtype, eagerly or through `graph` (see
    _vae_graph); `launched()` is called once its work is queued. In fp16 the SD VAE can overflow (older GPUs,
    Apple): a non-finite result is recomputed with a float32 copy of the VAE, with a warning, and the stage is
    added to `fp32_stages`. Before that, the pass's pending checks are read (`checks`): a non-finite input or UNet
    output is that error, not an overflow of this stage."""
    vae = models.vae
    forward = functools.partial(_vae_forward, vae, stage)
    x = x.to(models.dtype)
    out = graph(stage, forward, x) if graph is not None else forward(x)
    if launched is not None:
        launched()
    if models.dtype == torch.float16 and not torch.isfinite(out).all():
        if checks is not None:
            checks.raise_first()  # this read waits for nothing more: the one above already did
        logger.warning("[HYPIR] VAE %s overflowed in fp16; recomputing it in fp32", stage)
        out = _vae_forward(runtime.vae_fp32(vae), stage, x.float())
        if fp32_stages is not None:
            fp32_stages.add(stage)
    return out


# The VAE stages are replayed from CUDA graphs up to this many pixels per call: there its ~180 (encoder) and
# ~280 (decoder) kernels are short enough that launching them kept the GPU waiting (the encoder: 8.2 of 19.7
# ms idle at a 1024 output on an H200, benchmarks/levers.py's per-stage account); at 2048 they are not (under
# 1 %), and a graph would only hold memory.
VAE_GRAPH_MAX_PIXELS = 1024 * 1024
# ...and only where the memory a pass may use is this many times its working memory: each of the up to four VAE
# graphs (encoder and decoder of the last two sizes) keeps up to one stage's working memory while it lives (a
# 1024 pass plans 1.6 GiB: VAE graphs from about 6.4 GiB free beside the weights, a 12 GiB card and up).
VAE_GRAPH_MEMORY_PASSES = 4


def _vae_graph(models: HYPIRModels, runtime: Runtime, router: AttentionRouter, options: RestoreOptions,
               plan: PassPlan) -> Callable[[str, Callable, torch.Tensor], torch.Tensor] | None:
    """A VAE stage replayed from a CUDA graph when its shape repeats, for passes whose VAE calls are at most
    VAE_GRAPH_MAX_PIXELS and that have VAE_GRAPH_MEMORY_PASSES times their working memory (None: eager)."""
    h, w = (plan.tile, plan.tile) if plan.tile else plan.padded_size
    if not (_graphed(models, options) and plan.batch * plan.tiles_per_batch * h * w <= VAE_GRAPH_MAX_PIXELS):
        return None
    available = plan.available_bytes  # measured as the pass was planned, a moment ago
    if available is not None and available < VAE_GRAPH_MEMORY_PASSES * plan.activation_bytes:
        return None
    key = _graph_key(router, options)
    weights = weights_signature(models.vae)

    def call(stage: str, forward: Callable, x: torch.Tensor) -> torch.Tensor:
        prefix = {"encode": "vae.encoder.", "decode": "vae.decoder."}[stage]  # its attention modules' names
        return runtime.vae_graphs((stage, key), forward, [x], weights=weights,
                                  snapshot=lambda: router.snapshot(prefix), restore=router.restore)
    return call


def _graphed(models: HYPIRModels, options: RestoreOptions) -> bool:
    return options.cuda_graphs and models.device.type == "cuda" and not _graphs_blocked(options)


def _graph_key(router: AttentionRouter, options: RestoreOptions) -> tuple:
    """What a graph's kernels depend on beside its inputs' shapes: the attention policy and the fused kernels."""
    return repr(router.policy), options.fused_kernels, options.fused_softmax


TRITON_IN_GRAPHS_AT_EVERY_SIZE = True  # benchmarks/levers.py switches it off to measure what it saves


def _unet_call(models: HYPIRModels, runtime: Runtime, router: AttentionRouter, options: RestoreOptions,
               text: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """eps for a batch of latent tiles: eager, or replayed from a CUDA graph when the shape repeats."""
    unet = models.unet
    graphed = _graphed(models, options)
    every_size = graphed and TRITON_IN_GRAPHS_AT_EVERY_SIZE

    def forward(sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with triton_at_every_size(every_size):
            return unet(sample, timestep, encoder_hidden_states=text).sample

    timestep = torch.full((1,), options.model_t, device=models.device)  # a fill: no copy from the host to wait for
    key = (*_graph_key(router, options), every_size)
    weights = weights_signature(unet) if graphed else ()

    def call(tiles: torch.Tensor) -> torch.Tensor:
        n = tiles.shape[0]
        inputs = [tiles.to(models.dtype), timestep.expand(n), text.expand(n, -1, -1)]
        if not graphed:
            return forward(*inputs)
        return runtime.unet_graphs(key, forward, inputs, weights=weights,
                                   snapshot=lambda: router.snapshot("unet."), restore=router.restore)
    return call


def _graphs_blocked(options: RestoreOptions) -> str | None:
    """Why the UNet runs without a CUDA graph although they are on: a graph could not hold the Triton kernels
    it may launch (the fused norms, or the fused softmax of the matmul attention backend) under cudaMallocAsync,
    and the Triton kernels save more than a graph does (on an H200 at 1024: 111 ms without the graph against
    221 ms for a graph on PyTorch's norms, `benchmarks/cards_check.py allocator`)."""
    if (options.fused_kernels or options.fused_softmax) and triton_available() and not triton_failure():
        return why_graphs_cannot_hold_triton()
    return None


def _speedups(models: HYPIRModels, options: RestoreOptions, replayed: bool, vae_replayed: bool = False) -> str:
    """The status line's account of the fused kernels and CUDA graphs (GPU only)."""
    if models.device.type != "cuda":
        return ""
    if not options.fused_kernels:
        norms = "PyTorch norms (fused kernels off)"
    elif not triton_available():
        norms = "PyTorch norms (Triton not installed)"
    elif triton_failure():
        norms = "PyTorch norms (Triton failed)"
    else:
        norms = "Triton norms"
    parts = [norms]
    blocked = _graphs_blocked(options) if options.cuda_graphs else None
    if blocked:
        parts.append(f"no UNet CUDA graph ({blocked} cannot hold Triton kernels; ComfyUI: --disable-cuda-malloc)")
    elif options.cuda_graphs:
        parts.append("UNet CUDA graph" if replayed else "UNet CUDA graph from the next run of this size")
        if vae_replayed:
            parts.append("VAE CUDA graphs")
    return ", ".join(parts)


def require_finite(checks: FiniteChecks, tensor: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    """Stop the pass (at its end: FiniteChecks) when a stage produced NaN or infinite values (damaged weights,
    an overflow)."""
    def error(bad: int, total: int) -> Exception:
        return NonFiniteError(
            f"{what} holds {bad} NaN or infinite values (of {total}) in {str(dtype).removeprefix('torch.')}: "
            f"nothing was restored. Try the fp32 dtype (--dtype fp32); if that fails too, the model files are "
            f"damaged: download them again")
    return checks.add(tensor, error)


# ----------------------------------------------------------------------------------------------
# Sizes (planning.py) and channels


def resize_to_output(images: torch.Tensor, upscale: float | None, long_side: int | None) -> torch.Tensor:
    if long_side:
        h, w = output_size(images.shape[2], images.shape[3], None, long_side)
        return F.interpolate(images, size=(h, w), mode="bicubic")
    return F.interpolate(images, scale_factor=upscale, mode="bicubic")


def resize_short_side(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=short_side_size(*images.shape[2:], size), mode="bicubic", antialias=True)


CHANNELS = {1: "grey", 2: "grey and alpha", 3: "RGB", 4: "RGBA"}


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey (with or without alpha) is restored as RGB, RGBA as its RGB part."""
    return images[:, :1].expand(-1, 3, -1, -1) if images.shape[1] <= 2 else images[:, :3]


def restore_channels(source: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """Give the restored RGB the source's channels: grey back to luma (ITU-R BT.601), alpha resized beside."""
    channels = source.shape[1]
    if channels <= 2:
        # Without a tensor made from Python numbers on the GPU: that copy would wait for the queued pass.
        restored = restored[:, :1] * 0.299 + restored[:, 1:2] * 0.587 + restored[:, 2:3] * 0.114
    if channels in (2, 4):
        alpha = source[:, -1:].to(device=restored.device, dtype=torch.float32)
        alpha = F.interpolate(alpha, size=restored.shape[2:], mode="bicubic", antialias=True).clamp(0, 1)
        return torch.cat([restored, alpha], dim=1)
    return restored


# ----------------------------------------------------------------------------------------------
# The object front ends hold


class HYPIRPipeline:
    """Loaded models and a call that restores with keyword options (RestoreOptions' fields). Cheap to create:
    models come from the cache, and changing an option never reloads them."""

    def __init__(self, models: HYPIRModels, device_info: DeviceInfo | None = None):
        self.models = models
        self.device_info = device_info or DeviceInfo.of(models.device)
        self._last_console: tuple | None = None

    @classmethod
    def from_files(cls, base: str, weights: str, device="auto", dtype="auto", lora_scale=1.0,
                   allow_download=False, **kwargs) -> "HYPIRPipeline":
        return cls(MODEL_CACHE.get(base, weights, device, dtype, lora_scale, allow_download, **kwargs))

    def encode_prompt(self, prompt: str, implementation: str = "sdpa") -> torch.Tensor:
        """(1, 77, hidden) text embedding, cached per prompt and attention implementation."""
        return runtime_of(self.models).prompt_embedding(self.models, prompt, implementation)

    def plan(self, images: torch.Tensor, options: RestoreOptions) -> PassPlan:
        return plan_for(self.models, images, options)

    def __call__(self, images: torch.Tensor, *, options: RestoreOptions | None = None,
                 callbacks: Callbacks | None = None, **kwargs) -> RestoreResult:
        """restore() with these models: `options`, or RestoreOptions built from the keyword arguments."""
        if options is None:  # None means "the default", as for a keyword left out
            options = RestoreOptions(**{k: v for k, v in kwargs.items() if v is not None})
        elif kwargs:
            options = options.replace(**kwargs)
        result = restore(self.models, images, options, callbacks, self.device_info)
        self._log_report(result.report)
        return result

    def launch_frame(self, frame, options: RestoreOptions, callbacks: Callbacks | None = None) -> "FrameInFlight":
        """Queue the restoration of one (C, H, W) float32 numpy frame and its copy back to the host without
        waiting for the GPU: a caller that launches the next frame before collecting this one keeps the GPU
        busy while the CPU prepares the next pass (streaming.restore_stream does). On a CUDA GPU only; on other
        devices the frame is restored at once (its FrameInFlight is already done)."""
        start = time.perf_counter()
        device = self.models.device
        if device.type != "cuda":
            restored, result = self.restore_frames([frame], options, callbacks)
            return FrameInFlight(restored[0], None, lambda: None, result, start)
        with on_device(device):  # the copies and the event on the models' GPU's stream, whatever GPU is current
            # From pinned memory, without waiting: a blocking copy would wait for the pass queued before this one.
            images = torch.from_numpy(frame)[None].pin_memory().to(device, non_blocking=True)
            result = restore(self.models, images, options, callbacks, self.device_info, wait=False)
            self._log_report(result.report)
            host = torch.empty(result.images.shape[1:], dtype=torch.float32, pin_memory=True)
            host.copy_(result.images[0], non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
        # The GPU output is not held while the next pass is planned (the planner counts allocated memory): its
        # block is reused only by work queued after the copy.
        return FrameInFlight(host, done, result.pending, replace(result, images=host[None], pending=None), start)

    def restore_frames(self, frames: list, options: RestoreOptions, callbacks: Callbacks | None = None
                       ) -> tuple[list, RestoreResult]:
        """Restore each (C, H, W) float32 numpy frame of an image file (one, or an animation's); returns the
        restored frames as numpy arrays and the last frame's result."""
        restored, result = [], None
        for frame in frames:
            frame = torch.from_numpy(frame)[None].to(self.models.device)  # its checks run there, not on the CPU
            result = self(frame, options=options, callbacks=callbacks)
            restored.append(result.images[0].float().cpu().numpy())
        return restored, result

    def _log_report(self, report: AttentionReport) -> None:
        key = (report.status_line(), tuple(sorted(report.backends_by_role().items())))
        if key != self._last_console:
            self._last_console = key
            for line in report.console_lines():
                logger.info("[HYPIR] %s", line)


@dataclass
class FrameInFlight:
    """A frame queued by HYPIRPipeline.launch_frame: `collect` waits for the GPU, raises a non-finite stage's
    error, and returns the restored (C, H, W) float32 numpy frame and the result (its `seconds` from launch to
    done, which includes waiting behind the pass queued before it)."""
    frame: object  # a numpy array, or a pinned CPU tensor filled once `done` has passed
    done: torch.cuda.Event | None
    pending: Callable[[], None]
    result: RestoreResult
    start: float

    def ready(self) -> bool:
        """Whether collect would return without waiting."""
        return self.done is None or self.done.query()

    def collect(self) -> tuple[object, RestoreResult]:
        if self.done is not None:
            self.done.synchronize()
        self.pending()
        frame = self.frame
        if isinstance(frame, torch.Tensor):  # out of pinned memory: the host allocator keeps every pinned block
            frame = frame.numpy().copy()  # for reuse, and outputs wait in the writers' queue
        return frame, replace(self.result, seconds=time.perf_counter() - self.start)


def restore_files(images: torch.Tensor, base: str, weights: str, device="auto", dtype="auto", **options
                  ) -> RestoreResult:
    """One-call API: load (cached) and restore."""
    return HYPIRPipeline.from_files(base, weights, device, dtype)(images, **options)
