"""Point detection in the engines: training from points, tiled prediction to point tables.

Nothing here is a second training loop or a second tiled-inference loop:

* :class:`PointTrainer` is the fine-tuning :class:`~napari_muvit.engine.trainer.Trainer` with
  another loss. Points plus their annotated region are presented to it as a virtual label image
  (:class:`~napari_muvit.data.points_io.PointRaster`: 0 = not annotated, 1 = annotated without
  a point, ``c + 1`` = a point of class ``c``), so its label index, crop sampler (nested crops
  around annotated pixels with random offsets: MUSE's large-field-of-view samples),
  augmentations, checkpoints, cancel and resume all apply unchanged. The loss is MUSE's
  (:func:`~napari_muvit.model.points.point_loss` inside the annotated region, the ramped
  :func:`~napari_muvit.model.points.point_consistency_loss` of an EMA teacher outside).
* :class:`PointPredictor` is the :class:`~napari_muvit.engine.predictor.Predictor` whose tile
  output is the detector's per-pixel maps (score, offsets, class probabilities) instead of class
  probabilities: tile plan, reading, batching, caching and overlap blending are reused; sinks
  decode each tile's core into points and suppress duplicates across tile borders
  (:class:`PointMerger`). :class:`PointMemorySink` keeps the table in memory;
  :class:`PointCsvSink` streams it to a CSV file, resumably.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from napari_muvit.data.geometry import Tile, clip_region, grid_cell_range
from napari_muvit.data.points_io import PointRaster, PointTable, parse_region, read_points
from napari_muvit.engine.predictor import Predictor, model_digest
from napari_muvit.engine.trainer import Trainer, TrainConfig
from napari_muvit.errors import InputError

__all__ = [
    "POINT_COLUMNS",
    "POINT_TRAIN_DEFAULTS",
    "PointCsvSink",
    "PointMemorySink",
    "PointMerger",
    "PointPredictor",
    "PointTrainer",
    "empty_points",
    "predict_points",
    "suppress_duplicates",
    "train_points",
]

POINT_COLUMNS = ("y", "x", "class", "score")
DEFAULT_HEAD_DIM = 64
#: TrainConfig fields a point detector trains with unless told otherwise: its decoder and
#: objectness start from nothing and the encoder must learn to localise nuclei, so everything
#: learns at 1e-3 (measured on the synthetic rings from the bundled MAE encoder, 600 steps:
#: detection F1 0.45 at the segmentation defaults, lr 1e-4 and the encoder at 0.1x; see
#: docs/results.md)
POINT_TRAIN_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "encoder_lr_factor": 1.0}


def empty_points() -> dict[str, np.ndarray]:
    """A point table with no rows: ``{"y", "x", "class", "score"}`` numpy arrays."""
    return {
        "y": np.zeros(0, np.float64),
        "x": np.zeros(0, np.float64),
        "class": np.zeros(0, np.int64),
        "score": np.zeros(0, np.float32),
    }


def suppress_duplicates(yx: Any, score: Any, min_distance: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (see ``model.points.nms_points``)."""
    from napari_muvit.model.points import nms_points

    return nms_points(yx, score, min_distance)


def is_detector(model: Any) -> bool:
    """Whether ``model`` is a point detector (engines dispatch on ``model.task``)."""
    return getattr(model, "task", None) == "points"


# ============================================================================ training
class PointTrainer(Trainer):
    """Fine-tune a point detector on point annotations (MUSE's recipe on MuViT).

    Parameters
    ----------
    model
        An encoder, MAE, segmenter (its encoder is used) or point detector (its head is kept if
        it knows every annotated class).
    annotations
        ``[(image, PointTable, region)]``; ``region`` ``[[y0, x0], [y1, x1]]`` is the
        completely annotated rectangle (``None``: the whole image). Points outside it still
        count as points; only inside it is "no point" learnt.
    head_options
        Options of a new head (``stride``, ``offsets``, ``pos_radius``, ``min_distance``,
        ``threshold``; :mod:`napari_muvit.model.points`).
    reg_weight, background_weight
        Weight of the offset MSE, and of the background class in the type cross-entropy.
    val_radius
        Matching radius (px) of the validation F1 (``config.val_region``).

    Everything else is :class:`~napari_muvit.engine.trainer.Trainer`'s (``config``,
    ``progress``, ``cancel``, ``out``, ``resume``, ``provenance``, ``notes``); ``class_names``
    maps class ids to names. Progress dicts carry ``val_f1`` (mean class F1) when validating.
    """

    curve_keys = (*Trainer.curve_keys, "loss_type", "loss_obj", "loss_reg")
    #: trees of the type forest (class-balanced, depth <= 20)
    type_forest_trees = 100

    def __init__(
        self,
        model: nn.Module,
        annotations: Sequence[tuple[Any, PointTable, Any]],
        config: TrainConfig | None = None,
        progress: Any = None,
        cancel: Any = None,
        out: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
        class_names: Mapping[int, str] | None = None,
        head_options: Mapping[str, Any] | None = None,
        reg_weight: float = 1.0,
        background_weight: float = 1.0,
        val_radius: float = 5.0,
        provenance: Mapping[str, Any] | None = None,
        notes: Iterable[str] = (),
    ) -> None:
        from napari_muvit.data import open_image

        config = config or TrainConfig(**POINT_TRAIN_DEFAULTS)
        if not annotations:
            raise InputError("points: expected at least one (image, points) pair, got none")
        self.head_options = dict(head_options or {})
        self.reg_weight = float(reg_weight)
        self.background_weight = float(background_weight)
        self.val_radius = float(val_radius)
        self.tables: list[PointTable] = []
        pairs = []
        for i, (image, table, region) in enumerate(annotations):
            source = open_image(image)
            if table.yx.size == 0:
                raise InputError(f"{table.source}: no points")
            table.check_inside(source.shape)
            held_out = config.val_region if i == config.val_pair else None
            raster = PointRaster(table, source.shape, region, exclude=held_out)
            self.tables.append(table)
            pairs.append((source, raster))
        self._names = dict(class_names or {})
        for table in self.tables:
            for k, v in table.class_names.items():
                self._names.setdefault(int(k), v)
        super().__init__(
            model, pairs, config, progress, cancel, out, resume=resume,
            provenance=provenance, notes=notes,
        )
        # one class needs no type: an empty forest gives probability 1
        if not resume and self.model.type_forest is not None and self.model.num_classes > 1:
            self._fit_type_forest()
            # the EMA teacher was copied before the forest existed
            self.teacher = self._build_teacher()

    # ------------------------------------------------------------------ classes
    def point_classes(self) -> list[int]:
        """Class ids with at least one point (outside the validation region)."""
        return sorted(v - 1 for v in self.painted_values() if v >= 2)

    @property
    def label_mapping(self) -> dict[int, int]:
        """Raster value -> type index: 1 (annotated) -> 0 (background), ``c+1`` -> ``k+1``."""
        mapping = {1: 0}
        for k, c in enumerate(self.model.label_values):
            mapping[int(c) + 1] = k + 1
        return mapping

    def _setup_model(self, model: nn.Module, class_names: Any) -> nn.Module:
        from napari_muvit.model import MuViTEncoder, MuViTMAE, MuViTPointDetector, MuViTSegmenter

        if isinstance(model, (MuViTMAE, MuViTSegmenter)):
            self._event("start", f"the encoder of the starting {type(model).__name__} is used")
            model = model.encoder
        if not isinstance(model, (MuViTEncoder, MuViTPointDetector)):
            raise InputError(
                f"model: expected an encoder or a point detector, got {type(model).__name__}"
            )
        source = self.pairs[0][0]
        if model.in_channels != source.channels and isinstance(model, MuViTPointDetector):
            self._event("new_head", "the detector's channels differ from the image's: its "
                        "encoder is adapted and a new head trained", warning=True)
            model = model.encoder
        model = self._fit_to_images(model)
        classes = self.point_classes()
        if not classes:
            raise InputError(self._no_annotation_message())
        if isinstance(model, MuViTPointDetector) and not set(classes) <= set(model.label_values):
            new = sorted(set(classes) - set(model.label_values))
            self._event(
                "new_head",
                f"point class(es) {new} are not classes of the starting detector "
                f"({model.label_values}); its head was replaced by a new one",
                warning=True,
            )
            model = model.encoder
        if isinstance(model, MuViTEncoder):
            model = self._new_detector(model, classes)
        self._unify_normalization(model)
        return model.to(self.device)

    def _new_detector(self, encoder: nn.Module, classes: list[int]) -> nn.Module:
        from napari_muvit.engine._models import preset_for
        from napari_muvit.model import MuViTPointDetector

        preset = preset_for(encoder.dim)
        head_dim = preset.head_dim if preset is not None else DEFAULT_HEAD_DIM
        names = [self._names.get(c, f"class {c}") for c in classes]
        options = {**self._spacing_defaults(), **self.head_options}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            det = MuViTPointDetector(
                encoder, num_classes=len(classes), head_dim=head_dim, class_names=names,
                label_values=classes, head_options=options,
                meta={k: v for k, v in getattr(encoder, "meta", {}).items()
                      if k in ("init", "crop_size")},
            )
        self._event("head", f"new point head for classes {classes} ({det.head_config})")
        return det

    def _spacing_defaults(self) -> dict[str, float]:
        """``pos_radius`` and ``min_distance`` from the spacing of the clicked points.

        A location learns "point" within ``pos_radius`` of one: too small for large nuclei and
        the score plateaus below the threshold over the rest of each nucleus (measured: a
        12 px-radius nucleus with 3 px peaked at 0.48); offsets keep large radii precise.
        0.3× / 0.5× the median nearest-neighbour distance, within [3, 10] / [4, 16] px.
        """
        from scipy.spatial import cKDTree

        dists = []
        for table in self.tables:
            if len(table) >= 2:
                d, _ = cKDTree(table.yx).query(table.yx, k=2)
                dists.append(d[:, 1])
        if not dists:
            return {}
        nn = float(np.median(np.concatenate(dists)))
        out = {
            "pos_radius": round(float(np.clip(0.3 * nn, 3.0, 10.0)), 2),
            "min_distance": round(float(np.clip(0.5 * nn, 4.0, 16.0)), 2),
        }
        self._event("spacing", f"median nearest-neighbour distance {nn:.1f} px -> {out}")
        return out

    def _no_annotation_message(self) -> str:
        where = " outside the validation region" if self.config.val_region is not None else ""
        return f"points: found no points{where}; click at least a few points per class"

    def _check_annotations(self) -> None:
        missing = [c for c in self.model.label_values if c not in self.point_classes()]
        if missing:
            self._event(
                "unpainted_classes",
                f"class(es) {missing} of the detector have no points; they are kept but get no "
                "training signal",
                warning=True,
            )

    # ------------------------------------------------------------------ forest type head
    def _fit_type_forest(self) -> None:
        """Fit the detector's type forest on the positive locations of the clicked points."""
        import time

        from napari_muvit.engine.forests import fit_ensemble

        t0 = time.perf_counter()
        rows, types, points = self._type_rows()
        if len(rows) == 0:
            raise InputError(self._no_annotation_message())
        trees = self.type_forest_trees
        shape = fit_ensemble(self.model.type_forest.forest, rows, types, trees,
                             seed=self.config.seed)
        self.model.head_options.update(shape)
        self._event(
            "type_forest",
            f"type forest ({trees} trees) fitted on {len(rows)} locations of {points} points "
            f"in {time.perf_counter() - t0:.1f} s",
        )

    @torch.no_grad()
    def _type_rows(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Forest features and type indices of the positive grid locations of the points
        (outside the validation region), each computed in the level-1 tile of the global tile
        grid that holds the point, with the crops prediction would read there."""
        from napari_muvit.engine.quicktrain import nested_tiles_of_pixels
        from napari_muvit.model.points import point_targets

        m, S = self.model, self.crop_size
        levels = tuple(float(v) for v in m.levels)
        device = next(m.parameters()).device
        rows, types, points = [], [], 0
        for source, raster in self.pairs:
            pixels = np.clip(np.rint(raster.table.yx).astype(np.int64), 0,
                             np.array(source.shape) - 1)
            points += len(pixels)
            for tiles, _, x, boxes in nested_tiles_of_pixels(source, pixels, S, levels, device,
                                                             cancel=self.cancel):
                x = m.encoder.check_input(x)
                coords = m.encoder.token_coords(boxes, x.shape, device)
                feats = m.head.type_features(x, coords).permute(0, 2, 3, 1)
                target = torch.from_numpy(
                    np.stack([self._type_target(raster, t.origin, S) for t in tiles])
                )
                t_types, _, positive, _ = point_targets(target, m.stride,
                                                        m.head_options["pos_radius"])
                keep = positive & (t_types > 0)
                rows.append(feats[keep.to(device)].float().cpu().numpy())
                types.append((t_types[keep] - 1).numpy())
        if not rows:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), points
        return np.concatenate(rows), np.concatenate(types), points

    def _type_target(self, raster: PointRaster, origin: Any, size: int) -> np.ndarray:
        """The tile's window of ``raster`` as :func:`point_targets` reads it (-1 not annotated,
        0 no point, ``k + 1`` a point of type index ``k``), padded with -1 past the image."""
        y0, x0 = (int(v) for v in origin)
        block = np.asarray(raster[max(y0, 0) : y0 + size, max(x0, 0) : x0 + size])
        lut = np.full(int(block.max(initial=1)) + 1, -1, np.int64)
        lut[1] = 0
        for value, index in self.label_mapping.items():
            if value < len(lut):
                lut[value] = index
        out = np.full((size, size), -1, np.int64)
        out[max(-y0, 0) : max(-y0, 0) + block.shape[0],
            max(-x0, 0) : max(-x0, 0) + block.shape[1]] = lut[block]
        return out

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        logits: Tensor,
        target: Tensor,
        valid: Tensor,
        teacher_logits: Tensor | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """MUSE: objectness + type CE + offset MSE inside the annotated region (the detector's
        ``type_head`` layout), plus the ramped consistency term of the teacher's confident
        predictions outside it."""
        from napari_muvit.engine.trainer import _ramp
        from napari_muvit.model.points import point_consistency_loss, point_loss

        cfg, m = self.config, self.model
        opts = m.head_options
        sup, parts = point_loss(
            logits, target, m.num_classes, m.stride, opts["pos_radius"],
            reg_weight=self.reg_weight, background_weight=self.background_weight,
            type_head=m.type_head,
        )
        parts["loss_supervised"] = float(sup.detach())
        weight = cfg.pseudo_weight * _ramp(self.step if step is None else step, self._ramp_steps)
        if teacher_logits is None or weight <= 0:
            return sup, parts
        pseudo, frac = point_consistency_loss(
            logits, teacher_logits, target, valid, m.num_classes, m.stride,
            cfg.pseudo_threshold, reg_weight=self.reg_weight, type_head=m.type_head,
        )
        parts.update(loss_pseudo=float(pseudo.detach()), pseudo_fraction=frac)
        return sup + weight * pseudo, parts

    # ------------------------------------------------------------------ validation
    def _report_extra(self) -> dict[str, Any]:
        return {"val_f1": self.history["val"][-1]["f1"]} if self.history["val"] else {}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean class F1 (``val_radius``) of the points of the validation region."""
        from napari_muvit.metrics import point_f1

        cfg = self.config
        source, _ = self.pairs[cfg.val_pair]
        table = self.tables[cfg.val_pair]
        region = clip_region(cfg.val_region, source.shape)
        was_training = self.model.training
        pred = PointPredictor(
            self.model, device=self.device, cache_tiles=0, tile_size=self.crop_size,
            amp="off" if self.amp_dtype is None else "auto",
            threads=self.run_threads, adapt_threads=False,
        )
        found = pred.predict_table(source, region)
        self.model.train(was_training)
        inside = table.in_region(region)
        score = point_f1(
            np.stack([found["y"], found["x"]], 1), found["class"],
            table.yx[inside], table.classes[inside], self.val_radius,
        )
        f1 = float(score["mean_f1"])
        self.history["val"].append(
            {"step": self.step, "f1": f1, "detection_f1": score["detection"]["f1"]}
        )
        return f1

    # ------------------------------------------------------------------ checkpoints
    def _update_meta(self) -> None:
        super()._update_meta()
        self.model.meta.update(
            task="points",
            point_training={
                "reg_weight": self.reg_weight,
                "background_weight": self.background_weight,
                "val_radius": self.val_radius,
            },
        )


def train_points(
    images: Any,
    points: Any,
    out: str | os.PathLike[str] | None = None,
    init: Any = None,
    levels: Any = None,
    preset: str | None = None,
    config: TrainConfig | None = None,
    progress: Any = None,
    cancel: Any = None,
    *,
    regions: Sequence[Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    class_names: Sequence[str] | None = None,
    head_options: Mapping[str, Any] | None = None,
    reg_weight: float = 1.0,
    background_weight: float = 1.0,
) -> nn.Module:
    """Train a point detector on images and their point annotations; returns the detector.

    ``images``: one or a list (paths, arrays, PyramidSources). ``points``: one per image, a CSV
    path (:func:`~napari_muvit.data.points_io.read_points`), a :class:`PointTable` or an
    ``(N, 2)``/``(N, 3)`` array of ``y, x[, class]``. ``regions``: per image the annotated
    rectangle (``"y0,x0,y1,x1"`` or a bbox; ``None`` = whole image). ``init``/``levels``/
    ``preset``/``out``/``resume``/``overwrite`` as in :func:`~napari_muvit.engine.api.train`.
    """
    from napari_muvit.data import open_image
    from napari_muvit.engine import _checkpointing as ckpt
    from napari_muvit.engine.trainer import _describe, prepare_start_model

    config = config or TrainConfig(**POINT_TRAIN_DEFAULTS)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    several = isinstance(points, (list, tuple)) and not _is_array_like(points)
    points = list(points) if several else [points]
    if len(points) != len(images):
        raise InputError(
            f"points: expected one points file per image ({len(images)}), got {len(points)}"
        )
    regions = list(regions) if regions is not None else [None] * len(images)
    if len(regions) != len(images):
        raise InputError(f"regions: expected one per image ({len(images)}), got {len(regions)}")
    sources = [open_image(i) for i in images]
    tables = [as_point_table(p, s.shape, class_names) for p, s in zip(points, sources)]
    resuming = ckpt.check_out_folder(out, resume, overwrite) if out is not None else False
    if resuming:
        from napari_muvit.model import load_model

        model, notes = load_model(out), [f"resuming the run in {out}"]
    else:
        model, notes = prepare_start_model(init, levels, preset, sources[0].channels, config.seed)
    provenance = {
        "init": str(out) if resuming else (model.meta.get("init") or _describe(init)),
        "images": [_describe(i) for i in images],
        "points": [t.source for t in tables],
        "regions": [None if r is None else parse_region(r, s.shape).tolist()
                    for r, s in zip(regions, sources)],
        "steps": config.steps,
        "preset": preset,
    }
    names = {k + 1: n for k, n in enumerate(class_names)} if class_names else None
    trainer = PointTrainer(
        model, [(s, t, r) for s, t, r in zip(sources, tables, regions)], config, progress,
        cancel, out, resume=resuming, class_names=names, head_options=head_options,
        reg_weight=reg_weight, background_weight=background_weight,
        provenance=provenance, notes=notes,
    )
    trainer.run()
    return trainer.model


def _is_array_like(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or (
        isinstance(obj, (list, tuple)) and len(obj) > 0 and np.ndim(obj[0]) == 1
        and len(obj[0]) in (2, 3) and all(np.isscalar(v) for v in obj[0])
    )


def as_point_table(
    points: Any, shape: Sequence[int] | None = None, class_names: Sequence[str] | None = None
) -> PointTable:
    """A :class:`PointTable` from a CSV path, a table, or an ``(N, 2|3)`` array."""
    if isinstance(points, PointTable):
        table = points
    elif isinstance(points, (str, os.PathLike)):
        table = read_points(points, shape, class_names)
    else:
        arr = np.asarray(points, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] not in (2, 3) or len(arr) == 0:
            raise InputError(
                "points: expected an (N, 2) or (N, 3) array of y, x[, class], "
                f"got shape {arr.shape}"
            )
        cls = np.ones(len(arr), np.int64) if arr.shape[1] == 2 else arr[:, 2]
        if np.any(np.asarray(cls) < 1):
            raise InputError("points: classes are integers >= 1 (0 would mean 'no point')")
        table = PointTable(arr[:, :2].copy(), np.asarray(cls, dtype=np.int64), {}, "points array")
    if shape is not None:
        table.check_inside(shape)
    return table


# ============================================================================ prediction
class PointMerger:
    """Drops points closer than ``min_distance`` to a point accepted from an earlier tile.

    Tiles are decoded independently; a nucleus on a tile border can be found by both. Within a
    tile :func:`~napari_muvit.model.points.decode_points` already suppressed duplicates; across
    tiles the first tile to report a nucleus keeps it. Only points near their tile's core border
    are remembered (the only ones a neighbour can duplicate), so memory stays small.
    """

    def __init__(self, min_distance: float, border: float | None = None) -> None:
        self.min_distance = float(min_distance)
        self.border = float(border if border is not None else 4 * self.min_distance + 8)
        self.cell = max(self.min_distance, 1.0)
        self._grid: dict[tuple[int, int], list[tuple[float, float]]] = {}

    def _key(self, y: float, x: float) -> tuple[int, int]:
        return int(math.floor(y / self.cell)), int(math.floor(x / self.cell))

    def _near(self, y: float, x: float) -> bool:
        ky, kx = self._key(y, x)
        d2 = self.min_distance**2
        for gy in (ky - 1, ky, ky + 1):
            for gx in (kx - 1, kx, kx + 1):
                for py, px in self._grid.get((gy, gx), ()):
                    if (py - y) ** 2 + (px - x) ** 2 < d2:
                        return True
        return False

    def add(self, yx: np.ndarray, core: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask of the new points (of one tile) that are kept; remembers them."""
        keep = np.array([not self._near(float(y), float(x)) for y, x in yx], dtype=bool)
        for (y, x), k in zip(yx, keep):
            if k and (core is None or _near_border(y, x, core, self.border)):
                self._grid.setdefault(self._key(y, x), []).append((float(y), float(x)))
        return keep


def _near_border(y: float, x: float, core: np.ndarray, margin: float) -> bool:
    (y0, x0), (y1, x1) = core
    return min(y - y0, y1 - y, x - x0, x1 - x) < margin


class PointPredictor(Predictor):
    """The tiled :class:`~napari_muvit.engine.predictor.Predictor` for point detectors.

    A tile's output "probabilities" are the detector's per-pixel maps (score, offsets, class
    probabilities; :func:`~napari_muvit.model.points.point_maps`), so overlap blending and the
    tile cache work on them unchanged; :meth:`tile_points` decodes a tile's core.

    ``threshold`` and ``min_distance`` default to the detector's ``head_options``.
    """

    def __init__(
        self, model: nn.Module, *args: Any, threshold: float | None = None,
        min_distance: float | None = None, **kwargs: Any,
    ) -> None:
        if not is_detector(model):
            raise InputError(
                f"model: expected a point detector (task 'points'), got {type(model).__name__}"
            )
        super().__init__(model, *args, **kwargs)
        opts = model.head_options
        self.threshold = float(opts["threshold"] if threshold is None else threshold)
        self.min_distance = float(opts["min_distance"] if min_distance is None else min_distance)
        if not 0 < self.threshold < 1:
            raise InputError(f"threshold: expected a value in (0, 1), got {threshold!r}")
        if not self.min_distance > 0:
            raise InputError(f"min_distance: expected a positive distance, got {min_distance!r}")
        # the tile "probabilities" are the C maps; labels are not used
        self.num_classes = int(model.map_channels)
        self.label_values = list(range(self.num_classes))
        self._lut = torch.arange(self.num_classes, device=self.device)
        self._label_dtype = np.uint8
        self.class_ids = np.asarray(model.label_values, dtype=np.int64)

    def _forward(self, crops: np.ndarray, bboxes: np.ndarray, need_probs: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        from napari_muvit.engine.device import autocast

        x = torch.from_numpy(crops).to(self.device, non_blocking=True)
        bb = torch.from_numpy(bboxes).to(self.device)
        if self.device.type == "mps":
            bb = bb.float()
        self.stats["model_calls"] += 1
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            raw = self.model(x, bb)
        maps = self.model.maps(raw.float(), crops.shape[-1])
        labels = np.zeros((len(crops), *crops.shape[-2:]), dtype=self._label_dtype)
        # scores and class probabilities in [0, 1] and offsets of a few pixels: float16 keeps
        # them to ~1e-3 (scores) / ~0.01 px (offsets), like the segmenter's probabilities
        return labels, maps.to(torch.float16).cpu().numpy()

    def tile_points(self, result: Any) -> dict[str, np.ndarray]:
        """Points of one :class:`TileResult` core, in level-0 pixel coordinates."""
        from napari_muvit.model.points import decode_points

        if result.skipped or result.probs is None:
            return empty_points()
        maps = torch.from_numpy(result.probs.astype(np.float32))[None]
        found = decode_points(maps, self.threshold, self.min_distance)[0]
        (y0, x0), _ = np.asarray(result.tile.core)
        yx = found["yx"].numpy().astype(np.float64)
        return {
            "y": yx[:, 0] + y0,
            "x": yx[:, 1] + x0,
            "class": self.class_ids[found["class_index"].numpy()],
            "score": found["score"].numpy().astype(np.float32),
        }

    def iter_points(self, source: Any, region: Any = None, progress: Any = None,
                    cancel: Any = None) -> Any:
        """Yield ``(TileResult, points)`` per tile (duplicates across tiles removed)."""
        merger = PointMerger(self.min_distance)
        for res in self.iter_tiles(source, region, progress, cancel, probabilities=True):
            pts = self.tile_points(res)
            keep = merger.add(np.stack([pts["y"], pts["x"]], 1), np.asarray(res.tile.core))
            yield res, {k: v[keep] for k, v in pts.items()}

    def predict_table(self, source: Any, region: Any = None, progress: Any = None,
                      cancel: Any = None) -> dict[str, np.ndarray]:
        """All points of ``region`` (default: the whole image) as a table of numpy arrays."""
        sink = PointMemorySink(self)
        reg = clip_region(region, source.shape)
        self.predict(source, reg, sink=sink, progress=progress, cancel=cancel)
        return sink.table()


class _PointSinkBase:
    """What :meth:`Predictor.predict` needs from a sink, for points."""

    wants_probabilities = True

    def __init__(self, predictor: PointPredictor) -> None:
        self.predictor = predictor
        self.merger = PointMerger(predictor.min_distance)
        self.region: np.ndarray | None = None

    def blocks(self, region: np.ndarray | None = None) -> list[np.ndarray]:
        reg = self.region if region is None else np.asarray(region)
        return [] if reg is None else [reg]

    def is_done(self, tile: Tile) -> bool:
        return False

    def remaining(self, region: np.ndarray | None = None) -> int | None:
        return None

    def _decode(self, result: Any) -> dict[str, np.ndarray]:
        pts = self.predictor.tile_points(result)
        keep = self.merger.add(np.stack([pts["y"], pts["x"]], 1), np.asarray(result.tile.core))
        return {k: v[keep] for k, v in pts.items()}


class PointMemorySink(_PointSinkBase):
    """Collects the points of a prediction in memory (:meth:`table`)."""

    def __init__(self, predictor: PointPredictor) -> None:
        super().__init__(predictor)
        self._parts: list[dict[str, np.ndarray]] = []
        self.complete = False

    def blocks(self, region: np.ndarray | None = None) -> list[np.ndarray]:
        return [] if region is None else [np.asarray(region)]

    def write(self, result: Any) -> None:
        self._parts.append(self._decode(result))

    def close(self, complete: bool = True) -> None:
        self.complete = bool(complete)

    def table(self) -> dict[str, np.ndarray]:
        """``{"y", "x", "class", "score"}`` arrays, sorted by (y, x)."""
        if not self._parts:
            return empty_points()
        out = {k: np.concatenate([p[k] for p in self._parts]) for k in POINT_COLUMNS}
        order = np.lexsort((out["x"], out["y"]))
        return {k: v[order] for k, v in out.items()}


class PointCsvSink(_PointSinkBase):
    """Streams points to ``path`` (``y,x,class,score``), resumably.

    While running, rows go to ``.NAME.partial`` next to ``path``, each tile's rows followed by
    a ``#done,gy,gx`` line (flushed): an interrupted run leaves every finished tile on disk, and
    re-running with the same model, image and settings (the fingerprint in
    ``.NAME.partial.json``) skips them. When every tile is done the final CSV is written to a
    temporary file and renamed over ``path`` (atomic); the partial files are removed. An
    existing ``path`` is only replaced with ``overwrite``.
    """

    def __init__(self, predictor: PointPredictor, path: str | os.PathLike[str], source: Any,
                 region: Any = None, overwrite: bool = False, block: int = 2048) -> None:
        super().__init__(predictor)
        self.path = Path(path)
        self.region = clip_region(region, source.shape)
        self.block = max(int(block) // predictor.step, 1) * predictor.step
        self.partial = self.path.parent / f".{self.path.name}.partial"
        self.meta = self.path.parent / f".{self.path.name}.partial.json"
        self.fingerprint = {
            "model_sha256": model_digest(predictor.model),
            "image_shape": [int(s) for s in source.shape],
            "channels": int(source.channels),
            "region": self.region.tolist(),
            "tile_size": predictor.tile_size,
            "overlap": predictor.overlap,
            "threshold": predictor.threshold,
            "min_distance": predictor.min_distance,
        }
        if self.path.exists() and not overwrite:
            raise InputError(
                f"output {self.path} already exists; pass --overwrite to replace it or "
                "choose another file"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done: set[tuple[int, int]] = set()
        self.resumed_tiles = 0
        if self.meta.is_file() and self.partial.is_file() and not overwrite:
            self._resume()
        else:
            self._start()
        self._fh = open(self.partial, "a", encoding="utf-8", newline="")  # noqa: SIM115

    def _start(self) -> None:
        self.partial.write_text(",".join(POINT_COLUMNS) + "\n", encoding="utf-8")
        tmp = self.meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.fingerprint), encoding="utf-8")
        os.replace(tmp, self.meta)

    def _resume(self) -> None:
        try:
            old = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != self.fingerprint:
            raise InputError(
                f"{self.partial} holds an unfinished prediction with another model, image or "
                "settings; pass --overwrite to start over"
            )
        lines = self.partial.read_text(encoding="utf-8").splitlines()
        kept, pending = [lines[0]], []
        for line in lines[1:]:
            if line.startswith("#done,"):
                _, gy, gx = line.split(",")
                self._done.add((int(gy), int(gx)))
                kept.extend(pending)
                kept.append(line)
                pending = []
            else:
                pending.append(line)
        # rows after the last #done line belong to a tile that did not finish: dropped
        tmp = self.partial.with_suffix(".tmp")
        tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
        os.replace(tmp, self.partial)
        yx = [tuple(float(v) for v in r.split(",")[:2]) for r in kept[1:] if not r.startswith("#")]
        if yx:
            self.merger.add(np.asarray(yx))
        self.resumed_tiles = len(self._done)

    def blocks(self, region: np.ndarray | None = None) -> list[np.ndarray]:
        shape = self.fingerprint["image_shape"]
        reg = self.region if region is None else clip_region(region, shape)
        (y0, x0), (y1, x1) = reg
        b = self.block
        rows, cols = grid_cell_range(reg, b)
        return [np.array([[max(ky * b, y0), max(kx * b, x0)],
                          [min((ky + 1) * b, y1), min((kx + 1) * b, x1)]])
                for ky in rows for kx in cols]

    def is_done(self, tile: Tile) -> bool:
        return tuple(int(g) for g in tile.grid) in self._done

    def write(self, result: Any) -> None:
        pts = self._decode(result)
        lines = [
            f"{y:.2f},{x:.2f},{int(c)},{s:.4f}\n"
            for y, x, c, s in zip(pts["y"], pts["x"], pts["class"], pts["score"])
        ]
        gy, gx = (int(g) for g in result.tile.grid)
        self._fh.write("".join(lines) + f"#done,{gy},{gx}\n")
        self._fh.flush()
        self._done.add((gy, gx))

    def close(self, complete: bool = True) -> None:
        with contextlib.suppress(OSError):
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self._fh.close()
        if not complete:
            return
        rows = [r for r in self.partial.read_text(encoding="utf-8").splitlines()[1:]
                if not r.startswith("#")]
        rows.sort(key=lambda r: (float(r.split(",")[0]), float(r.split(",")[1])))
        tmp = self.path.parent / f".{self.path.name}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(",".join(POINT_COLUMNS) + "\n")
            fh.write("".join(r + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.partial.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)


def _output_lock(path: Path) -> Any:
    """One writer per output file: a second run on the same CSV stops with one line."""
    from napari_muvit.locks import advisory_lock

    return advisory_lock(path, "points CSV")


def predict_points(
    image_or_source: Any,
    model: Any,
    region: Any = None,
    out: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    overlap: int = 0,
    progress: Any = None,
    cancel: Any = None,
    *,
    overwrite: bool = False,
    tile_size: int | None = None,
    amp: str = "auto",
    threshold: float | None = None,
    min_distance: float | None = None,
) -> dict[str, np.ndarray] | Path:
    """Detect points with a point detector; ``out=None`` returns the table, else writes a CSV
    (``y,x,class,score``, level-0 pixel coordinates) and returns its path."""
    from napari_muvit.data import open_image

    source = open_image(image_or_source)
    pred = PointPredictor(
        model, device=device, batch_size=batch_size, amp=amp, overlap=overlap,
        cache_tiles=0 if out is not None else 512, tile_size=tile_size,
        threshold=threshold, min_distance=min_distance,
    )
    pred.check_source(source)
    if out is None:
        return pred.predict_table(source, region, progress=progress, cancel=cancel)
    path = Path(out)
    if path.suffix.lower() != ".csv":
        raise InputError(f"--out: a point detector writes a .csv table, got {path.name!r}")
    with _output_lock(path):
        sink = PointCsvSink(pred, path, source, region, overwrite=overwrite)
        pred.predict(source, sink=sink, progress=progress, cancel=cancel)
    return path
