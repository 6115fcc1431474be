"""Segmentation metrics: the one implementation used by training validation, the benchmarks and
the experiment scripts, so that every reported score means the same thing.

Pure numpy, no torch: scores are computed on label images that have already left the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from napari_muvit.errors import InputError

__all__ = ["dice", "dice_scores", "mean_dice"]


# ============================================================================ Dice
# Dice of one class: 2·|P ∩ T| / (|P| + |T|) over the pixels where the truth is not ignored.
# A class in neither the prediction nor the truth scores 0 (not 1): the callers only ask for
# classes that exist in the truth or that a table reports, so 0 never hides a real success.


def dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    """Dice coefficient of the pixels labelled ``value`` in ``pred`` and in ``truth``.

    ``pred`` and ``truth`` are label images (or flat arrays) of the same shape; 0.0 when the
    value occurs in neither.
    """
    p, t = _same_shape(pred, truth)
    a, b = p == value, t == value
    return float(2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


def dice_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    values: Iterable[int] | None = None,
    ignore: int | None = None,
) -> dict[int, float]:
    """Dice per label value: ``{value: dice}``.

    ``values`` defaults to the values present in ``truth`` (apart from ``ignore``). Pixels whose
    truth is ``ignore`` (e.g. -1 = not annotated) are left out of every score.
    """
    p, t = _same_shape(pred, truth)
    if ignore is not None:
        keep = t != ignore
        p, t = p[keep], t[keep]
    if values is None:
        values = (int(v) for v in np.unique(t))
    return {int(v): dice(p, t, int(v)) for v in values}


def mean_dice(
    pred: np.ndarray,
    truth: np.ndarray,
    values: Iterable[int] | None = None,
    ignore: int | None = None,
) -> float:
    """Mean of :func:`dice_scores` (the paper's mDSC when ``values`` are the foreground
    classes); NaN when there is nothing to score."""
    scores = dice_scores(pred, truth, values, ignore)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def _same_shape(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(truth)
    if p.shape != t.shape:
        raise InputError(f"Dice: prediction shape {p.shape} differs from truth shape {t.shape}")
    return p, t
