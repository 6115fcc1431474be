"""Evaluation metrics: the one implementation used by training validation, the benchmarks and
the experiment scripts, so that every reported score means the same thing.

Pure numpy (+ scipy for point matching), no torch: scores are computed on label images and
point tables that have already left the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from napari_muvit.errors import InputError

__all__ = [
    "detection_f1", "dice", "dice_scores", "match_points", "mean_dice", "point_f1", "seam_ratio",
]


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


# ============================================================================ seams
# How visible tile borders are in a tiled prediction (issue 13's acceptance: ratio <= 1.5).


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


# ============================================================================ points
# Point detection F1 as in MUSE / MCSpatNet / DPA-P2PNet: predictions and true points are
# matched one-to-one (Hungarian assignment) within a radius; a match is a true positive, an
# unmatched prediction a false positive, an unmatched true point a false negative.  Per class,
# only points of that class are matched with each other; the mean class F1 averages over the
# classes; detection F1 ignores the classes.  Among all matchings the one with the most pairs
# (then the smallest total distance) is used, so the counts do not depend on the input order.


def _as_points(yx: Any, name: str) -> np.ndarray:
    arr = np.asarray(yx, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"{name}: expected (N, 2) y, x coordinates, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: coordinates must be finite")
    return arr


def match_points(pred_yx: Any, true_yx: Any, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predicted and true points closer than or at ``radius``.

    Maximises the number of pairs, then minimises their total distance (Hungarian assignment
    with :func:`scipy.optimize.linear_sum_assignment`, run per connected group of nearby points
    so that large images stay cheap). Returns the matched indices ``(pred_idx, true_idx)``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    if not radius > 0:
        raise InputError(f"radius: expected a positive distance in pixels, got {radius!r}")
    p = _as_points(pred_yx, "pred_yx")
    t = _as_points(true_yx, "true_yx")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(p) == 0 or len(t) == 0:
        return empty
    pairs = cKDTree(p).sparse_distance_matrix(cKDTree(t), radius, output_type="ndarray")
    if len(pairs) == 0:
        return empty
    pi, ti, dist = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    n, m = len(p), len(t)
    graph = coo_matrix((np.ones(len(pi)), (pi, n + ti)), shape=(n + m, n + m))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[pi]
    order = np.argsort(pair_comp, kind="stable")
    pi, ti, dist, pair_comp = pi[order], ti[order], dist[order], pair_comp[order]
    bounds = np.flatnonzero(np.diff(pair_comp)) + 1
    out_p, out_t = [], []
    for sl in np.split(np.arange(len(pi)), bounds):
        rows, r_inv = np.unique(pi[sl], return_inverse=True)
        cols, c_inv = np.unique(ti[sl], return_inverse=True)
        if len(sl) == 1:
            out_p.append(rows)
            out_t.append(cols)
            continue
        # a forbidden pair costs more than any set of allowed ones: most pairs first
        big = float(radius) * (len(rows) + len(cols) + 1) + 1.0
        cost = np.full((len(rows), len(cols)), big)
        cost[r_inv, c_inv] = dist[sl]
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < big
        out_p.append(rows[r[ok]])
        out_t.append(cols[c[ok]])
    return np.concatenate(out_p), np.concatenate(out_t)


def _counts(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else 1.0
    recall = tp / n_true if n_true else 1.0
    # nothing to find and nothing found is a perfect score
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}


def detection_f1(pred_yx: Any, true_yx: Any, radius: float) -> dict[str, float]:
    """Class-agnostic detection counts and scores: ``tp, fp, fn, precision, recall, f1``."""
    p = _as_points(pred_yx, "pred_yx")
    t = _as_points(true_yx, "true_yx")
    mp, _ = match_points(p, t, radius)
    return _counts(len(mp), len(p), len(t))


def point_f1(
    pred_yx: Any,
    pred_class: Any,
    true_yx: Any,
    true_class: Any,
    radius: float,
    classes: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Per-class point F1 (class-aware one-to-one matching), their mean, and detection F1.

    ``classes`` default: every class in the truth or the prediction. Returns
    ``{"classes": {c: counts}, "mean_f1": float, "detection": counts}``, counts as in
    :func:`detection_f1`.
    """
    p = _as_points(pred_yx, "pred_yx")
    t = _as_points(true_yx, "true_yx")
    pc = np.asarray(pred_class, dtype=np.int64).reshape(-1)
    tc = np.asarray(true_class, dtype=np.int64).reshape(-1)
    if len(pc) != len(p) or len(tc) != len(t):
        raise InputError(
            f"classes: expected one class per point (pred {len(p)} / {len(pc)}, "
            f"true {len(t)} / {len(tc)})"
        )
    if classes is None:
        classes = sorted(set(pc.tolist()) | set(tc.tolist()))
    per: dict[int, dict[str, float]] = {}
    for c in classes:
        ps, ts = p[pc == c], t[tc == c]
        mp, _ = match_points(ps, ts, radius)
        per[int(c)] = _counts(len(mp), len(ps), len(ts))
    mean = float(np.mean([v["f1"] for v in per.values()])) if per else float("nan")
    return {"classes": per, "mean_f1": mean, "detection": detection_f1(p, t, radius)}
