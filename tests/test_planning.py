"""The pass planner (hypir/planning.py): sizes after the short-side rule, memory, tiles; no model runs."""

from __future__ import annotations

import pytest

from hypir.planning import (MIN_TILE, PlanError, buffer_bytes, default_stride, output_size, pass_bytes, plan_pass,
                            processed_size, tile_count, tile_starts)

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


def test_tile_starts_as_the_reference():
    assert tile_starts(512, 512, 256) == [0]
    assert tile_starts(1000, 512, 256) == [0, 256, 488]
    with pytest.raises(ValueError, match="larger than the tile size"):
        tile_starts(1000, 256, 512)
