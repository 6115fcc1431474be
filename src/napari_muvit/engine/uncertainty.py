"""Where a stroke would help most: the per-pixel uncertainty of a prediction.

Active-learning hint of the annotation loop (issue 13): from the class probabilities of a
prediction (:attr:`~napari_muvit.engine.predictor.TileResult.probs`, blended across tile
borders when the predictor has an overlap), the pixels where the model hesitates between two
classes are those where a painted stroke changes the most.
"""

from __future__ import annotations

import numpy as np


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """``1 - (p1 - p2)`` per pixel: one minus the margin between the two most probable classes.

    ``probs`` is ``(K, h, w)`` (any float dtype).  1 means undecided between two classes, 0
    certain.  Pixels without a prediction (every probability 0: tiles skipped as empty, or
    not covered by any tile) get 0, since there is nothing to annotate there.  Returns
    ``(h, w)`` float32 in ``[0, 1]``.
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 3:
        raise ValueError(f"probabilities must be (K, h, w), got shape {p.shape}")
    if p.shape[0] < 2:
        return np.zeros(p.shape[1:], np.float32)
    top2 = np.partition(p, p.shape[0] - 2, axis=0)[-2:]
    out = 1.0 - (top2[1] - top2[0])
    out[top2[1] <= 0] = 0.0
    return np.clip(out, 0.0, 1.0, out=out)


def uncertainty_percent(probs: np.ndarray) -> np.ndarray:
    """:func:`margin_uncertainty` as ``uint8`` percent (0–100), the uncertainty layer's data."""
    return np.rint(margin_uncertainty(probs) * 100).astype(np.uint8)
