"""The napari layers the panels create and write into (no Qt, no compute).

* :class:`ViewOutputs`: per image layer, the Labels layer (and optional confidence and
  uncertainty layers) of view predictions, recreated when the model changes, and the painting
  of streamed tiles.
* :func:`add_store_layer`: a whole-image OME-Zarr store shown as a Labels layer aligned with
  the displayed plane of its image.
* :meth:`ViewOutputs.show_points`: a point detector's view predictions as a Points layer
  (``class`` and ``score`` features, class colours) over its image.
* :func:`add_annotation_layer` / :func:`add_validation_layer`: what the train panel paints on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from napari_muvit.engine.sinks import label_dtype
from napari_muvit.engine.uncertainty import uncertainty_percent
from napari_muvit.widgets import _layers as L

PAINT_MODES = ("paint", "erase", "fill", "polygon")


def safe_name(name: str, fallback: str = "image") -> str:
    """``name`` usable as a file name (letters, digits, ``-_.``; others become ``_``)."""
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip())
    return keep.strip("._") or fallback


def unique_name(viewer: Any, name: str) -> str:
    """``name``, or ``name [k]`` when the viewer already has a layer called ``name``."""
    names = {layer.name for layer in viewer.layers}
    if name not in names:
        return name
    k = 2
    while f"{name} [{k}]" in names:
        k += 1
    return f"{name} [{k}]"


def keep_painting(viewer: Any, previous: Any) -> None:
    """napari makes every new layer the active one; while the user is annotating (a Labels
    layer in a painting mode) give the selection back so the next stroke lands where meant."""
    if (previous is not None and previous in viewer.layers
            and str(getattr(previous, "mode", "")) in PAINT_MODES):
        viewer.layers.selection.active = previous


def unless_painting(viewer: Any) -> Any:
    """For :func:`._layers.add_layer_in_steps`: select the new layer (napari's rule) unless
    the active layer is being painted on at that moment (see :func:`keep_painting`)."""
    def select() -> bool:
        active = viewer.layers.selection.active
        return active is None or str(getattr(active, "mode", "")) not in PAINT_MODES
    return select


def is_prediction(layer: Any) -> bool:
    """Whether ``layer`` is an output of the predict panel (not an annotation)."""
    meta = getattr(layer, "metadata", {}) or {}
    info = meta.get("napari_muvit", {}) if isinstance(meta, dict) else {}
    return isinstance(info, dict) and "source_layer" in info


def is_ground_truth(layer: Any) -> bool:
    """Whether ``layer`` is marked as ground truth (e.g. the sample's), never annotations."""
    meta = getattr(layer, "metadata", {}) or {}
    info = meta.get("napari_muvit", {}) if isinstance(meta, dict) else {}
    return isinstance(info, dict) and bool(info.get("ground_truth"))


# ---------------------------------------------------------------------------------------------
# view predictions
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ViewTarget:
    """The output layers of view predictions for one image layer.

    ``identity`` is the :attr:`~.jobs.Loaded.identity` of the model whose tiles the layer
    shows (while ``pending``: will show from its first painted tile on, the older model's
    labels staying until then); ``painted`` holds ``(plane key, grid cell)`` of every tile of
    that model shown.
    """

    image: Any
    identity: tuple
    labels: Any
    confidence: Any = None
    label_levels: list[Any] = field(default_factory=list)
    conf_levels: list[Any] | None = None
    painted: set[tuple] = field(default_factory=set)
    label_values: list[int] = field(default_factory=list)
    style: tuple = ()
    writers: dict[tuple, tuple[L.LevelWriter, L.LevelWriter | None, L.LevelWriter | None]] = (
        field(default_factory=dict))
    # where a stroke would help most: 1 - margin of the top two classes, percent
    uncertainty: Any = None
    unc_levels: list[Any] | None = None
    # another model's labels are still shown: they are cleared when its first tile is painted
    # (a request refused or cancelled before then leaves them as they are)
    pending: _PendingReset | None = None

    def writer(self, plane: L.LayerPlane
               ) -> tuple[L.LevelWriter, L.LevelWriter | None, L.LevelWriter | None]:
        """Writers of the labels, confidence and uncertainty levels (None: no such layer)."""
        key = plane.key()
        hit = self.writers.get(key)
        if hit is None:
            conf = None if self.conf_levels is None else L.LevelWriter(plane, self.conf_levels)
            unc = None if self.unc_levels is None else L.LevelWriter(plane, self.unc_levels)
            hit = (L.LevelWriter(plane, self.label_levels), conf, unc)
            self.writers[key] = hit
        return hit

    def painted_cells(self, plane: L.LayerPlane | None = None) -> set[tuple[int, int]]:
        """Grid cells shown (of ``plane``, default: every plane)."""
        key = None if plane is None else plane.key()
        return {cell for k, cell in self.painted if key is None or k == key}


@dataclass(eq=False)
class _PendingReset:
    """What the output layers are reset for at the first painted tile of a new model."""

    loaded: Any
    plane: L.LayerPlane
    dtype: np.dtype
    probabilities: bool
    uncertainty: bool


def _same_family(a: tuple, b: tuple) -> bool:
    """Identities of the same model choice and tiling (only the weights differ)."""
    return a[0] == b[0] and a[3:] == b[3:]


@dataclass
class PaintResult:
    """What one painted tile changed: layers to refresh later, level-0 slices to refresh now."""

    painted: bool = False
    dirty: list[Any] = field(default_factory=list)
    regions: list[tuple[Any, tuple]] = field(default_factory=list)


class ViewOutputs:
    """The view-prediction layers of one viewer, keyed by their image layer."""

    def __init__(self, viewer: Any, defer: Any = None, settled: bool = False) -> None:
        self.viewer = viewer
        # runs a callback in a later turn of the event loop (see L.add_layer_in_steps)
        self.defer, self.settled = defer, settled
        self._targets: dict[int, ViewTarget] = {}
        self._points: dict[int, tuple[Any, tuple]] = {}  # image id -> (Points layer, identity)

    def target(self, image: Any) -> ViewTarget | None:
        """The outputs of ``image`` (None before its first view prediction)."""
        return None if image is None else self._targets.get(id(image))

    def is_current(self, target: ViewTarget | None) -> bool:
        return target is not None and self._targets.get(id(target.image)) is target

    def forget(self, layer: Any) -> None:
        """``layer`` was removed from the viewer: drop what refers to it."""
        self._targets.pop(id(layer), None)
        self._points.pop(id(layer), None)
        for key, (points, _identity) in list(self._points.items()):
            if points is layer:
                del self._points[key]
        for key, target in list(self._targets.items()):
            if target.labels is layer:
                del self._targets[key]  # the user deleted our output: start afresh next time
            elif target.confidence is layer:
                target.confidence, target.conf_levels = None, None
                target.writers.clear()
            elif target.uncertainty is layer:
                target.uncertainty, target.unc_levels = None, None
                target.writers.clear()

    def prepare(self, image: Any, loaded: Any, plane: L.LayerPlane, probabilities: bool,
                uncertainty: bool = False) -> ViewTarget:
        """The output layers for ``image``, (re)created when the model changed
        (``probabilities``: with the confidence layer; ``uncertainty``: with the uncertainty
        layer)."""
        viewer = self.viewer
        target = self._targets.get(id(image))
        if target is not None and target.labels not in viewer.layers:
            target = None
        model = loaded.model
        dtype = label_dtype(len(model.label_values), model.label_values)
        if (
            target is not None
            and target.identity != loaded.identity
            and _same_family(target.identity, loaded.identity)
            and target.label_values == list(model.label_values)
            and target.label_levels[0].dtype == dtype
        ):
            # New weights of the same model (fine-tuning snapshots): keep showing the old
            # labels until each tile is overwritten, instead of blanking the layer.
            target.identity = loaded.identity
            target.painted.clear()
        if target is None:
            target = self._new_labels(image, loaded, plane, None, dtype)
            self._targets[id(image)] = target
        elif target.identity != loaded.identity or target.pending is not None:
            # Another model: keep showing the old labels until the new model's first tile
            # exists (never clear a layer for a request that is then refused or cancelled).
            target.identity = loaded.identity
            target.painted.clear()
            target.pending = _PendingReset(loaded, plane, dtype, probabilities, uncertainty)
            return target
        if probabilities and self._missing(target.confidence, target.conf_levels):
            self._add_confidence(target, image, plane)
        if uncertainty and self._missing(target.uncertainty, target.unc_levels):
            self._add_uncertainty(target, image, plane)
        return target

    def _missing(self, layer: Any, levels: Any) -> bool:
        """No such map: never made, or its layer was removed (one being built is not)."""
        return levels is None or (layer is not None and layer not in self.viewer.layers)

    def _reset(self, target: ViewTarget) -> None:
        """Clear ``target`` for the model it is pending for (at its first painted tile)."""
        pending, target.pending = target.pending, None
        fresh = self._new_labels(target.image, pending.loaded, pending.plane, target,
                                 pending.dtype)
        for name in ("labels", "label_levels", "label_values", "style", "confidence",
                     "conf_levels", "uncertainty", "unc_levels"):
            setattr(target, name, getattr(fresh, name))
        target.writers.clear()
        if pending.probabilities:
            self._add_confidence(target, target.image, pending.plane)
        if pending.uncertainty:
            self._add_uncertainty(target, target.image, pending.plane)

    def _new_labels(self, image: Any, loaded: Any, plane: L.LayerPlane,
                    target: ViewTarget | None, dtype: np.dtype) -> ViewTarget:
        viewer, model = self.viewer, loaded.model
        colors = getattr(model, "class_colors", None)
        style = (tuple(model.label_values), repr(colors), tuple(model.class_names))
        if target is not None:
            # Same layer, new model: no stale tile of the old model may survive.
            layer = target.labels
            levels = target.label_levels
            if all(isinstance(a, np.ndarray) for a in levels) and levels[0].dtype == dtype:
                for arr in levels:
                    arr[...] = 0  # in place: far cheaper for napari than new data
                L.refresh_data(layer)
            else:
                levels = L.allocate_levels(plane, dtype)
                layer.data = levels if plane.multiscale else levels[0]
            if target.style != style:
                layer.colormap = _colormap(loaded)
                layer.features = L.class_features(model.label_values, model.class_names)
            for old in (target.confidence, target.uncertainty):
                if old is not None and old in viewer.layers:
                    self._remove_later(old)
        else:
            levels = L.allocate_levels(plane, dtype)
            previous = viewer.layers.selection.active
            layer = L.add_labels_in_steps(
                viewer, levels if plane.multiscale else levels[0], self.defer,
                select=unless_painting(viewer), settled=self.settled,
                name=f"{image.name} MuViT",
                multiscale=plane.multiscale,
                colormap=_colormap(loaded),
                features=L.class_features(model.label_values, model.class_names),
                opacity=0.6,
                metadata={"napari_muvit": {"source_layer": image.name}},
                **L.transform_kwargs(image, plane),
            )
            keep_painting(viewer, previous)
        return ViewTarget(image=image, identity=loaded.identity, labels=layer,
                          label_levels=levels, label_values=list(model.label_values),
                          style=style)

    def _remove_later(self, layer: Any) -> None:
        """Hide ``layer`` now, remove it once the panel is quiet (removing a layer is one of
        napari's long pieces of GUI work)."""
        if not self.settled or self.defer is None:
            self.viewer.layers.remove(layer)
            return
        layer.visible = False

        def remove() -> None:
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

        self.defer(remove, settled=True)

    def _add_confidence(self, target: ViewTarget, image: Any, plane: L.LayerPlane) -> None:
        target.confidence, target.conf_levels = self._add_percent_layer(
            target, image, plane, "confidence")

    def _add_uncertainty(self, target: ViewTarget, image: Any, plane: L.LayerPlane) -> None:
        target.uncertainty, target.unc_levels = self._add_percent_layer(
            target, image, plane, "uncertainty")

    def _add_percent_layer(self, target: ViewTarget, image: Any, plane: L.LayerPlane,
                           what: str) -> tuple[Any, list[Any]]:
        """The levels of a map of percentages over ``image``'s plane, and its Image layer
        (magma, additive).  With a panel that settles, the layer is made once it is quiet
        (``None`` until then: tiles are written into the levels meanwhile); making a napari
        layer is one of the longest pieces of GUI work, and a secondary map can wait."""
        levels = L.allocate_levels(plane, np.uint8)
        target.writers.clear()
        # Tiles already shown have no such map yet: let them be recomputed (cache hits).
        target.painted.clear()
        if not self.settled or self.defer is None:
            return self._percent_layer(image, plane, what, levels), levels
        attr, levels_attr = (("confidence", "conf_levels") if what == "confidence"
                             else ("uncertainty", "unc_levels"))

        def make() -> None:
            if (self.is_current(target) and getattr(target, levels_attr) is levels
                    and getattr(target, attr) is None and image in self.viewer.layers):
                setattr(target, attr, self._percent_layer(image, plane, what, levels))

        self.defer(make, settled=True)
        return None, levels

    def _percent_layer(self, image: Any, plane: L.LayerPlane, what: str,
                       levels: list[Any]) -> Any:
        previous = self.viewer.layers.selection.active
        layer = L.add_image_in_steps(
            self.viewer, levels if plane.multiscale else levels[0], self.defer,
            select=unless_painting(self.viewer), settled=self.settled and "all",
            name=f"{image.name} MuViT {what}",
            multiscale=plane.multiscale,
            colormap="magma",
            contrast_limits=(0, 100),
            opacity=0.5,
            blending="additive",
            metadata={"napari_muvit": {"source_layer": image.name, "unit": "percent"}},
            **L.transform_kwargs(image, plane),
        )
        keep_painting(self.viewer, previous)
        return layer

    def points_layer(self, image: Any) -> Any:
        """The Points layer of ``image``'s point detections (None before the first)."""
        hit = None if image is None else self._points.get(id(image))
        return None if hit is None or hit[0] not in self.viewer.layers else hit[0]

    def show_points(self, image: Any, loaded: Any, plane: L.LayerPlane,
                    table: dict[str, np.ndarray], region: np.ndarray) -> Any:
        """Show a detector's points of ``region`` (level-0 ``(y, x)`` pixel edges of the plane)
        on ``image``'s Points layer, created on first use with the image's transform.

        Points of the same model elsewhere (other regions, other planes) stay, those inside
        ``region`` on this plane are replaced; another model (or new weights) starts afresh.
        """
        model = loaded.model
        coords = points_coords(plane, table["y"], table["x"])
        new = pd.DataFrame({"class": np.asarray(table["class"], dtype=np.int64),
                            "score": np.asarray(table["score"], dtype=np.float32)})
        layer = self.points_layer(image)
        if layer is not None and self._points[id(image)][1] == loaded.identity:
            old = np.asarray(layer.data, dtype=np.float64).reshape(-1, coords.shape[1])
            keep = ~_in_plane_region(old, plane, region)
            coords = np.concatenate([old[keep], coords])
            new = pd.concat([layer.features.loc[keep, ["class", "score"]], new],
                            ignore_index=True)
        colormap = _colormap(loaded)
        face = (colormap.map(new["class"].to_numpy()) if len(new)
                else np.zeros((0, 4), np.float32))
        if layer is None:
            previous = self.viewer.layers.selection.active
            layer = self.viewer.add_points(
                coords, ndim=coords.shape[1], name=f"{image.name} MuViT points",
                features=new, face_color=face, border_width=0, size=_point_size(model),
                metadata={"napari_muvit": {"source_layer": image.name,
                                           "class_names": dict(zip(model.label_values,
                                                                   model.class_names))}},
                **L.transform_kwargs(image, plane),
            )
            keep_painting(self.viewer, previous)
        else:
            layer.data = coords
            layer.features = new
            if len(new):
                layer.face_color = face
        self._points[id(image)] = (layer, loaded.identity)
        return layer

    def paint(self, target: ViewTarget, plane: L.LayerPlane, res: Any) -> PaintResult:
        """Write one :class:`~napari_muvit.engine.sinks.TileResult` into ``target``.

        Returns what to refresh: non-multiscale Labels layers region by region (``regions``,
        uploaded together once per painting slice), the others as a whole (``dirty``, by the
        panel's rate-limited refresh).
        """
        out = PaintResult()
        if target.pending is not None:
            self._reset(target)
        key = (plane.key(), tuple(res.tile.grid))
        if key in target.painted and res.cached:
            return out
        core = np.asarray(res.tile.core, dtype=np.int64)
        labels_writer, conf_writer, unc_writer = target.writer(plane)
        written = labels_writer.write(core, np.asarray(res.labels))
        if conf_writer is not None and res.probs is not None:
            conf = (np.asarray(res.probs, dtype=np.float32).max(axis=0) * 100).astype(np.uint8)
            conf_writer.write(core, conf)
            if target.confidence is not None:
                out.dirty.append(target.confidence)
        if unc_writer is not None and res.probs is not None:
            unc_writer.write(core, uncertainty_percent(res.probs))
            if target.uncertainty is not None:
                out.dirty.append(target.uncertainty)
        target.painted.add(key)
        out.painted = True
        layer = target.labels
        if layer.multiscale:
            out.dirty.append(layer)
        else:
            out.regions = [(layer, slice_key) for level, slice_key in written if level == 0]
        return out


def _colormap(loaded: Any) -> Any:
    """The model's class colours, as built by the loader in its worker thread."""
    cached = getattr(loaded, "colormap", None)
    return cached if cached is not None else L.model_colormap(loaded.model)


def points_coords(plane: L.LayerPlane, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``(N, ndim)`` data coordinates of plane points ``(y, x)`` in the output layers' axes
    (the plane's other axes at their displayed index)."""
    axes = plane.out_axes
    out = np.zeros((len(y), len(axes)), dtype=np.float64)
    for col, axis in enumerate(axes):
        if axis == plane.displayed[0]:
            out[:, col] = y
        elif axis == plane.displayed[1]:
            out[:, col] = x
        else:
            out[:, col] = plane.index.get(axis, 0)
    return out


def _in_plane_region(coords: np.ndarray, plane: L.LayerPlane, region: np.ndarray) -> np.ndarray:
    """Which points lie on ``plane`` inside ``region`` (pixel edges; pixel ``i`` is centred
    at ``i``, so its points lie in ``[i - 0.5, i + 0.5)``)."""
    axes = plane.out_axes
    (y0, x0), (y1, x1) = np.asarray(region, dtype=np.float64)
    y = coords[:, axes.index(plane.displayed[0])]
    x = coords[:, axes.index(plane.displayed[1])]
    inside = (y >= y0 - 0.5) & (y < y1 - 0.5) & (x >= x0 - 0.5) & (x < x1 - 0.5)
    for col, axis in enumerate(axes):
        if axis not in plane.displayed:
            inside &= coords[:, col] == plane.index.get(axis, 0)
    return inside


def _point_size(model: Any) -> float:
    """Marker size in data pixels: the detector's duplicate distance (about a nucleus)."""
    return float(max(3.0, 2 * model.head_options.get("min_distance", 4)))


# ---------------------------------------------------------------------------------------------
# whole-image stores
# ---------------------------------------------------------------------------------------------


def add_store_layer(viewer: Any, image: Any, plane: L.LayerPlane, sink: Any, model: Any,
                    out_path: Path, colormap: Any = None, defer: Any = None,
                    settled: bool = False) -> Any:
    """Show the zarr store of a whole-image job as a Labels layer over ``image``'s plane
    (replacing the layer of a previous run of the same store); ``colormap`` default: the
    model's; ``defer`` and ``settled`` as in :func:`._layers.add_layer_in_steps`."""
    levels = [sink.labels(k) for k in range(sink.n_levels)]
    name = f"{image.name} MuViT ({out_path.name})"
    for layer in list(viewer.layers):
        if layer.name == name:
            viewer.layers.remove(layer)  # a previous run of the same store
    data, kwargs = stack_for_plane(levels, image, plane)
    return L.add_labels_in_steps(
        viewer,
        data,
        defer,
        settled=settled,
        name=name,
        multiscale=len(levels) > 1,
        colormap=colormap if colormap is not None else L.model_colormap(model),
        features=L.class_features(model.label_values, model.class_names),
        opacity=0.6,
        metadata={"napari_muvit": {"store": str(out_path), "source_layer": image.name}},
        **kwargs,
    )


def stack_for_plane(levels: list[Any], image: Any, plane: L.LayerPlane) -> tuple[Any, dict]:
    """2-D store levels as layer data aligned with ``image``'s displayed plane.

    A 2-D image uses the arrays and transforms as they are.  For nD images the 2-D levels get
    length-1 axes for the other dimensions (lazily, via dask) and the plane's index is folded
    into the affine, so the result sits exactly on the plane it was computed for.
    """
    if plane.ndim == 2 and plane.channel_axis is None:
        return (levels if len(levels) > 1 else levels[0]), L.transform_kwargs(image, plane)
    out_axes = plane.out_axes
    ndim = len(out_axes)
    disp = (out_axes.index(plane.displayed[0]), out_axes.index(plane.displayed[1]))
    stacked = []
    for arr in levels:
        lazy = da.from_array(arr, chunks=arr.chunks)
        shape = [1] * ndim
        shape[disp[0]], shape[disp[1]] = arr.shape
        stacked.append(lazy.reshape(tuple(shape)))
    full = L.full_affine(image)
    keep = [*out_axes, full.shape[0] - 1]
    affine = full[np.ix_(keep, keep)]
    shift = np.eye(ndim + 1)
    for axis, index in plane.index.items():
        shift[out_axes.index(axis), -1] = index
    data = stacked if len(stacked) > 1 else stacked[0]
    return data, {"affine": affine @ shift}


def default_store_path(image: Any, output_dir: str) -> Path:
    """``<folder>/<image>_muvit.zarr``: next to the image's file when it has one, else in
    ``output_dir``."""
    name = "image" if image is None else safe_name(image.name)
    folder = Path(output_dir)
    source_path = getattr(getattr(image, "source", None), "path", None)
    if source_path:
        folder = Path(source_path).expanduser().parent
    return folder / f"{name}_muvit.zarr"


# ---------------------------------------------------------------------------------------------
# training inputs
# ---------------------------------------------------------------------------------------------


def add_annotation_layer(viewer: Any, image: Any, store: str | Path | None,
                         annotation_dir: str) -> Any:
    """An empty Labels layer over ``image``'s plane, ready to paint (brush, label 1).

    In memory for planes up to :data:`._layers.DENSE_OUTPUT_MAX_PIXELS`; beyond that (or when
    ``store`` is given) a zarr array on disk, default ``<annotation_dir>/<name>.zarr``, so that
    the annotations of a big image survive the session.
    """
    plane = L.layer_plane(viewer, image)
    shape = L.output_level_shapes(plane)[0]
    name = unique_name(viewer, f"{image.name} annotations")
    if int(np.prod(plane.shape)) <= L.DENSE_OUTPUT_MAX_PIXELS and store is None:
        data: Any = np.zeros(shape, dtype=np.uint8)
    else:
        path = Path(store) if store is not None else (
            Path(annotation_dir) / f"{safe_name(name, 'labels')}.zarr"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        chunks = tuple(min(1024, n) if n > 64 else 1 for n in shape)
        data = zarr.open_array(
            str(path), mode="a", shape=shape, chunks=chunks, dtype="uint8", fill_value=0
        )
    layer = viewer.add_labels(
        data,
        name=name,
        metadata={"napari_muvit": {"annotations_for": image.name}},
        **L.transform_kwargs(image, plane),
    )
    layer.mode = "paint"
    layer.selected_label = 1
    layer.brush_size = 10
    return layer


def add_validation_layer(viewer: Any, image: Any) -> Any:
    """A Shapes layer in rectangle mode (over ``image``) for the validation region."""
    kwargs = {} if image is None else {"scale": image.scale, "translate": image.translate}
    layer = viewer.add_shapes(
        name=unique_name(viewer, "validation region"),
        edge_color="yellow",
        face_color="transparent",
        edge_width=2,
        **kwargs,
    )
    layer.mode = "add_rectangle"
    return layer
