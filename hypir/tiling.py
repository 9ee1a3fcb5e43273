"""Overlapping tiles with gaussian blending, as the reference tiles, accumulated in float32.

The grid follows the reference (XPixelGroup/HYPIR ``sliding_windows``): starts 0, stride, 2*stride, ...
plus a last tile flush with the far edge; a side no longer than the tile is one tile. The weights are
the reference's gaussian (variance 0.01 of the tile size squared) with both midpoints at (n-1)/2 (the
reference puts the y midpoint at n/2, a bug), computed and accumulated in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .planning import tile_starts


@dataclass(frozen=True)
class Tile:
    y0: int
    y1: int
    x0: int
    x1: int


def tile_grid(height: int, width: int, tile: int, stride: int) -> list[Tile]:
    """Row-major tiles covering (height, width); the reference's order (it draws noise in this order)."""
    th, tw = min(tile, height), min(tile, width)
    return [Tile(y, y + th, x, x + tw)
            for y in tile_starts(height, tile, stride)
            for x in tile_starts(width, tile, stride)]


def gaussian_weights(height: int, width: int, device=None) -> torch.Tensor:
    """(height, width) float32 blending weights, peak at the centre."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * 0.01))

    # Made on the CPU (float64, which some GPUs lack) and sent to a CUDA GPU without waiting: a blocking copy
    # waits for all the work queued before it, and the GPU then idles while the rest of the pass is launched.
    # (CUDA stages a pageable source before the call returns; MPS may read it after it is freed: pytorch#139550.)
    weights = torch.outer(axis(height), axis(width)).to(dtype=torch.float32)
    return weights.to(device=device, non_blocking=torch.device(device or "cpu").type == "cuda")


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    stride: int,
    scale: float,
    out_channels: int,
    tiles_per_batch: int = 1,
    on_tile: Callable[[int], None] | None = None,
    per_tile: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` (B, C, H, W) and blend the results.

    ``scale`` maps input to output pixels (1/8 for the VAE encoder, 8 for the decoder, 1 for the UNet).
    Tiles of equal size are stacked along the batch and sent ``tiles_per_batch`` at a time.
    ``per_tile(output, index)`` post-processes each tile's output in grid order (the encoder's noise).
    ``on_tile(n)`` is called after every group with the number of tiles done (progress, interrupts).
    Returns float32.
    """
    b, _, h, w = x.shape
    tiles = tile_grid(h, w, tile, stride)
    oh, ow = _scaled(h, scale), _scaled(w, scale)
    if len(tiles) == 1:  # the whole image: nothing to blend
        result = fn(x)
        if per_tile is not None:
            result = per_tile(result, 0)
        if tuple(result.shape) != (b, out_channels, oh, ow):
            raise RuntimeError(f"internal: a stage gave {tuple(result.shape)} for {(b, out_channels, oh, ow)}")
        if on_tile is not None:
            on_tile(1)
        return result.to(torch.float32, memory_format=torch.contiguous_format)  # as the blended result is
    out = torch.zeros(b, out_channels, oh, ow, dtype=torch.float32, device=x.device)
    weight_sum = torch.zeros(1, 1, oh, ow, dtype=torch.float32, device=x.device)
    t0 = tiles[0]
    weights = gaussian_weights(_scaled(t0.y1 - t0.y0, scale), _scaled(t0.x1 - t0.x0, scale), x.device)
    tiles_per_batch = max(1, int(tiles_per_batch))

    for start in range(0, len(tiles), tiles_per_batch):
        group = tiles[start:start + tiles_per_batch]
        batch = torch.cat([x[:, :, t.y0:t.y1, t.x0:t.x1] for t in group], dim=0)
        results = fn(batch).split(b, dim=0)
        for i, (t, result) in enumerate(zip(group, results)):
            if per_tile is not None:
                result = per_tile(result, start + i)
            ys, xs = slice(_scaled(t.y0, scale), _scaled(t.y1, scale)), slice(_scaled(t.x0, scale), _scaled(t.x1, scale))
            out[:, :, ys, xs].add_(result.float() * weights)
            weight_sum[:, :, ys, xs].add_(weights)
        del batch, results
        if on_tile is not None:
            on_tile(len(group))
    return out / weight_sum


def _scaled(n: int, scale: float) -> int:
    return int(n * scale) if scale >= 1 else int(n // round(1 / scale))


