"""Tile grid and blending: exact for per-pixel functions, the reference's grid, symmetric weights."""

import pytest
import torch

from hypir.tiling import gaussian_weights, run_tiled, tile_grid, tile_starts


def test_grid_matches_reference_rule():
    assert tile_starts(1000, 512, 256) == [0, 256, 488]
    assert tile_starts(1024, 512, 256) == [0, 256, 512]
    assert tile_starts(512, 512, 256) == [0]
    assert tile_starts(300, 512, 256) == [0]
    grid = tile_grid(600, 984, 512, 256)
    assert [(t.y0, t.x0) for t in grid] == [(0, 0), (0, 256), (0, 472), (88, 0), (88, 256), (88, 472)]


def test_gaps_refused():
    with pytest.raises(ValueError, match="larger than the tile size"):
        tile_starts(1000, 256, 512)


def test_weights_symmetric_float32():
    w = gaussian_weights(64, 48)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, w.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(w, w.flip(1), rtol=0, atol=0)
    assert w.argmax() // 48 in (31, 32)


@pytest.mark.parametrize("scale,fn", [
    (1, lambda t: torch.sin(3 * t) * 0.5 + t * 0.25),
    (8, lambda t: torch.repeat_interleave(torch.repeat_interleave(torch.tanh(t), 8, dim=2), 8, dim=3)),
    (1 / 8, lambda t: t[:, :, ::8, ::8] * 0.5 - 1),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_tiling_a_per_pixel_function_is_exact(scale, fn, batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 200, 328, generator=gen) * 2 - 1  # outputs within [-1, 1]: 1e-6 is ~8 ulps
    tile, stride = (64, 32) if scale != 1 / 8 else (128, 64)
    tiled = run_tiled(fn, x, tile, stride, scale, 4, tiles_per_batch=batch)
    torch.testing.assert_close(tiled, fn(x).float(), rtol=0, atol=1e-6)


def test_tile_callbacks_in_grid_order():
    x = torch.zeros(1, 1, 100, 100)
    seen, done = [], []
    run_tiled(lambda t: t, x, 64, 32, 1, 1, tiles_per_batch=2,
              per_tile=lambda out, i: seen.append(i) or out, on_tile=done.append)
    assert seen == list(range(9)) and sum(done) == 9 and done == [2, 2, 2, 2, 1]


def test_one_tile_is_the_stage_itself_without_blending():
    """A pass that fits runs each stage on the whole image: the stage's output exactly, as float32, with the
    per-tile step and one progress report."""
    x = torch.randn(2, 3, 40, 24, dtype=torch.bfloat16)
    reports, seen = [], []

    def per_tile(out, index):
        seen.append(index)
        return out * 2

    out = run_tiled(lambda t: t[:, :2].repeat_interleave(8, 2).repeat_interleave(8, 3), x, 64, 48, 8, 2,
                    on_tile=reports.append, per_tile=per_tile)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 320, 192)
    assert torch.equal(out, (x[:, :2].repeat_interleave(8, 2).repeat_interleave(8, 3) * 2).float())
    assert (reports, seen) == ([1], [0])
    channels_last = run_tiled(lambda t: t.float().contiguous(memory_format=torch.channels_last) * 3, x, 64, 48, 1, 3)
    assert channels_last.is_contiguous() and torch.equal(channels_last, x.float() * 3)  # as a blended result is
    with pytest.raises(RuntimeError, match=r"internal: a stage gave \(2, 3, 40, 24\) for \(2, 4, 40, 24\)"):
        run_tiled(lambda t: t, x, 64, 48, 1, 4)
