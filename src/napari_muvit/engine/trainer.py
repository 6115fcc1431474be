"""Fine-tuning a MuViT segmenter on sparse (napari-painted) or dense labels.

The recipe follows the MuViT supplement B.3: nested multi-resolution crops sampled around the
annotated pixels with the paper's augmentations, CE + 0.1·Dice on annotated pixels only,
AdamW with asymmetric learning rates (encoder 0.1× head), gradient clipping 0.5 and a cosine
schedule (after a short linear warm-up).  Optionally, MUSE-style pseudo-labels: confident
predictions of an EMA teacher on the *unlabelled* pixels of each crop are learnt under a
consistency loss whose weight ramps up from 0.

No Qt here: progress is a callback receiving one dict per step, cancellation a
:class:`~napari_muvit.engine.cancel.CancelToken`.  With ``out`` set, the run is checkpointed
atomically every ``checkpoint_every`` seconds (or steps) and at the end, and can be resumed.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_muvit.data.picture_files import is_picture, read_label_picture
from napari_muvit.engine._labels import LabelIndex
from napari_muvit.engine._loop import (
    RunConfig,
    StepProgress,
    TrainingDivergedError,
    TrainingLoop,
    cpu_state,
    thin_history,
)
from napari_muvit.engine._models import (
    adapt_channels,
    default_class_names,
    fresh_encoder,
    load_start,
    new_segmenter,
    parse_levels,
    preset_for,
    select_levels,
)
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.device import autocast
from napari_muvit.engine.predictor import Predictor
from napari_muvit.engine.quick_choices import COLOR_SPACE_CHOICES, FOREST_LEVEL_CHOICES
from napari_muvit.errors import InputError
from napari_muvit.metrics import mean_dice

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "open_labels",
    "prepare_start_model",
]

Bbox = Sequence[Sequence[float]] | np.ndarray


@dataclass
class TrainConfig(RunConfig):
    """Hyper-parameters of a fine-tuning run (defaults: MuViT supplement B.3).

    ``crop_size=None`` takes the starting model's ``meta["crop_size"]`` or 128.
    ``warmup_steps=None`` warms up linearly for 5 % of the steps (at most 100).
    ``checkpoint_every`` is in ``checkpoint_unit`` (``"seconds"`` or ``"steps"``).
    ``val_region`` is a bbox ``[[y0, x0], [y1, x1]]`` of image ``val_pair`` whose annotations are
    held out from training and scored (mean Dice over classes) every ``val_every`` steps.
    Pseudo-labels: pixels of a crop that are not annotated get the teacher's class where its
    softmax is ``>= pseudo_threshold``; their cross-entropy is added with a weight that ramps
    from 0 to ``pseudo_weight`` over ``pseudo_ramp_steps`` (sigmoid ramp, Laine & Aila;
    default: the first third of the run).
    ``classifier`` of a new ``"pixel"`` head: ``"forest"`` (a random forest on the filter bank
    of every level, fitted in seconds; nothing to fine-tune) or ``"mlp"`` (an MLP on the
    level-1 filters and the encoder's features, then fine-tuning of the whole segmenter).
    ``forest_levels`` (:data:`FOREST_LEVEL_CHOICES`) and ``color_space``
    (:data:`COLOR_SPACE_CHOICES`) steer the quick fit of a pixel head
    (:class:`~napari_muvit.engine.quicktrain.QuickTrainer` applies them): ``"auto"`` leaves the
    choice to it (levels, and for a new forest head on RGB images CIELAB or stain-density
    filters, judged on held-out strokes), any other value forces it.
    """

    steps: int = 500
    batch_size: int = 8
    crop_size: int | None = None
    lr: float = 1e-4
    encoder_lr_factor: float = 0.1
    weight_decay: float = 0.05
    clip: float = 0.5
    warmup_steps: int | None = None
    min_lr_factor: float = 0.01
    head: str = "unetr"
    classifier: str = "forest"
    forest_levels: str = "auto"
    color_space: str = "auto"
    dense: bool = False
    naive_bbox: bool = False
    freeze_encoder: bool = False
    augment: bool = True
    anchor_prob: float = 0.9
    dice_weight: float = 0.1
    class_weights: list[float] | None = None
    pseudo_labels: bool = False
    pseudo_threshold: float = 0.9
    pseudo_ramp_steps: int | None = None
    pseudo_weight: float = 1.0
    pseudo_teacher: str = "ema"
    ema_decay: float = 0.99
    checkpoint_every: float = 60.0
    checkpoint_unit: str = "seconds"
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    num_workers: int = 0
    val_region: list[list[float]] | None = None
    val_pair: int = 0
    val_every: int = 100

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "checkpoint_every": self.checkpoint_every,
            "val_every": self.val_every,
        }
        for name, value in positive.items():
            if not value > 0:
                raise InputError(f"{name}: expected a positive number, got {value!r}")
        if self.crop_size is not None and (
            int(self.crop_size) != self.crop_size or self.crop_size < 8
        ):
            raise InputError(f"crop_size: expected an integer >= 8, got {self.crop_size!r}")
        if self.checkpoint_unit not in ("seconds", "steps"):
            raise InputError(
                f"checkpoint_unit: expected 'seconds' or 'steps', got {self.checkpoint_unit!r}"
            )
        if self.pseudo_teacher not in ("ema", "model"):
            raise InputError(
                f"pseudo_teacher: expected 'ema' or 'model', got {self.pseudo_teacher!r}"
            )
        if not 0.0 < self.pseudo_threshold <= 1.0:
            raise InputError(
                f"pseudo_threshold: expected a value in (0, 1], got {self.pseudo_threshold!r}"
            )
        if not 0.0 <= self.anchor_prob <= 1.0:
            raise InputError(f"anchor_prob: expected a value in [0, 1], got {self.anchor_prob!r}")
        if self.clip < 0 or self.weight_decay < 0 or self.encoder_lr_factor < 0:
            raise InputError("clip, weight_decay and encoder_lr_factor must be >= 0")
        if self.num_workers < 0:
            raise InputError(f"num_workers: expected >= 0, got {self.num_workers!r}")
        if self.head not in ("unetr", "mask2former", "pixel"):
            raise InputError(
                f"head: expected 'unetr', 'mask2former' or 'pixel', got {self.head!r}"
            )
        if self.classifier not in ("forest", "mlp"):
            raise InputError(f"classifier: expected 'forest' or 'mlp', got {self.classifier!r}")
        if self.forest_levels not in FOREST_LEVEL_CHOICES:
            raise InputError(f"forest_levels: expected one of {', '.join(FOREST_LEVEL_CHOICES)}, "
                             f"got {self.forest_levels!r}")
        if self.color_space not in COLOR_SPACE_CHOICES:
            raise InputError(f"color_space: expected one of {', '.join(COLOR_SPACE_CHOICES)}, "
                             f"got {self.color_space!r}")
        if self.val_region is not None:
            region = np.asarray(self.val_region, dtype=np.float64)
            if region.shape != (2, 2) or np.any(region[1] <= region[0]):
                raise InputError(
                    f"val_region: expected [[y0, x0], [y1, x1]], got {self.val_region!r}"
                )
            self.val_region = region.tolist()


# ============================================================================ labels
def open_labels(labels: Any) -> Any:
    """Labels as a 2-D integer array: numpy/zarr/dask as is, or a path (.npy, TIFF, PNG, zarr).

    Large files stay lazy (memory-mapped .npy, zarr); napari multiscale labels give level 0.
    """
    if isinstance(labels, (list, tuple)):
        labels = labels[0]
    if not isinstance(labels, (str, os.PathLike)):
        if not hasattr(labels, "shape"):
            labels = np.asarray(labels)
        return labels
    path = Path(labels)
    if not path.exists():
        raise InputError(f"labels: file or folder {path} does not exist")
    name = path.name.lower()
    if name.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    if name.endswith((".tif", ".tiff")):
        import tifffile

        return tifffile.imread(path)
    if is_picture(path):
        return read_label_picture(path)
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for non-zarr folders
        raise InputError(f"labels: expected .npy, TIFF, PNG or zarr, got {path} ({err})") from err
    if hasattr(node, "array_keys"):  # a group (e.g. OME-Zarr labels): its first array
        keys = sorted(node.array_keys())
        if not keys:
            raise InputError(f"labels: the zarr group {path} holds no array")
        node = node[keys[0]]
    return node


def _squeeze_labels(labels: Any, i: int) -> Any:
    """Drop leading singleton axes (napari labels of a (1, Y, X) stack); must end 2-D."""
    while len(labels.shape) > 2 and labels.shape[0] == 1:
        labels = labels[0]
    if len(labels.shape) != 2:
        raise InputError(
            f"labels[{i}]: expected a 2-D (Y, X) array, got shape {tuple(labels.shape)}"
        )
    return labels


def _check_pair(source: Any, labels: Any, i: int) -> Any:
    """Validate one (image, labels) pair; returns the 2-D labels."""
    labels = _squeeze_labels(labels, i)
    if np.dtype(labels.dtype).kind not in "iub":
        raise InputError(f"labels[{i}]: expected an integer label image, got dtype {labels.dtype}")
    lshape, ishape = tuple(int(s) for s in labels.shape), tuple(source.shape)
    if lshape == ishape:
        return labels
    hint = ""
    if all(a >= b for a, b in zip(lshape, ishape)):
        inside = np.asarray(labels[: ishape[0], : ishape[1]]).any()
        if not inside and np.asarray(labels).any():
            hint = " (all painted pixels lie outside the image, in the padding)"
    raise InputError(
        f"labels[{i}]: expected the image's level-1 shape {ishape}, got {lshape}{hint}"
    )


# ============================================================================ sampling
def _crop_dataset_class() -> type:
    """The trainer's dataset class (:class:`._anchored.AnchoredCrops`), imported on first use
    so that importing this module does not import the sampler's dependencies."""
    from napari_muvit.engine._anchored import AnchoredCrops

    return AnchoredCrops


def _collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# ============================================================================ pseudo-label ramp
def _ramp(step: int, ramp_steps: int) -> float:
    """Sigmoid ramp-up ``exp(-5 (1 - t)^2)`` from ~0 to 1 over ``ramp_steps`` (0 at step 0)."""
    if step <= 0:
        return 0.0
    t = min(1.0, step / max(1, ramp_steps))
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


# ============================================================================ model setup
def prepare_start_model(
    init: str | os.PathLike[str] | nn.Module | None = None,
    levels: str | Sequence[float] | None = None,
    preset: str | None = None,
    in_channels: int = 1,
    seed: int = 0,
) -> tuple[nn.Module, list[str]]:
    """The model training starts from, and notes on what was done to it.

    * ``init`` (folder or module): our encoder/segmenter/MAE folder or an official muvit folder
      (an MAE gives its encoder); restricted to ``levels`` with ``select_levels``.
    * no ``init`` and no ``preset``: the bundled, MAE-pretrained default encoder (falls back to
      a random ``small`` encoder if the installation has none);
    * ``preset`` without ``init``: a random encoder of that size on ``levels`` (default 1,4).
    """
    from napari_muvit.model import MuViTMAE

    lv = parse_levels(levels)
    notes: list[str] = []
    if init is None and preset is None:
        init, notes = _default_encoder_or_none()
        preset = None if init is not None else "small"
    if init is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model: nn.Module = fresh_encoder(preset or "small", in_channels, lv)
        notes.append(f"start: randomly initialised {preset} encoder, levels {list(model.levels)}")
        return model, notes
    model = load_start(init)
    if isinstance(model, MuViTMAE):
        encoder = model.encoder
        encoder.meta = {**getattr(encoder, "meta", {}), **model.meta}
        model = encoder
        notes.append("start: the encoder of an MAE checkpoint (decoder dropped)")
    model, level_notes = select_levels(model, lv)
    return model, notes + level_notes


def _default_encoder_or_none() -> tuple[Path | None, list[str]]:
    from napari_muvit.errors import CheckpointError
    from napari_muvit.weights import DEFAULT_ENCODER, default_model_path

    try:
        path = default_model_path(DEFAULT_ENCODER)
    except CheckpointError as err:
        return None, [f"no bundled default encoder ({err}); using a random 'small' encoder"]
    return path, [f"start: bundled default encoder {path.name}"]


# ============================================================================ trainer
class Trainer(TrainingLoop):
    """Fine-tune a segmenter (or a fresh head on an encoder) on ``(image, labels)`` pairs.

    Parameters
    ----------
    model
        A :class:`~napari_muvit.model.MuViTEncoder` (a fresh ``config.head`` is added for the
        painted classes) or a :class:`~napari_muvit.model.MuViTSegmenter` (its head is kept if
        it knows all painted values, else replaced, with a warning in the history).
    pairs
        ``[(PyramidSource, labels)]``; labels numpy/zarr/dask with the image's level-1 shape.
    config
        :class:`TrainConfig`.
    progress
        Called after every step with ``{step, steps, loss, lr, elapsed, val_dice?, status}``.
    cancel
        :class:`CancelToken`; cancelling stops after the current step and checkpoints.
    out
        Checkpoint folder (``None``: nothing is written).
    resume
        Continue the run checkpointed in ``out`` (weights, optimizer, schedule, step).
    class_names
        ``{label value: name}`` for a fresh head.
    provenance
        Extra provenance recorded in the history (image/label paths, init model...).
    notes
        Messages from model preparation (recorded as history events).
    """

    curve_keys = (
        "steps",
        "loss",
        "lr",
        "elapsed",
        "loss_supervised",
        "loss_pseudo",
        "pseudo_fraction",
    )

    def __init__(
        self,
        model: nn.Module,
        pairs: Sequence[tuple[Any, Any]],
        config: TrainConfig | None = None,
        progress: StepProgress | None = None,
        cancel: CancelToken | None = None,
        out: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
        class_names: Mapping[int, str] | None = None,
        provenance: Mapping[str, Any] | None = None,
        notes: Iterable[str] = (),
    ) -> None:
        super().__init__(config or TrainConfig(), progress, cancel, out, provenance)
        self.history["val"] = []
        for note in notes:
            self._event("setup", note)
        self.pairs = self._check_pairs(pairs)
        self.indexes = self._build_indexes()
        self.model = self._setup_model(model, class_names)
        self.crop_size = self._resolve_crop_size()
        self._check_annotations()
        self._lock = threading.Lock()
        self._pending: list[tuple[int, list[Bbox] | None]] = []
        self.dataset = self._build_dataset()
        self._loader: Iterator[dict[str, Tensor]] | None = None
        self._loader_step = 0
        self._refresh_anchors()
        self._init_optimizer(self._param_groups())
        self.teacher = self._build_teacher()
        if resume:
            self._restore()

    # ------------------------------------------------------------------ setup
    def _check_pairs(self, pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        from napari_muvit.data import open_image

        if not pairs:
            raise InputError("pairs: expected at least one (image, labels) pair, got none")
        out = []
        for i, (image, labels) in enumerate(pairs):
            source = open_image(image)
            out.append((source, _check_pair(source, open_labels(labels), i)))
        channels = {s.channels for s, _ in out}
        if len(channels) > 1:
            raise InputError(
                f"images: expected the same channel count for all images, got {sorted(channels)}"
            )
        if self.config.val_region is not None and not 0 <= self.config.val_pair < len(out):
            raise InputError(
                f"val_pair: expected an index < {len(out)}, got {self.config.val_pair}"
            )
        return out

    def _build_indexes(self) -> list[LabelIndex]:
        cfg = self.config
        indexes = [
            LabelIndex(
                labels,
                dense=cfg.dense,
                seed=cfg.seed + i,
                exclude=cfg.val_region if (cfg.val_region and i == cfg.val_pair) else None,
            )
            for i, (_, labels) in enumerate(self.pairs)
        ]
        for i, index in enumerate(indexes):
            negative = sum(index.negative_pixels.values())
            if negative:
                name = self.history["provenance"].get("labels") or []
                what = f"labels[{i}]" + (f" ({name[i]})" if i < len(name) and name[i] else "")
                raise InputError(
                    f"{what}: {negative} pixel(s) hold negative values; label values must be "
                    ">= 0 (0 = not annotated): set them to 0 to leave those pixels unannotated"
                )
        return indexes

    def painted_values(self) -> list[int]:
        """Label values painted anywhere (sorted; includes 0 in dense mode)."""
        return sorted({v for idx in self.indexes for v in idx.values})

    def _fit_to_images(self, model: nn.Module) -> nn.Module:
        """``model`` adapted to the images' channels (noted in the history), its levels checked
        against every image."""
        model, notes = adapt_channels(model, self.pairs[0][0].channels)
        # a forest on the filter bank never reads the encoder: its adaptation is only a record
        encoder_unused = self.config.head == "pixel" and self.config.classifier == "forest"
        for note in notes:
            self._event("channel_adaptation", note, warning=not encoder_unused)
        for src, *_ in self.pairs:
            src.check_levels(model.levels)
            self._check_level_extent(src, model)
        return model

    def _setup_model(self, model: nn.Module, class_names: Mapping[int, str] | None) -> nn.Module:
        from napari_muvit.model import MuViTEncoder, MuViTMAE, MuViTSegmenter

        if isinstance(model, MuViTMAE):
            model = model.encoder
        if not isinstance(model, (MuViTEncoder, MuViTSegmenter)):
            raise InputError(
                f"model: expected a MuViTEncoder or MuViTSegmenter, got {type(model).__name__}"
            )
        model = self._fit_to_images(model)
        values = self.painted_values()
        if not values:
            raise InputError(self._no_annotation_message())
        if len(values) < 2 and (
            isinstance(model, MuViTEncoder) or not set(values) <= set(model.label_values)
        ):
            raise InputError(
                f"labels: only label value {values[0]} is painted, so the model would learn a "
                "single class; paint at least two classes (e.g. background and object) before "
                "training"
            )
        if len(values) < 2:
            self._event(
                "one_class",
                f"only label value {values[0]} is painted: fine-tuning pulls every pixel towards "
                "that class; paint at least two classes",
                warning=True,
            )
        if isinstance(model, MuViTEncoder):
            model = self._fresh_head(model, values, class_names, reason="")
        elif not set(values) <= set(model.label_values):
            new = sorted(set(values) - set(model.label_values))
            model = self._fresh_head(
                model.encoder,
                values,
                class_names,
                reason=f"painted label value(s) {new} are not classes of the starting segmenter "
                f"(label_values {model.label_values}); its head was replaced by a new one",
            )
        self._unify_normalization(model)
        return model.to(self.device)

    def _unify_normalization(self, model: nn.Module) -> None:
        """Read every image with the model's normalisation, the one prediction will apply.

        A segmenter keeps the normalisation it was trained with; a fresh head takes the first
        image's.  Sources are shallow-copied, so the caller's objects are not modified.
        """
        from napari_muvit.data import Normalization

        norm = model.normalization or self.pairs[0][0].normalization.to_dict()
        model.normalization = norm
        target = Normalization.from_dict(norm)
        pairs = []
        for source, labels in self.pairs:
            if source.normalization != target:
                source = copy.copy(source)
                source.normalization = target
            pairs.append((source, labels))
        self.pairs = pairs
        self._event("normalization", f"all images are read with normalisation {norm}")

    def _fresh_head(
        self,
        encoder: nn.Module,
        values: list[int],
        class_names: Mapping[int, str] | None,
        reason: str,
    ) -> nn.Module:
        preset = preset_for(encoder.dim)
        names = default_class_names(values, self.config.dense)
        if class_names:
            names = [class_names.get(v, n) for v, n in zip(values, names)]
        # a fixed seed for the head's initialisation makes runs reproducible without touching
        # the caller's global RNG stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            seg = new_segmenter(encoder, values, self.config.head, preset, names, self.config.dense,
                                self.config.classifier)
        if reason:
            self._event("new_head", reason, warning=True)
        self._event("head", f"new {self.config.head} head for label values {values}")
        return seg

    def _check_level_extent(self, source: Any, model: nn.Module) -> None:
        """Refuse levels whose pixels are larger than the image; warn when mostly padding."""
        size = self.config.crop_size or model.meta.get("crop_size") or 128
        coarsest = float(model.levels[-1])
        if coarsest > max(source.shape):
            raise InputError(
                f"levels: the model's coarsest level {coarsest:g} needs an image larger than "
                f"{coarsest:g} px per side, this image is {tuple(source.shape)} (one pixel of that "
                f"level would exceed the image); start from fewer levels (--levels)"
            )
        if coarsest * size > 8 * max(source.shape):
            self._event(
                "levels",
                f"level {coarsest:g} covers {coarsest * size:g} px, more than 8x the image "
                f"{tuple(source.shape)}: its crops are mostly padding (consider fewer levels)",
                warning=True,
            )

    def _no_annotation_message(self) -> str:
        where = " outside the validation region" if self.config.val_region is not None else ""
        kind = "pixels" if self.config.dense else "painted pixels (label values > 0)"
        return (
            f"labels: found no annotated {kind}{where} in {len(self.pairs)} label image(s); "
            "paint at least a few strokes per class before training"
        )

    def _resolve_crop_size(self) -> int:
        size = self.config.crop_size or self.model.meta.get("crop_size") or 128
        size, patch = int(size), int(self.model.patch_size)
        if size % patch:
            raise InputError(
                f"crop_size: expected a multiple of the patch size {patch}, got {size}"
            )
        return size

    def _check_annotations(self) -> None:
        values = set(self.painted_values())
        unpainted = [v for v in self.model.label_values if v not in values]
        if 0 in unpainted and not self.config.dense:
            self._event(
                "background_not_trainable",
                "the model has a class with label value 0, which means 'not annotated' in sparse "
                "mode; it is kept unchanged (train with dense=True / --dense to train it)",
                warning=True,
            )
            unpainted.remove(0)
        if unpainted:
            self._event(
                "unpainted_classes",
                f"class(es) with label value(s) {unpainted} of the model are never painted; they "
                "are kept but get no training signal (paint some pixels to train them)",
                warning=True,
            )

    @property
    def label_mapping(self) -> dict[int, int]:
        """``{label value: class index}`` of the model's trainable classes.

        In sparse mode value 0 means "not annotated", so a class with label value 0 (a dense
        model fine-tuned on scribbles) is not mapped: it keeps its weights but gets no signal.
        """
        dense = self.config.dense
        return {int(v): k for k, v in enumerate(self.model.label_values) if dense or v != 0}

    def _build_dataset(self) -> Any:
        cfg = self.config
        cls = _crop_dataset_class()
        return cls(
            [s for s, _ in self.pairs],
            [lab for _, lab in self.pairs],
            size=self.crop_size,
            levels=self.model.levels,
            length=cfg.steps * cfg.batch_size,
            weighted=False,
            augment=cfg.augment,
            naive=cfg.naive_bbox,
            seed=cfg.seed,
            label_mapping=self.label_mapping,
            anchor_prob=cfg.anchor_prob,
        )

    def _refresh_anchors(self) -> None:
        """Rebuild the per-class anchor table from the label indexes."""
        mapping = self.label_mapping
        table: dict[int, list[tuple[int, np.ndarray]]] = {}
        for i, index in enumerate(self.indexes):
            for value, points in index.points_by_value().items():
                if value in mapping and len(points):
                    table.setdefault(mapping[value], []).append((i, points))
        self.dataset.anchor_table = [table[k] for k in sorted(table)]

    def _param_groups(self) -> list[dict[str, Any]]:
        """Head at ``lr``, encoder at ``lr·encoder_lr_factor`` (or frozen)."""
        cfg = self.config
        enc_params = list(self.model.encoder.parameters())
        enc_ids = {id(p) for p in enc_params}
        head_params = [p for p in self.model.parameters() if id(p) not in enc_ids]
        groups = [{"params": head_params, "lr": cfg.lr, "name": "head"}]
        if cfg.freeze_encoder:
            for p in enc_params:
                p.requires_grad_(False)
            self._event("freeze", "encoder frozen: only the head is trained")
        else:
            groups.append(
                {"params": enc_params, "lr": cfg.lr * cfg.encoder_lr_factor, "name": "encoder"}
            )
        return groups

    @property
    def _ramp_steps(self) -> int:
        cfg = self.config
        return (
            cfg.pseudo_ramp_steps if cfg.pseudo_ramp_steps is not None else max(1, cfg.steps // 3)
        )

    def _build_teacher(self) -> nn.Module | None:
        cfg = self.config
        if not cfg.pseudo_labels or cfg.pseudo_teacher != "ema":
            return None
        teacher = copy.deepcopy(self.model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    # ------------------------------------------------------------------ labels
    def update_labels(self, regions: Iterable[Bbox] | None = None, pair: int = 0) -> None:
        """Tell the trainer that labels changed (thread-safe; applied before the next step).

        ``regions``: pixel bboxes ``[[y0, x0], [y1, x1]]`` that were painted (only the label
        tiles they touch are rescanned); ``None`` rescans the whole label image ``pair``.
        """
        if not 0 <= pair < len(self.pairs):
            raise InputError(f"pair: expected an index < {len(self.pairs)}, got {pair}")
        with self._lock:
            self._pending.append((pair, None if regions is None else list(regions)))

    def _before_step(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for pair, regions in pending:
            self.indexes[pair].update(regions)
        if pending:
            self._refresh_anchors()
            self._loader = None  # workers hold the old anchors
            self._event("labels_updated", f"labels re-indexed: {self.annotated_counts()}")

    def annotated_counts(self) -> dict[int, int]:
        """Indexed annotated pixels per label value over all pairs."""
        total: dict[int, int] = {}
        for index in self.indexes:
            for v, n in index.counts().items():
                total[v] = total.get(v, 0) + n
        return total

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        logits: Tensor,
        target: Tensor,
        valid: Tensor,
        teacher_logits: Tensor | None = None,
        step: int | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Supervised CE + Dice on annotated pixels, plus the ramped pseudo-label term.

        ``target`` (B, H, W) class indices, -1 = not annotated/padding; ``valid`` (B, H, W)
        False on padding. Unannotated pixels contribute nothing unless they become confident
        pseudo-labels.
        """
        cfg = self.config
        sup = _supervised_loss(logits, target, cfg)
        parts = {"loss_supervised": float(sup.detach())}
        weight = cfg.pseudo_weight * _ramp(self.step if step is None else step, self._ramp_steps)
        if teacher_logits is None or weight <= 0:
            return sup, parts
        pseudo, frac = _pseudo_label_loss(
            logits, teacher_logits, target, valid, cfg.pseudo_threshold
        )
        parts.update(loss_pseudo=float(pseudo.detach()), pseudo_fraction=frac)
        return sup + weight * pseudo, parts

    # ------------------------------------------------------------------ one step
    def _batch(self, step: int) -> dict[str, Tensor]:
        """The samples of ``step`` (a pure function of seed and step: resumable, reproducible,
        identical with any ``num_workers``)."""
        b = self.config.batch_size
        if self.config.num_workers == 0:
            return _collate([self.dataset[i] for i in range(step * b, (step + 1) * b)])
        if self._loader is None or self._loader_step != step:
            self._loader = self._start_loader(step)
        self._loader_step = step + 1
        return next(self._loader)

    def _start_loader(self, step: int) -> Iterator[dict[str, Tensor]]:
        """DataLoader workers reading the samples of ``step`` onwards.

        Workers hold a copy of the anchor table, so it is restarted after label updates.
        """
        from torch.utils.data import DataLoader

        cfg = self.config
        indices = range(step * cfg.batch_size, cfg.steps * cfg.batch_size)
        loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=indices,
            num_workers=cfg.num_workers,
            collate_fn=_collate,
        )
        return iter(loader)

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """One optimisation step; raises :class:`TrainingDivergedError` on NaN/inf."""
        self.model.train()
        dev = self.device
        x = batch["image"].to(dev, non_blocking=True)
        bbox = batch["bbox"].to(dev)
        target = batch["target"].to(dev)
        valid = batch["valid"][:, 0].to(dev)
        with autocast(dev, self.amp_dtype):
            logits = self.model(x, bbox)
            teacher_logits = self._teacher_logits(x, bbox)
        loss, parts = self.compute_loss(logits.float(), target, valid, teacher_logits)
        norm = self._optimize(loss)
        self._update_teacher()
        return {"loss": float(loss.detach()), **parts, "grad_norm": norm}

    def _teacher_logits(self, x: Tensor, bbox: Tensor) -> Tensor | None:
        cfg = self.config
        if not cfg.pseudo_labels or _ramp(self.step, self._ramp_steps) * cfg.pseudo_weight <= 0:
            return None
        net = self.teacher if self.teacher is not None else self.model
        was_training = net.training
        net.eval()
        with torch.no_grad():
            out = net(x, bbox).float()
        net.train(was_training)
        return out

    @torch.no_grad()
    def _update_teacher(self) -> None:
        if self.teacher is None:
            return
        d = self.config.ema_decay
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(d).add_(s.detach(), alpha=1 - d)
        for t, s in zip(self.teacher.buffers(), self.model.buffers()):
            t.copy_(s)

    # ------------------------------------------------------------------ validation
    def _after_record(self) -> None:
        if self.config.val_region is not None and self.step % self.config.val_every == 0:
            self.validate()

    def _after_run(self) -> None:
        val = self.history["val"]
        if self.config.val_region is not None and (not val or val[-1]["step"] != self.step):
            self.validate()

    def _report_extra(self) -> dict[str, Any]:
        return {"val_dice": self.history["val"][-1]["dice"]} if self.history["val"] else {}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean Dice over the trained classes on the annotated pixels of the validation region.

        The region is predicted by the engine's :class:`Predictor` (the tiles, context crops and
        precision of any prediction), so the score is what a user predicting it would get.
        """
        cfg = self.config
        source, labels = self.pairs[cfg.val_pair]
        predictor = Predictor(
            self.model, device=self.device, amp=cfg.amp, cache_tiles=0, tile_size=self.crop_size,
            threads=self.run_threads, adapt_threads=False,
        )
        sink = predictor.predict(source, cfg.val_region)
        (y0, x0), (y1, x1) = sink.region
        truth = np.asarray(labels[y0:y1, x0:x1])
        # only the trained classes' painted pixels are scored (value 0 = not annotated in
        # sparse mode, unpainted or unknown values are not this model's classes)
        scored = np.isin(truth, list(self.label_mapping))
        dice = mean_dice(sink.labels[scored], truth[scored])
        self.history["val"].append({"step": self.step, "dice": dice})
        return dice

    # ------------------------------------------------------------------ checkpoints
    def _update_meta(self) -> None:
        self.model.meta.update(
            crop_size=self.crop_size,
            dense=self.config.dense,
            naive_bbox=self.config.naive_bbox,
            train_config=self.config.to_dict(),
            history=thin_history(self.history, ("val",)),
            provenance=self.history["provenance"],
        )

    def _extra_state(self) -> dict[str, Any]:
        return {
            "teacher": None if self.teacher is None else cpu_state(self.teacher),
            "label_values": list(self.model.label_values),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if list(state["label_values"]) != list(self.model.label_values):
            raise InputError(
                f"resume: the run in {self.out} trains label values {state['label_values']}, "
                f"the model now has {self.model.label_values}; start a new run (--overwrite)"
            )
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])


# ============================================================================ helpers
def _supervised_loss(logits: Tensor, target: Tensor, cfg: TrainConfig) -> Tensor:
    """CE + ``dice_weight``·Dice on annotated pixels (model.segmentation_loss, ignore -1)."""
    from napari_muvit.model import segmentation_loss

    # The paper leaves background out of Dice; only dense labels say which class that is
    # (label value 0 = class 0). Sparse scribbles have no known background class.
    exclude = (0,) if cfg.dense else ()
    return segmentation_loss(
        logits,
        target,
        ignore_index=-1,
        dice_weight=cfg.dice_weight,
        class_weights=cfg.class_weights,
        dice_exclude=exclude,
    )


def _pseudo_label_loss(
    logits: Tensor, teacher_logits: Tensor, target: Tensor, valid: Tensor, threshold: float
) -> tuple[Tensor, float]:
    """CE towards the teacher's confident classes on unannotated, in-image pixels."""
    conf, pseudo = torch.softmax(teacher_logits.float(), 1).max(1)
    use = (target < 0) & valid & (conf >= threshold)
    frac = float(use.float().mean())
    if not bool(use.any()):
        return logits.sum() * 0.0, frac
    pseudo_target = torch.where(use, pseudo, torch.full_like(pseudo, -1))
    return F.cross_entropy(logits, pseudo_target, ignore_index=-1), frac


def _pair_lists(images: Any, labels: Any) -> tuple[list[Any], list[Any]]:
    """One image + one labels, or lists of both (a labels list for one image is napari
    multiscale labels, of which level 0 is used)."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) == 1 and not (isinstance(labels, (list, tuple)) and len(labels) == 1):
        labels = [labels]
    labels = list(labels) if isinstance(labels, (list, tuple)) else [labels]
    if len(labels) != len(images):
        raise InputError(
            f"labels: expected one label image per image ({len(images)}), got {len(labels)}"
        )
    return images, labels


def _describe(obj: Any) -> str | None:
    """Provenance text for a path (its name only: a model folder travels to other machines and
    must not carry this one's paths), an array or a model."""
    if obj is None or isinstance(obj, (str, os.PathLike)):
        return None if obj is None else Path(obj).resolve().name
    if isinstance(obj, nn.Module):
        return str(getattr(obj, "meta", {}).get("init", type(obj).__name__))
    shape = getattr(obj, "shape", None)
    return f"{type(obj).__name__}{tuple(shape) if shape is not None else ''} (in memory)"
