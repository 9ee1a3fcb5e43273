"""Sizes and memory of one restore pass, planned before it runs: one plan for the pipeline, the command
line's check of every input before the models load, and the ComfyUI node's request to ComfyUI.

The pass works at the *processed* size, not the output size: the output (input x upscale, or a target long
side) is raised to a short side of 512 (the reference's patch size) when it is smaller, so a thin strip
becomes very long. Memory is planned on that size. No torch import here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

PATCH = 512  # the reference's patch size: short sides up to this are processed at 512
VAE_SCALE = 8
MIN_TILE = 256  # pixels; the smallest tile the planner (and the out-of-memory retry) goes down to
MAX_TILE = 2048
HEADROOM = 0.85  # share of the free memory a pass may plan to use
# Parameters of the SD2.1 UNet (865.9M with the LoRA merged), VAE (83.7M) and OpenCLIP-H text encoder (340.4M).
MODEL_PARAMETERS = 1_290_000_000


class PlanError(ValueError):
    """A pass that cannot fit, with the numbers."""


def output_size(height: int, width: int, upscale: float | None, long_side: int | None) -> tuple[int, int]:
    """The output (height, width) the reference produces for this input and scaling."""
    if long_side:
        if height >= width:
            return long_side, int(width * (long_side / height))
        return int(height * (long_side / width)), long_side
    return int(math.floor(height * upscale)), int(math.floor(width * upscale))


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side at `size`, the other side int()-truncated, as the reference."""
    if height == width:
        return size, size
    if height < width:
        return size, int(width * (size / height))
    return int(height * (size / width)), size


def processed_size(out_height: int, out_width: int) -> tuple[int, int]:
    """The size the VAE and UNet see for an output of this size (before padding to a multiple of 8)."""
    if min(out_height, out_width) <= PATCH:
        return short_side_size(out_height, out_width, PATCH)
    return out_height, out_width


def round_to(n: float, multiple: int) -> int:
    return max(multiple, int(math.floor(n / multiple)) * multiple)


def default_stride(tile: int, stride: int | None) -> int:
    """A stride at or beyond the tile size leaves no overlap (a seam grid) or gaps: it becomes half the tile,
    the reference's 512/256 ratio."""
    if stride is None or stride >= tile:
        return round_to(tile // 2, 8)
    return stride


# ----------------------------------------------------------------------------------------------
# Memory estimates


def pass_bytes(height: int, width: int, batch: int, element_bytes: int) -> int:
    """Peak activation bytes of the models over one untiled pass at this (padded, processed) size: 760 elements
    a pixel. Measured on an H200 with SD2.1-architecture weights in bf16 (benchmarks/cards_check.py memory):
    1406 bytes a pixel at 1024, 2048 and 4096, untiled and in tiles; 760 leaves 8 % of headroom."""
    return int(height * width * batch * 760 * element_bytes)


def buffer_bytes(batch: int, output: tuple[int, int], processed: tuple[int, int]) -> int:
    """The float32 RGB image buffers held beside the models' activations: three planes at the output size (the
    upscaled input, the blended result and its weights) and two at the processed size (the padded pass input,
    the decoded image); measured as 4.3 planes where the two sizes are equal."""
    return batch * 3 * 4 * (3 * output[0] * output[1] + 2 * processed[0] * processed[1])


def finish_bytes(batch: int, output: tuple[int, int]) -> int:
    """The colour fix's buffers after the models ran: about eight float32 RGB planes at the output size."""
    return batch * 3 * 4 * 8 * output[0] * output[1]


def model_bytes(element_bytes: int) -> int:
    """The resident weights of the SD2.1 UNet, VAE and text encoder in this precision."""
    return MODEL_PARAMETERS * element_bytes


def available_ram() -> int | None:
    """Memory the system can give this process now (MemAvailable on Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PassPlan:
    input_size: tuple[int, int]  # (height, width) of the image given
    output_size: tuple[int, int]  # (h0, w0)
    processed_size: tuple[int, int]  # (h1, w1): the size the VAE and UNet see
    padded_size: tuple[int, int]  # processed, padded to a multiple of 8
    batch: int
    tile: int | None  # pixels of the processed image; None: one pass
    stride: int | None
    tiles: int
    tiles_per_batch: int  # tiles sent through the models together
    activation_bytes: int  # the models' working memory for one group of tiles (or the one pass)
    buffer_bytes: int  # the float32 image-sized buffers held meanwhile
    finish_bytes: int  # the colour fix's buffers, after the models ran
    available_bytes: int | None = None  # what the pass could use when it was planned (None: unknown)

    @property
    def total_bytes(self) -> int:
        """The pass's peak beside the resident weights: what the node asks ComfyUI for."""
        return max(self.activation_bytes + self.buffer_bytes, self.finish_bytes)

    def describe(self) -> str:
        h0, w0 = self.output_size
        h1, w1 = self.processed_size
        at = "" if (h1, w1) == (h0, w0) else f" (processed at {w1}x{h1})"
        how = f"tiles of {self.tile} px, stride {self.stride}" if self.tile else "one pass"
        return f"{w0}x{h0}{at}, {how}, about {gib(self.total_bytes)}"


def plan_pass(height: int, width: int, batch: int, *, upscale: float | None, long_side: int | None,
              element_bytes: int, available_bytes: int | None, tile_size: int | None = None,
              tile_stride: int | None = None, max_group: int | None = None, where: str = "the device",
              group_limits: Mapping[int, int] | None = None) -> PassPlan:
    """How a pass over a (batch, height, width) input runs within `available_bytes` (the memory left for the
    pass beside the resident weights; None: unbounded, one pass unless tiles are forced). `group_limits`: for a
    tile size, the most tiles sent together (where more ran out of memory before, Runtime.tiles_ran_out).

    Untiled passes that do not fit are tiled, in the fitting tile size with the least estimated time
    (fastest_tile; down to MIN_TILE px); a pass whose image buffers alone, or whose smallest tile, do not fit
    raises PlanError with the numbers."""
    h0, w0 = output_size(height, width, upscale, long_side)
    if h0 < 1 or w0 < 1:
        scale = f"long side {long_side}" if long_side else f"upscale {upscale:g}"
        raise PlanError(f"{scale} turns {width}x{height} into an empty {w0}x{h0} image")
    h1, w1 = processed_size(h0, w0)
    hp, wp = h1 + -h1 % VAE_SCALE, w1 + -w1 % VAE_SCALE
    buffers = buffer_bytes(batch, (h0, w0), (h1, w1))
    finish = finish_bytes(batch, (h0, w0))
    processed = "" if (h1, w1) == (h0, w0) else f" (processed at {w1}x{h1}: short sides are raised to {PATCH})"
    if available_bytes is not None and max(buffers, finish) > available_bytes:
        need = max(buffers, finish)
        raise PlanError(f"a {w0}x{h0} output{processed}, batch {batch}, needs about {gib(need)} for its "
                        f"image buffers alone, and {where} has {gib(max(available_bytes, 0))} for it; choose a "
                        f"smaller upscale or long side")
    budget = None if available_bytes is None else available_bytes - buffers
    whole = max(hp, wp)

    if tile_size is not None:
        tile, stride = int(tile_size), default_stride(int(tile_size), tile_stride)
    elif budget is None or pass_bytes(hp, wp, batch, element_bytes) <= HEADROOM * budget:
        tile, stride = None, None
    else:
        tile = fastest_tile(hp, wp, lambda t: pass_bytes(t, t, batch, element_bytes) <= HEADROOM * budget)
        stride = auto_stride(tile)
        if pass_bytes(tile, tile, batch, element_bytes) > budget:
            raise PlanError(f"a {w0}x{h0} output{processed}, batch {batch}, does not fit even in tiles of {tile} "
                            f"px: each needs about {gib(pass_bytes(tile, tile, batch, element_bytes))} beside "
                            f"{gib(buffers)} of image buffers, and {where} has {gib(max(available_bytes, 0))}; "
                            f"free memory, or choose a smaller output or batch")
    if tile is not None and tile >= whole:
        tile, stride = None, None  # one tile is one pass
    if tile is None:
        return PassPlan((height, width), (h0, w0), (h1, w1), (hp, wp), batch, None, None, 1, 1,
                        pass_bytes(hp, wp, batch, element_bytes), buffers, finish, available_bytes)
    count = tile_count(hp, wp, tile, stride)
    group = 1
    if budget is not None:
        group = max(1, min(count, int(HEADROOM * budget // max(1, pass_bytes(tile, tile, batch, element_bytes))), 16))
    group = min(group, max_group or group, (group_limits or {}).get(tile, group))
    return PassPlan((height, width), (h0, w0), (h1, w1), (hp, wp), batch, tile, stride, count, group,
                    pass_bytes(tile, tile, batch * group, element_bytes), buffers, finish, available_bytes)


# ----------------------------------------------------------------------------------------------
# Tiles chosen by their time

# GPU milliseconds of one pass over a tile of n megapixels: MS_PER_MEGAPIXEL * n for the work that grows with the
# pixels (convolutions, norms, matmuls), MS_PER_MEGAPIXEL_SQUARED * n**2 for the self-attention over every latent
# pixel (the UNet's top two levels and the VAE's middle: quadratic in the tokens), and MS_PER_CALL for what every
# tile pays whatever its size (launches, the blend). Fitted on an H200 in bf16 to `hypir bench --speed` (44.3 ms
# at 1024x1024, 259.0 ms at 2048x2048, 119.6 ms a tile of 1536x1536; benchmarks/results/2026-11-30-h200-groupnorm-
# stats); only the ratios between tile sizes matter, and attention and convolutions both run on tensor cores on
# the GPUs with a FlashAttention-class kernel, so they hold beyond the H200 closely enough to rank tile sizes.
MS_PER_MEGAPIXEL = 36.0
MS_PER_MEGAPIXEL_SQUARED = 6.1
MS_PER_CALL = 2.0
# Among tile sizes within this share of the fastest, the largest is taken: a larger tile sees more of the image and
# leaves fewer seams.
TILE_TIME_TOLERANCE = 0.05


def auto_stride(tile: int) -> int:
    """The planner's stride: a quarter of the tile overlaps its neighbour."""
    return round_to(tile * 3 // 4, 64)


def tile_ms(height: int, width: int) -> float:
    """Estimated GPU ms of one pass over a (height, width) tile (see MS_PER_MEGAPIXEL)."""
    megapixels = height * width / 1e6
    return MS_PER_MEGAPIXEL * megapixels + MS_PER_MEGAPIXEL_SQUARED * megapixels ** 2 + MS_PER_CALL


def tiled_ms(height: int, width: int, tile: int) -> float:
    """Estimated GPU ms of a (height, width) pass in tiles of `tile` px at the planner's stride."""
    return tile_count(height, width, tile, auto_stride(tile)) * tile_ms(min(tile, height), min(tile, width))


def fastest_tile(height: int, width: int, fits: Callable[[int], bool]) -> int:
    """The tile size (a multiple of 64, MIN_TILE..MAX_TILE) for a (height, width) pass that `fits` in memory and
    takes the least estimated time, or the largest within TILE_TIME_TOLERANCE of it; MIN_TILE when none fits.

    The largest tile that fits is not the fastest: attention grows with the square of a tile's pixels while more
    tiles only add their overlaps: a 4096x4096 output in tiles of 1536 (16 tiles) is estimated at 1.7 times, and
    measured at 1.8 times, the time in tiles of 1024 (25 tiles) on an H200 (benchmarks/tile_sizes.py)."""
    largest = min(MAX_TILE, round_to(max(height, width), 64))
    fitting = [t for t in range(MIN_TILE, largest + 1, 64) if fits(t)]
    if not fitting:
        return MIN_TILE
    times = {t: tiled_ms(height, width, t) for t in fitting}
    best = min(times.values())
    return max(t for t in fitting if times[t] <= best * (1 + TILE_TIME_TOLERANCE))


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one side, as the reference: 0, stride, 2*stride, ... and a last tile flush with the
    far edge; a side no longer than the tile is one tile."""
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be positive")
    if stride > tile:
        raise ValueError(f"tile stride {stride} is larger than the tile size {tile}: tiles would leave gaps")
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if (size - tile) % stride:
        starts.append(size - tile)
    return starts


def tile_count(height: int, width: int, tile: int, stride: int) -> int:
    return len(tile_starts(height, tile, stride)) * len(tile_starts(width, tile, stride))
