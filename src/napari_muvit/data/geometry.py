"""Coordinate math for MuViT: bounding boxes, nested crops, tile plans and the napari camera.

This module is the single source of truth for geometry in napari-muvit; it is pure numpy.

Conventions (see ``docs/architecture.md``):

* **World coordinates** are level-1 (full resolution) pixel coordinates, axis order ``(y, x)``.
* A **bbox** is ``[[y0, x0], [y1, x1]]``: the top-left pixel *edge* and the exclusive
  bottom-right edge, so pixel ``i`` of level ``f`` covers world ``[f*i, f*(i+1))``.
* A crop of ``S×S`` pixels at downsampling factor ``f`` has a bbox of extent ``f·S``.
* Coarse-level crops are snapped to their own factor's grid (origin a multiple of ``f``) so
  that they area-average whole pyramid pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_muvit.errors import InputError

__all__ = [
    "Tile",
    "affine_from_scale_translate",
    "bbox_contains",
    "blend_weights",
    "centered_nested_bboxes",
    "clip_region",
    "grid_cell_range",
    "grid_cell_region",
    "grid_cells",
    "level_to_world",
    "naive_bboxes",
    "plan_tiles",
    "random_nested_bboxes",
    "tile_contributors",
    "visible_data_bbox",
    "world_to_level",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _levels(levels: Sequence[float]) -> np.ndarray:
    lv = np.asarray(levels, dtype=np.float64).reshape(-1)
    if lv.size == 0:
        raise InputError("levels: expected at least one downsampling factor, got an empty list")
    if not np.all(np.isfinite(lv)) or np.any(lv < 1):
        raise InputError(f"levels: expected factors >= 1, got {list(levels)}")
    if np.any(np.diff(lv) <= 0):
        raise InputError(
            f"levels: expected strictly ascending factors (finest first), got {list(levels)}"
        )
    return lv


def _size(size: int) -> int:
    s = int(size)
    if s != size or s < 1:
        raise InputError(f"size: expected a positive integer crop size, got {size!r}")
    return s


def _snap(value: np.ndarray | float, factor: float) -> np.ndarray:
    """Round ``value`` to the nearest multiple of ``factor`` (ties up, not banker's rounding)."""
    return np.floor(np.asarray(value, dtype=np.float64) / factor + 0.5) * factor


def world_to_level(coords: np.ndarray | Sequence[float], factor: float) -> np.ndarray:
    """Convert world (level-1) edge coordinates to the pixel edge coordinates of level ``factor``."""
    return np.asarray(coords, dtype=np.float64) / float(factor)


def level_to_world(coords: np.ndarray | Sequence[float], factor: float) -> np.ndarray:
    """Convert pixel edge coordinates of level ``factor`` to world (level-1) coordinates."""
    return np.asarray(coords, dtype=np.float64) * float(factor)


def bbox_contains(outer: np.ndarray, inner: np.ndarray, tol: float = 1e-9) -> bool:
    """True when bbox ``inner`` lies inside bbox ``outer`` (edges may coincide)."""
    outer = np.asarray(outer, dtype=np.float64)
    inner = np.asarray(inner, dtype=np.float64)
    return bool(np.all(outer[0] <= inner[0] + tol) and np.all(inner[1] <= outer[1] + tol))


# --------------------------------------------------------------------------------------------
# nested crops
# --------------------------------------------------------------------------------------------


def centered_nested_bboxes(
    tile_origin: Sequence[float], size: int, levels: Sequence[float]
) -> np.ndarray:
    """Nested bboxes for prediction: every level centred on the level-1 tile.

    Parameters
    ----------
    tile_origin
        World ``(y, x)`` of the top-left edge of the level-1 tile (integers in practice).
    size
        Crop size ``S`` in pixels (same for all levels).
    levels
        Ascending downsampling factors, finest first, e.g. ``(1, 8, 32)``.

    Returns
    -------
    np.ndarray
        ``(L, 2, 2)`` float64 bboxes. Level ``l`` has extent ``levels[l]·S`` centred on the tile
        centre, its origin snapped to a multiple of ``levels[l]`` (the finest level is not
        snapped: it is the tile itself). Snapping moves a crop by at most ``f/2`` world pixels,
        which keeps every crop nested in the next coarser one whenever
        ``S >= (f_a + f_b) / (f_b - f_a)`` (always true for realistic sizes, e.g. ``S >= 2`` for
        power-of-two levels).
    """
    lv = _levels(levels)
    s = _size(size)
    origin = np.asarray(tile_origin, dtype=np.float64).reshape(2)
    centre = origin + s / 2.0
    out = np.empty((lv.size, 2, 2), dtype=np.float64)
    for i, f in enumerate(lv):
        # the finest level at factor 1 is the tile itself; everything else is snapped
        o = origin.copy() if (i == 0 and f == 1) else _snap(centre - f * s / 2.0, f)
        out[i, 0] = o
        out[i, 1] = o + f * s
    return out


def naive_bboxes(bboxes: np.ndarray, levels: Sequence[float], size: int) -> np.ndarray:
    """The paper's *naive bbox* ablation (sec. 3.1 / 4.4): concentric boxes, wrong on purpose.

    "each level is assigned a fixed, centered bounding box scaled by its downsampling factor,
    independent of the actual crop location". Every level gets a box of extent ``f·S`` centred
    on the centre of the (true) level-1 crop. Because the encoder only sees coordinate
    differences (RoPE, level-1 centre subtracted), this is identical to a fixed box around the
    origin, but it keeps the level-1 box truthful for anything that uses absolute positions.
    The coarse crops themselves were read elsewhere (non-centred), so the boxes lie about where
    the context came from: the model cannot align levels.
    """
    lv = _levels(levels)
    s = _size(size)
    bb = np.asarray(bboxes, dtype=np.float64)
    centre = (bb[0, 0] + bb[0, 1]) / 2.0
    out = np.empty((lv.size, 2, 2), dtype=np.float64)
    for i, f in enumerate(lv):
        out[i, 0] = centre - f * s / 2.0
        out[i, 1] = centre + f * s / 2.0
    return out


def random_nested_bboxes(
    rng: np.random.Generator,
    image_shape: Sequence[int],
    size: int,
    levels: Sequence[float],
    naive: bool = False,
    anchor: Sequence[float] | None = None,
    return_read: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Random nested crops for training (paper sec. 4.4 / supplement B.2).

    The level-1 crop is placed uniformly inside the image (images smaller than ``S``: uniformly
    among the positions covering the whole image); with ``anchor``, uniformly among those
    positions whose crop also contains the world pixel ``anchor``. Each coarser crop is placed with
    a uniform random offset, origin snapped to a multiple of its factor, such that it contains
    the next finer crop, so the level-1 crop is *not* centred in its context. Coarse crops are
    never clipped: they may extend past the image border (read as padding).

    Parameters
    ----------
    rng
        ``np.random.Generator`` (the only source of randomness).
    image_shape
        World ``(Y, X)`` image shape.
    size, levels
        Crop size ``S`` and ascending factors.
    naive
        Return :func:`naive_bboxes` (concentric boxes) instead of the true ones: the paper's
        ablation. Crops are still *read* at the true, non-centred positions.
    anchor
        Optional world ``(y, x)`` pixel the level-1 crop must contain.
    return_read
        Also return the true bboxes (where to read the crops): ``(reported, read)``.

    Returns
    -------
    ``(L, 2, 2)`` float64 bboxes, or ``(reported, read)`` with ``return_read=True``.
    """
    lv = _levels(levels)
    s = _size(size)
    shape = np.asarray(image_shape, dtype=np.int64).reshape(-1)
    if shape.size != 2 or np.any(shape < 1):
        raise InputError(f"image_shape: expected a positive (Y, X), got {tuple(image_shape)}")

    origin = np.zeros(2, dtype=np.float64)
    for ax in range(2):
        n = int(shape[ax])
        # keep the level-1 crop (the one with targets) inside the image when it fits, else
        # let it cover the whole image (random padding placement)
        lo, hi = (0, n - s) if n >= s else (n - s, 0)
        if anchor is not None:
            a = int(np.floor(float(anchor[ax])))
            if not 0 <= a < n:
                raise InputError(
                    f"anchor: expected a pixel inside the image {tuple(shape)}, got {tuple(anchor)}"
                )
            lo, hi = max(lo, a - s + 1), min(hi, a)
        origin[ax] = rng.integers(lo, hi + 1)

    read = np.empty((lv.size, 2, 2), dtype=np.float64)
    f0 = lv[0]
    if f0 == 1:
        read[0, 0] = origin
    else:  # finest level is itself coarse: snap it
        read[0, 0] = _snap(origin + s / 2.0 - f0 * s / 2.0, f0)
    read[0, 1] = read[0, 0] + f0 * s
    for i in range(1, lv.size):
        f = lv[i]
        inner = read[i - 1]
        for ax in range(2):
            # origin o (multiple of f) with o <= inner0 and o + f*s >= inner1
            kmin = int(np.ceil((inner[1, ax] - f * s) / f - 1e-9))
            kmax = int(np.floor(inner[0, ax] / f + 1e-9))
            if kmax < kmin:  # crop too small to nest on the grid: fall back to centred+snap
                k = int(np.floor(((inner[0, ax] + inner[1, ax]) / 2 - f * s / 2) / f + 0.5))
            else:
                k = int(rng.integers(kmin, kmax + 1))
            read[i, 0, ax] = k * f
        read[i, 1] = read[i, 0] + f * s
    reported = naive_bboxes(read, lv, s) if naive else read.copy()
    if return_read:
        return reported, read
    return reported


# --------------------------------------------------------------------------------------------
# tiling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One level-1 tile of a prediction plan.

    Attributes
    ----------
    index
        Position in the plan (0 = closest to the region centre).
    grid
        ``(iy, ix)`` index on the global tile grid (origin ``(0, 0)``, step ``S - overlap``):
        the same tile gets the same ``grid`` whatever region it was planned for (cache key).
    origin
        World ``(y, x)`` of the tile's top-left edge (may be shifted to stay inside the image).
    size
        Tile size ``S``.
    bbox
        ``(2, 2)`` world bbox of the ``S×S`` level-1 crop (``origin`` .. ``origin + S``).
    core
        ``(2, 2)`` int bbox of the output pixels this tile owns: the grid cell clipped to the
        region and the image. The cores of a plan partition the region exactly once.
    """

    index: int
    grid: tuple[int, int]
    origin: tuple[int, int]
    size: int
    bbox: np.ndarray
    core: np.ndarray

    @property
    def core_in_tile(self) -> tuple[slice, slice]:
        """Slices selecting the core inside the tile's ``S×S`` output."""
        o = np.asarray(self.origin)
        c = np.asarray(self.core, dtype=np.int64)
        return (
            slice(int(c[0, 0] - o[0]), int(c[1, 0] - o[0])),
            slice(int(c[0, 1] - o[1]), int(c[1, 1] - o[1])),
        )

    @property
    def centre(self) -> np.ndarray:
        """World centre of the tile."""
        return np.asarray(self.origin, dtype=np.float64) + self.size / 2.0


def clip_region(region: np.ndarray | Sequence | None, image_shape: Sequence[int]) -> np.ndarray:
    """``region`` (``[[y0, x0], [y1, x1]]`` or ``(y0, x0, y1, x1)``; ``None`` = whole image) as
    an int64 ``(2, 2)`` bbox: floored/ceiled to whole pixels and clipped to the image.

    Raises :class:`InputError` for malformed or empty regions, before any work starts.
    """
    shape = np.asarray(image_shape, dtype=np.int64).reshape(-1)[-2:]
    if region is None:
        return np.array([[0, 0], shape], dtype=np.int64)
    reg = np.asarray(region, dtype=np.float64)
    if reg.shape == (4,):
        reg = reg.reshape(2, 2)
    if reg.shape != (2, 2) or not np.all(np.isfinite(reg)):
        raise InputError(
            f"region: expected a finite bbox [[y0, x0], [y1, x1]], got {np.asarray(region).tolist()}"
        )
    lo = np.maximum(np.floor(reg[0]), 0).astype(np.int64)
    hi = np.minimum(np.ceil(reg[1]), shape).astype(np.int64)
    if np.any(hi <= lo):
        raise InputError(
            f"region: {reg.tolist()} is empty or lies outside the image of shape "
            f"{tuple(int(v) for v in shape)} (need y0 < y1, x0 < x1 inside the image)"
        )
    return np.stack([lo, hi])


def plan_tiles(
    region: np.ndarray | Sequence | None,
    size: int,
    image_shape: Sequence[int],
    overlap: int = 0,
) -> list[Tile]:
    """Level-1 tiles of size ``S`` covering ``region``, ordered centre-first.

    Tiles sit on a global grid of step ``S - overlap``: the core of grid cell ``(iy, ix)`` is
    ``[iy·step, (iy+1)·step)`` (clipped to region and image) and its tile extends
    ``overlap // 2`` pixels before the core. Tiles that would leave the image are shifted back
    inside it when the image is at least ``S`` (the core stays inside the shifted tile); for
    smaller images the tile starts at 0 and the reader pads. Ordering is by distance of the
    tile centre to the region centre, ties broken by grid position (deterministic).

    Parameters
    ----------
    region
        World bbox to cover (``None`` = whole image); clipped to the image.
    size
        Tile size ``S``.
    image_shape
        World ``(Y, X)``.
    overlap
        Pixels shared by neighbouring tiles (``0 <= overlap < S``); see :func:`blend_weights`.
    """
    s = _size(size)
    ov = int(overlap)
    if ov != overlap or not 0 <= ov < s:
        raise InputError(f"overlap: expected an integer in [0, {s}), got {overlap!r}")
    shape = np.asarray(image_shape, dtype=np.int64).reshape(-1)[-2:]
    if shape.size != 2 or np.any(shape < 1):
        raise InputError(f"image_shape: expected a positive (Y, X), got {tuple(image_shape)}")
    if region is None:
        region = np.array([[0, 0], shape], dtype=np.float64)
    reg = clip_region(region, shape)
    step = s - ov
    half = ov // 2

    cells = []
    for ax, axis_range in enumerate(grid_cell_range(reg, step)):
        axis_cells = []
        for k in axis_range:
            c0 = max(k * step, int(reg[0, ax]))
            c1 = min((k + 1) * step, int(reg[1, ax]))
            o = k * step - half
            n = int(shape[ax])
            if n >= s:
                o = min(max(o, 0), n - s)
            else:
                o = 0
            axis_cells.append((k, o, c0, c1))
        cells.append(axis_cells)

    centre = (reg[0] + reg[1]) / 2.0
    tiles = []
    for ky, oy, cy0, cy1 in cells[0]:
        for kx, ox, cx0, cx1 in cells[1]:
            d = np.hypot(oy + s / 2.0 - centre[0], ox + s / 2.0 - centre[1])
            tiles.append((d, ky, kx, oy, ox, cy0, cy1, cx0, cx1))
    tiles.sort(key=lambda t: (round(t[0], 9), t[1], t[2]))
    out = []
    for i, (_, ky, kx, oy, ox, cy0, cy1, cx0, cx1) in enumerate(tiles):
        out.append(
            Tile(
                index=i,
                grid=(ky, kx),
                origin=(oy, ox),
                size=s,
                bbox=np.array([[oy, ox], [oy + s, ox + s]], dtype=np.float64),
                core=np.array([[cy0, cx0], [cy1, cx1]], dtype=np.int64),
            )
        )
    return out


def grid_cell_range(region: np.ndarray | Sequence, step: int) -> tuple[range, range]:
    """Rows and columns of the global grid of step ``step`` (the tile grid of
    :func:`plan_tiles`, or any other aligned grid such as a store's chunks) whose cells
    intersect ``region`` (a float bbox, floored/ceiled to whole pixels)."""
    reg = np.asarray(region, dtype=np.float64)
    lo = [int(np.floor(v)) for v in reg[0]]
    hi = [int(np.ceil(v)) for v in reg[1]]
    rows, cols = (range(lo[ax] // step, (hi[ax] - 1) // step + 1) for ax in range(2))
    return rows, cols


def grid_cells_of_pixels(pixels: np.ndarray | Sequence, step: int) -> np.ndarray:
    """``(N, 2)`` cells ``(iy, ix)`` of the global tile grid (step ``step``) that own the
    integer pixels ``(N, 2)``: the cell whose core holds each pixel."""
    return np.floor_divide(np.asarray(pixels, dtype=np.int64).reshape(-1, 2), int(step))


def grid_cells(region: np.ndarray | Sequence, step: int) -> list[tuple[int, int]]:
    """``(iy, ix)`` cells of the global tile grid (step ``step``, see :func:`plan_tiles`) whose
    cores intersect ``region`` (a float bbox; floored/ceiled to whole pixels), row-major."""
    rows, cols = grid_cell_range(region, step)
    return [(r, c) for r in rows for c in cols]


def tile_contributors(
    targets: Sequence[Tile], image_shape: Sequence[int], overlap: int
) -> tuple[dict[tuple[int, int], list[tuple[int, int]]], dict[tuple[int, int], Tile]]:
    """For every target tile, the grid cells of the tiles whose bbox covers part of its core.

    With overlap, a core is also seen by neighbouring tiles (blending); their tiles are
    planned on the same global grid. Returns ``(contributors, pool)``: per target ``grid``
    the sorted contributing cells (a canonical order, so blending is bit-identical), and every
    contributing :class:`Tile` by its cell. Without overlap each tile is its only contributor.
    """
    targets = list(targets)
    if overlap == 0 or not targets:
        return {t.grid: [t.grid] for t in targets}, {t.grid: t for t in targets}
    size = targets[0].size
    step = size - int(overlap)
    # a tile reaches at most ceil(S / step) cells past its own (it starts overlap // 2 before
    # its core and may be shifted back inside the image by up to one tile)
    reach = math.ceil(size / step) + 1
    shape = np.asarray(image_shape, dtype=np.int64).reshape(-1)[-2:]
    cores = np.stack([t.core for t in targets])
    block = np.stack([cores[:, 0].min(axis=0), cores[:, 1].max(axis=0)])
    grown = np.stack([np.maximum(block[0] - reach * step, 0),
                      np.minimum(block[1] + reach * step, shape)])
    around = {t.grid: t for t in plan_tiles(grown, size, shape, overlap)}
    contributors: dict[tuple[int, int], list[tuple[int, int]]] = {}
    pool: dict[tuple[int, int], Tile] = {}
    offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    for t in targets:
        # one vectorised overlap test per target: this runs in the prediction worker, and
        # thousands of tiny numpy calls held the GIL long enough to stall napari's GUI thread
        near = [(t.grid[0] + dy, t.grid[1] + dx) for dy, dx in offsets]
        near = [cell for cell in near if cell in around]
        cells = []
        if near:
            boxes = np.stack([around[cell].bbox for cell in near])
            core = np.asarray(t.core)
            hit = np.all(np.maximum(boxes[:, 0], core[0]) < np.minimum(boxes[:, 1], core[1]),
                         axis=1)
            cells = [cell for cell, h in zip(near, hit) if h]
        for cell in cells:
            pool[cell] = around[cell]
        contributors[t.grid] = sorted(cells)
    return contributors, pool


def grid_cell_region(
    region: np.ndarray | Sequence, step: int, image_shape: Sequence[int]
) -> np.ndarray:
    """``region`` grown to whole cells of the global tile grid, clipped to the image.

    A prediction of the grown region fills every cell it touches completely, so a later,
    overlapping request never has to recompute a half-filled cell.
    """
    reg = np.asarray(region, dtype=np.float64)
    shape = np.asarray(image_shape, dtype=np.float64).reshape(-1)[-2:]
    lo = np.floor(np.floor(reg[0]) / step) * step
    hi = np.minimum(np.ceil(np.ceil(reg[1]) / step) * step, shape)
    return np.stack([np.maximum(lo, 0), hi])


def blend_weights(size: int, overlap: int, floor: float = 1e-3) -> np.ndarray:
    """``(S, S)`` float32 weights for blending overlapping tiles.

    A raised-cosine ramp over ``overlap`` pixels at every edge (product of 1-D ramps). For two
    tiles overlapping by exactly ``overlap`` the ramps sum to 1 pixel-wise, so blending with
    ``sum(w·p) / sum(w)`` is a smooth partition of unity; ``floor`` keeps weights > 0 where a
    tile is the only one (image borders, shifted border tiles). ``overlap=0`` gives ones.
    """
    s = _size(size)
    ov = int(overlap)
    if not 0 <= ov < s:
        raise InputError(f"overlap: expected an integer in [0, {s}), got {overlap!r}")
    w = np.ones(s, dtype=np.float64)
    if ov > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ov) + 0.5) / ov)
        w[:ov] = np.minimum(w[:ov], ramp)
        w[s - ov :] = np.minimum(w[s - ov :], ramp[::-1])
    w = np.maximum(w, floor)
    return np.outer(w, w).astype(np.float32)


# --------------------------------------------------------------------------------------------
# napari camera
# --------------------------------------------------------------------------------------------


def affine_from_scale_translate(
    scale: Sequence[float] = (1.0, 1.0), translate: Sequence[float] = (0.0, 0.0)
) -> np.ndarray:
    """3×3 homogeneous ``(y, x, 1)`` data→world affine from napari-style scale and translate
    (the last two displayed dims): ``world = data · scale + translate``."""
    sc = np.asarray(scale, dtype=np.float64).reshape(-1)[-2:]
    tr = np.asarray(translate, dtype=np.float64).reshape(-1)[-2:]
    a = np.eye(3)
    a[0, 0], a[1, 1] = sc
    a[:2, 2] = tr
    return a


def visible_data_bbox(
    camera_center: Sequence[float],
    zoom: float,
    canvas_size: Sequence[int],
    data_to_world: np.ndarray | tuple[Sequence[float], Sequence[float]],
    data_shape: Sequence[int],
) -> np.ndarray:
    """Bbox of the layer's data visible on the canvas (in data = MuViT world coordinates).

    Parameters
    ----------
    camera_center
        napari ``camera.center`` for the two displayed dims, in napari world units (extra
        leading entries are ignored).
    zoom
        napari ``camera.zoom``: screen pixels per world unit.
    canvas_size
        ``(height, width)`` of the canvas in screen pixels.
    data_to_world
        The layer's data→world transform for the displayed dims: a 3×3 homogeneous affine in
        ``(y, x)`` order (e.g. ``layer.affine`` composed with scale/translate, see
        :func:`affine_from_scale_translate`) or a ``(scale, translate)`` pair.
    data_shape
        Data ``(Y, X)`` of the layer (level 0 for multiscale layers).

    Returns
    -------
    ``(2, 2)`` float64 bbox clipped to ``[0, Y] × [0, X]``; zero extent (``y1 == y0`` or
    ``x1 == x0``) when the image is not on screen. All four canvas corners are mapped, so
    rotated/sheared layers yield the enclosing box.
    """
    if isinstance(data_to_world, tuple) and len(data_to_world) == 2:
        aff = affine_from_scale_translate(*data_to_world)
    else:
        aff = np.asarray(data_to_world, dtype=np.float64)
        if aff.shape != (3, 3):
            raise InputError(
                f"data_to_world: expected a 3x3 affine or (scale, translate), got shape {aff.shape}"
            )
    z = float(zoom)
    if not np.isfinite(z) or z <= 0:
        raise InputError(f"zoom: expected a positive number, got {zoom!r}")
    c = np.asarray(camera_center, dtype=np.float64).reshape(-1)[-2:]
    h, w = (float(v) for v in np.asarray(canvas_size).reshape(-1)[-2:])
    half = np.array([h, w]) / (2.0 * z)
    corners_w = np.array(
        [
            [c[0] - half[0], c[1] - half[1], 1.0],
            [c[0] - half[0], c[1] + half[1], 1.0],
            [c[0] + half[0], c[1] - half[1], 1.0],
            [c[0] + half[0], c[1] + half[1], 1.0],
        ]
    )
    try:
        inv = np.linalg.inv(aff)
    except np.linalg.LinAlgError as e:
        raise InputError(f"data_to_world: expected an invertible affine, got {aff.tolist()}") from e
    corners_d = corners_w @ inv.T
    lo = corners_d[:, :2].min(axis=0)
    hi = corners_d[:, :2].max(axis=0)
    shape = np.asarray(data_shape, dtype=np.float64).reshape(-1)[-2:]
    lo = np.clip(lo, 0, shape)
    hi = np.clip(hi, 0, shape)
    hi = np.maximum(hi, lo)
    return np.stack([lo, hi])
