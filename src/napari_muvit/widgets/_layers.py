"""napari layers ↔ napari-muvit data: planes, transforms, the camera, and writing results back.

Everything here is plumbing between napari's layer model and the engine's conventions; it holds
no compute.  The rules it implements:

* **Which plane.**  A MuViT model is 2-D.  For a layer with more dimensions the plane shown in
  the viewer is used: the two displayed data axes (in ascending data order, so the engine sees
  ``(y, x)`` even when the viewer shows the plane transposed) at the current slider position.
  For multiscale layers whose pyramid also shrinks the non-displayed axes, the slider index is
  mapped to each level.
* **Channels.**  RGB(A) layers give 3/4 channels (the trailing colour axis).  A grayscale layer
  whose leading, non-displayed axis has as many entries as the model has input channels is read
  as a multi-channel image (napari's one-layer representation of ``(C, Y, X)`` data).
* **Coordinates.**  MuViT world coordinates are the level-0 *data* coordinates of the layer
  with pixel *edges* at integers (pixel ``i`` covers ``[i, i+1)``); napari puts pixel centres
  at integers.  :func:`data_to_world_edges` folds that half-pixel shift into the layer's
  data→world affine so that the visible bbox is exact.
* **Output layers** get the image layer's scale, translate, rotate, shear and affine so that they
  overlay the image pixel-for-pixel, and have the same level shapes (minus colour/channel axes)
  for multiscale images.  Large outputs live in (sparse) zarr arrays so that a gigapixel
  prediction of a small view costs memory only where it was computed.

Imports are eager on purpose: this module is only imported with the widgets, and importing
zarr/dask/torch modules later from a worker thread would hold the GIL long enough to freeze the
event loop for a few hundred ms.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from napari_muvit.data import PyramidSource
from napari_muvit.data.geometry import visible_data_bbox
from napari_muvit.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image

log = logging.getLogger("napari_muvit.widgets")

# Beyond this many level-0 pixels an output plane is stored in a sparse in-memory zarr array
# instead of numpy: a view-sized prediction of a gigapixel image must not allocate gigabytes.
DENSE_OUTPUT_MAX_PIXELS = 1 << 26  # 64 Mpx (a uint8 8k x 8k plane)
OUTPUT_CHUNK = 512


# ---------------------------------------------------------------------------------------------
# planes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlane:
    """The 2-D plane of an image layer that a model sees.

    Attributes
    ----------
    displayed
        The two displayed data axes of the layer, ascending (the engine's ``(y, x)``).
    transposed
        Whether the viewer shows them as ``(x, y)``.
    index
        Level-0 index of every other (non-displayed, non-channel) data axis.
    channel_axis
        Data axis read as channels (only ever 0), or None.
    rgb
        Whether the layer is RGB(A) (trailing colour axis, not a layer dimension).
    level_shapes
        Per pyramid level, the layer's data shape without the colour axis.
    """

    displayed: tuple[int, int]
    transposed: bool
    index: dict[int, int]
    channel_axis: int | None
    rgb: bool
    level_shapes: tuple[tuple[int, ...], ...]
    ndim: int = field(default=2)

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(Y, X)`` of the plane (the MuViT world shape)."""
        s = self.level_shapes[0]
        return int(s[self.displayed[0]]), int(s[self.displayed[1]])

    @property
    def multiscale(self) -> bool:
        return len(self.level_shapes) > 1

    @property
    def out_axes(self) -> tuple[int, ...]:
        """Data axes kept by the output layers (all but the channel axis)."""
        return tuple(a for a in range(self.ndim) if a != self.channel_axis)

    def level_index(self, level: int) -> dict[int, int]:
        """The non-displayed indices mapped to pyramid ``level`` (axes may shrink too)."""
        base, shape = self.level_shapes[0], self.level_shapes[level]
        return {
            axis: min(int(i * shape[axis] // max(1, base[axis])), shape[axis] - 1)
            for axis, i in self.index.items()
        }

    def level_factors(self, level: int) -> tuple[float, float]:
        """Downsampling factor of pyramid ``level`` along the plane's ``(y, x)``."""
        base, shape = self.level_shapes[0], self.level_shapes[level]
        return tuple(base[a] / shape[a] for a in self.displayed)  # type: ignore[return-value]

    def key(self) -> tuple:
        """Hashable identity of the plane (what a cached prediction belongs to)."""
        return (self.displayed, tuple(sorted(self.index.items())), self.channel_axis)


def layer_levels(layer: Image) -> list[Any]:
    """The pyramid levels of an image layer (a one-element list for non-multiscale layers)."""
    return list(layer.data) if layer.multiscale else [layer.data]


def layer_plane(
    viewer: napari.Viewer | None, layer: Image, in_channels: int | None = None
) -> LayerPlane:
    """The plane of ``layer`` currently displayed in ``viewer`` (or the last two axes).

    ``in_channels`` (the model's) decides whether a leading axis is a channel axis.
    Raises :class:`InputError` for 3-D rendering or layers with fewer than two dimensions.
    """
    levels = layer_levels(layer)
    rgb = bool(getattr(layer, "rgb", False))
    shapes = tuple(tuple(int(s) for s in (a.shape[:-1] if rgb else a.shape)) for a in levels)
    ndim = len(shapes[0])
    if ndim < 2:
        raise InputError(f"layer {layer.name!r} has {ndim} dimension(s); MuViT needs 2-D images")
    if viewer is not None and viewer.dims.ndisplay != 2:
        raise InputError("MuViT predicts 2-D planes: switch the viewer to 2-D display")
    if viewer is not None:
        displayed_world = list(viewer.dims.displayed)
        offset = viewer.dims.ndim - ndim  # layer axes are the trailing world axes
        displayed = [d - offset for d in displayed_world]
        if any(d < 0 for d in displayed):
            raise InputError(f"layer {layer.name!r}: its axes are not the displayed ones")
        point = np.asarray(layer.world_to_data(viewer.dims.point), dtype=np.float64)
    else:
        displayed = [ndim - 2, ndim - 1]
        point = np.zeros(ndim)
    transposed = displayed[0] > displayed[1]
    dy, dx = sorted(displayed)
    channel_axis = None
    if (
        in_channels is not None
        and in_channels > 1
        and not rgb
        and ndim >= 3
        and 0 not in (dy, dx)
        and shapes[0][0] == in_channels
    ):
        channel_axis = 0
    index = {}
    for axis in range(ndim):
        if axis in (dy, dx) or axis == channel_axis:
            continue
        index[axis] = int(np.clip(np.round(point[axis]), 0, shapes[0][axis] - 1))
    return LayerPlane(
        displayed=(dy, dx),
        transposed=transposed,
        index=index,
        channel_axis=channel_axis,
        rgb=rgb,
        level_shapes=shapes,
        ndim=ndim,
    )


def plane_arrays(layer: Image, plane: LayerPlane) -> list[Any]:
    """Per pyramid level, the plane as a lazily indexable array.

    Shapes are ``(Y, X)``, ``(C, Y, X)`` (channel axis) or ``(Y, X, C)`` (RGB).  numpy data is
    sliced into views; anything else (zarr, dask, tensorstore...) is wrapped in dask so that
    selecting the plane does not read it: the engine only reads the crops it needs.
    """
    out = []
    for level, arr in enumerate(layer_levels(layer)):
        key: list[Any] = [slice(None)] * len(plane.level_shapes[level])
        for axis, i in plane.level_index(level).items():
            key[axis] = i
        if plane.rgb:
            key.append(slice(None))
        if not key or all(isinstance(k, slice) for k in key):
            out.append(arr if isinstance(arr, np.ndarray) else _lazy(arr))
            continue
        if isinstance(arr, np.ndarray):
            out.append(arr[tuple(key)])
        else:
            out.append(_lazy(arr)[tuple(key)])
    return out


def _lazy(arr: Any) -> Any:
    if isinstance(arr, da.Array):
        return arr
    chunks = getattr(arr, "chunks", None)
    if not (isinstance(chunks, tuple) and all(isinstance(c, int) for c in chunks)):
        chunks = "auto"
    return da.from_array(arr, chunks=chunks, asarray=False, fancy=False)


def plane_source(layer: Image, plane: LayerPlane, normalization: Any = None) -> Any:
    """A :class:`~napari_muvit.data.PyramidSource` over the plane (lazy, nothing is read).

    ``normalization`` is the model's (a dict or ``Normalization``); None lets the source compute
    percentiles once from a coarse level.
    """
    arrays = plane_arrays(layer, plane)
    return PyramidSource.from_layer_data(
        arrays if plane.multiscale else arrays[0],
        multiscale=plane.multiscale,
        rgb=plane.rgb,
        channel_axis=plane.channel_axis,
        normalization=normalization,
    )


# ---------------------------------------------------------------------------------------------
# transforms and the camera
# ---------------------------------------------------------------------------------------------


def unwrap(obj: Any) -> Any:
    """The napari object behind a plugin ``PublicOnlyProxy`` (or ``obj`` itself).

    napari hands plugin widgets a proxy of the viewer that wraps every layer in a *new* proxy
    on each access: identities (``is``, ``id``) are not stable and private attributes warn.
    The widgets key their state by layer identity, so they work on the real objects.
    """
    return getattr(obj, "__wrapped__", obj)


def full_affine(layer: Any) -> np.ndarray:
    """The layer's ``(ndim+1)²`` data→world matrix from its public transform attributes:
    ``affine · (translate + rotate · shear · scale)``, the composition napari renders."""
    from napari.utils.transforms import Affine

    physical = Affine(
        scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear
    ).affine_matrix
    return np.asarray(layer.affine.affine_matrix, dtype=np.float64) @ np.asarray(physical)


def data_to_world_2d(layer: Any, plane: LayerPlane) -> np.ndarray:
    """3×3 data→world affine of the plane's ``(y, x)`` axes (scale, translate, rotate, shear
    and affine composed, exactly as napari renders the layer)."""
    full = full_affine(layer)
    rows = list(plane.displayed)
    sub = np.eye(3)
    sub[:2, :2] = full[np.ix_(rows, rows)]
    sub[:2, 2] = full[rows, -1]
    return sub


def data_to_world_edges(layer: Any, plane: LayerPlane) -> np.ndarray:
    """Like :func:`data_to_world_2d` but for MuViT's edge coordinates (pixel centres at
    ``i + 0.5``): napari maps data coordinate ``i`` to the *centre* of pixel ``i``."""
    shift = np.eye(3)
    shift[:2, 2] = -0.5
    return data_to_world_2d(layer, plane) @ shift


def camera(viewer: napari.Viewer) -> Any:
    """The viewer's camera model (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    cam = getattr(scene, "camera", None)
    return cam if cam is not None else viewer.camera


def canvas_size(viewer: napari.Viewer) -> tuple[int, int]:
    """``(height, width)`` of the viewer's canvas in screen pixels."""
    model = getattr(getattr(viewer, "canvas", None), "size", None)  # napari >= 0.9 model
    if model is not None and not callable(model) and len(model) == 2:
        return int(model[0]), int(model[1])
    qt_viewer = getattr(viewer.window, "_qt_viewer", None)
    canvas = getattr(qt_viewer, "canvas", None)
    size = getattr(canvas, "size", None)
    if size is not None and not callable(size):
        return int(size[0]), int(size[1])
    legacy = getattr(viewer, "_canvas_size", None)  # older napari
    if legacy is not None:
        return int(legacy[0]), int(legacy[1])
    raise InputError("cannot determine the size of the napari canvas")


def visible_bbox(viewer: napari.Viewer, layer: Any, plane: LayerPlane) -> np.ndarray:
    """The MuViT-world bbox ``[[y0, x0], [y1, x1]]`` of the plane visible on the canvas.

    Clipped to the image; zero extent when the image is off-screen.
    """
    cam = camera(viewer)
    center = np.asarray(cam.center, dtype=np.float64)[-2:]
    size = np.asarray(canvas_size(viewer), dtype=np.float64)
    if plane.transposed:
        # The canvas shows (x, y): camera centre and canvas height follow the displayed order.
        center, size = center[::-1], size[::-1]
    return visible_data_bbox(
        center, cam.zoom, size, data_to_world_edges(layer, plane), plane.shape
    )


def transform_kwargs(layer: Any, plane: LayerPlane) -> dict[str, Any]:
    """Layer keyword arguments that put an output layer exactly over ``layer``'s plane."""
    if plane.channel_axis is None:
        return {
            "scale": np.asarray(layer.scale),
            "translate": np.asarray(layer.translate),
            "rotate": np.asarray(layer.rotate),
            "shear": np.asarray(layer.shear),
            "affine": np.asarray(layer.affine.affine_matrix),
        }
    # Dropping the (leading) channel axis: the composed transform of the remaining axes.
    full = full_affine(layer)
    keep = [*plane.out_axes, full.shape[0] - 1]
    return {"affine": full[np.ix_(keep, keep)]}


def points_on_plane(points: Any, image: Any, plane: LayerPlane) -> tuple[np.ndarray, np.ndarray]:
    """``(yx, keep)``: the level-0 plane ``(y, x)`` of a Points layer's points over ``image``
    (through both layers' transforms), and which of the layer's points lie on the plane."""
    axes = plane.out_axes
    image_affine = full_affine(image)
    keep_axes = [*axes, image_affine.shape[0] - 1]
    image_affine = image_affine[np.ix_(keep_axes, keep_axes)]
    data = np.asarray(points.data, dtype=np.float64).reshape(-1, points.ndim)
    if points.ndim != len(axes):
        raise InputError(
            f"points layer {points.name!r} has {points.ndim} dimensions, the image "
            f"{image.name!r} {len(axes)}: add the points on a layer over this image"
        )
    homog = np.concatenate([data, np.ones((len(data), 1))], axis=1)
    in_image = (np.linalg.inv(image_affine) @ full_affine(points) @ homog.T).T[:, :-1]
    keep = np.ones(len(data), dtype=bool)
    for col, axis in enumerate(axes):
        if axis not in plane.displayed:
            keep &= np.round(in_image[:, col]) == plane.index.get(axis, 0)
    cols = [axes.index(plane.displayed[0]), axes.index(plane.displayed[1])]
    return in_image[np.ix_(keep, cols)], keep


# ---------------------------------------------------------------------------------------------
# output arrays and writing tiles into layers
# ---------------------------------------------------------------------------------------------


def output_level_shapes(plane: LayerPlane) -> list[tuple[int, ...]]:
    """Per level, the shape of an output array (the image level without channel axis)."""
    return [tuple(s[a] for a in plane.out_axes) for s in plane.level_shapes]


def allocate_levels(
    plane: LayerPlane, dtype: Any, *, store: Any = None, dense: bool | None = None
) -> list[Any]:
    """Zero-filled output arrays, one per pyramid level.

    numpy when small (fast display), else zarr arrays (sparse: unwritten chunks take no memory)
    in ``store`` (default: a fresh in-memory store).
    """
    shapes = output_level_shapes(plane)
    if dense is None:
        dense = int(np.prod(plane.shape)) <= DENSE_OUTPUT_MAX_PIXELS and store is None
    if dense:
        return [np.zeros(s, dtype=dtype) for s in shapes]
    root = zarr.open_group(store if store is not None else zarr.storage.MemoryStore(), mode="a")
    out = []
    for level, shape in enumerate(shapes):
        chunks = tuple(
            min(OUTPUT_CHUNK, n) if axis in _out_displayed(plane) else 1
            for axis, n in enumerate(shape)
        )
        out.append(
            root.create_array(
                str(level), shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                overwrite=True,
            )
        )
    return out


def _out_displayed(plane: LayerPlane) -> tuple[int, int]:
    """The plane's ``(y, x)`` axes in output-array axis numbering."""
    axes = plane.out_axes
    return axes.index(plane.displayed[0]), axes.index(plane.displayed[1])


def _level_rows(start: int, stop: int, factor: float, size: int) -> tuple[int, int, np.ndarray]:
    """Level pixels ``i`` whose sample point ``floor((i + .5)·f)`` lies in ``[start, stop)``.

    Every coarse pixel is taken from exactly one level-0 pixel, so tiles written independently
    fill each pyramid level seamlessly (nearest-neighbour downsampling, right for labels).
    Returns ``(i0, i1, sample offsets relative to start)``.
    """
    i0 = max(0, int(np.floor(start / factor - 0.5)) - 1)
    i1 = min(size, int(np.ceil(stop / factor)) + 1)
    idx = np.arange(i0, i1)
    samples = np.floor((idx + 0.5) * factor).astype(np.int64)
    keep = (samples >= start) & (samples < stop)
    idx, samples = idx[keep], samples[keep]
    if idx.size == 0:
        return 0, 0, samples
    return int(idx[0]), int(idx[-1]) + 1, samples - start


class LevelWriter:
    """Writes 2-D results of the plane into per-level output arrays (nearest downsampling)."""

    def __init__(self, plane: LayerPlane, levels: list[Any]) -> None:
        self.plane = plane
        self.levels = levels
        self._axes = _out_displayed(plane)
        self._index = [
            {plane.out_axes.index(a): i for a, i in plane.level_index(level).items()}
            for level in range(len(levels))
        ]

    def slice_key(self, level: int, ys: slice, xs: slice) -> tuple[Any, ...]:
        """Full-ND index of a 2-D region of ``level`` (length-1 slices on the other axes, as
        napari's own paint code uses them: basic indexing works on every backend)."""
        key: list[Any] = [slice(None)] * self.levels[level].ndim
        for axis, i in self._index[level].items():
            key[axis] = slice(i, i + 1)
        key[self._axes[0]], key[self._axes[1]] = ys, xs
        return tuple(key)

    def write(self, core: np.ndarray, values: np.ndarray) -> list[tuple[int, tuple]]:
        """Write ``values`` (the level-0 region ``core`` = ``[[y0, x0], [y1, x1]]``) into every
        level; returns ``(level, slice_key)`` of what was written."""
        (y0, x0), (y1, x1) = np.asarray(core, dtype=np.int64)
        written = []
        for level, arr in enumerate(self.levels):
            fy, fx = self.plane.level_factors(level)
            if level == 0 or (fy == 1 and fx == 1):
                ys, xs, block = slice(y0, y1), slice(x0, x1), values
            else:
                shape = arr.shape
                i0, i1, sy = _level_rows(y0, y1, fy, shape[self._axes[0]])
                j0, j1, sx = _level_rows(x0, x1, fx, shape[self._axes[1]])
                if i1 <= i0 or j1 <= j0:
                    continue
                ys, xs, block = slice(i0, i1), slice(j0, j1), values[np.ix_(sy, sx)]
            key = self.slice_key(level, ys, xs)
            arr[key] = block.reshape(_expanded_shape(arr.ndim, self._axes, block.shape))
            written.append((level, key))
        return written


def _expanded_shape(ndim: int, axes: tuple[int, int], shape2d: tuple[int, ...]) -> tuple:
    out = [1] * ndim
    out[axes[0]], out[axes[1]] = shape2d
    return tuple(out)


def refresh_data(layer: Any) -> None:
    """Re-read the visible data of ``layer`` without recomputing its thumbnail.

    The thumbnail (and the layer-list repaint it triggers) costs more than the slice itself
    and is not worth doing for every batch of tiles; napari updates it on the next full
    refresh.
    """
    try:
        layer.refresh(thumbnail=False)
    except TypeError:  # napari < 0.6 has no keyword arguments here
        layer.refresh()


def refresh_region(layer: Any, slice_key: tuple[slice, ...]) -> None:
    """Show new data written into ``layer.data[slice_key]`` (see :func:`refresh_regions`)."""
    refresh_regions(layer, [slice_key])


def refresh_regions(layer: Any, slice_keys: Sequence[tuple[slice, ...]]) -> None:
    """Show new data written into ``layer.data[key]`` for every key, with one texture upload.

    For a non-multiscale Labels layer only the changed parts of the displayed texture are
    re-coloured, and the union of them is uploaded once (napari's own partial-refresh path for
    painting; a full ``refresh`` re-colours the whole plane, which takes tens of ms for large
    planes and would stall the event loop on every tile).  Other layers fall back to
    ``refresh()``.  Uses napari internals defensively: any surprise falls back to the full
    refresh, and is logged (a warning the first time for each kind of error, so that a napari
    update that breaks the fast path does not go unnoticed).
    """
    if not slice_keys:
        return
    try:
        _partial_labels_refresh(layer, slice_keys)
    except Exception as err:  # noqa: BLE001 - private napari API: never worse than a full refresh
        kind = type(err).__name__
        first = kind not in _FAST_REFRESH_FAILURES
        _FAST_REFRESH_FAILURES.add(kind)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "napari's partial Labels refresh failed (%s: %s); refreshing the whole layer "
            "instead, which is slower for large planes", kind, err, exc_info=first,
        )
        refresh_data(layer)


_FAST_REFRESH_FAILURES: set[str] = set()


def _partial_labels_refresh(layer: Any, slice_keys: Sequence[tuple[slice, ...]]) -> None:
    from napari.layers import Labels

    if not isinstance(layer, Labels) or layer.multiscale:
        refresh_data(layer)
        return
    if not layer._slicing_state.loaded or layer._slice.empty:
        return  # a pending slice load will read the new data anyway
    data, image = layer.data, layer._slice.image
    staged = False
    for slice_key in slice_keys:
        upd = layer._get_update_slices(slice_key)
        if upd is None:
            continue  # not on the displayed plane
        region_slices, view_slices = upd
        region = np.asarray(data[slice_key])
        visible = region[tuple(region_slices)]
        visible, _ = layer._align_data_to_view(visible, visible)
        if not (isinstance(data, np.ndarray) and np.shares_memory(data, image.raw)):
            image.raw[tuple(view_slices)] = visible
        if layer.contour == 0 and not (
            isinstance(data, np.ndarray) and np.shares_memory(data, image.view)
        ):
            image.view[tuple(view_slices)] = layer.colormap._data_to_texture(visible)
        layer._accumulate_updated_slice(slice_key)
        staged = True
    if staged:
        layer._partial_labels_refresh()  # one upload of the union of the regions


def add_labels_in_steps(viewer: Any, data: Any, defer: Any = None,
                        select: Any = True, settled: Any = None, **kwargs: Any) -> Any:
    """``viewer.add_labels(data, **kwargs)``, split over turns of the event loop (see
    :func:`add_layer_in_steps`; ``select`` and ``settled`` as there)."""
    from napari.layers import Labels

    return add_layer_in_steps(viewer, Labels(data, **kwargs), defer, select=select,
                              settled=settled)


def add_image_in_steps(viewer: Any, data: Any, defer: Any = None,
                       select: Any = True, settled: Any = None, **kwargs: Any) -> Any:
    """``viewer.add_image(data, **kwargs)`` for one layer, split over turns of the event loop
    (see :func:`add_layer_in_steps`)."""
    from napari.layers import Image

    return add_layer_in_steps(viewer, Image(data, **kwargs), defer, select=select,
                              settled=settled)


def add_layer_in_steps(viewer: Any, layer: Any, defer: Any = None, select: Any = True,
                       settled: Any = None) -> Any:
    """``viewer.add_layer(layer)``, split over turns of the event loop.

    Adding a layer is one long stretch of GUI-thread work in napari (0.1–0.3 s on a small CPU,
    see ``benchmarks/bench_ui.py --profile``): creating its vispy visuals, its Qt layer
    controls, the canvas overlays of the Labels tools (brush, polygon), selecting it, and the
    first draw, which compiles its shaders.  With ``defer`` (called with a callback to run in
    a later turn of the event loop) the layer is in ``viewer.layers`` when this returns, but
    hidden and unselected, its visuals and controls not built yet; each of those pieces then
    runs in a turn of its own: making the visuals, placing them in the scene graph, showing
    it (napari slices its data), its first draw (which compiles its shaders), each shown
    overlay, the controls (only if it is to be selected: else when it is first selected),
    and last selecting it when ``select`` (a bool, or a callable asked at that moment) says
    so.  The end state is napari's own ``add_layer``, except that the overlays of the Labels
    tools (brush, polygon), which are drawn only while their tool is on, are made visible,
    and their visuals built, when their tool is first switched on.  With ``settled`` (True) the
    overlays, controls and selection are deferred with ``defer(callback, settled=True)``: the
    caller runs them once it has settled (e.g. no prediction running); ``settled="all"``:
    every step (a secondary layer, e.g. a confidence map, built once the tiles are in).  A
    Labels layer's controls and polygon overlay are the longest single pieces of GUI work
    (30–80 ms each with a worker competing for the GIL), so they wait for a quiet moment, or
    the user's choice of tool, instead of lengthening a stall while tiles stream in.
    Removing or selecting the layer before then finishes the remaining steps at once
    (napari's handlers need them).

    Uses napari internals defensively: any surprise adds the layer the ordinary way (logged
    once).  Without ``defer`` this is ``viewer.add_layer(layer)``.
    """
    if defer is None:
        viewer.add_layer(layer)
        return layer
    try:
        staged = _StagedAdd(viewer, layer, defer, select, settled)
    except Exception as err:  # noqa: BLE001 - private napari API: never worse than usual
        _log_once("adding a layer in steps", err)
        viewer.add_layer(layer)
        return layer
    staged.start()
    return layer


# layers added in steps that are to be shown and whose first draw has not come yet
_FIRST_DRAW_PENDING: weakref.WeakSet[Any] = weakref.WeakSet()


def first_draw_pending(layer: Any) -> bool:
    """Whether ``layer`` is being added in steps and has not been drawn yet."""
    return layer in _FIRST_DRAW_PENDING


class _Inserted:
    """The part of napari's ``inserted`` event that its layer handlers read."""

    type = "inserted"

    def __init__(self, index: int, value: Any) -> None:
        self.index, self.value = index, value


class _StagedAdd:
    """The rest of adding one layer to the viewer, one step per turn of the event loop.

    The layer's Qt controls are built only when they are shown: in their own step when the
    layer is to be selected at the end, else when it is first selected (a layer nobody
    selects, e.g. a confidence map while the user paints, never pays for them).  Until then
    a blank placeholder stands in napari's table of controls.
    """

    def __init__(self, viewer: Any, layer: Any, defer: Any, select: Any,
                 settled: Any = None) -> None:
        from napari.settings import get_settings
        from qtpy.QtWidgets import QFrame

        self.viewer, self.layer, self.defer, self.select = viewer, layer, defer, select
        self.settled = settled
        qt_viewer = viewer.window._qt_viewer
        self.visual = qt_viewer._on_add_layer_change  # napari's vispy visual of a new layer
        self.controls = None
        self.placeholder = None
        self.made: Any = None  # the controls, made but not yet in napari's table
        self.made_visual: Any = None  # the visual, made but not yet in the scene graph
        if not get_settings().experimental.dynamic_layer_controls:
            from napari._qt.layer_controls import qt_layer_controls_container

            self.controls = qt_viewer.controls
            self.placeholder = QFrame()
            self.create_controls = qt_layer_controls_container.create_qt_layer_controls
        self.overlays = [o for o in layer._overlays.values() if o.visible]
        self.visible = bool(layer.visible)
        self.steps: list[Any] = []
        self.quiet_steps: list[Any] = []
        self.running = False
        self.connected = False
        self.event: _Inserted | None = None

    # ------------------------------------------------------------------ the steps

    def start(self) -> None:
        layers = self.viewer.layers
        inserted = layers.events.inserted
        handlers = [self.visual] + ([self.controls._add] if self.controls is not None else [])
        for overlay in self.overlays:
            overlay.visible = False
        self.layer.visible = False  # no draw (shader compilation) before its own turn
        activate = layers._activate_on_insert
        for handler in handlers:
            inserted.block(handler)
        layers._activate_on_insert = False
        try:
            self.viewer.add_layer(self.layer)
        finally:
            layers._activate_on_insert = activate
            for handler in handlers:
                inserted.unblock(handler)
        self.event = _Inserted(layers.index(self.layer), self.layer)
        if self.visible:
            _FIRST_DRAW_PENDING.add(self.layer)
        if self.controls is not None:
            # napari's own selection handler runs before any plugin's: until the controls are
            # built, selecting the layer shows the placeholder (never a KeyError)
            self.controls.addWidget(self.placeholder)
            self.controls.widgets[self.layer] = self.placeholder
        # the tool overlays (brush, polygon: vispy visuals of their own) and the controls
        # serve a user working on the layer: they can wait for a quiet moment (``settled``);
        # a tool's overlay is only drawn while its tool is on, so it waits for that
        others = []
        for overlay in self.overlays:
            if getattr(overlay, "enabled", True) is False:
                _show_when_enabled(overlay)
            else:
                others.append(overlay)
        quiet = [*(lambda o=o: setattr(o, "visible", True) for o in others),
                 self._make_controls_if_selected, self._controls_if_selected, self._select]
        shown = [self._build_visual, self._place_visual, self._show, self._draw]
        self.steps = shown + quiet
        self.quiet_steps = list(self.steps) if self.settled == "all" else quiet
        # strong references (napari holds bound methods weakly): this object lives as long as
        # the layer may still need it
        self._removing = lambda event=None: self._on_removing(event)
        self._selected = lambda event=None: self._on_selection(event)
        layers.events.removing.connect(self._removing)
        layers.selection.events.changed.connect(self._selected)
        self.connected = True
        self._defer_next()

    def _scene(self) -> Any:
        return getattr(self.viewer.window._qt_viewer.canvas, "_scene_canvas", None)

    def _build_visual(self) -> None:
        # napari makes a layer's visual (for an image: image, tiled-image and volume nodes)
        # and then puts it in the scene graph; one turn each (25-40 and 10-15 ms of GUI thread
        # here, twice that with every core busy).  The layer is hidden: nothing on screen
        # changes, but napari asks for a frame (40-60 ms with software OpenGL) in the same
        # turn; showing the layer, later, draws it
        with self._quiet_canvas():
            try:
                self.made_visual = _make_visual(self.viewer, self.layer)
            except Exception as err:  # noqa: BLE001 - private napari API: napari's own way
                _log_once("making a layer's visual before placing it", err)
                self.made_visual = None
                self.visual(self.event)

    def _place_visual(self) -> None:
        made, self.made_visual = self.made_visual, None
        if made is None:
            return
        with self._quiet_canvas():
            _place_visual(self.viewer, self.layer, made)

    def _quiet_canvas(self) -> Any:
        scene = self._scene()
        if scene is None or self.layer.visible:
            return contextlib.nullcontext()
        return _no_redraw(scene)

    def _wanted(self) -> bool:
        return bool(self.select() if callable(self.select) else self.select)

    def _make_controls_if_selected(self) -> None:
        # making the widgets and putting them in napari's table (Qt's layout and style work)
        # are two pieces of 10-30 ms each: one turn each
        if self._wanted() and self.placeholder is not None:
            self._make_controls()

    def _make_controls(self) -> Any:
        """The layer's controls as napari's ``_add`` makes them (made once)."""
        if self.made is None:
            self.made = self.create_controls(self.layer)
            self.made.ndisplay = self.viewer.dims.ndisplay
        return self.made

    def _controls_if_selected(self) -> None:
        if self._wanted():
            self._build_controls()

    def _build_controls(self) -> None:
        if self.placeholder is None or self.layer not in self.viewer.layers:
            return
        placeholder, self.placeholder = self.placeholder, None
        made, self.made = self._make_controls(), None
        # what napari's ``_add`` does with the controls: they replace the placeholder
        self.controls.addWidget(made)
        self.controls.widgets[self.layer] = made
        self.controls.removeWidget(placeholder)
        placeholder.deleteLater()

    def _drop_made_controls(self) -> None:
        made, self.made = self.made, None
        if made is not None:
            made.close()
            made.deleteLater()

    def _show(self) -> None:
        # napari slices the layer's data when it is shown (10-20 ms): that turn asks for no
        # frame; the next turn's draws the layer (its first frame compiles its shaders and
        # costs 1.5-2 plain frames with software OpenGL), so the two never add up to one stall
        if not self.visible:
            return
        scene = self._scene()
        with contextlib.nullcontext() if scene is None else _no_redraw(scene):
            self.layer.visible = True

    def _draw(self) -> None:
        _FIRST_DRAW_PENDING.discard(self.layer)
        scene = self._scene()
        if scene is not None and self.layer.visible and self.layer in self.viewer.layers:
            scene.update()

    def _select(self) -> None:
        if self._wanted() and self.layer in self.viewer.layers:
            self._build_controls()
            self.viewer.layers.selection.active = self.layer

    def _next(self) -> None:
        if self.steps:
            self._run(self.steps.pop(0))
        if self.steps:
            self._defer_next()
        elif self.placeholder is None:
            self._disconnect()  # else: still waiting for the first selection

    def _defer_next(self) -> None:
        if self.settled and any(self.steps[0] is q for q in self.quiet_steps):
            self.defer(self._next, settled=True)
        else:
            self.defer(self._next)

    def _run(self, step: Any) -> None:
        self.running = True
        try:
            step()
        finally:
            self.running = False

    def finish(self) -> None:
        """Run every remaining step now (not selecting: the caller is choosing)."""
        while self.steps:
            step = self.steps.pop(0)
            if step not in (self._select, self._controls_if_selected,
                            self._make_controls_if_selected):
                self._run(step)

    # ------------------------------------------------------------------ napari's events

    def _on_removing(self, event: Any = None) -> None:
        layers = self.viewer.layers
        index = getattr(event, "index", None)
        if isinstance(index, int) and 0 <= index < len(layers) and layers[index] is self.layer:
            self.finish()  # napari removes the visual and the placeholder (or controls)
            self.placeholder = None
            self._drop_made_controls()
            self._disconnect()

    def _on_selection(self, event: Any = None) -> None:
        if self.running or self.layer not in self.viewer.layers.selection:
            return
        self.finish()
        if self.placeholder is not None:
            self._build_controls()
            self.controls._populate()  # napari showed the placeholder: now the controls
        self._disconnect()

    def _disconnect(self) -> None:
        if not self.connected:
            return
        self.connected = False
        layers = self.viewer.layers
        layers.events.removing.disconnect(self._removing)
        layers.selection.events.changed.disconnect(self._selected)


def _make_visual(viewer: Any, layer: Any) -> Any:
    """The first half of napari's ``QtViewer._add_layer``: the layer's vispy visual."""
    from napari._vispy import create_vispy_layer

    canvas = viewer.window._qt_viewer.canvas
    font_info = getattr(canvas, "font_info", None)
    if font_info is None:
        return create_vispy_layer(layer)
    return create_vispy_layer(layer, font_info=font_info())


def _place_visual(viewer: Any, layer: Any, vispy_layer: Any) -> None:
    """The second half of napari's ``QtViewer._add_layer``: the visual in the scene graph."""
    qt_viewer = viewer.window._qt_viewer
    poll = getattr(qt_viewer, "_qt_poll", None)
    if poll is not None:  # napari's experimental polling, as napari connects it
        poll.events.poll.connect(vispy_layer._on_poll)
        if vispy_layer.events is not None:
            vispy_layer.events.loaded.connect(poll.wake_up)
    qt_viewer.canvas.add_layer_visual_mapping(layer, vispy_layer)


@contextlib.contextmanager
def _no_redraw(scene_canvas: Any) -> Iterator[None]:
    """Drop the requests for a frame of ``scene_canvas`` (a vispy ``SceneCanvas``) made in
    the body."""
    scene_canvas.update = lambda *args, **kwargs: None  # shadows vispy's method
    try:
        yield
    finally:
        del scene_canvas.update


def _show_when_enabled(overlay: Any) -> None:
    """Make a layer's tool overlay visible (napari then builds its vispy visual, 30-70 ms of
    GUI thread for the polygon tool) when its tool is first switched on, not before."""

    def on_enabled(event: Any = None) -> None:
        if overlay.enabled:
            overlay.events.enabled.disconnect(on_enabled)
            overlay.visible = True

    overlay.events.enabled.connect(on_enabled)


_LOGGED: set[str] = set()


def _log_once(what: str, err: BaseException) -> None:
    first = what not in _LOGGED
    _LOGGED.add(what)
    log.log(logging.WARNING if first else logging.DEBUG,
            "%s failed (%s: %s); napari's ordinary (slower) path is used", what,
            type(err).__name__, err)


@functools.lru_cache(maxsize=1)
def _annotation_colormap() -> Any:
    """The colours napari gives a new Labels layer (the annotation layer): one colour table,
    so a class painted in a colour is predicted in that colour.

    Built as napari's ``Labels.__init__`` builds it (49 colours, seed 0.5), not by creating a
    throw-away Labels layer: that took up to a second of GIL on the first prediction
    (``tests/test_widget_painting.py`` checks the colours still match a new layer's).
    """
    from napari.utils.colormaps import label_colormap

    return label_colormap(49, 0.5, background_value=0)


def labels_colormap(
    label_values: Sequence[int],
    class_colors: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> Any:
    """A napari ``DirectLabelColormap`` for a model's label values.

    The model's class colours when it has them, else the colours napari gives the same value in
    a new Labels layer (the annotations); value 0 and a
    class *named* ``background`` (annotated as a class when training on scribbles) are
    transparent, so that the predicted objects stand out over the image.
    """
    from napari.utils.colormaps import DirectLabelColormap

    default = _annotation_colormap()
    colors: dict[int | None, Any] = {None: np.zeros(4), 0: np.zeros(4)}
    for k, value in enumerate(label_values):
        if int(value) == 0:
            continue  # dense models write class 0 as 0: napari's background
        given = class_colors[k] if class_colors is not None and k < len(class_colors) else None
        name = str(class_names[k]).strip().lower() if class_names and k < len(class_names) else ""
        if given is not None:
            colors[int(value)] = given
        elif name in ("background", "bg"):
            colors[int(value)] = np.zeros(4)
        else:
            colors[int(value)] = default.map(np.array([int(value)]))[0]
    return DirectLabelColormap(color_dict=colors)


def model_colormap(model: Any) -> Any:
    """:func:`labels_colormap` of a segmenter's or detector's classes."""
    return labels_colormap(model.label_values, getattr(model, "class_colors", None),
                           model.class_names)


def class_features(label_values: Sequence[int], class_names: Sequence[str]) -> Any:
    """Labels ``features`` table: napari's status bar shows the class name under the cursor."""
    return pd.DataFrame(
        {"index": [int(v) for v in label_values], "class": [str(n) for n in class_names]}
    )


# ---------------------------------------------------------------------------------------------
# painting events → changed regions
# ---------------------------------------------------------------------------------------------


def painted_bboxes(atoms: Iterable[Any], displayed: Sequence[int] | None = None) -> list[np.ndarray]:
    """2-D ``[[y0, x0], [y1, x1]]`` of every undo atom of a Labels ``paint`` event.

    napari ≥0.6 stores mask paints as ``_MaskedPaintAtom(slice_key, ...)`` and older/fancy edits
    as ``(indices, old_values, new_values)``; both are understood.  ``displayed`` selects the
    plane axes (default: the last two).
    """
    out = []
    for atom in atoms:
        key = getattr(atom, "slice_key", None)
        if key is not None:
            axes = list(displayed) if displayed is not None else [len(key) - 2, len(key) - 1]
            lo = [key[a].start for a in axes]
            hi = [key[a].stop for a in axes]
        else:
            indices = atom[0]
            axes = list(displayed) if displayed is not None else [len(indices) - 2, len(indices) - 1]
            idx = [np.asarray(indices[a]) for a in axes]
            if idx[0].size == 0:
                continue
            lo = [int(i.min()) for i in idx]
            hi = [int(i.max()) + 1 for i in idx]
        out.append(np.array([lo, hi], dtype=np.float64))
    return out


# ---------------------------------------------------------------------------------------------
# training inputs: painted plane, validation rectangle
# ---------------------------------------------------------------------------------------------


def labels_plane(data: Any, plane: LayerPlane) -> Any:
    """The 2-D plane of a Labels array the trainer reads (a live view: new paint is seen)."""
    if data.ndim == 2:
        return data
    axes = plane.out_axes
    key: list[Any] = [slice(None)] * data.ndim
    for axis, i in plane.index.items():
        key[axes.index(axis)] = i
    if isinstance(data, np.ndarray):
        return data[tuple(key)]  # a numpy view shares memory with the layer
    return _lazy(data)[tuple(key)]


def _pad_world(world: np.ndarray, viewer: Any) -> np.ndarray:
    """A shapes vertex in world coordinates padded with the current point for missing dims."""
    point = np.asarray(viewer.dims.point, dtype=np.float64)
    if world.size >= point.size:
        return world
    out = point.copy()
    out[-world.size :] = world
    return out


def rectangle_region(viewer: Any, shapes: Any, image: Any) -> np.ndarray | None:
    """The first shape of ``shapes`` as a bbox ``[[y0, x0], [y1, x1]]`` (pixel edges) of
    ``image``'s displayed plane; None when there is no shape.  Raises :class:`InputError` when
    it lies outside the image."""
    if shapes is None or image is None or len(shapes.data) == 0:
        return None
    plane = layer_plane(viewer, image)
    corners = []
    for vertex in np.asarray(shapes.data[0], dtype=np.float64):
        world = np.asarray(shapes.data_to_world(vertex), dtype=np.float64)
        data = np.asarray(image.world_to_data(_pad_world(world, viewer)), dtype=np.float64)
        corners.append([data[plane.displayed[0]], data[plane.displayed[1]]])
    edges = np.asarray(corners) + 0.5  # napari pixel centres -> MuViT pixel edges
    lo = np.clip(np.floor(edges.min(axis=0) + 1e-6), 0, plane.shape)
    hi = np.clip(np.ceil(edges.max(axis=0) - 1e-6), 0, plane.shape)
    if np.any(hi - lo < 1):
        raise InputError("the validation rectangle lies outside the image")
    return np.stack([lo, hi])
