"""Coordinate math: nested crops, tile plans, camera -> data bbox (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_muvit.data.geometry import (
    affine_from_scale_translate,
    bbox_contains,
    blend_weights,
    centered_nested_bboxes,
    grid_cell_range,
    grid_cells,
    level_to_world,
    naive_bboxes,
    plan_tiles,
    random_nested_bboxes,
    tile_contributors,
    visible_data_bbox,
    world_to_level,
)
from napari_muvit.errors import InputError

LEVEL_SETS = [(1,), (1, 4), (1, 8), (1, 8, 32), (1, 2, 4, 8), (1, 8, 32, 64), (1, 3, 12)]
FAST = settings(max_examples=60, deadline=None)


@FAST
@given(
    coords=st.lists(st.floats(-1e7, 1e7, allow_nan=False), min_size=2, max_size=2),
    factor=st.sampled_from([1, 2, 3, 8, 32, 64, 1.5]),
)
def test_world_level_round_trip(coords, factor):
    c = np.array(coords)
    np.testing.assert_allclose(
        level_to_world(world_to_level(c, factor), factor), c, rtol=1e-12, atol=1e-6
    )
    # level pixel i covers world [f*i, f*(i+1))
    np.testing.assert_allclose(level_to_world([3, 4], factor), [3 * factor, 4 * factor])


@FAST
@given(
    oy=st.integers(-5000, 100_000),
    ox=st.integers(-5000, 100_000),
    size=st.sampled_from([16, 64, 128, 256, 512]),
    levels=st.sampled_from(LEVEL_SETS),
)
def test_centered_nested_bboxes_invariants(oy, ox, size, levels):
    bb = centered_nested_bboxes((oy, ox), size, levels)
    assert bb.shape == (len(levels), 2, 2)
    np.testing.assert_array_equal(bb[0], [[oy, ox], [oy + size, ox + size]])
    centre = np.array([oy, ox]) + size / 2
    for i, f in enumerate(levels):
        np.testing.assert_allclose(bb[i, 1] - bb[i, 0], [f * size] * 2)
        if i:
            # snapped to the level's own grid, within f/2 of the exact centring
            np.testing.assert_allclose(bb[i, 0] % f, 0, atol=1e-9)
            np.testing.assert_array_less(np.abs((bb[i, 0] + bb[i, 1]) / 2 - centre), f / 2 + 1e-9)
            assert bbox_contains(bb[i], bb[i - 1])


def test_centered_nested_bboxes_neighbours_share_grid():
    # tiles whose centres snap to the same coarse pixel get the identical context crop
    a = centered_nested_bboxes((0, 0), 8, (1, 32))
    b = centered_nested_bboxes((8, 8), 8, (1, 32))
    np.testing.assert_array_equal(a[1], b[1])
    c = centered_nested_bboxes((256, 512), 256, (1, 8, 32))
    np.testing.assert_array_equal(c[1], [[-640, -384], [1408, 1664]])
    np.testing.assert_array_equal(c[2], [[-3712, -3456], [4480, 4736]])


@FAST
@given(
    seed=st.integers(0, 2**31),
    shape=st.tuples(st.integers(5, 5000), st.integers(5, 5000)),
    size=st.sampled_from([16, 32, 64]),
    levels=st.sampled_from(LEVEL_SETS),
    use_anchor=st.booleans(),
)
def test_random_nested_bboxes_invariants(seed, shape, size, levels, use_anchor):
    rng = np.random.default_rng(seed)
    anchor = None
    if use_anchor:
        anchor = (int(rng.integers(shape[0])), int(rng.integers(shape[1])))
    rep, read = random_nested_bboxes(rng, shape, size, levels, anchor=anchor, return_read=True)
    np.testing.assert_array_equal(rep, read)
    for i, f in enumerate(levels):
        np.testing.assert_allclose(read[i, 1] - read[i, 0], [f * size] * 2)
        np.testing.assert_allclose(read[i, 0] % f, 0, atol=1e-9)
        if i:
            assert bbox_contains(read[i], read[i - 1])
    # the level-1 crop is inside the image when it fits, and contains the anchor
    for ax in range(2):
        if shape[ax] >= size:
            assert 0 <= read[0, 0, ax] and read[0, 1, ax] <= shape[ax]
        else:  # small image: the crop covers all of it
            assert read[0, 0, ax] <= 0 and read[0, 1, ax] >= shape[ax]
    if anchor is not None:
        assert np.all(read[0, 0] <= anchor) and np.all(np.array(anchor) < read[0, 1])


def test_random_nested_bboxes_not_centred_and_reproducible():
    offs = []
    for s in range(200):
        bb = random_nested_bboxes(np.random.default_rng(s), (4096, 4096), 64, (1, 8))
        offs.append(bb[0, 0] - bb[1, 0])
    offs = np.array(offs)
    # offset of the level-1 crop inside the 512-px context covers the whole admissible range
    assert offs.min() >= 0 and offs.max() <= 512 - 64
    assert offs.min() < 64 and offs.max() > 512 - 64 - 64
    assert np.std(offs) > 80  # uniform on [0, 448] has std ~129; centred would be 0
    a = random_nested_bboxes(np.random.default_rng(7), (1000, 1000), 64, (1, 8, 32))
    b = random_nested_bboxes(np.random.default_rng(7), (1000, 1000), 64, (1, 8, 32))
    np.testing.assert_array_equal(a, b)


def test_random_nested_bboxes_coarse_may_pad():
    # context larger than the image must extend past the border rather than be clipped
    bb = random_nested_bboxes(np.random.default_rng(0), (300, 300), 64, (1, 32))
    assert bb[1, 1, 0] - bb[1, 0, 0] == 2048
    assert bb[1, 0, 0] < 0 or bb[1, 1, 0] > 300


def test_naive_bboxes_are_concentric_and_differ_from_read():
    rng = np.random.default_rng(3)
    rep, read = random_nested_bboxes(
        rng, (5000, 5000), 64, (1, 8, 32), naive=True, return_read=True
    )
    np.testing.assert_array_equal(rep[0], read[0])  # level-1 box is truthful
    c = (read[0, 0] + read[0, 1]) / 2
    for i, f in enumerate((1, 8, 32)):
        np.testing.assert_allclose((rep[i, 0] + rep[i, 1]) / 2, c)
        np.testing.assert_allclose(rep[i, 1] - rep[i, 0], f * 64)
    assert not np.allclose(rep[1:], read[1:])
    np.testing.assert_allclose(naive_bboxes(read, (1, 8, 32), 64), rep)


def test_random_nested_bboxes_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="levels"):
        random_nested_bboxes(rng, (100, 100), 16, (8, 1))
    with pytest.raises(InputError, match="anchor"):
        random_nested_bboxes(rng, (100, 100), 16, (1, 4), anchor=(100, 5))
    with pytest.raises(InputError, match="size"):
        centered_nested_bboxes((0, 0), 0, (1,))


@FAST
@given(
    shape=st.tuples(st.integers(1, 700), st.integers(1, 700)),
    size=st.sampled_from([16, 32, 64, 100]),
    overlap_frac=st.sampled_from([0, 0.125, 0.25, 0.5]),
    reg=st.tuples(st.floats(-100, 800), st.floats(-100, 800), st.floats(1, 900), st.floats(1, 900)),
)
def test_plan_tiles_cores_partition_region(shape, size, overlap_frac, reg):
    overlap = int(size * overlap_frac)
    region = np.array([[reg[0], reg[1]], [reg[0] + reg[2], reg[1] + reg[3]]])
    r0 = np.maximum(np.floor(region[0]), 0).astype(int)
    r1 = np.minimum(np.ceil(region[1]), shape).astype(int)
    if np.any(r1 <= r0):
        with pytest.raises(InputError, match="region"):
            plan_tiles(region, size, shape, overlap)
        return
    tiles = plan_tiles(region, size, shape, overlap)
    count = np.zeros(shape, dtype=np.int32)
    centre = (r0 + r1) / 2
    dist = []
    for i, t in enumerate(tiles):
        assert t.index == i
        c = t.core
        count[c[0, 0] : c[1, 0], c[0, 1] : c[1, 1]] += 1
        assert bbox_contains(t.bbox, c)  # the tile sees the whole core it writes
        np.testing.assert_array_equal(t.bbox[1] - t.bbox[0], [size, size])
        for ax in range(2):
            if shape[ax] >= size:  # shifted inside the image
                assert 0 <= t.bbox[0, ax] and t.bbox[1, ax] <= shape[ax]
            else:
                assert t.origin[ax] == 0
        sl = t.core_in_tile
        assert sl[0].stop - sl[0].start == c[1, 0] - c[0, 0]
        dist.append(np.hypot(*(np.array(t.origin) + size / 2 - centre)))
    inside = np.zeros(shape, bool)
    inside[r0[0] : r1[0], r0[1] : r1[1]] = True
    np.testing.assert_array_equal(count[inside], 1)
    np.testing.assert_array_equal(count[~inside], 0)
    assert np.all(np.diff(dist) >= -1e-6)  # centre-first


def test_plan_tiles_global_grid_is_region_independent():
    a = {t.grid: t.origin for t in plan_tiles(None, 64, (1000, 1000))}
    b = {t.grid: t.origin for t in plan_tiles([[100, 130], [300, 250]], 64, (1000, 1000))}
    assert set(b) <= set(a)
    assert all(a[k] == b[k] for k in b)
    tiles = plan_tiles([[0, 0], [1000, 1000]], 256, (1000, 1000))
    assert len(tiles) == 16
    # centre-first: the first tiles touch the image centre
    assert bbox_contains(np.array([[256, 256], [768, 768]]), tiles[0].bbox)


@st.composite
def grid_cases(draw, side: int, sizes: list[int]):
    """An image shape, tile size, overlap and a non-empty float region inside the image."""
    shape = (draw(st.integers(1, side)), draw(st.integers(1, side)))
    size = draw(st.sampled_from(sizes))
    overlap = int(size * draw(st.sampled_from([0, 0.125, 0.25, 0.5])))
    lo = [draw(st.floats(0, n - 0.5)) for n in shape]
    hi = [min(a + draw(st.floats(0.5, side)), n) for a, n in zip(lo, shape)]
    return shape, size, overlap, np.array([lo, hi])


@FAST
@given(case=grid_cases(400, [16, 32, 50]))
def test_grid_cell_range_is_the_tile_plan_grid(case):
    """One tile grid: the cells of a region are exactly the grid cells plan_tiles plans."""
    shape, size, overlap, region = case
    step = size - overlap
    rows, cols = grid_cell_range(region, step)
    planned = {t.grid for t in plan_tiles(region, size, shape, overlap)}
    assert {(r, c) for r in rows for c in cols} == planned
    assert grid_cells(region, step) == sorted(planned)  # row-major
    assert len(rows) * len(cols) == len(planned)


@FAST
@given(case=grid_cases(300, [16, 24, 40]))
def test_tile_contributors_are_every_tile_that_sees_a_core(case):
    """Blending (overlap > 0) needs every tile whose bbox covers part of a core, and no other:
    compared with a brute-force search over the whole image's plan. Without overlap a core
    is its own tile's alone, even where a shifted border tile also covers it."""
    shape, size, overlap, region = case
    targets = plan_tiles(region, size, shape, overlap)
    everything = plan_tiles(None, size, shape, overlap)
    contributors, pool = tile_contributors(targets, shape, overlap)
    assert set(contributors) == {t.grid for t in targets}
    if overlap == 0:
        assert all(contributors[t.grid] == [t.grid] for t in targets)
        return
    for t in targets:
        lo, hi = t.core
        seen = sorted(o.grid for o in everything
                      if np.all(np.maximum(o.bbox[0], lo) < np.minimum(o.bbox[1], hi)))
        assert contributors[t.grid] == seen
        assert t.grid in seen
        for g in seen:
            np.testing.assert_array_equal(pool[g].bbox, next(o.bbox for o in everything
                                                              if o.grid == g))


def test_plan_tiles_bad_input():
    with pytest.raises(InputError, match="overlap"):
        plan_tiles(None, 64, (100, 100), overlap=64)
    with pytest.raises(InputError, match="region"):
        plan_tiles([[200, 200], [300, 300]], 64, (100, 100))


def test_blend_weights_partition_of_unity():
    s, ov = 64, 16
    w = blend_weights(s, ov)
    assert w.shape == (s, s) and w.dtype == np.float32
    np.testing.assert_allclose(blend_weights(s, 0), 1.0)
    # 1-D: two tiles overlapping by `ov` sum to 1 in the overlap, 1 elsewhere
    acc = np.zeros(3 * (s - ov) + ov)
    for k in range(3):
        acc[k * (s - ov) : k * (s - ov) + s] += w[s // 2] / w[s // 2].max()
    np.testing.assert_allclose(acc[ov:-ov], 1.0, atol=1e-6)
    assert w.min() > 0  # never zero: border tiles still normalise
    np.testing.assert_allclose(w, w.T)


def _ref_visible(center, zoom, canvas, scale, translate, shape):
    half = np.array(canvas, float) / (2 * zoom)
    lo = (np.array(center) - half - translate) / scale
    hi = (np.array(center) + half - translate) / scale
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return np.clip(lo, 0, shape), np.clip(hi, 0, shape)


@FAST
@given(
    cy=st.floats(-500, 3000),
    cx=st.floats(-500, 3000),
    zoom=st.floats(0.01, 20),
    canvas=st.tuples(st.integers(1, 1999), st.integers(1, 1999)),
    scale=st.tuples(st.floats(0.1, 5), st.floats(0.1, 5)),
    translate=st.tuples(st.floats(-1000, 1000), st.floats(-1000, 1000)),
)
def test_visible_data_bbox_scale_translate(cy, cx, zoom, canvas, scale, translate):
    shape = (1501, 999)
    got = visible_data_bbox((cy, cx), zoom, canvas, (scale, translate), shape)
    lo, hi = _ref_visible((cy, cx), zoom, canvas, np.array(scale), np.array(translate), shape)
    np.testing.assert_allclose(got[0], lo, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(got[1], np.maximum(hi, lo), rtol=1e-9, atol=1e-6)
    aff = affine_from_scale_translate(scale, translate)
    np.testing.assert_allclose(visible_data_bbox((cy, cx), zoom, canvas, aff, shape), got)


def test_visible_data_bbox_examples():
    # identity, zoom 2 (2 screen px per data px), odd canvas 101 x 200, centred on (50, 60)
    bb = visible_data_bbox((50, 60), 2.0, (101, 200), np.eye(3), (1000, 1000))
    np.testing.assert_allclose(bb, [[24.75, 10], [75.25, 110]])
    # multiscale layer: napari world is level-0 data * scale (0.5 µm/px) + translate; the
    # bbox is in level-0 data pixels (= MuViT world), independent of the displayed level
    bb = visible_data_bbox((1000, 2000), 0.5, (400, 600), ((0.5, 0.5), (100, 200)), (65536, 65536))
    # world y 1000 ± 400 -> data (600-100)/0.5 .. (1400-100)/0.5; x 2000 ± 600 likewise
    np.testing.assert_allclose(bb, [[1000, 2400], [2600, 4800]], rtol=1e-9)
    # nested 3-D camera centre: only the last two dims are used
    bb3 = visible_data_bbox(
        (7, 1000, 2000), 0.5, (400, 600), ((1, 0.5, 0.5), (0, 100, 200)), (65536, 65536)
    )
    np.testing.assert_allclose(bb3, bb)
    # off screen -> zero extent
    off = visible_data_bbox((-5000, -5000), 1.0, (100, 100), np.eye(3), (100, 100))
    assert np.all(off[1] - off[0] == 0)
    # rotation by 90 degrees: enclosing box of the rotated canvas
    rot = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float)  # world = R @ data
    bb = visible_data_bbox((-50, 50), 1.0, (20, 40), rot, (1000, 1000))
    np.testing.assert_allclose(bb, [[30, 40], [70, 60]])
    with pytest.raises(InputError, match="zoom"):
        visible_data_bbox((0, 0), 0, (10, 10), np.eye(3), (10, 10))


@given(
    st.integers(16, 300), st.integers(16, 300), st.sampled_from([16, 32, 64]),
    st.lists(st.tuples(st.integers(0, 299), st.integers(0, 299)), min_size=1, max_size=20),
)
@settings(max_examples=60, deadline=None)
def test_the_cell_of_a_pixel_is_the_planned_tile_whose_core_holds_it(h, w, size, pixels):
    from napari_muvit.data.geometry import grid_cells_of_pixels

    pixels = [(y % h, x % w) for y, x in pixels]
    tiles = {t.grid: t for t in plan_tiles(None, size, (h, w), 0)}
    for (y, x), cell in zip(pixels, grid_cells_of_pixels(pixels, size)):
        core = tiles[tuple(int(c) for c in cell)].core
        assert core[0][0] <= y < core[1][0] and core[0][1] <= x < core[1][1]
