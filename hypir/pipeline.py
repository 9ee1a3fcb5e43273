"""The HYPIR restore pass, readable top to bottom (REFERENCE.md section 1).

upscale -> short side to 512 -> pad to 8 -> VAE encode (seeded sample or mode) -> one UNet call at
model_t -> x0 with the scheduler's alphas at coeff_t -> VAE decode -> crop -> resize back ->
wavelet colour fix -> clamp.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import config as _config
from .attention import AttentionBackend, AttentionPolicy, AttentionReport, AttentionRouter, DeviceInfo, build_report, \
    text_encoder_implementation, use_router
from .colorfix import wavelet_color_fix
from .cuda_graphs import weights_signature
from .fused_blocks import fused_kernels
from .kernels import triton_available, triton_failure
from .loading import MODEL_CACHE, HYPIRModels
from .planning import MIN_TILE, PATCH, VAE_SCALE, PassPlan, available_ram, gib, output_size, plan_pass, \
    round_to, short_side_size
from .tiling import run_tiled

logger = logging.getLogger("hypir")

MAX_OOM_RETRIES = 3


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


@dataclass(frozen=True)
class SpeedOptions:
    """How a pass runs on a GPU; none changes results beyond bf16/fp16 rounding (see hypir_config.py)."""

    fused_kernels: bool = True  # Triton GroupNorm+SiLU / bias kernels (fused_blocks.py)
    cuda_graphs: bool = True  # the UNet call replayed as a CUDA graph when its shape repeats (cuda_graphs.py)
    torch_compile: bool = False  # UNet and VAE through torch.compile


@dataclass
class RestoreResult:
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1], on the model's device
    report: AttentionReport
    seconds: float
    stage_seconds: dict[str, float]
    tile_size: int | None  # None: one pass
    tile_stride: int | None
    processed_size: tuple[int, int]  # (h1, w1), the size the VAE and UNet saw
    speedups: str = ""  # what else ran on the GPU: "Triton norms, UNet CUDA graph, torch.compile"

    def status_line(self) -> str:
        b, _, h, w = self.images.shape
        tiles = f"tiles {self.tile_size}/{self.tile_stride}" if self.tile_size else "one pass"
        roles = ", ".join(f"{k} {v}" for k, v in self.report.backends_by_role().items())
        extra = f" | {self.speedups}" if self.speedups else ""
        return f"{self.report.status_line()} | {roles} | {w}x{h} x{b} | {tiles}{extra} | {self.seconds:.2f} s"


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
        weights = torch.tensor([0.299, 0.587, 0.114], device=restored.device).view(1, 3, 1, 1)
        restored = (restored * weights).sum(dim=1, keepdim=True)
    if channels in (2, 4):
        alpha = source[:, -1:].to(device=restored.device, dtype=torch.float32)
        alpha = F.interpolate(alpha, size=restored.shape[2:], mode="bicubic", antialias=True).clamp(0, 1)
        return torch.cat([restored, alpha], dim=1)
    return restored


def require_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    """Stop the pass when a stage produced NaN or infinite values (damaged weights, an overflow)."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteError(
            f"{what} holds {bad} NaN or infinite values (of {tensor.numel()}) in {str(dtype).removeprefix('torch.')}: "
            f"nothing was restored. Try the fp32 dtype (--dtype fp32); if that fails too, the model files are "
            f"damaged: download them again")
    return tensor


# ----------------------------------------------------------------------------------------------
# Memory available to a pass (planning.py plans within it)


def memory_available(device: torch.device, vram_budget_gb: float | None = None) -> tuple[int | None, str]:
    """Bytes a pass may use beside what is already allocated (the resident weights), and where they are:
    the budget less what is allocated, else the GPU's free memory, else the system's available RAM."""
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if vram_budget_gb:
        return int(vram_budget_gb * 2**30) - held, (f"a memory budget of {vram_budget_gb:g} GiB (of which the models "
                                                    f"hold {gib(held)})")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - held, f"{device} ({torch.cuda.get_device_name(device)})"
    return available_ram(), "this machine's available memory"


# ----------------------------------------------------------------------------------------------
# VAE stages with the fp16 overflow guard


def _vae_forward(vae: torch.nn.Module, stage: str, x: torch.Tensor) -> torch.Tensor:
    if stage == "encode":
        dist = vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)
    return vae.decode(x).sample


def vae_stage(models: HYPIRModels, stage: str, x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """VAE encode (moments: mean and std) or decode in the model dtype. In fp16 the SD VAE can overflow
    (older GPUs, Apple): a non-finite result is recomputed with a float32 copy of the VAE, with a warning."""
    forward = functools.partial(_vae_forward, models.vae, stage)
    if compiled:
        forward = models.compiled(f"vae.{stage}", forward)
    out = forward(x.to(models.dtype))
    if models.dtype == torch.float16 and not torch.isfinite(out).all():
        logger.warning("[HYPIR] VAE %s overflowed in fp16; recomputing it in fp32", stage)
        out = _vae_forward(models.vae_fp32(), stage, x.float())
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline


def _check_t(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 999:
        raise ValueError(f"{name} must be an integer in 1..999, got {value!r}")
    return value


class HYPIRPipeline:
    """Restores batches with loaded HYPIR models. Cheap to create; models come from the cache."""

    def __init__(self, models: HYPIRModels, device_info: DeviceInfo | None = None):
        self.models = models
        self.device_info = device_info or DeviceInfo.of(models.device)
        self._last_console: tuple | None = None

    @classmethod
    def from_files(cls, base: str, weights: str, device="auto", dtype="auto", lora_scale=1.0,
                   allow_download=False, **kwargs) -> "HYPIRPipeline":
        return cls(MODEL_CACHE.get(base, weights, device, dtype, lora_scale, allow_download, **kwargs))

    # --- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str, implementation: str = "sdpa") -> torch.Tensor:
        """(1, 77, hidden) text embedding, cached per prompt and attention implementation."""
        m = self.models
        key = (prompt, implementation)
        with m.text_lock:
            if key not in m.prompt_cache:
                tokens = m.tokenizer(prompt, padding="max_length", max_length=m.tokenizer.model_max_length,
                                     truncation=False, return_tensors="pt").input_ids
                if tokens.shape[1] > m.tokenizer.model_max_length:
                    logger.warning("[HYPIR] prompt has %d tokens; only the first %d are used", tokens.shape[1],
                                   m.tokenizer.model_max_length)
                    tokens = m.tokenizer(prompt, padding="max_length", max_length=m.tokenizer.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids
                previous = m.text_encoder.config._attn_implementation
                m.text_encoder.config._attn_implementation = implementation
                try:
                    embedding = m.text_encoder(tokens.to(m.device))[0]
                finally:
                    m.text_encoder.config._attn_implementation = previous
                if len(m.prompt_cache) >= 16:
                    m.prompt_cache.pop(next(iter(m.prompt_cache)))
                m.prompt_cache[key] = embedding
            return m.prompt_cache[key]

    # --- restore ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        *,
        upscale: float | None = None,
        long_side: int | None = None,
        prompt: str | None = None,
        seed: int | None = None,
        model_t: int | None = None,
        coeff_t: int | None = None,
        tile_size: int | str | None = None,
        tile_stride: int | None = None,
        latent: str | None = None,
        color_fix: bool | None = None,
        attention: str | None = None,
        use_flash_attention: bool | None = None,
        vram_budget_gb: float | None = None,
        fused_kernels: bool | None = None,
        cuda_graphs: bool | None = None,
        torch_compile: bool | None = None,
        oom_retry: bool = True,
        callbacks: Callbacks | None = None,
        sync_stages: bool = False,
    ) -> RestoreResult:
        defaults = _config.load_config()
        pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
        if long_side is None and upscale is None:
            upscale = float(defaults["upscale"])
        prompt = pick(prompt, "prompt")
        seed = int(pick(seed, "seed"))
        model_t = _check_t("model_t", pick(model_t, "model_t"))
        coeff_t = _check_t("coeff_t", pick(coeff_t, "coeff_t"))
        tile_size = pick(tile_size, "tile_size")
        tile_stride = pick(tile_stride, "tile_stride")
        latent = pick(latent, "latent")
        color_fix = bool(pick(color_fix, "color_fix"))
        policy = AttentionPolicy(pick(attention, "attention"), bool(pick(use_flash_attention, "use_flash_attention")))
        speed = SpeedOptions(bool(pick(fused_kernels, "fused_kernels")), bool(pick(cuda_graphs, "cuda_graphs")),
                             bool(pick(torch_compile, "torch_compile")))
        callbacks = callbacks or Callbacks()
        self._check_inputs(images, upscale, long_side, latent, tile_size, tile_stride)
        forced_tile = None if tile_size in (None, "auto") else int(tile_size)
        plan = self.plan(images, upscale, long_side, forced_tile, int(tile_stride), vram_budget_gb)

        router = AttentionRouter(policy, self.models.device, self.models.dtype, self.device_info)
        replays_before = self.models.unet_graphs.replays
        start = time.perf_counter()
        attempt = 0
        while True:
            try:
                result = self._restore(images, plan, upscale, long_side, prompt, seed, model_t, coeff_t, latent,
                                       color_fix, router, callbacks, sync_stages, speed)
                break
            except torch.cuda.OutOfMemoryError as exc:
                if not oom_retry:
                    raise
                attempt += 1
                current = plan.tile or max(plan.padded_size)
                if attempt > MAX_OOM_RETRIES or current <= MIN_TILE:
                    raise torch.cuda.OutOfMemoryError(
                        f"out of GPU memory even with tiles of {current} px, one at a time (a {plan.describe()}). "
                        f"Free VRAM (close other programs, unload other models), restore a smaller batch, or use "
                        f"fp16/bf16") from exc
                tile = round_to(current // 2, 64)
                plan = self.plan(images, upscale, long_side, tile, round_to(tile * 3 // 4, 64), None, max_group=1)
            # Outside the except block, the failed pass's tensors (held by the traceback) are free.
            torch.cuda.empty_cache()
            logger.warning("[HYPIR] out of GPU memory; retrying with tiles of %d px", plan.tile)
        images_out, stages = result
        images_out = restore_channels(images, images_out)
        if self.models.device.type == "cuda":
            torch.cuda.synchronize(self.models.device)
        seconds = time.perf_counter() - start
        report = build_report(router, text_encoder_implementation(router))
        self._log_report(report)
        speedups = self._speedups(speed, self.models.unet_graphs.replays > replays_before)
        return RestoreResult(images_out, report, seconds, stages, plan.tile, plan.stride, plan.processed_size,
                             speedups)

    def _speedups(self, speed: SpeedOptions, replayed: bool) -> str:
        """The status line's account of the fused kernels, CUDA graphs and torch.compile (GPU only)."""
        if self.models.device.type != "cuda":
            return ""
        if not speed.fused_kernels:
            norms = "PyTorch norms (fused kernels off)"
        elif not triton_available():
            norms = "PyTorch norms (Triton not installed)"
        elif triton_failure():
            norms = "PyTorch norms (Triton failed)"
        else:
            norms = "Triton norms"
        parts = [norms]
        if speed.cuda_graphs:
            parts.append("UNet CUDA graph" if replayed else "UNet CUDA graph from the next run of this size")
        if speed.torch_compile:
            parts.append("torch.compile")
        return ", ".join(parts)

    def _check_inputs(self, images, upscale, long_side, latent, tile_size, tile_stride):
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        b, c, h, w = images.shape
        if b == 0 or h == 0 or w == 0:
            raise ValueError(f"empty input: batch {b}, size {w}x{h}")
        if c not in CHANNELS:
            raise ValueError(f"images must have 1 (grey), 2 (grey and alpha), 3 (RGB) or 4 (RGBA) channels, got {c}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype}")
        bad = (~torch.isfinite(images)).sum().item()
        if bad:
            raise ValueError(f"the input holds {bad} NaN or infinite values (of {images.numel()}); the node or file "
                             f"that produced it is broken: nothing was restored")
        if long_side is not None and (not isinstance(long_side, int) or long_side < 1):
            raise ValueError(f"long_side must be a positive integer, got {long_side!r}")
        if long_side is None and not (isinstance(upscale, (int, float)) and 0 < upscale <= 16):
            raise ValueError(f"upscale must be a number in (0, 16], got {upscale!r}")
        if latent not in ("sample", "mode"):
            raise ValueError(f"latent must be 'sample' or 'mode', got {latent!r}")
        if tile_size not in (None, "auto"):
            if int(tile_size) < 64 or int(tile_size) % 8:
                raise ValueError(f"tile_size must be 'auto' or a multiple of 8 of at least 64 px, got {tile_size!r}")
            if int(tile_stride) < 8 or int(tile_stride) % 8:
                raise ValueError(f"tile_stride must be a multiple of 8 of at least 8 px, got {tile_stride!r}")

    def plan(self, images: torch.Tensor, upscale: float | None, long_side: int | None, tile_size: int | None = None,
             tile_stride: int | None = None, vram_budget_gb: float | None = None, max_group: int | None = None
             ) -> PassPlan:
        """The pass's sizes, tiles and memory (planning.plan_pass) within what this device has now."""
        available, where = memory_available(self.models.device, vram_budget_gb)
        if self.models.device.type != "cuda":
            max_group = 1  # sending tiles together fills a GPU; on a CPU it only holds more memory
        return plan_pass(images.shape[2], images.shape[3], images.shape[0], upscale=upscale, long_side=long_side,
                         element_bytes=self.models.dtype.itemsize, available_bytes=available, tile_size=tile_size,
                         tile_stride=tile_stride, max_group=max_group, where=where)

    def _restore(self, images, plan: PassPlan, upscale, long_side, prompt, seed, model_t, coeff_t, latent,
                 color_fix, router, callbacks, sync_stages, speed=SpeedOptions()):
        m = self.models
        device, dtype = m.device, m.dtype
        stages: dict[str, float] = {}
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            if sync_stages and device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            stages[name] = now - clock[0]
            clock[0] = now

        # 1. Upscale; this is the colour reference and fixes the output size.
        ref = resize_to_output(as_rgb(images).to(device=device, dtype=torch.float32), upscale, long_side)
        h0, w0 = ref.shape[2:]
        # 2. Short side up to the reference's patch size.
        lq = resize_short_side(ref, PATCH) if min(h0, w0) <= PATCH else ref
        # 3. [-1, 1], padded to a multiple of 8.
        h1, w1 = lq.shape[2:]
        x = F.pad(lq * 2 - 1, (0, -w1 % VAE_SCALE, 0, -h1 % VAE_SCALE))
        if (h0, w0) != plan.output_size or tuple(x.shape[2:]) != plan.padded_size:
            raise RuntimeError(f"internal: pass sizes {(h0, w0)}/{tuple(x.shape[2:])} differ from the plan {plan}")
        px_tile = plan.tile or max(plan.padded_size)
        px_stride = plan.stride or px_tile
        lat_tile, lat_stride = px_tile // VAE_SCALE, px_stride // VAE_SCALE
        n_tiles, group = plan.tiles, plan.tiles_per_batch
        lap("prepare")

        def progress(stage):
            done = [0]

            def on_tile(n):
                done[0] += n
                callbacks.step(stage, done[0], n_tiles)
            return on_tile

        on_gpu = device.type == "cuda"
        compiled = speed.torch_compile and on_gpu
        with use_router(router), fused_kernels(speed.fused_kernels):
            # 4. VAE encode; the sample's noise is drawn per tile in grid order, as the reference does
            #    after torch.manual_seed(seed).
            callbacks.step("encode", 0, n_tiles)
            generator = torch.Generator(device=device).manual_seed(seed) if latent == "sample" else None

            def encode(tiles: torch.Tensor) -> torch.Tensor:
                return vae_stage(m, "encode", tiles, compiled)

            def to_latent(moments: torch.Tensor, index: int) -> torch.Tensor:
                mean, std = moments.chunk(2, dim=1)
                if generator is None:
                    return mean.float()
                noise = torch.randn(mean.shape, generator=generator, device=device, dtype=dtype)
                return mean.float() + std.float() * noise.float()

            z = run_tiled(encode, x, px_tile, px_stride, 1 / VAE_SCALE, 4, group, progress("encode"), to_latent)
            require_finite(z, "the VAE encoder's latent", dtype)
            lap("encode")

            # 5. One UNet call at model_t on the scaled latent.
            scaling = m.vae.config.scaling_factor
            z_in = z * scaling
            text = self.encode_prompt(prompt, text_encoder_implementation(router)).to(dtype)
            timestep = torch.tensor([model_t], device=device)

            unet_forward = m.compiled("unet", _unet_forward(m.unet)) if compiled else _unet_forward(m.unet)
            graphs_key = (repr(router.policy), speed) if speed.cuda_graphs and on_gpu else None
            unet_weights = weights_signature(m.unet) if graphs_key is not None else ()

            def unet(tiles: torch.Tensor) -> torch.Tensor:
                n = tiles.shape[0]
                inputs = [tiles.to(dtype), timestep.expand(n), text.expand(n, -1, -1)]
                if graphs_key is None:
                    return unet_forward(*inputs)
                return m.unet_graphs(graphs_key, unet_forward, inputs, weights=unet_weights,
                                     snapshot=lambda: router.snapshot("unet."), restore=router.restore)

            callbacks.step("unet", 0, n_tiles)
            eps = require_finite(run_tiled(unet, z_in, lat_tile, lat_stride, 1, 4, group, progress("unet")),
                                 "the UNet's noise prediction", dtype)
            lap("unet")

            # 6. x0 from the scheduler's alphas at coeff_t (blending eps then stepping equals stepping
            #    per tile then blending: the step is linear).
            abar = float(m.alphas_cumprod[coeff_t])
            z_out = (z_in - math.sqrt(1 - abar) * eps) / math.sqrt(abar) / scaling

            # 7. VAE decode, crop the padding, back to [0, 1] at the output size.
            callbacks.step("decode", 0, n_tiles)
            out = run_tiled(lambda t: vae_stage(m, "decode", t, compiled), z_out, lat_tile, lat_stride, VAE_SCALE, 3,
                            group, progress("decode"))
            require_finite(out, "the VAE decoder's image", dtype)
            lap("decode")
        if compiled:  # the compiled graphs call SDPA directly (HYPIRAttnProcessor): report that
            for model in (m.unet, m.vae):
                for processor in model.attn_processors.values():
                    router.ran.setdefault(processor.name, AttentionBackend.SDPA)
        out = (out[:, :, :h1, :w1] + 1) / 2
        out = F.interpolate(out, size=(h0, w0), mode="bicubic", antialias=True)
        # 8. Colour fix: the restored high frequencies on the upscaled input's low frequencies.
        if color_fix:
            out = wavelet_color_fix(out, ref)
        # 9. Clamp.
        out = require_finite(out, "the restored image", dtype).clamp(0, 1)
        lap("finish")
        return out, stages

    def _log_report(self, report: AttentionReport) -> None:
        key = (report.status_line(), tuple(sorted(report.backends_by_role().items())))
        if key != self._last_console:
            self._last_console = key
            for line in report.console_lines():
                logger.info("[HYPIR] %s", line)


def _unet_forward(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    def forward(sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return unet(sample, timestep, encoder_hidden_states=text).sample
    return forward


def restore(images: torch.Tensor, base: str, weights: str, device="auto", dtype="auto", **options) -> RestoreResult:
    """One-call API: load (cached) and restore."""
    return HYPIRPipeline.from_files(base, weights, device, dtype)(images, **options)
