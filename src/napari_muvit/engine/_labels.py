"""Where the painted pixels are: a tile-wise, incrementally updatable index of label arrays.

Training samples crops *around annotated pixels*, so the trainer needs the coordinates of the
painted pixels of every class.  Scanning a gigapixel label array at every step is out of the
question, and even one full scan per paint stroke is too slow, so the array is split into tiles
(its zarr/dask chunks, or 1024² blocks for numpy), each tile is scanned once, and a paint stroke
only rescans the tiles it touched (:meth:`LabelIndex.update`).  Zarr chunks that were never
written hold the fill value and are skipped without reading them.

Each tile keeps at most ``max_points_per_tile`` random coordinates per label value, so memory
stays bounded for dense labels (every pixel annotated) while sparse scribbles are kept whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from napari_muvit.errors import InputError

NUMPY_TILE = 1024
# Coarser than this many tiles per axis is pointless bookkeeping for tiny zarr chunks.
MIN_TILE = 256

Bbox = Sequence[Sequence[float]] | np.ndarray


def _axis_edges(size: int, chunk: int) -> np.ndarray:
    """Tile boundaries ``[0, c, 2c, ..., size]`` along one axis."""
    return np.unique(np.r_[np.arange(0, size, chunk), size]).astype(np.int64)


def _grid_edges(labels: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Tile boundaries per axis: dask chunks, zarr chunks (at least MIN_TILE), or NUMPY_TILE."""
    chunks = getattr(labels, "chunks", None)
    if chunks is not None and len(chunks) == 2 and isinstance(chunks[0], tuple):
        # dask: possibly irregular chunk sizes per axis
        ey, ex = (np.r_[0, np.cumsum(c)].astype(np.int64) for c in chunks)
        return ey, ex
    if chunks is not None and len(chunks) == 2 and all(isinstance(c, int) for c in chunks):
        # zarr: whole chunks per tile (a multiple, so a tile never splits a chunk)
        tiles = [c * max(1, -(-MIN_TILE // c)) for c in chunks]
        return _axis_edges(shape[0], tiles[0]), _axis_edges(shape[1], tiles[1])
    return _axis_edges(shape[0], NUMPY_TILE), _axis_edges(shape[1], NUMPY_TILE)


def _stored_zarr_chunks(labels: Any) -> set[tuple[int, ...]] | None:
    """Chunk grid coordinates that exist in a zarr v3 store, or ``None`` if unknown.

    Unwritten chunks read as the fill value; with fill value 0 (= not annotated) they can be
    skipped without any I/O.  Uses zarr internals defensively: any surprise means "scan all".
    """
    try:
        import zarr
        from zarr.core.sync import sync

        if not isinstance(labels, zarr.Array) or labels.shards is not None:
            return None
        if labels.fill_value not in (0, None):
            return None
        store_path = labels.store_path

        async def _list() -> list[str]:
            return [k async for k in store_path.store.list_prefix(prefix=store_path.path)]

        prefix = f"{store_path.path}/" if store_path.path else ""
        keys = {k[len(prefix) :] for k in sync(_list())}
        encode = labels.metadata.encode_chunk_key
        grid = labels.cdata_shape
        return {(i, j) for i in range(grid[0]) for j in range(grid[1]) if encode((i, j)) in keys}
    except Exception:  # noqa: BLE001 - private zarr API: any surprise means "scan everything"
        return None


class LabelIndex:
    """Coordinates of annotated pixels of one 2D label array, grouped by label value.

    Parameters
    ----------
    labels
        ``(Y, X)`` integer array: numpy, zarr, dask or anything sliceable with a ``shape``.
    dense
        If ``False`` (napari default), value 0 means "not annotated" and is not indexed; if
        ``True`` every pixel is annotated and 0 is a class like any other.
    exclude
        Optional bbox ``[[y0, x0], [y1, x1]]`` whose pixels are never indexed (held-out
        validation region).
    max_points_per_tile
        Cap of stored coordinates per label value and tile (random subset beyond it).
    """

    def __init__(
        self,
        labels: Any,
        *,
        dense: bool = False,
        exclude: Bbox | None = None,
        max_points_per_tile: int = 4096,
        seed: int = 0,
    ) -> None:
        shape = tuple(int(s) for s in labels.shape)
        if len(shape) != 2:
            raise InputError(f"labels must be 2D (Y, X), got shape {shape}")
        dtype = np.dtype(labels.dtype)
        if dtype.kind not in "iub":
            raise InputError(f"labels must hold integers, got dtype {dtype}")
        self.labels = labels
        self.shape: tuple[int, int] = shape  # type: ignore[assignment]
        self.dense = dense
        self.exclude = None if exclude is None else np.asarray(exclude, dtype=np.float64)
        self.max_points_per_tile = int(max_points_per_tile)
        self._rng = np.random.default_rng(seed)
        self.edges = _grid_edges(labels, shape)
        self._tiles: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        self._cache: dict[int, np.ndarray] | None = None
        self.tiles_scanned = 0
        self.negative_pixels: dict[tuple[int, int], int] = {}  # per scanned tile origin
        self.update(None)

    # ------------------------------------------------------------------ scanning
    def _tile_slices(self, ti: int, tj: int) -> tuple[slice, slice]:
        ey, ex = self.edges
        return slice(int(ey[ti]), int(ey[ti + 1])), slice(int(ex[tj]), int(ex[tj + 1]))

    def _scan_tile(self, ti: int, tj: int) -> dict[int, np.ndarray]:
        """Painted coordinates per value of one tile (global pixel coordinates)."""
        sy, sx = self._tile_slices(ti, tj)
        block = np.asarray(self.labels[sy, sx])
        # negative values are never classes (the sampler maps them to "ignore" as well); they
        # are counted so that the trainer can say so instead of ignoring them silently
        if block.dtype.kind == "i":
            self.negative_pixels[(sy.start, sx.start)] = int(np.count_nonzero(block < 0))
        mask = block >= 0 if self.dense else block > 0
        if self.exclude is not None:
            mask &= ~self._inside_exclude(sy, sx)
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            return {}
        values = block[ys, xs].astype(np.int64)
        out: dict[int, np.ndarray] = {}
        for value in np.unique(values):
            sel = np.flatnonzero(values == value)
            if sel.size > self.max_points_per_tile:
                sel = self._rng.choice(sel, self.max_points_per_tile, replace=False)
            out[int(value)] = np.stack([ys[sel] + sy.start, xs[sel] + sx.start], 1)
        return out

    def _inside_exclude(self, sy: slice, sx: slice) -> np.ndarray:
        """Boolean mask of the tile's pixels that lie in the excluded (validation) bbox."""
        (ey0, ex0), (ey1, ex1) = self.exclude  # type: ignore[misc]
        ys = np.arange(sy.start, sy.stop)
        xs = np.arange(sx.start, sx.stop)
        return ((ys >= ey0) & (ys < ey1))[:, None] & ((xs >= ex0) & (xs < ex1))[None, :]

    def _tiles_touching(self, bbox: Bbox) -> Iterable[tuple[int, int]]:
        """Tile indices overlapping a pixel bbox ``[[y0, x0], [y1, x1]]``."""
        box = np.asarray(bbox, dtype=np.float64)
        ey, ex = self.edges
        i0 = max(int(np.searchsorted(ey, box[0, 0], side="right")) - 1, 0)
        i1 = min(int(np.searchsorted(ey, box[1, 0], side="left")), len(ey) - 1)
        j0 = max(int(np.searchsorted(ex, box[0, 1], side="right")) - 1, 0)
        j1 = min(int(np.searchsorted(ex, box[1, 1], side="left")), len(ex) - 1)
        return [(i, j) for i in range(i0, i1) for j in range(j0, j1)]

    def update(self, regions: Iterable[Bbox] | None = None) -> int:
        """Rescan the tiles touched by ``regions`` (pixel bboxes); ``None`` rescans everything.

        Returns the number of tiles read.  Call it after painting with the bbox of the stroke.
        """
        if regions is None:
            self._tiles.clear()
            ny, nx = len(self.edges[0]) - 1, len(self.edges[1]) - 1
            stored = _stored_zarr_chunks(self.labels)
            todo = [(i, j) for i in range(ny) for j in range(nx)]
            if stored is not None and not self.dense:
                todo = [t for t in todo if self._tile_has_stored_chunk(t, stored)]
        else:
            todo = sorted({t for bbox in regions for t in self._tiles_touching(bbox)})
        for tile in todo:
            points = self._scan_tile(*tile)
            if points:
                self._tiles[tile] = points
            else:
                self._tiles.pop(tile, None)
        self.tiles_scanned += len(todo)
        self._cache = None
        return len(todo)

    def _tile_has_stored_chunk(self, tile: tuple[int, int], stored: set[tuple[int, ...]]) -> bool:
        """Whether any zarr chunk inside ``tile`` exists in the store."""
        cy, cx = self.labels.chunks
        sy, sx = self._tile_slices(*tile)
        return any(
            (i, j) in stored
            for i in range(sy.start // cy, -(-sy.stop // cy))
            for j in range(sx.start // cx, -(-sx.stop // cx))
        )

    # ------------------------------------------------------------------ queries
    def points_by_value(self) -> dict[int, np.ndarray]:
        """``{label value: (N, 2) int64 (y, x) coordinates}`` of all indexed pixels."""
        if self._cache is None:
            merged: dict[int, list[np.ndarray]] = {}
            for points in self._tiles.values():
                for value, coords in points.items():
                    merged.setdefault(value, []).append(coords)
            self._cache = {v: np.concatenate(c) for v, c in sorted(merged.items())}
        return self._cache

    @property
    def values(self) -> list[int]:
        """Label values that are painted (sorted)."""
        return list(self.points_by_value())

    def counts(self) -> dict[int, int]:
        """Number of indexed pixels per label value (capped per tile, see class doc)."""
        return {v: len(c) for v, c in self.points_by_value().items()}
