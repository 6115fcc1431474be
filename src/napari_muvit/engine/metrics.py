"""Scores of a segmentation: mean Dice against ground truth and tile-seam visibility.

Pure numpy; used by the quick trainer, the benchmarks and the tests.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mean_dice", "seam_ratio"]


def mean_dice(pred: np.ndarray, truth: np.ndarray, ignore: int | None = None) -> float:
    """Mean Dice (mDSC) over the classes present in ``truth``.

    ``pred`` and ``truth`` hold label values of the same shape; pixels whose truth equals
    ``ignore`` are left out. A class the prediction never produces scores 0.
    """
    pred = np.asarray(pred).ravel()
    truth = np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth differ in size: {pred.size} vs {truth.size}")
    if ignore is not None:
        keep = truth != ignore
        pred, truth = pred[keep], truth[keep]
    scores = []
    for k in np.unique(truth):
        p, t = pred == k, truth == k
        scores.append(2.0 * np.sum(p & t) / max(1, int(p.sum() + t.sum())))
    return float(np.mean(scores)) if scores else float("nan")


def seam_ratio(labels: np.ndarray, step: int, origin: tuple[int, int] = (0, 0)) -> dict:
    """How much more often labels change across tile borders than inside tiles.

    ``labels`` is a prediction whose tiles sit on a grid of period ``step`` (the predictor's
    ``tile_size - overlap``) with a tile border before every world pixel ``k·step``;
    ``origin`` is the world ``(y, x)`` of ``labels[0, 0]``. Neighbouring pixel pairs (both
    axes) are split into *border* pairs (the two pixels lie in different grid cells) and
    *interior* pairs. Returns ``{"border": fraction of border pairs that change label,
    "interior": the same inside cells, "ratio": border / interior}``; a seam-free prediction
    has a ratio near 1 (structures cross tile borders as often as any other line).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2 or min(lab.shape) < 2:
        raise ValueError(f"labels: expected a 2-D array of at least 2x2, got {lab.shape}")
    step = int(step)
    if step < 2:
        raise ValueError(f"step: expected an integer >= 2, got {step}")
    border, interior = [], []
    for axis in (0, 1):
        change = np.diff(lab, axis=axis) != 0
        # pair (i, i+1) crosses a border when world i+1 is a multiple of step
        world_next = origin[axis] + np.arange(1, lab.shape[axis])
        crossing = world_next % step == 0
        moved = np.moveaxis(change, axis, 0)
        border.append(moved[crossing].ravel())
        interior.append(moved[~crossing].ravel())
    b = float(np.concatenate(border).mean()) if sum(x.size for x in border) else float("nan")
    i = float(np.concatenate(interior).mean())
    return {"border": b, "interior": i, "ratio": b / i if i > 0 else float("inf")}
