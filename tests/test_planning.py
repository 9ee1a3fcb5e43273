"""The pass planner (hypir/planning.py): sizes after the short-side rule, memory, tiles; no model runs."""

from __future__ import annotations

import pytest

from hypir.planning import (MIN_TILE, PlanError, auto_stride, buffer_bytes, default_stride, fastest_tile, output_size,
                            pass_bytes, plan_pass, processed_size, tile_count, tile_ms, tile_starts, tiled_ms)

GIB = 2**30


@pytest.mark.parametrize("size,upscale,long_side,output,processed", [
    ((100, 400), 2.0, None, (200, 800), (512, 2048)),  # the node once planned 512x800 for this
    ((400, 100), 2.0, None, (800, 200), (2048, 512)),
    ((256, 256), 2.0, None, (512, 512), (512, 512)),
    ((300, 500), 2.0, None, (600, 1000), (600, 1000)),
    ((50, 30), None, 100, (100, 60), (853, 512)),
    ((2, 20000), 2.0, None, (4, 40000), (512, 5120000)),
])
def test_sizes_follow_the_short_side_rule(size, upscale, long_side, output, processed):
    assert output_size(*size, upscale, long_side) == output
    assert processed_size(*output) == processed
    plan = plan_pass(*size, 1, upscale=upscale, long_side=long_side, element_bytes=2, available_bytes=None)
    assert plan.output_size == output and plan.processed_size == processed
    assert plan.padded_size == tuple(n + -n % 8 for n in processed)
    assert plan.tile is None and plan.activation_bytes == pass_bytes(*plan.padded_size, 1, 2)
    assert plan.buffer_bytes == buffer_bytes(1, output, processed)


def test_a_long_strip_is_tiled_within_the_budget():
    plan = plan_pass(100, 2000, 1, upscale=1.0, long_side=None, element_bytes=2, available_bytes=3 * GIB)
    assert plan.processed_size == (512, 10240)
    assert plan.tile is not None and plan.tile < 10240 and plan.total_bytes <= 3 * GIB
    assert plan.tiles == tile_count(*plan.padded_size, plan.tile, plan.stride) > 1


def test_what_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(PlanError, match=r"a 40000x4 output \(processed at 5120000x512: .*needs about 58.6 GiB for "
                                        r"its image buffers alone, and the device has 8.0 GiB"):
        plan_pass(2, 20000, 1, upscale=2.0, long_side=None, element_bytes=2, available_bytes=8 * GIB)
    tiny_room = buffer_bytes(1, (1024, 1024), (1024, 1024)) + pass_bytes(MIN_TILE, MIN_TILE, 1, 2) // 2
    with pytest.raises(PlanError, match="does not fit even in tiles of 256 px"):
        plan_pass(512, 512, 1, upscale=2.0, long_side=None, element_bytes=2, available_bytes=tiny_room)
    with pytest.raises(PlanError, match="turns 3x3 into an empty 0x0 image"):
        plan_pass(3, 3, 1, upscale=0.1, long_side=None, element_bytes=2, available_bytes=None)


def test_forced_tiles_and_their_stride():
    plan = plan_pass(256, 256, 1, upscale=4.0, long_side=None, element_bytes=2, available_bytes=None,
                     tile_size=512, tile_stride=512)
    assert (plan.tile, plan.stride, plan.tiles) == (512, 256, 9)
    assert plan_pass(64, 64, 1, upscale=2.0, long_side=None, element_bytes=2, available_bytes=None,
                     tile_size=1024, tile_stride=256).tile is None  # one tile is one pass
    assert default_stride(128, 256) == 64 and default_stride(512, 384) == 384 and default_stride(72, None) == 32


def test_tiles_go_together_only_where_memory_allows():
    roomy = plan_pass(512, 512, 1, upscale=4.0, long_side=None, element_bytes=2, available_bytes=200 * GIB,
                      tile_size=512, tile_stride=384)
    assert roomy.tiles_per_batch == min(roomy.tiles, 16)
    one = plan_pass(512, 512, 1, upscale=4.0, long_side=None, element_bytes=2, available_bytes=200 * GIB,
                    tile_size=512, tile_stride=384, max_group=1)
    assert one.tiles_per_batch == 1 and one.activation_bytes == pass_bytes(512, 512, 1, 2)
    # Where tiles of a size ran out together before (Runtime.tiles_ran_out), at most the limit go together; a
    # limit for another size changes nothing.
    capped = plan_pass(512, 512, 1, upscale=4.0, long_side=None, element_bytes=2, available_bytes=200 * GIB,
                       tile_size=512, tile_stride=384, group_limits={512: 3, 1024: 1})
    assert capped.tiles_per_batch == 3 and capped.activation_bytes == pass_bytes(512, 512, 3, 2)
    other = plan_pass(512, 512, 1, upscale=4.0, long_side=None, element_bytes=2, available_bytes=200 * GIB,
                      tile_size=512, tile_stride=384, group_limits={1024: 1})
    assert other.tiles_per_batch == roomy.tiles_per_batch


def test_tile_starts_as_the_reference():
    assert tile_starts(512, 512, 256) == [0]
    assert tile_starts(1000, 512, 256) == [0, 256, 488]
    with pytest.raises(ValueError, match="larger than the tile size"):
        tile_starts(1000, 256, 512)


def test_the_tile_size_is_the_fastest_that_fits_not_the_largest():
    # A 4096x4096 output where tiles up to 1536 px fit: 16 tiles of 1536 cost more than 25 of 1024 (attention
    # grows with the square of a tile's pixels), and 1280 (16 tiles) is more than 5 % slower than 1024.
    fits = lambda tile: tile <= 1536  # noqa: E731
    assert fastest_tile(4096, 4096, fits) == 1024
    assert tiled_ms(4096, 4096, 1536) > 1.6 * tiled_ms(4096, 4096, 1024)
    assert tile_count(4096, 4096, 1024, auto_stride(1024)) == 25
    # A 2048 output in tiles of up to 1536: the smallest tile that still covers it in 2x2 (1216 px, overlapping by
    # 384) beats 2x2 of 1536 and 3x3 of 1024.
    assert fastest_tile(2048, 2048, fits) == 1216
    assert tile_count(2048, 2048, 1216, auto_stride(1216)) == 4 == tile_count(2048, 2048, 1536, auto_stride(1536))
    assert tile_count(2048, 2048, 1152, auto_stride(1152)) == 9
    # Within 5 % of the fastest the largest is taken: at 6144 tiles of 1536 (25) against 1152 (49).
    times = {t: tiled_ms(6144, 6144, t) for t in (1152, 1536)}
    assert times[1536] <= 1.05 * times[1152] and fastest_tile(6144, 6144, fits) == 1536
    # Never a size that does not fit; MIN_TILE where nothing fits.
    assert fastest_tile(4096, 4096, lambda tile: tile <= 640) == 640
    assert fastest_tile(4096, 4096, lambda tile: False) == MIN_TILE
    # A narrow tile estimate is the tile's own size: a 512x10240 strip in 1024 tiles is 1024x512 calls.
    assert tiled_ms(512, 10240, 1024) == tile_count(512, 10240, 1024, 768) * tile_ms(512, 1024)


def test_a_budget_plan_takes_the_fastest_fitting_tile():
    # 4096x4096 (from 2048, x2) with room for about a 1536 tile: the plan runs 1024 tiles at stride 768.
    buffers = buffer_bytes(1, (4096, 4096), (4096, 4096))
    room = buffers + int(pass_bytes(1536, 1536, 1, 2) / 0.85) + 1
    plan = plan_pass(2048, 2048, 1, upscale=2.0, long_side=None, element_bytes=2, available_bytes=room, max_group=1)
    assert (plan.tile, plan.stride, plan.tiles) == (1024, 768, 25)
    assert plan.total_bytes <= room
