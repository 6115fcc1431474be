"""Where predicted tiles go: an in-memory array or a resumable OME-Zarr labels image.

A *sink* receives :class:`TileResult` objects (labels, and optionally class probabilities, of
one tile's *core*, i.e. the output pixels that tile owns) from the
:class:`~napari_muvit.engine.predictor.Predictor`, which imports this module (never the other
way round). Two sinks exist:

* :class:`MemorySink`: numpy arrays for a region (the viewer and the Python API).
* :class:`ZarrSink`: a zarr v3 OME-Zarr (NGFF 0.5) labels image on disk with a nearest-neighbour
  multiscale pyramid, an optional probability array, and a per-tile ``done`` record so that an
  interrupted run resumes where it stopped. Tiles are buffered per zarr chunk and each chunk is
  written whole once its tiles are in, so memory stays bounded by a few chunks whatever the
  image size, no chunk is read-modify-written by two processes (Dask workers own whole chunks),
  and a tile is marked done only after its pixels are on disk.

The store layout (all world = level-1 pixel coordinates, the full image extent, so it overlays
the image in napari without any translation; pixels outside the predicted region are 0)::

    OUT.zarr/            group, attrs: ome (multiscales + image-label), napari_muvit (status)
      0, 1, 2, ...       labels (Y, X), (Y/2, X/2), ... uint8/uint16/uint32
      probabilities/0    float16 (K, Y, X)        only with probabilities=True
      done               bool (ceil(Y/step), ceil(X/step))   one flag per tile grid cell

A :class:`LevelLayout` changes where the levels go and what they look like (the labels of a
source OME-Zarr: the image's level shapes and downsampling, its axes with size-1 non-spatial
axes, zarr v2 or v3, and the NGFF attributes of the store's version); see
:mod:`napari_muvit.engine.ome_labels`.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_muvit.data.geometry import Tile, clip_region, grid_cell_range
from napari_muvit.errors import InputError
from napari_muvit.locks import AdvisoryLock

if TYPE_CHECKING:  # pragma: no cover
    import zarr

STORE_FORMAT = "napari-muvit-prediction"
STORE_FORMAT_VERSION = 1
STATUS_INCOMPLETE = "incomplete"
STATUS_COMPLETE = "complete"
NGFF_VERSION = "0.5"
DEFAULT_CHUNK = 512
MIN_PYRAMID_SIZE = 256

__all__ = [
    "STORE_FORMAT",
    "LevelLayout",
    "MemorySink",
    "TileResult",
    "ZarrSink",
    "label_dtype",
    "read_store_info",
]


# --------------------------------------------------------------------------------------------
# what a sink receives
# --------------------------------------------------------------------------------------------


@dataclass
class TileResult:
    """Prediction of one tile's core (the output pixels the tile owns).

    Attributes
    ----------
    tile
        The :class:`~napari_muvit.data.geometry.Tile`; ``tile.core`` is where ``labels`` go.
    labels
        ``(h, w)`` label values (``label_values[argmax]``; 0 for skipped empty tiles).
    probs
        ``(K, h, w)`` float16 class probabilities, or ``None`` when not requested.
    skipped
        The tile was judged empty (``skip_empty``) and not run through the model.
    cached
        Every tile this result depends on came from the tile cache.
    """

    tile: Tile
    labels: np.ndarray
    probs: np.ndarray | None = None
    skipped: bool = False
    cached: bool = False


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def label_dtype(num_classes: int, label_values: Sequence[int] | None = None) -> np.dtype:
    """Smallest unsigned integer dtype holding every output label value."""
    values = list(label_values) if label_values is not None else list(range(num_classes + 1))
    if any(int(v) < 0 for v in values):
        raise InputError(f"label_values: expected non-negative integers, got {values}")
    top = max((int(v) for v in values), default=0)
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise InputError(f"label_values: {top} does not fit a 32-bit label image")


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    lo = np.maximum(a[0], b[0])
    hi = np.minimum(a[1], b[1])
    if np.any(hi <= lo):
        return None
    return np.stack([lo, hi]).astype(np.int64)


def _core_and_offsets(
    result: TileResult, region: np.ndarray
) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """Part of the result's core inside ``region`` and the matching slices into the result."""
    core = np.asarray(result.tile.core, dtype=np.int64)
    part = _intersect(core, region)
    if part is None:
        return None
    src = (
        slice(int(part[0, 0] - core[0, 0]), int(part[1, 0] - core[0, 0])),
        slice(int(part[0, 1] - core[0, 1]), int(part[1, 1] - core[0, 1])),
    )
    return part, src


def _pyramid_shapes(image_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Level shapes of the nearest-neighbour pyramid (factor 2), coarsest <= MIN_PYRAMID_SIZE."""
    y, x = (int(v) for v in image_shape)
    shapes = [(y, x)]
    while max(y, x) > MIN_PYRAMID_SIZE:
        y, x = math.ceil(y / 2), math.ceil(x / 2)
        shapes.append((y, x))
    return shapes


def _downsample_slices(lo: int, hi: int, factor: int) -> tuple[int, int, int]:
    """Level-k index range ``[a, b)`` sampling world ``[lo, hi)`` at multiples of ``factor``,
    and the offset of the first sample inside ``[lo, hi)``.

    Nearest-neighbour level k keeps world pixels ``i·2^k``; a world interval owns exactly the
    samples that fall inside it, so chunks written independently never overlap in level k.
    """
    a = -(-lo // factor)
    b = -(-hi // factor)
    return a, b, a * factor - lo


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


class MemorySink:
    """Prediction of a region held in numpy arrays.

    Parameters
    ----------
    region
        Integer world bbox ``[[y0, x0], [y1, x1]]`` of the output.
    num_classes
        Number of model classes ``K`` (size of the probability axis).
    probabilities
        Also keep ``(K, h, w)`` float16 class probabilities in :attr:`probs`.
    label_values
        Output label values (to choose the smallest label dtype); default ``0..K``.

    Attributes
    ----------
    labels
        ``(h, w)`` label image of the region (0 where nothing was predicted yet).
    probs
        ``(K, h, w)`` float16 or ``None``.
    written
        ``(h, w)`` bool: pixels written so far (useful after a cancel).
    """

    def __init__(
        self,
        region: np.ndarray | Sequence,
        num_classes: int,
        probabilities: bool = False,
        label_values: Sequence[int] | None = None,
    ) -> None:
        reg = np.asarray(region, dtype=np.int64)
        if reg.shape != (2, 2) or np.any(reg[1] <= reg[0]):
            raise InputError(f"region: expected a non-empty [[y0, x0], [y1, x1]], got {reg.tolist()}")
        self.region = reg
        self.num_classes = int(num_classes)
        self.wants_probabilities = bool(probabilities)
        h, w = (int(v) for v in reg[1] - reg[0])
        self.labels = np.zeros((h, w), dtype=label_dtype(self.num_classes, label_values))
        self.probs = (
            np.zeros((self.num_classes, h, w), dtype=np.float16) if probabilities else None
        )
        self.written = np.zeros((h, w), dtype=bool)

    def blocks(self, region: np.ndarray | None = None) -> list[np.ndarray]:
        """The region in one block (everything fits in memory by construction)."""
        reg = self.region if region is None else _intersect(self.region, np.asarray(region))
        return [] if reg is None else [reg]

    def is_done(self, tile: Tile) -> bool:
        """Memory sinks start empty: nothing to resume."""
        return False

    def remaining(self, region: np.ndarray | None = None) -> int | None:
        """Unknown up-front (the planner counts tiles)."""
        return None

    def write(self, result: TileResult) -> None:
        """Copy the part of the tile's core inside the region."""
        hit = _core_and_offsets(result, self.region)
        if hit is None:
            return
        part, src = hit
        dst = (
            slice(int(part[0, 0] - self.region[0, 0]), int(part[1, 0] - self.region[0, 0])),
            slice(int(part[0, 1] - self.region[0, 1]), int(part[1, 1] - self.region[0, 1])),
        )
        self.labels[dst] = result.labels[src]
        self.written[dst] = True
        if self.probs is not None and result.probs is not None:
            self.probs[(slice(None), *dst)] = result.probs[(slice(None), *src)]

    def close(self, complete: bool | None = None) -> None:
        """Nothing to flush."""


# --------------------------------------------------------------------------------------------
# zarr
# --------------------------------------------------------------------------------------------


def read_store_info(path: str | Path) -> dict[str, Any] | None:
    """The ``napari_muvit`` attributes of a prediction store, or ``None`` if ``path`` is not one.

    Never raises for foreign data: anything that is not our store returns ``None``.
    """
    import json

    path = Path(path)
    try:
        if (path / "zarr.json").is_file():
            meta = json.loads((path / "zarr.json").read_text())
            attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
        else:  # zarr v2 (labels inside an NGFF 0.4 image)
            attrs = json.loads((path / ".zattrs").read_text())
    except (OSError, ValueError):
        return None
    info = attrs.get("napari_muvit") if isinstance(attrs, dict) else None
    if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
        return None
    return info


def _check_writable(path: Path) -> None:
    """Raise :class:`InputError` if ``path`` cannot be created (before any work starts)."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"output {str(path)!r}: cannot create folder {str(parent)!r}: {err}") from None
    if not parent.is_dir():
        raise InputError(f"output {str(path)!r}: {str(parent)!r} is not a folder")
    probe = parent / f".napari-muvit-write-test-{path.name}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"output {str(path)!r}: folder {str(parent)!r} is not writable ({err})") from None


def _ngff_attrs(
    name: str,
    n_levels: int,
    label_values: Sequence[int],
    class_names: Sequence[str] | None,
    class_colors: Sequence[Sequence[float]] | None,
) -> dict[str, Any]:
    datasets = [
        {
            "path": str(k),
            # level k keeps world pixels i·2^k (nearest): pixel centres line up with scale only
            "coordinateTransformations": [{"type": "scale", "scale": [2.0**k, 2.0**k]}],
        }
        for k in range(n_levels)
    ]
    properties = []
    colors = []
    for i, value in enumerate(label_values):
        prop: dict[str, Any] = {"label-value": int(value)}
        if class_names is not None and i < len(class_names):
            prop["class"] = str(class_names[i])
        properties.append(prop)
        if class_colors is not None and i < len(class_colors):
            rgba = [float(c) for c in class_colors[i]]
            if len(rgba) == 3:
                rgba.append(1.0)
            colors.append({"label-value": int(value), "rgba": [round(255 * c) for c in rgba]})
    label_meta: dict[str, Any] = {"version": NGFF_VERSION, "properties": properties}
    if colors:
        label_meta["colors"] = colors
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "y", "type": "space", "unit": "pixel"},
                    {"name": "x", "type": "space", "unit": "pixel"},
                ],
                "datasets": datasets,
                "type": "nearest",
                "metadata": {"method": "numpy slicing [::2, ::2] (nearest neighbour)"},
            }
        ],
        "image-label": label_meta,
    }


@dataclass(frozen=True)
class LevelLayout:
    """How a :class:`ZarrSink` lays out its label levels (default: our own store).

    Attributes
    ----------
    shapes
        ``(Y, X)`` of each level, level 0 = the image.
    factors
        Integer ``(fy, fx)`` downsampling of each level relative to level 0 (level 0 is
        ``(1, 1)``), each a multiple of the previous one: level ``k`` pixel ``(i, j)`` is
        level-0 pixel ``(i·fy, j·fx)`` (nearest neighbour).
    axes
        Axis names of the label arrays; every axis but ``y`` and ``x`` has size 1.
    zarr_format
        2 or 3.
    attrs
        NGFF attributes written as the group's attributes (in the store version's layout).
    """

    shapes: tuple[tuple[int, int], ...]
    factors: tuple[tuple[int, int], ...]
    axes: str = "yx"
    zarr_format: int = 3
    attrs: dict[str, Any] | None = None

    @classmethod
    def default(cls, image_shape: Sequence[int]) -> LevelLayout:
        """Our own store: a factor-2 pyramid down to ``MIN_PYRAMID_SIZE``, zarr v3, 2-D."""
        shapes = tuple(_pyramid_shapes(image_shape))
        return cls(shapes, tuple((2**k, 2**k) for k in range(len(shapes))))

    def array_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The ``(.., Y, X)`` array shape of a level with ``(Y, X)`` plane ``shape``."""
        plane = {"y": int(shape[0]), "x": int(shape[1])}
        return tuple(plane.get(a, 1) for a in self.axes)


class _PlaneView:
    """The ``(y, x)`` plane of a zarr array whose other axes have size 1, indexed in 2-D."""

    def __init__(self, array: Any, axes: str) -> None:
        self.array = array
        self._iy, self._ix = axes.index("y"), axes.index("x")
        self.shape = (int(array.shape[self._iy]), int(array.shape[self._ix]))
        self.chunks = (int(array.chunks[self._iy]), int(array.chunks[self._ix]))
        self.dtype = array.dtype
        self.ndim = 2

    def _key(self, key: Any) -> tuple:
        ky, kx = key if isinstance(key, tuple) else (key, slice(None))
        full: list[Any] = [slice(None)] * self.array.ndim
        full[self._iy], full[self._ix] = ky, kx
        return tuple(full)

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.asarray(self.array[self._key(key)])
        keep = [self._iy, self._ix]
        return out.reshape(tuple(out.shape[i] for i in keep)) if out.ndim > 2 else out

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        sel = self._key(key)
        value = np.asarray(value)
        shape = [1] * self.array.ndim
        shape[self._iy], shape[self._ix] = value.shape
        self.array[sel] = value.reshape(shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)


def _plane(array: Any, axes: str) -> Any:
    return array if axes == "yx" else _PlaneView(array, axes)


def _zarr_format(path: Path) -> int:
    return 3 if (path / "zarr.json").is_file() else 2


class ChunkPlan(Sequence):
    """Chunk bboxes ``((y0, x0), (y1, x1))`` (clipped to a region) in processing order,
    stored as an ``(N, 2)`` int32 array of chunk indices."""

    def __init__(self, keys: np.ndarray, chunk: int, region: np.ndarray) -> None:
        self.keys = keys
        self.chunk = int(chunk)
        self.region = np.asarray(region, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[tuple[int, int], tuple[int, int]]:  # type: ignore[override]
        iy, ix = (int(v) for v in self.keys[i])
        c = self.chunk
        (ry0, rx0), (ry1, rx1) = self.region.tolist()
        return ((max(iy * c, ry0), max(ix * c, rx0)), (min((iy + 1) * c, ry1), min((ix + 1) * c, rx1)))


class _ChunkBuffer:
    """Labels (and probabilities) of one level-0 chunk being filled by tiles."""

    def __init__(self, bbox: np.ndarray, labels: np.ndarray, probs: np.ndarray | None) -> None:
        self.bbox = bbox
        self.labels = labels
        self.probs = probs
        self.pending: set[tuple[int, int]] = set()
        self.missing: set[tuple[int, int]] = set()


class ZarrSink:
    """Resumable OME-Zarr (zarr v3, NGFF 0.5) labels output; see the module docstring.

    Create with :meth:`create` (checks the path, refuses to clobber, resumes a matching
    incomplete store) or attach to an existing store with :meth:`open` (Dask workers).
    """

    def __init__(self, path: Path, group: zarr.Group, write_pyramid: bool = True,
                 max_buffered_chunks: int = 8, resumed: bool = False,
                 finalize: bool = True, fresh: bool = False) -> None:
        info = dict(group.attrs["napari_muvit"])
        self.path = path
        self.group = group
        self.info = info
        self.image_shape = tuple(int(v) for v in info["image_shape"])
        self.tile_size = int(info["tile_size"])
        self.overlap = int(info["overlap"])
        self.step = self.tile_size - self.overlap
        self.chunk_size = int(info["chunk_size"])
        self.region = np.asarray(info["region"], dtype=np.int64)
        self.num_classes = int(info["num_classes"])
        self.label_values = [int(v) for v in info["label_values"]]
        self.wants_probabilities = bool(info["probabilities"])
        self.n_levels = int(info["pyramid_levels"])
        # stores written before layouts existed: factor-2 pyramid, 2-D arrays
        self.factors = [
            (int(f[0]), int(f[1]))
            for f in info.get("pyramid_factors") or [(2**k, 2**k) for k in range(self.n_levels)]
        ]
        self.axes = str(info.get("axes", "yx"))
        self.write_pyramid = write_pyramid
        self.max_buffered_chunks = max(1, int(max_buffered_chunks))
        self.resumed = resumed
        # only the process that created the store may declare it complete (not Dask workers)
        self.finalize = finalize
        self._levels = [_plane(group[str(k)], self.axes) for k in range(self.n_levels)]
        self._probs = group["probabilities/0"] if self.wants_probabilities else None
        self._done = group["done"]
        self._buffers: OrderedDict[tuple[int, int], _ChunkBuffer] = OrderedDict()
        # done flags of the chunks touched recently, one small block per chunk (bounded LRU)
        self._done_blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cells_per_chunk = self.chunk_size // self.step
        # cells flushed so far when the store started empty (None: unknown, read the flags)
        self._done_count: int | None = 0 if fresh else None
        self.chunks_written = 0
        self.repaired: list[str] = []  # chunk files found damaged and recomputed on resume
        self._lock: AdvisoryLock | None = None

    # ---------------------------------------------------------------- creation / opening

    @classmethod
    def create(
        cls,
        path: str | Path,
        image_shape: Sequence[int],
        tile_size: int,
        num_classes: int,
        *,
        overlap: int = 0,
        region: np.ndarray | Sequence | None = None,
        label_values: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        class_colors: Sequence[Sequence[float]] | None = None,
        probabilities: bool = False,
        chunk_size: int | None = None,
        fingerprint: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = True,
        write_pyramid: bool = True,
        name: str = "labels",
        layout: LevelLayout | None = None,
        lock: bool = True,
        input_path: str | None = None,
    ) -> ZarrSink:
        """Create (or resume) a prediction store at ``path``.

        * ``path`` does not exist (or is an empty folder): a new store, marked incomplete.
        * ``path`` is an *incomplete* napari-muvit store with the same fingerprint, region,
          tile plan and outputs, and ``resume=True``: it is reopened and only missing tiles are
          computed.
        * ``path`` is another napari-muvit store: replaced only with ``overwrite=True``.
          ``overwrite=True`` always starts a fresh store (it never resumes).
        * anything else (user data): always refused, even with ``overwrite=True``.

        ``layout`` (default :meth:`LevelLayout.default`) sets the levels, axes, zarr format
        and NGFF attributes (e.g. labels inside a source OME-Zarr).

        ``fingerprint`` holds what must match to resume (model, normalisation, the input's
        :func:`~napari_muvit.data.pyramid.input_fingerprint`); a mismatch is named in the error.
        With ``lock`` (default) the store's :class:`~napari_muvit.locks.AdvisoryLock` is held
        from here until :meth:`close`: a second writer gets a one-line error. ``input_path``
        (the image's file) is recorded to name it in later messages. Undecodable chunks of a
        resumed store are recomputed (see :meth:`_repair_damaged_chunks`).
        """
        path = Path(path).expanduser().absolute()
        shape = tuple(int(v) for v in image_shape)
        reg = clip_region(region, shape)
        values = list(range(num_classes)) if label_values is None else [int(v) for v in label_values]
        if len(values) != num_classes:
            raise InputError(f"label_values: expected {num_classes} values, got {len(values)}")
        step = int(tile_size) - int(overlap)
        chunk = _chunk_size(step, chunk_size)
        layout = LevelLayout.default(shape) if layout is None else layout
        wanted = {
            "format": STORE_FORMAT,
            "format_version": STORE_FORMAT_VERSION,
            "image_shape": list(shape),
            "region": reg.tolist(),
            "tile_size": int(tile_size),
            "overlap": int(overlap),
            "chunk_size": chunk,
            "num_classes": int(num_classes),
            "label_values": values,
            "class_names": list(class_names) if class_names is not None else None,
            "probabilities": bool(probabilities),
            "pyramid_levels": len(layout.shapes),
            "pyramid_factors": [list(f) for f in layout.factors],
            "axes": layout.axes,
            "fingerprint": fingerprint or {},
        }
        if input_path is not None:
            wanted["input_path"] = str(input_path)
        store_lock = None
        if lock:
            _check_writable(path)  # creates the parent folder the lock file lives in
            store_lock = AdvisoryLock(path, "prediction store")
            store_lock.acquire()  # before looking at the path: nobody else decides about it now
        try:
            sink = cls._create_locked(path, shape, wanted, values, class_names, class_colors,
                                      overwrite=overwrite, resume=resume,
                                      write_pyramid=write_pyramid, name=name, layout=layout)
        except BaseException:
            if store_lock is not None:
                store_lock.release()
            raise
        sink._hold(store_lock)
        return sink

    @classmethod
    def _create_locked(
        cls, path: Path, shape: tuple[int, int], wanted: dict[str, Any], values: list[int],
        class_names: Sequence[str] | None, class_colors: Sequence[Sequence[float]] | None, *,
        overwrite: bool, resume: bool, write_pyramid: bool, name: str, layout: LevelLayout,
    ) -> ZarrSink:
        import zarr

        _remove_trash(path)
        existing = _existing_kind(path)
        if existing == "ours":
            info = read_store_info(path) or {}
            differences = _differences(info, wanted)
            # overwrite means a fresh store: never resume, whatever is there
            if (resume and not overwrite and info.get("status") == STATUS_INCOMPLETE
                    and not differences):
                try:
                    group = zarr.open_group(str(path), mode="r+", zarr_format=_zarr_format(path))
                    sink = cls(path, group, write_pyramid=write_pyramid, resumed=True)
                except KeyError:
                    # interrupted while creating its arrays: our own empty store, start over
                    overwrite = True
                except Exception as err:
                    raise InputError(
                        f"output {str(path)!r} is a damaged unfinished prediction ({err}); pass "
                        "overwrite=True (--overwrite) to start afresh or choose another path"
                    ) from None
                else:
                    sink.repaired = sink._repair_damaged_chunks()
                    return sink
            if not overwrite:
                if info.get("status") == STATUS_COMPLETE:
                    why = "a finished prediction"
                else:
                    why = f"an unfinished prediction with different settings: {'; '.join(differences)}"
                    if info.get("input_path"):
                        why += f"; it was started on {info['input_path']}"
                raise InputError(
                    f"output {str(path)!r} already exists ({why}); pass overwrite=True "
                    "(--overwrite) to start afresh or choose another path"
                )
            _remove_store(path)
        elif existing == "foreign":
            raise InputError(
                f"output {str(path)!r} already exists and is not a napari-muvit prediction; "
                "refusing to touch it (even with overwrite) - choose another path"
            )
        _check_writable(path)
        ngff = layout.attrs
        if ngff is None:
            ngff = {"ome": _ngff_attrs(name, len(layout.shapes), values, class_names, class_colors)}
        attrs = {**ngff, "napari_muvit": {**wanted, "status": STATUS_INCOMPLETE}}
        group = zarr.open_group(str(path), mode="w", zarr_format=layout.zarr_format,
                                attributes=attrs)
        _create_arrays(group, layout, shape, wanted["chunk_size"],
                       wanted["tile_size"] - wanted["overlap"], wanted["num_classes"], values,
                       wanted["probabilities"])
        return cls(path, group, write_pyramid=write_pyramid, fresh=True)

    def _hold(self, store_lock: AdvisoryLock | None) -> None:
        """Keep ``store_lock`` until :meth:`close` (or until this sink is garbage-collected)."""
        self._lock = store_lock
        if store_lock is not None:
            self._lock_finalizer = weakref.finalize(self, store_lock.release)

    def release_lock(self) -> None:
        """Let other runs write this store again (done by :meth:`close`)."""
        store_lock = getattr(self, "_lock", None)
        if store_lock is not None:
            store_lock.release()
            self._lock = None

    def _repair_damaged_chunks(self) -> list[str]:
        """Decode every chunk written so far; undecodable ones are deleted and recomputed.

        A damaged label or probability chunk loses its cells' done flags (recomputed on this
        run), a damaged done-flag chunk resets its flags (its chunk is recomputed), a damaged
        coarse pyramid chunk is rebuilt from the level below. Each repair is reported with a
        one-line warning naming the chunk file. Reads every written chunk once (resume only).
        """
        arrays: list[tuple[str, Any]] = [("done", self._done)]
        # the zarr arrays themselves (a layout's levels may be 2-D views of n-D arrays)
        arrays += [(str(k), self.group[str(k)]) for k in range(self.n_levels)]
        if self._probs is not None:
            arrays.append(("probabilities/0", self._probs))
        repaired: list[str] = []
        coarse: list[tuple[int, tuple[int, ...]]] = []
        for name, array in arrays:
            for coords, file in _chunk_files(self.path / name):
                try:
                    array.get_block_selection(coords)
                except Exception as err:  # zarr/numcodecs raise RuntimeError, ValueError...
                    file.unlink()
                    repaired.append(str(file))
                    warnings.warn(
                        f"prediction store {self.path}: chunk {file} was unreadable ({err}); "
                        "it is recomputed", RuntimeWarning, stacklevel=4,
                    )
                    if name in ("0", "probabilities/0"):
                        self._forget_chunk(coords[-2:])
                    elif name != "done":
                        coarse.append((int(name), coords))
        for level, coords in sorted(coarse):
            if self.write_pyramid:  # else the pyramid is rebuilt after all tiles anyway
                array = self._levels[level]  # (y, x): the last two chunk coordinates
                lo = np.array(coords[-2:]) * np.array(array.chunks)
                box = np.stack([lo, np.minimum(lo + array.chunks, array.shape)])
                build_pyramid_chunk(self, level, box)
        return repaired

    def _forget_chunk(self, key: Sequence[int]) -> None:
        """Mark every cell of level-0 chunk ``key`` as not done (it will be recomputed)."""
        n = self._cells_per_chunk
        r0, q0 = int(key[0]) * n, int(key[1]) * n
        rows = min(n, self._done.shape[0] - r0)
        cols = min(n, self._done.shape[1] - q0)
        self._done[r0 : r0 + rows, q0 : q0 + cols] = False
        self._done_blocks.pop((int(key[0]), int(key[1])), None)

    @classmethod
    def open(cls, path: str | Path, write_pyramid: bool = False,
             max_buffered_chunks: int = 8) -> ZarrSink:
        """Attach to an existing prediction store for writing (Dask workers, inspection)."""
        import zarr

        path = Path(path).expanduser().absolute()
        if read_store_info(path) is None:
            raise InputError(f"{str(path)!r} is not a napari-muvit prediction store")
        group = zarr.open_group(str(path), mode="r+", zarr_format=_zarr_format(path))
        return cls(path, group, write_pyramid=write_pyramid,
                   max_buffered_chunks=max_buffered_chunks, finalize=False)

    # ---------------------------------------------------------------- state

    @property
    def complete(self) -> bool:
        """Whether the store is marked complete (re-read from disk)."""
        info = read_store_info(self.path) or {}
        return info.get("status") == STATUS_COMPLETE

    def expect_external_writes(self) -> None:
        """Other processes (Dask workers) write into this store: from now on read the done
        flags from disk instead of counting this sink's own flushes."""
        self._done_count = None
        self._done_blocks.clear()

    def labels(self, level: int = 0) -> zarr.Array:
        """The zarr array of pyramid level ``level`` (0 = full resolution); with a layout of
        more than two axes, a 2-D view of its ``(y, x)`` plane."""
        return self._levels[level]

    @property
    def probabilities(self) -> zarr.Array | None:
        """The ``(K, Y, X)`` float16 probability array, if requested."""
        return self._probs

    def cell_range(self, region: np.ndarray | None = None) -> tuple[range, range]:
        """Grid cells (rows, columns) whose cores intersect ``region`` (default: the store's)."""
        return grid_cell_range(self.region if region is None else region, self.step)

    def done_mask(self, region: np.ndarray | None = None) -> np.ndarray:
        """Done flags of the cells of ``region`` (2-D bool)."""
        rows, cols = self.cell_range(region)
        return np.asarray(self._done[rows.start : rows.stop, cols.start : cols.stop], dtype=bool)

    def _done_block(self, key: tuple[int, int]) -> np.ndarray:
        """Done flags of chunk ``key``'s cells (cached; the owner of a chunk keeps it current)."""
        block = self._done_blocks.get(key)
        if block is None:
            n = self._cells_per_chunk
            block = np.asarray(
                self._done[key[0] * n : (key[0] + 1) * n, key[1] * n : (key[1] + 1) * n], dtype=bool
            ).copy()
            self._done_blocks[key] = block
            while len(self._done_blocks) > 4 * self.max_buffered_chunks:
                self._done_blocks.popitem(last=False)
        else:
            self._done_blocks.move_to_end(key)
        return block

    def _cell_done(self, iy: int, ix: int) -> bool:
        n = self._cells_per_chunk
        return bool(self._done_block(self._chunk_of(iy, ix))[iy % n, ix % n])

    def is_done(self, tile: Tile) -> bool:
        """Whether ``tile``'s cell is already written (this run, an earlier flush or run)."""
        iy, ix = tile.grid
        buf = self._buffers.get(self._chunk_of(iy, ix))
        if buf is not None and (iy, ix) in buf.pending:
            return True
        return self._cell_done(iy, ix)

    def remaining(self, region: np.ndarray | None = None) -> int:
        """Number of cells in ``region`` (∩ the store's region) still to compute."""
        reg = self.region if region is None else _intersect(self.region, np.asarray(region))
        if reg is None:
            return 0
        rows, cols = self.cell_range(reg)
        if self._done_count is not None and np.array_equal(reg, self.region):
            # counted, not read: a fresh 64k² store would otherwise probe 16k missing chunks
            return len(rows) * len(cols) - self._done_count
        if self._done_count == 0:
            return len(rows) * len(cols)
        return int((~self.done_mask(reg)).sum())

    def blocks(self, region: np.ndarray | None = None) -> ChunkPlan:
        """Level-0 chunks (∩ region) with missing cells, centre-first.

        The predictor plans and flushes one chunk at a time, so every chunk is written whole
        and memory does not grow with the image size (the plan itself keeps 8 bytes per chunk).
        """
        reg = self.region if region is None else _intersect(self.region, np.asarray(region))
        if reg is None:
            return ChunkPlan(np.zeros((0, 2), np.int32), self.chunk_size, self.region)
        c = self.chunk_size
        (ry0, rx0), (ry1, rx1) = reg.tolist()
        cy, cx = (np.asarray(axis) for axis in grid_cell_range(reg, c))
        ky, kx = (a.ravel() for a in np.meshgrid(cy, cx, indexing="ij"))
        mid_y = (np.maximum(ky * c, ry0) + np.minimum((ky + 1) * c, ry1)) / 2
        mid_x = (np.maximum(kx * c, rx0) + np.minimum((kx + 1) * c, rx1)) / 2
        dist = np.round(np.hypot(mid_y - (ry0 + ry1) / 2, mid_x - (rx0 + rx1) / 2), 6)
        order = np.lexsort((kx, ky, dist))
        keys = np.stack([ky[order], kx[order]], axis=1).astype(np.int32)
        if self._done_count != 0:  # a fresh store has no finished chunk: skip reading flags
            finished = self._finished_chunks(reg, cy, cx)
            keys = keys[~finished[keys[:, 0] - cy[0], keys[:, 1] - cx[0]]]
        return ChunkPlan(keys, c, reg)

    def _finished_chunks(self, reg: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
        """(len(cy), len(cx)) bool: every cell of the chunk inside ``reg`` is done (one read
        of the region's flags, which are ~step² times smaller than the labels)."""
        n = self._cells_per_chunk
        rows, cols = self.cell_range(reg)
        full = np.ones((len(cy) * n, len(cx) * n), dtype=bool)  # outside the region = done
        r0, q0 = rows.start - int(cy[0]) * n, cols.start - int(cx[0]) * n
        full[r0 : r0 + len(rows), q0 : q0 + len(cols)] = self.done_mask(reg)
        return full.reshape(len(cy), n, len(cx), n).all(axis=(1, 3))

    # ---------------------------------------------------------------- writing

    def _chunk_of(self, iy: int, ix: int) -> tuple[int, int]:
        return iy // self._cells_per_chunk, ix // self._cells_per_chunk

    def _chunk_bbox(self, key: tuple[int, int]) -> np.ndarray:
        c = self.chunk_size
        lo = np.array([key[0] * c, key[1] * c], dtype=np.int64)
        hi = np.minimum(lo + c, np.asarray(self.image_shape, dtype=np.int64))
        return np.stack([lo, hi])

    def _expected_cells(self, key: tuple[int, int]) -> set[tuple[int, int]]:
        box = _intersect(self._chunk_bbox(key), self.region)
        if box is None:
            return set()
        rows, cols = self.cell_range(box)
        return {(r, q) for r in rows for q in cols}

    def _buffer(self, key: tuple[int, int]) -> _ChunkBuffer:
        buf = self._buffers.get(key)
        if buf is not None:
            self._buffers.move_to_end(key)
            return buf
        bbox = self._chunk_bbox(key)
        sl = (slice(int(bbox[0, 0]), int(bbox[1, 0])), slice(int(bbox[0, 1]), int(bbox[1, 1])))
        cells = self._expected_cells(key)
        missing = {c for c in cells if not self._cell_done(*c)}
        # a chunk with finished cells from an earlier run/flush keeps them: start from disk
        if len(missing) < len(cells):
            labels = np.asarray(self._levels[0][sl])
            probs = np.asarray(self._probs[(slice(None), *sl)]) if self._probs is not None else None
        else:
            labels = np.zeros(tuple(bbox[1] - bbox[0]), dtype=self._levels[0].dtype)
            probs = (
                np.zeros((self.num_classes, *labels.shape), dtype=np.float16)
                if self._probs is not None
                else None
            )
        buf = _ChunkBuffer(bbox, labels, probs)
        buf.missing = missing
        self._buffers[key] = buf
        while len(self._buffers) > self.max_buffered_chunks:
            old_key = next(iter(self._buffers))
            self._flush(old_key)
        return buf

    def write(self, result: TileResult) -> None:
        """Buffer a tile; its chunk is written (and the tile marked done) once complete."""
        core = np.asarray(result.tile.core, dtype=np.int64)
        if _intersect(core, self.region) is None:
            return
        iy, ix = result.tile.grid
        key = self._chunk_of(iy, ix)
        buf = self._buffer(key)
        hit = _core_and_offsets(result, np.asarray(buf.bbox))
        if hit is None:  # pragma: no cover - cores lie inside their cell's chunk by construction
            raise RuntimeError(f"tile {result.tile.grid} core {core.tolist()} outside its chunk")
        part, src = hit
        dst = (
            slice(int(part[0, 0] - buf.bbox[0, 0]), int(part[1, 0] - buf.bbox[0, 0])),
            slice(int(part[0, 1] - buf.bbox[0, 1]), int(part[1, 1] - buf.bbox[0, 1])),
        )
        buf.labels[dst] = result.labels[src]
        if buf.probs is not None and result.probs is not None:
            buf.probs[(slice(None), *dst)] = result.probs[(slice(None), *src)]
        buf.pending.add((iy, ix))
        if buf.pending >= buf.missing:
            self._flush(key)

    def _flush(self, key: tuple[int, int]) -> None:
        """Write one chunk buffer: pixels first, then pyramid, then the done flags."""
        buf = self._buffers.pop(key, None)
        if buf is None or not buf.pending:
            return
        (y0, x0), (y1, x1) = buf.bbox.tolist()
        self._levels[0][y0:y1, x0:x1] = buf.labels
        if self._probs is not None and buf.probs is not None:
            self._probs[:, y0:y1, x0:x1] = buf.probs
        if self.write_pyramid:
            for k in range(1, self.n_levels):
                fy, fx = self.factors[k]
                level = self._levels[k]
                a, b, oy = _downsample_slices(y0, y1, fy)
                c, d, ox = _downsample_slices(x0, x1, fx)
                # a level may be a pixel shorter than ceil(Y / f) (a source image's pyramid)
                b, d = min(b, level.shape[0]), min(d, level.shape[1])
                if b > a and d > c:
                    level[a:b, c:d] = buf.labels[oy::fy, ox::fx][: b - a, : d - c]
        # flags last: a crash before this line only costs recomputing the chunk on resume
        n = self._cells_per_chunk
        block = self._done_block(key)
        newly = 0
        for r, q in buf.pending:
            newly += not block[r % n, q % n]
            block[r % n, q % n] = True
        r0, q0 = key[0] * n, key[1] * n
        rows = min(n, self._done.shape[0] - r0)
        cols = min(n, self._done.shape[1] - q0)
        self._done[r0 : r0 + rows, q0 : q0 + cols] = block[:rows, :cols]
        if self._done_count is not None:
            self._done_count += newly
        self.chunks_written += 1

    def flush(self) -> None:
        """Write every buffered chunk (partial ones too: their finished tiles stay valid)."""
        for key in list(self._buffers):
            self._flush(key)

    def build_pyramid(self, region: np.ndarray | None = None) -> None:
        """Recompute pyramid levels >= 1 over ``region`` from level 0 (after parallel writes).

        Each level is derived from the previous one (``[::2, ::2]``), equal to sampling level 0
        at multiples of ``2^k``; processed one output chunk at a time (bounded memory).
        """
        reg = self.region if region is None else region
        for k in range(1, self.n_levels):
            for box in pyramid_chunk_boxes(self, k, reg):
                build_pyramid_chunk(self, k, box)

    def close(self, complete: bool | None = None) -> bool:
        """Flush, then mark the store complete if every cell of the region is done.

        ``complete=False`` keeps it incomplete (e.g. a cancelled run); a sink attached with
        :meth:`open` (a Dask worker) only flushes. Returns whether the store is now complete.
        Releases the store's lock (also on errors).
        """
        try:
            self.flush()
            if complete is False or not self.finalize:
                return False
            if self.remaining() > 0:
                return False
            if not self.write_pyramid:
                self.build_pyramid()
            self.mark(STATUS_COMPLETE)
            return True
        finally:
            self.release_lock()

    def mark(self, status: str) -> None:
        """Set the store status in one atomic metadata write (zarr writes via rename)."""
        info = dict(self.group.attrs["napari_muvit"])
        info["status"] = status
        self.group.attrs.update({"napari_muvit": info})
        self.info = info


def pyramid_chunk_boxes(sink: ZarrSink, level: int, region: np.ndarray) -> list[np.ndarray]:
    """Level-``level`` chunk bboxes (level pixels) covering world ``region``."""
    fy, fx = sink.factors[level]
    arr = sink.labels(level)
    cy, cx = arr.chunks
    a0, a1 = -(-int(region[0, 0]) // fy) // cy * cy, -(-int(region[1, 0]) // fy)
    b0, b1 = -(-int(region[0, 1]) // fx) // cx * cx, -(-int(region[1, 1]) // fx)
    a1, b1 = min(a1, arr.shape[0]), min(b1, arr.shape[1])
    boxes = []
    for y in range(a0, a1, cy):
        for x in range(b0, b1, cx):
            boxes.append(
                np.array([[y, x], [min(y + cy, arr.shape[0]), min(x + cx, arr.shape[1])]])
            )
    return boxes


def build_pyramid_chunk(sink: ZarrSink, level: int, box: np.ndarray) -> None:
    """Write one chunk of pyramid ``level`` from level ``level - 1`` (one writer per chunk)."""
    (y0, x0), (y1, x1) = np.asarray(box).tolist()
    (fy, fx), (py, px) = sink.factors[level], sink.factors[level - 1]
    ry, rx = fy // py, fx // px
    block = np.asarray(sink.labels(level - 1)[ry * y0 : ry * y1 : ry, rx * x0 : rx * x1 : rx])
    if block.shape != (y1 - y0, x1 - x0):  # the previous level is a pixel short: read level 0
        block = np.asarray(sink.labels(0)[fy * y0 : fy * y1 : fy, fx * x0 : fx * x1 : fx])
    sink.labels(level)[y0:y1, x0:x1] = block


def _chunk_size(step: int, chunk_size: int | None) -> int:
    """Chunk edge: a multiple of the tile step (so chunks own whole tiles), ~DEFAULT_CHUNK."""
    target = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if target < 1:
        raise InputError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    return step * max(1, round(target / step))


def _existing_kind(path: Path) -> str:
    """'none' (free or empty folder), 'ours' (a napari-muvit store) or 'foreign'."""
    if not path.exists() and not path.is_symlink():
        return "none"
    if path.is_dir() and not path.is_symlink():
        if read_store_info(path) is not None:
            return "ours"
        if not any(path.iterdir()):
            return "none"
    return "foreign"


_SETTING_NAMES = {
    "format_version": "store format version",
    "image_shape": "image shape",
    "region": "region",
    "tile_size": "tile size",
    "overlap": "overlap",
    "chunk_size": "chunk size",
    "num_classes": "number of classes",
    "label_values": "label values",
    "probabilities": "probabilities on/off",
    "pyramid_levels": "pyramid levels",
    "pyramid_factors": "pyramid factors",
    "axes": "label axes",
}
_FINGERPRINT_NAMES = {
    "input": "the input image",
    "model_sha256": "the model weights",
    "levels": "the model levels",
    "normalization": "the intensity normalisation",
    "skip_empty": "skip-empty",
    "channels": "the number of channels",
}


def _differences(info: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between a store's settings and a new run's, in words ([] = resumable)."""
    out = []
    # stores written before layouts existed have the default layout
    old_default = {
        "pyramid_factors": [[2**k, 2**k] for k in range(int(info.get("pyramid_levels") or 0))],
        "axes": "yx",
    }
    for key, name in _SETTING_NAMES.items():
        stored = info.get(key, old_default.get(key))
        if stored != wanted.get(key):
            out.append(f"{name} {stored} vs {wanted.get(key)} now")
    old, new = info.get("fingerprint") or {}, wanted.get("fingerprint") or {}
    for key in sorted(set(old) | set(new), key=lambda k: (k not in _FINGERPRINT_NAMES, k)):
        if old.get(key) == new.get(key):
            continue
        if key == "input":
            out.append(_input_difference(old.get(key), new.get(key)))
        else:
            out.append(f"different {_FINGERPRINT_NAMES.get(key, key).removeprefix('the ')}")
    return out


def _input_difference(old: dict | None, new: dict | None) -> str:
    if not old:
        return "the input image was not recorded (store written by an older napari-muvit)"
    if not new:
        return "the input image is not known now"
    for key in ("shape", "channels", "dtype"):
        if old.get(key) != new.get(key):
            return f"the input image differs ({key} {old.get(key)} vs {new.get(key)} now)"
    return "the input image differs (its pixels)"


def _chunk_files(array_dir: Path) -> Iterator[tuple[tuple[int, ...], Path]]:
    """``(chunk coordinates, file)`` of every chunk written for a zarr v3 array folder."""
    root = array_dir / "c"
    if not root.is_dir():
        return
    for dirpath, _dirs, files in os.walk(root):
        for file in files:
            full = Path(dirpath) / file
            try:
                coords = tuple(int(part) for part in full.relative_to(root).parts)
            except ValueError:  # not a chunk (e.g. a temporary file of an interrupted write)
                continue
            yield coords, full


TRASH_MARK = ".napari-muvit-trash-"


def _remove_store(path: Path) -> None:
    """Delete an old store: renamed away first (atomic), so a crash never leaves half a store
    under ``path``; the renamed copy is removed now or by the next run."""
    trash = path.with_name(f".{path.name}{TRASH_MARK}{secrets.token_hex(4)}")
    try:
        os.replace(path, trash)
    except OSError as err:
        raise InputError(f"output {str(path)!r}: cannot remove the old prediction ({err})") from None
    shutil.rmtree(trash, ignore_errors=True)


def _remove_trash(path: Path) -> None:
    """Finish deleting old stores of ``path`` that a killed run had renamed away."""
    parent = path.parent
    if not parent.is_dir():
        return
    prefix = f".{path.name}{TRASH_MARK}"
    for entry in parent.iterdir():
        if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _create_arrays(
    group: zarr.Group,
    layout: LevelLayout,
    shape: tuple[int, int],
    chunk: int,
    step: int,
    num_classes: int,
    values: Sequence[int],
    probabilities: bool,
) -> None:
    dtype = label_dtype(num_classes, values)
    # NGFF 0.4 (zarr v2) asks for "/"-separated chunk keys; v3 arrays name their dimensions
    names: dict[str, Any] = (
        {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        if layout.zarr_format == 2 else {"dimension_names": tuple(layout.axes)}
    )
    for k, level_shape in enumerate(layout.shapes):
        group.create_array(
            str(k),
            shape=layout.array_shape(level_shape),
            chunks=layout.array_shape((min(chunk, level_shape[0]), min(chunk, level_shape[1]))),
            dtype=dtype,
            fill_value=0,
            **names,
        )
    if probabilities:
        sub = group.create_group(
            "probabilities",
            attributes={
                "ome": {
                    "version": NGFF_VERSION,
                    "multiscales": [
                        {
                            "name": "probabilities",
                            "axes": [
                                {"name": "c", "type": "channel"},
                                {"name": "y", "type": "space", "unit": "pixel"},
                                {"name": "x", "type": "space", "unit": "pixel"},
                            ],
                            "datasets": [
                                {
                                    "path": "0",
                                    "coordinateTransformations": [
                                        {"type": "scale", "scale": [1.0, 1.0, 1.0]}
                                    ],
                                }
                            ],
                        }
                    ],
                }
            },
        )
        sub.create_array(
            "0",
            shape=(num_classes, *shape),
            chunks=(num_classes, min(chunk, shape[0]), min(chunk, shape[1])),
            dtype=np.float16,
            fill_value=0,
            dimension_names=("c", "y", "x"),
        )
    cells = tuple(len(axis) for axis in grid_cell_range([(0, 0), shape], step))
    per_chunk = chunk // step
    group.create_array(
        "done",
        shape=cells,
        # one done-chunk per label chunk: the process that owns a label chunk owns its flags
        chunks=(min(per_chunk, cells[0]), min(per_chunk, cells[1])),
        dtype=bool,
        fill_value=False,
        **({"dimension_names": ("cell_y", "cell_x")} if layout.zarr_format == 3 else {}),
    )


def iter_chunks(sink: ZarrSink, region: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """All level-0 chunk bboxes (∩ region), done or not, row-major (for tools and tests)."""
    reg = sink.region if region is None else region
    c = sink.chunk_size
    rows, cols = grid_cell_range(reg, c)
    for ky in rows:
        for kx in cols:
            box = _intersect(reg, np.array([[ky * c, kx * c], [(ky + 1) * c, (kx + 1) * c]]))
            if box is not None:
                yield box
