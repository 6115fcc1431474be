"""A useful answer within seconds of pressing *Train*, then full fine-tuning (issue 13).

Stage 1, **quick fit** (seconds on a CPU, ilastik-like): the segmenter gets a
:class:`~napari_muvit.model.heads.PixelHead`, a per-pixel classifier on a fixed filter bank of
the level-1 image and on the encoder's multi-level feature maps (upsampled from the token
grid). The features of the painted pixels are computed once, tile by tile on the prediction
grid, cached, standardised, and a small MLP is fitted on them with full-batch Adam: no crops,
no augmentation, no backward pass through the encoder. The default head is a random forest on
the filter bank of every level's crop instead (:func:`quick_fit`); which levels it reads is
chosen on held-out strokes (:func:`choose_forest_levels`), and on RGB images its filters see
CIELAB (the head's ``color_space``).

Stage 2, **fine-tuning**: the project's :class:`~napari_muvit.engine.trainer.Trainer` trains the
same segmenter (encoder at a tenth of the head's learning rate) on random nested crops around
the painted pixels, refining the stage-1 answer in the background. Both stages hand out
snapshots (``on_snapshot(model, info)``), so a viewer can refresh the prediction of the
visible region after the quick fit and at every snapshot of the fine-tuning.

No Qt here: progress is a callback receiving dicts, cancellation a
:class:`~napari_muvit.engine.cancel.CancelToken`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_muvit.data.geometry import centered_nested_bboxes, grid_cells_of_pixels, plan_tiles
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.forests import TREE_KINDS, fit_tree_arrays, random_forest
from napari_muvit.engine.quick_choices import FOREST_LEVEL_CHOICES
from napari_muvit.engine.trainer import TrainConfig, Trainer
from napari_muvit.errors import InputError

__all__ = ["QuickConfig", "QuickTrainer", "check_quick_options_apply", "choose_forest_levels",
           "collect_features", "forced_forest_levels", "forest_level_candidates", "quick_fit",
           "quick_fit_message", "starts_with_quick_fit", "stroke_folds"]

Snapshot = Callable[[nn.Module, dict[str, Any]], Any]
Progress = Callable[[dict[str, Any]], Any]


@dataclass
class QuickConfig:
    """Settings of the quick fit (stage 1).

    ``max_pixels`` painted pixels at most (class-balanced random subset) feed the fit; a
    forest head gets ``trees`` trees of depth ``tree_depth`` at most (``tree_kind``: extremely
    randomised trees, or ``"random"``, Breiman's forest: see
    :func:`~napari_muvit.engine.forests.random_forest`), on the filters of the
    levels that ``select_levels`` chooses (see :func:`choose_forest_levels`: ``select_folds``
    stroke folds drawn ``select_repeats`` times, ``select_trees`` trees per trial forest, the
    first candidate within
    ``select_margin`` of the best; ``False``: every level); an MLP head
    ``iterations`` full-batch Adam steps at ``lr`` with ``weight_decay``; ``tile_batch`` tiles
    per encoder forward pass while collecting features; ``snapshot_every`` fine-tuning steps
    between two snapshots of stage 2 (``0``: only at the end).
    """

    max_pixels: int = 20_000
    trees: int = 100
    tree_depth: int = 20
    tree_kind: str = "extra"
    iterations: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-3
    tile_batch: int = 4
    snapshot_every: int = 25
    seed: int = 0
    select_levels: bool = True
    select_folds: int = 3
    select_repeats: int = 3
    select_trees: int = 12
    select_margin: float = 0.005

    def __post_init__(self) -> None:
        for name in ("max_pixels", "trees", "tree_depth", "iterations", "tile_batch",
                     "select_folds", "select_repeats", "select_trees"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.tree_kind not in TREE_KINDS:
            raise InputError(f"tree_kind: expected one of {', '.join(TREE_KINDS)}, "
                             f"got {self.tree_kind!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.snapshot_every < 0:
            raise InputError("lr must be > 0, weight_decay and snapshot_every >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _points_of_pair(
    labels: Any, mapping: Mapping[int, int], budget_per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Painted pixels ``(N, 2)``, their class indices and their stroke (a connected painted
    region of one label value, numbered from 0 in this image), at most ``budget_per_class``
    pixels per class."""
    from scipy import ndimage

    lab = np.asarray(labels)
    pts, cls, strokes = [], [], []
    first = 0
    for value, k in mapping.items():
        painted = lab == value
        regions, count = ndimage.label(painted, structure=np.ones((3, 3)))
        yy, xx = np.nonzero(painted)
        if yy.size == 0:
            continue
        if yy.size > budget_per_class:
            keep = rng.choice(yy.size, budget_per_class, replace=False)
            yy, xx = yy[keep], xx[keep]
        pts.append(np.stack([yy, xx], 1))
        cls.append(np.full(yy.size, k, np.int64))
        strokes.append(first + regions[yy, xx].astype(np.int64) - 1)
        first += count
    if not pts:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pts).astype(np.int64), np.concatenate(cls), np.concatenate(strokes)


def nested_tiles_of_pixels(
    source: Any,
    pixels: np.ndarray,
    tile_size: int,
    levels: Sequence[float],
    device: torch.device,
    tile_batch: int = 4,
    cancel: CancelToken | None = None,
) -> Iterator[tuple[list[Any], list[np.ndarray], Tensor, Tensor]]:
    """The prediction tiles that own world pixels ``pixels`` (N, 2), ``tile_batch`` at a time:
    ``(tiles, pixel indices of each tile, nested crops (B, L, C, S, S), their bboxes)``.

    The tiles are those of the global tile grid without overlap
    (:func:`~napari_muvit.data.geometry.plan_tiles`), with nested crops centred on them, so
    what is computed at a pixel here is what prediction shows the classifier there.
    """
    by_cell = {t.grid: t for t in plan_tiles(None, tile_size, source.shape, 0)}
    owners: dict[tuple[int, int], list[int]] = {}
    for i, (cy, cx) in enumerate(grid_cells_of_pixels(pixels, tile_size)):
        owners.setdefault((int(cy), int(cx)), []).append(i)
    keys = sorted(owners)
    for start in range(0, len(keys), tile_batch):
        if cancel is not None and cancel.cancelled:
            return
        tiles = [by_cell[k] for k in keys[start : start + tile_batch]]
        boxes = np.stack([centered_nested_bboxes(t.origin, tile_size, levels) for t in tiles])
        crops = np.stack([source.read_nested(bb, levels, tile_size)[0] for bb in boxes])
        groups = [np.asarray(owners[t.grid]) for t in tiles]
        yield tiles, groups, torch.from_numpy(crops).to(device), torch.from_numpy(boxes).to(device)


@torch.no_grad()
def collect_features(
    model: nn.Module,
    source: Any,
    points: np.ndarray,
    tile_size: int,
    tile_batch: int = 4,
    cancel: CancelToken | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> np.ndarray:
    """Raw :class:`PixelHead` features ``(N, F)`` float32 of world pixels ``points`` ``(N, 2)``,
    each computed in the prediction tile that owns it (:func:`nested_tiles_of_pixels`), so the
    classifier is fitted on the features prediction will show it.
    """
    head = model.head
    device = next(model.parameters()).device
    levels = tuple(float(v) for v in model.levels)
    out = np.zeros((len(points), head.num_features), np.float32)
    if len(points) == 0:
        return out
    total = len(np.unique(grid_cells_of_pixels(points, tile_size), axis=0))
    done = 0
    was_training = model.training
    model.eval()
    try:
        for tiles, groups, x, bb in nested_tiles_of_pixels(
            source, points, tile_size, levels, device, tile_batch, cancel
        ):
            maps, tokens, coords, x = model.encode(x, bb)
            # every level's filters, whichever the head reads now: the fit chooses among them
            feats = head.features(maps, x[:, 0], tokens, coords, x, all_levels=True)
            for b, (tile, idx) in enumerate(zip(tiles, groups)):
                local = points[idx] - np.asarray(tile.origin)
                f = feats[b, :, local[:, 0], local[:, 1]]  # (F, n)
                out[idx] = f.T.float().cpu().numpy()
            done += len(tiles)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)
    return out


def quick_fit(
    model: nn.Module,
    features: np.ndarray,
    classes: np.ndarray,
    config: QuickConfig | None = None,
    cancel: CancelToken | None = None,
    strokes: np.ndarray | None = None,
    forest_levels: str = "auto",
    level_choice: tuple[tuple[int, ...], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Fit ``model.head`` (a :class:`PixelHead`) on cached features, in place.

    Sets the head's standardisation buffers from ``features`` ``(N, F)`` and trains its
    classifier with class-balanced cross-entropy (every class counts equally, however many
    pixels were painted). A forest is fitted instead, on the levels chosen by
    :func:`choose_forest_levels` from the ``strokes`` (stroke index of every row; without them,
    every level), or on those ``forest_levels`` forces (:func:`forced_forest_levels`);
    ``level_choice`` is that function's answer for these very features, when already known. Returns
    ``{"loss", "train_accuracy", "pixels", "seconds"}``, and for a forest
    ``"forest_levels"`` (levels its filters are computed on), ``"sub_forests"`` (the level
    counts of its sub-forests) and the stroke-validated ``"level_scores"``.
    """
    cfg = config or QuickConfig()
    head = model.head
    if not hasattr(head, "classify"):
        raise InputError(f"quick_fit needs a 'pixel' head, the model has {type(head).__name__}")
    if len(features) == 0:
        raise InputError("quick_fit: no painted pixels to fit on; paint a few strokes per class")
    t0 = time.perf_counter()
    device = head.feature_mean.device
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device)
    y = torch.from_numpy(np.asarray(classes, np.int64)).to(device)
    with torch.no_grad():
        head.feature_mean.copy_(x.mean(0))
        head.feature_std.copy_(x.std(0).clamp_min(1e-3))
    if getattr(head, "forest", None) is not None:
        fitted = _fit_forest(model, features, classes, cfg, strokes, forest_levels, level_choice)
        with torch.no_grad():
            acc = float((head.classify(x[:, :, None, None])[:, :, 0, 0].argmax(1) == y)
                        .float().mean())
        return {"loss": float("nan"), "train_accuracy": acc, "pixels": int(len(y)),
                "seconds": time.perf_counter() - t0,
                "forest_levels": head.forest_levels or _bank_levels(head),
                "sub_forests": fitted["sub_forests"], "level_scores": fitted["scores"]}
    counts = torch.bincount(y, minlength=model.num_classes).float()
    weight = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
    weight = weight / weight[counts > 0].mean()
    params = list(head.classifier.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for p in params:  # a fresh classifier: the stage-1 answer depends on the strokes only
            if p.dim() > 1:
                nn.init.kaiming_uniform_(p, a=5**0.5)
            else:
                nn.init.zeros_(p)
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    xs = x[:, :, None, None]
    was_training = head.training
    head.train()
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(cfg.iterations):
            if cancel is not None and cancel.cancelled:
                break
            logits = head.classify(xs)[:, :, 0, 0]
            loss = F.cross_entropy(logits, y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.train(was_training)
    with torch.no_grad():
        acc = float((head.classify(xs)[:, :, 0, 0].argmax(1) == y).float().mean())
    return {
        "loss": float(loss.detach()),
        "train_accuracy": acc,
        "pixels": int(len(y)),
        "seconds": time.perf_counter() - t0,
    }


def _bank_levels(head: nn.Module) -> int:
    """Levels in the head's filter bank."""
    return head.num_levels if head.bank == "levels" else 1


def _forest(trees: int, cfg: QuickConfig) -> Any:
    # class-balanced: a class painted with few pixels counts as much as one painted with many
    return random_forest(trees, cfg.tree_depth, cfg.seed, cfg.tree_kind)


def stroke_folds(classes: np.ndarray, strokes: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold index of every row: whole strokes go to one fold, each class's strokes spread
    over the folds in turn (so every fold holds out strokes of as many classes as it can)."""
    rng = np.random.default_rng(seed)
    fold_of_stroke: dict[int, int] = {}
    for k in np.unique(classes):
        own = np.unique(strokes[classes == k])
        rng.shuffle(own)
        start = int(rng.integers(folds))  # classes with few strokes do not all miss one fold
        for i, stroke in enumerate(own):
            fold_of_stroke[int(stroke)] = (start + i) % folds
    return np.array([fold_of_stroke[int(s)] for s in strokes], np.int64)


def forest_level_candidates(num_levels: int) -> list[tuple[int, ...]]:
    """What the forest may read, as the level counts of its sub-forests, in order of
    preference: a mix (equal sub-forests on the first 1, 2, … all levels, their
    probabilities averaged), level 1 alone, every level."""
    if num_levels < 2:
        return [(1,)]
    return [tuple(range(1, num_levels + 1)), (1,), (num_levels,)]


def forced_forest_levels(choice: str, num_levels: int) -> tuple[int, ...] | None:
    """The level counts of the sub-forests that ``TrainConfig.forest_levels`` ``choice`` forces
    (a candidate of :func:`forest_level_candidates`); ``None`` for ``"auto"``."""
    if choice == "auto":
        return None
    if choice not in FOREST_LEVEL_CHOICES:
        raise InputError(f"forest_levels: expected one of {', '.join(FOREST_LEVEL_CHOICES)}, "
                         f"got {choice!r}")
    candidates = forest_level_candidates(num_levels)
    if len(candidates) == 1:  # one level: level 1, every level and the mix are the same forest
        return candidates[0]
    return candidates[{"mix": 0, "level1": 1, "all": 2}[choice]]


def _dice_of_classes(predicted: np.ndarray, classes: np.ndarray) -> float:
    """Mean Dice over the classes in ``classes`` (rows with ``predicted < 0`` not judged)."""
    judged = predicted >= 0
    dice = []
    for k in np.unique(classes):
        truth_k, pred_k = classes[judged] == k, predicted[judged] == k
        total = truth_k.sum() + pred_k.sum()
        dice.append(2 * (truth_k & pred_k).sum() / total if total else 1.0)
    return float(np.mean(dice))


def choose_forest_levels(
    bank: np.ndarray, classes: np.ndarray, strokes: np.ndarray,
    columns_of_levels: Callable[[int], int], num_levels: int, cfg: QuickConfig,
) -> tuple[tuple[int, ...], dict[str, float]]:
    """Which levels' filters the forest should read, judged on strokes it did not see.

    The coarse levels are the context: decisive when a class shows only around the pixel (a
    cell's ring, a tissue layer), noise that a forest fitted on a few strokes overfits when it
    does not (nuclei on plain background: smooth coarse filters tell one stroke's place from
    another's). Each candidate of :func:`forest_level_candidates` is fitted on the strokes of
    all folds but one (:func:`stroke_folds`; pixels of one stroke are too alike for a per-pixel
    split to tell anything) and predicts the held-out strokes; its score is the mean Dice over
    classes of those predictions, averaged over ``cfg.select_repeats`` draws of the folds (one
    draw depends much on which strokes fall together). The first candidate within
    ``cfg.select_margin`` of the best wins. ``columns_of_levels(n)``: the bank columns of the
    first *n* levels (:meth:`PixelHead.bank_columns`). Returns
    ``(level counts of the sub-forests, {"1+2+3": score, ...})``; every level without scores
    when fewer than two folds can be formed.
    """
    candidates = forest_level_candidates(num_levels)
    folds = min(int(cfg.select_folds), len(np.unique(strokes)))
    if folds < 2 or num_levels < 2 or len(np.unique(classes)) < 2:
        return (num_levels,), {}
    present = np.unique(classes)
    counts = sorted({n for c in candidates for n in c})
    runs: dict[str, list[float]] = {_candidate_name(c): [] for c in candidates}
    for repeat in range(int(cfg.select_repeats)):
        fold = stroke_folds(classes, strokes, folds, cfg.seed + repeat)
        # out-of-stroke class probabilities of a sub-forest on the first n levels
        held_out = {n: np.zeros((len(classes), len(present))) for n in counts}
        judged = np.zeros(len(classes), bool)
        for f in range(folds):
            train, test = fold != f, fold == f
            if not test.any() or len(np.unique(classes[train])) < 2:
                continue
            judged |= test
            for n in counts:
                cols = bank[:, : columns_of_levels(n)]
                forest = _forest(cfg.select_trees, cfg).fit(cols[train], classes[train])
                columns = np.searchsorted(present, forest.classes_)
                held_out[n][np.ix_(test, columns)] = forest.predict_proba(cols[test])
        for c in candidates:
            probs = sum(held_out[n] for n in c)
            predicted = np.where(judged, present[probs.argmax(1)], -1)
            runs[_candidate_name(c)].append(_dice_of_classes(predicted, classes))
    scores = {name: float(np.mean(v)) for name, v in runs.items()}
    best = max(scores.values())
    chosen = next(c for c in candidates if scores[_candidate_name(c)] >= best - cfg.select_margin)
    return chosen, scores


def _candidate_name(counts: Sequence[int]) -> str:
    return "+".join(str(n) for n in counts)


def _fit_forest(model: nn.Module, features: np.ndarray, classes: np.ndarray,
                cfg: QuickConfig, strokes: np.ndarray | None = None,
                forest_levels: str = "auto",
                level_choice: tuple[tuple[int, ...], dict[str, float]] | None = None,
                ) -> dict[str, Any]:
    """Fit the head's random forest on the filter-bank columns of ``features`` (in place).

    ``forest_levels`` other than ``"auto"`` forces the levels (:func:`forced_forest_levels`);
    else with ``strokes`` and ``cfg.select_levels``, a forest-only head reads the levels that
    :func:`choose_forest_levels` picks (its ``forest_levels`` option: the most levels a
    sub-forest reads; without, the levels it is set to read); a mix is equal sub-forests in
    one ensemble, which averages them.
    Returns ``{"sub_forests": level counts, "scores": held-out scores}``.
    scikit-learn fits the trees; the head keeps only their node tables, evaluated in torch.
    Classes that were not painted keep a zero probability column.
    """
    head = model.head
    bank = np.ascontiguousarray(features[:, : head.num_image_features], np.float32)
    chosen, scores = (_bank_levels(head),), {}
    forced = forced_forest_levels(forest_levels, _bank_levels(head))
    if forced is not None and head.classifier is not None:
        raise InputError(_NOT_FOREST_ONLY.format(forest_levels))
    if head.classifier is None:  # a forest-only head: reading fewer levels saves their filters
        if forced is not None:
            chosen = forced
        elif cfg.select_levels and strokes is not None:
            chosen, scores = level_choice or choose_forest_levels(
                bank, classes, np.asarray(strokes), head.bank_columns, _bank_levels(head),
                cfg)
        else:  # the levels the head is set to read (every level unless forest_levels says)
            chosen = (head.forest_levels or _bank_levels(head),)
        head.forest_levels = max(chosen)
        head.forest_sub_levels = list(chosen)
        model.head_options["forest_levels"] = max(chosen)
        model.head_options["forest_sub_levels"] = list(chosen)
    trees = []
    per_forest = max(1, cfg.trees // len(chosen))
    for n in chosen:
        cols = bank[:, : head.bank_columns(n)]
        trees += fit_tree_arrays(cols, classes, model.num_classes, per_forest, cfg.tree_depth,
                                 cfg.seed, cfg.tree_kind)
    head.forest.load_trees(trees)
    model.head_options.update(head.forest.shape_config)
    return {"sub_forests": list(chosen), "scores": scores}


_NOT_FOREST_ONLY = ("forest levels {!r}: only a forest pixel head (classifier forest) reads "
                    "levels by choice; this head has an MLP: leave forest levels at auto")


def _describe_sub_forests(counts: Sequence[int], levels: Sequence[float]) -> str:
    """``[1]`` -> "level 1"; ``[3]`` -> "levels 1, 4, 16"; ``[1, 2, 3]`` -> "a mix of
    levels 1 | 1, 4 | 1, 4, 16"."""
    names = [", ".join(str(v) for v in list(levels)[:n]) for n in counts]
    if len(counts) > 1:
        return "a mix of levels " + " | ".join(names)
    return f"level{'s' if counts[0] > 1 else ''} {names[0]}"


def _short_name(candidate: str, num_levels: int) -> str:
    """A candidate of :func:`forest_level_candidates` in a few words."""
    counts = [int(n) for n in candidate.split("+")]
    if len(counts) > 1:
        return "mix"
    return "level 1" if counts[0] == 1 else (
        "all levels" if counts[0] == num_levels else f"{counts[0]} levels")


class QuickTrainer:
    """Quick fit (stage 1), then full fine-tuning (stage 2) of one segmenter.

    Parameters
    ----------
    model, pairs, out, class_names, provenance, notes
        As for :class:`~napari_muvit.engine.trainer.Trainer`; the head is a ``"pixel"`` head
        (``config.head`` is forced to it; a segmenter with another head gets a new one).
    config
        :class:`TrainConfig` of stage 2.
    quick
        :class:`QuickConfig` of stage 1.
    progress
        Receives the trainer's per-step dicts with ``"stage": "fine-tune"``, and before them
        ``"stage": "features"`` (``done``/``total`` tiles) and ``"stage": "quick"``
        (``loss``, ``train_accuracy``, ``pixels``, ``seconds``) with the same keys.
    fine_tune
        Run stage 2 after the quick fit (``False``: stage 1 only).
    on_snapshot
        ``on_snapshot(model_copy, info)`` after the quick fit and every
        ``quick.snapshot_every`` fine-tuning steps (``info["stage"]``, ``info["elapsed"]``
        seconds since :meth:`run` started, ``info["step"]``).
    """

    def __init__(
        self,
        model: nn.Module,
        pairs: Sequence[tuple[Any, Any]],
        config: TrainConfig | None = None,
        quick: QuickConfig | None = None,
        progress: Progress | None = None,
        on_snapshot: Snapshot | None = None,
        cancel: CancelToken | None = None,
        out: Any = None,
        *,
        fine_tune: bool = True,
        class_names: Mapping[int, str] | None = None,
        provenance: Mapping[str, Any] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        cfg = copy.copy(config) if config is not None else TrainConfig()
        cfg.head = "pixel"
        self.fine_tune = bool(fine_tune)
        self.quick = quick or QuickConfig()
        self.progress = progress
        self.on_snapshot = on_snapshot
        self.cancel = cancel or CancelToken()
        model = _with_pixel_head_or_encoder(model)
        fresh_head = getattr(model, "head_type", None) is None
        _check_quick_choices(model, pairs, cfg, fresh_head, provenance)
        self.trainer = Trainer(
            model, pairs, cfg, progress=self._trainer_progress, cancel=self.cancel, out=out,
            class_names=class_names, provenance=provenance, notes=notes,
        )
        self._color_candidates = _apply_color_space(self.trainer, cfg.color_space, fresh_head)
        self._start = time.monotonic()
        self.quick_stats: dict[str, float] = {}

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    def _emit(self, info: dict[str, Any]) -> None:
        """Stage-1 dicts carry the trainer's keys too (step 0, no loss yet), so one progress
        callback can show both stages."""
        if self.progress is None:
            return
        base = {"step": self.trainer.step, "steps": self.trainer.config.steps,
                "loss": float("nan"), "lr": 0.0, "status": "running",
                "elapsed": time.monotonic() - self._start}
        self.progress({**base, **info})

    def _snapshot(self, stage: str) -> None:
        if self.on_snapshot is None:
            return
        info = {"stage": stage, "step": self.trainer.step,
                "elapsed": time.monotonic() - self._start}
        self.on_snapshot(self.trainer.snapshot(), info)

    def _trainer_progress(self, info: dict[str, Any]) -> None:
        self._emit({**info, "stage": "fine-tune"})
        every = self.quick.snapshot_every
        step = int(info["step"])
        last = step >= self.trainer.config.steps  # the final snapshot follows
        if info.get("status") == "running" and every and step and step % every == 0 and not last:
            self._snapshot("fine-tune")

    def fit_quick(self) -> dict[str, float]:
        """Stage 1: features of the painted pixels, then the pixel head's fit."""
        t = self.trainer
        cfg = self.quick
        rng = np.random.default_rng(cfg.seed)
        mapping = t.label_mapping
        per_class = max(1, cfg.max_pixels // max(1, len(mapping)))
        points, classes, strokes = [], [], []
        for _, labels in t.pairs:
            pts, cls, stroke = _points_of_pair(labels, mapping, per_class, rng)
            # strokes of different images are different strokes
            strokes.append(stroke + sum(int(s.max(initial=-1)) + 1 for s in strokes))
            points.append(pts)
            classes.append(cls)
        classes, strokes = np.concatenate(classes), np.concatenate(strokes)
        color_note, level_choice = "", None
        if len(self._color_candidates) > 1:
            features, level_choice, color_note = self._choose_color_space(points, classes,
                                                                          strokes)
        else:
            features = self._painted_features(points)
        if self.cancel.cancelled:
            return {}
        stats = quick_fit(t.model, features, classes, cfg, self.cancel, strokes=strokes,
                          forest_levels=t.config.forest_levels, level_choice=level_choice)
        stats["elapsed"] = time.monotonic() - self._start
        self.quick_stats = stats
        read = ""
        if stats.get("level_scores"):
            forest = _describe_sub_forests(stats["sub_forests"], t.model.levels)
            judged = ", ".join(f"{_short_name(name, len(t.model.levels))} {v:.3f}"
                               for name, v in stats["level_scores"].items())
            read = f"; the forest reads {forest} (held-out strokes, mean Dice: {judged})"
        elif t.config.forest_levels != "auto" and "sub_forests" in stats:
            forest = _describe_sub_forests(stats["sub_forests"], t.model.levels)
            read = f"; the forest reads {forest} (forest levels: {t.config.forest_levels})"
        if all(getattr(source, "rgb", False) for source, _ in t.pairs):
            # short: the fine-tune panel shows this line under its form
            read += f"; filters on {_short_color(t.model.head.color_space)}{color_note}"
        t._event("quick_fit", f"pixel head fitted on {stats['pixels']} painted pixels in "
                 f"{stats['seconds']:.1f} s (train accuracy {stats['train_accuracy']:.3f})"
                 + read)
        self._emit({"stage": "quick", **stats, "elapsed": stats["elapsed"]})
        # the out folder holds a usable model seconds after the start, not after the first
        # fine-tuning checkpoint
        self.trainer.checkpoint()
        self._snapshot("quick")
        return stats

    def _painted_features(self, points: Sequence[np.ndarray], rounds: tuple[int, int] = (0, 1),
                          ) -> np.ndarray:
        """:func:`collect_features` of the painted pixels of every image, one array; progress
        counts ``rounds = (this round, of rounds)`` feature passes as one."""
        t = self.trainer
        done_before, passes = rounds

        def report(done: int, total: int) -> None:
            self._emit({"stage": "features", "done": done_before * total + done,
                        "total": passes * total})

        feats = []
        for (source, _), pts in zip(t.pairs, points):
            if self.cancel.cancelled:
                break
            feats.append(collect_features(t.model, source, pts, t.crop_size,
                                          self.quick.tile_batch, self.cancel, report))
        width = t.model.head.num_features
        return np.concatenate(feats) if feats else np.zeros((0, width), np.float32)

    def _choose_color_space(self, points: Sequence[np.ndarray], classes: np.ndarray,
                            strokes: np.ndarray) -> tuple[np.ndarray, Any, str]:
        """Set the colour space of the head's filters that predicts held-out strokes best.

        Each candidate's features are scored as :func:`choose_forest_levels` scores levels:
        the score of the levels the forest is forced to read, else of the best level
        candidate; the first candidate within ``select_margin`` of the best wins. When the
        strokes cannot be judged (fewer than two folds, one level) the first candidate is kept
        without computing the others. Returns the chosen features, their level choice (for
        the fit) and a note for the fit's message. A cancel keeps the first candidate, as the
        head options say.
        """
        head, cfg, first = self.trainer.model.head, self.quick, self._color_candidates[0]
        forced = forced_forest_levels(self.trainer.config.forest_levels, _bank_levels(head))
        scored: dict[str, tuple[float, np.ndarray, Any]] = {}
        for k, space in enumerate(self._color_candidates):
            head.color_space = space
            features = self._painted_features(points, (k, len(self._color_candidates)))
            if self.cancel.cancelled:
                head.color_space = first
                return features, None, ""
            bank = np.ascontiguousarray(features[:, : head.num_image_features], np.float32)
            levels = choose_forest_levels(bank, classes, strokes, head.bank_columns,
                                          _bank_levels(head), cfg)
            if not levels[1]:  # nothing to judge the colours by: keep the first
                head.color_space = first
                self.trainer._event("color_space", "RGB images: the filters see "
                                    f"{_COLOR_NAMES[first]} (too few strokes or levels to compare)")
                return (features if space == first else self._painted_features(points)), None, ""
            score = (levels[1].get(_candidate_name(forced), float("nan")) if forced
                     else max(levels[1].values()))
            scored[space] = (score, features, levels)
        best = max(score for score, _, _ in scored.values())
        chosen = next((space for space, (score, _, _) in scored.items()
                       if score >= best - cfg.select_margin), first)
        head.color_space = chosen
        self.trainer.model.head_options["color_space"] = chosen
        judged = ", ".join(f"{_short_color(space)} {score:.3f}"
                           for space, (score, _, _) in scored.items() if not math.isnan(score))
        note = f" (held-out strokes: {judged})" if judged else ""
        self.trainer._event("color_space", f"RGB images: the filters see "
                            f"{_COLOR_NAMES[chosen]}{note}")
        _, features, levels = scored[chosen]
        return features, (levels if levels[1] else None), note

    def run(self) -> dict[str, Any]:
        """Both stages; returns the trainer's history (``status`` as for ``Trainer.run``)."""
        self._start = time.monotonic()
        self.fit_quick()
        if self.cancel.cancelled:
            self.trainer.history["status"] = "cancelled"
            self.trainer.checkpoint()
            return self.trainer.history
        if self.fine_tune and not _head_is_trainable(self.model):
            # a forest on the filter bank has no gradient and does not use the encoder:
            # 600 steps of fine-tuning would change nothing it predicts
            self.trainer._event("fine_tune_skipped", "the forest head is fitted; nothing to "
                                "fine-tune (use --classifier mlp to fine-tune the encoder)")
        if self.fine_tune and _head_is_trainable(self.model):
            history = self.trainer.run()
        else:
            self.trainer.history["status"] = "finished"
            self.trainer.checkpoint()
            history = self.trainer.history
        self._snapshot("final")
        return history


def _check_quick_choices(model: nn.Module, pairs: Sequence[tuple[Any, Any]],
                         config: TrainConfig, fresh_head: bool,
                         provenance: Mapping[str, Any] | None) -> None:
    """Refuse ``config.forest_levels``/``color_space`` choices that cannot apply, before the
    trainer touches the output folder."""
    if config.color_space in ("lab", "hed"):
        names = list((provenance or {}).get("images") or [])
        for i, (source, _) in enumerate(pairs):
            if not getattr(source, "rgb", False) or getattr(source, "channels", 3) != 3:
                name = f"image {i + 1}" + (f" ({names[i]})" if i < len(names) and names[i] else "")
                raise InputError(
                    f"color space {config.color_space!r} needs RGB images; {name} is not RGB "
                    f"({getattr(source, 'channels', '?')} channel(s)): use color space auto")
    if config.forest_levels != "auto":
        head = getattr(model, "head", None)
        forest_only = (config.classifier == "forest" if fresh_head else
                       getattr(head, "forest", None) is not None and head.classifier is None)
        if not forest_only:
            raise InputError(_NOT_FOREST_ONLY.format(config.forest_levels))


def check_quick_options_apply(config: TrainConfig, quick_fit: bool, why: str) -> None:
    """Refuse ``config.forest_levels``/``color_space`` other than ``auto`` when training does
    not start with a quick fit (``why`` says what it does instead), rather than ignore them."""
    if quick_fit:
        return
    forced = [f"{name.replace('_', ' ')} {value!r}" for name, value in
              (("forest_levels", config.forest_levels), ("color_space", config.color_space))
              if value != "auto"]
    if forced:
        verb, pronoun = ("apply", "them") if len(forced) > 1 else ("applies", "it")
        raise InputError(f"{' and '.join(forced)} {verb} to the quick fit of a pixel head; "
                         f"{why}: leave {pronoun} at auto")


def _apply_color_space(trainer: Trainer, choice: str, fresh_head: bool) -> tuple[str, ...]:
    """What the pixel head's filters see of RGB images (its ``color_space`` option).

    ``"auto"``: a new forest head on RGB images filters CIELAB or the stain densities
    (haematoxylin, eosin, DAB), whichever predicts held-out strokes better: returns those
    candidates for :meth:`QuickTrainer.fit_quick` to choose from (CIELAB until then). On the
    RGB photograph of bench_scribbles, level-1 filters scored 0.960 mDSC on Lab against 0.918
    on RGB; on real H&E, stain densities beat Lab (docs/benchmarks.md). Any other head keeps
    what it has. ``"lab"``/``"hed"``/``"rgb"`` set it (the quick fit refits the classifier on
    the new filters); recorded in the head options and the history either way.
    """
    model, head = trainer.model, trainer.model.head
    rgb = all(getattr(source, "rgb", False) for source, _ in trainer.pairs)
    candidates: tuple[str, ...] = ()
    if choice == "auto":
        new_forest = fresh_head and getattr(head, "forest", None) is not None
        if not new_forest or not rgb or head.in_channels != 3:
            return ()
        choice, candidates = "lab", AUTO_COLOR_SPACES
    elif not rgb:  # "rgb" on other images: the filters see the channels as they come anyway
        return ()
    head.color_space = choice if choice in ("lab", "hed") else "channels"
    model.head_options["color_space"] = head.color_space
    if not candidates:  # an automatic choice is recorded once it is made
        set_by = "" if trainer.config.color_space == "auto" else f" (color space: {choice})"
        trainer._event("color_space", "RGB images: the filters see "
                       f"{_COLOR_NAMES[head.color_space]}{set_by}")
    return candidates


#: what ``color_space="auto"`` chooses from for a new forest head on RGB images
AUTO_COLOR_SPACES = ("lab", "hed")


def _short_color(space: str) -> str:
    """A colour space of :data:`_COLOR_NAMES` in a word or two ("CIELAB")."""
    return _COLOR_NAMES[space].split(" (")[0]


_COLOR_NAMES = {"lab": "CIELAB (lightness and two colour axes)",
                "hed": "stain densities (haematoxylin, eosin, DAB)", "channels": "R, G, B"}


def quick_fit_message(history: Mapping[str, Any]) -> str | None:
    """What the last quick fit recorded in a training ``history`` (None: there was none)."""
    fitted = [e["message"] for e in history.get("events", []) if e.get("kind") == "quick_fit"]
    return fitted[-1] if fitted else None


def starts_with_quick_fit(model: nn.Module, head: str) -> bool:
    """Whether training ``model`` begins with the quick fit: a new ``"pixel"`` head on an
    encoder, or a segmenter that already has a pixel head (its classifier is refitted on the
    current annotations; a forest could not be fine-tuned by gradient steps anyway)."""
    if getattr(model, "head_type", None) == "pixel":
        return True
    return head == "pixel" and not hasattr(model, "head_type")


def _head_is_trainable(model: nn.Module) -> bool:
    """Whether fine-tuning can change the head's answer (a forest-only head cannot)."""
    head = getattr(model, "head", None)
    return head is None or getattr(head, "uses_encoder", True) or any(
        p.requires_grad for p in head.parameters())


def _with_pixel_head_or_encoder(model: nn.Module) -> nn.Module:
    """A segmenter whose head is not a pixel head is reduced to its encoder (a new head)."""
    from napari_muvit.model import MuViTSegmenter

    if isinstance(model, MuViTSegmenter) and model.head_type != "pixel":
        encoder = model.encoder
        encoder.meta = {**getattr(encoder, "meta", {}), **{
            k: v for k, v in model.meta.items() if k in ("init", "crop_size")}}
        return encoder
    return model
