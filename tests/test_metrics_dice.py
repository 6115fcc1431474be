"""napari_muvit.metrics, Dice block: the one Dice used by validation, benchmarks and experiments."""

from __future__ import annotations

import numpy as np
import pytest

from napari_muvit.errors import InputError
from napari_muvit.metrics import dice, dice_scores, mean_dice


def test_dice_counts_overlap_against_sizes() -> None:
    pred = np.array([[1, 1, 0], [2, 2, 0]])
    truth = np.array([[1, 0, 0], [2, 2, 2]])
    assert dice(pred, truth, 1) == pytest.approx(2 * 1 / (2 + 1))
    assert dice(pred, truth, 2) == pytest.approx(2 * 2 / (2 + 3))
    assert dice(pred, truth, 0) == pytest.approx(2 * 1 / (2 + 2))
    assert dice(pred, truth, 7) == 0.0  # in neither: 0, not 1
    assert dice(truth, truth, 2) == 1.0


def test_scores_default_to_the_values_in_the_truth_and_skip_ignored_pixels() -> None:
    pred = np.array([1, 1, 2, 2, 3, 3])
    truth = np.array([1, -1, 2, 1, -1, -1])
    # ignored: positions 1, 4, 5 -> pred [1, 2, 2], truth [1, 2, 1]
    scores = dice_scores(pred, truth, ignore=-1)
    assert set(scores) == {1, 2}
    assert scores[1] == pytest.approx(2 * 1 / (1 + 2))
    assert scores[2] == pytest.approx(2 * 1 / (2 + 1))
    assert mean_dice(pred, truth, ignore=-1) == pytest.approx((scores[1] + scores[2]) / 2)
    # explicit values are scored even when absent (the paper's mDSC over fixed classes)
    assert dice_scores(pred, truth, values=(1, 3), ignore=-1) == {1: scores[1], 3: 0.0}
    assert np.isnan(mean_dice(pred, np.full(6, -1), ignore=-1))


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(InputError, match=r"prediction shape \(2,\) differs from truth shape"):
        dice(np.zeros(2), np.zeros(3), 1)
