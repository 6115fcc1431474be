"""The uncertainty map of the annotation loop's active-learning hint (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_muvit.engine.uncertainty import margin_uncertainty, uncertainty_percent


def test_margin_uncertainty_is_one_minus_the_top_two_margin():
    probs = np.zeros((3, 2, 3), np.float32)
    probs[:, 0, 0] = (0.5, 0.5, 0.0)  # undecided between two classes
    probs[:, 0, 1] = (1.0, 0.0, 0.0)  # certain
    probs[:, 0, 2] = (0.2, 0.3, 0.5)  # margin 0.2
    probs[:, 1, 0] = (1 / 3, 1 / 3, 1 / 3)  # undecided between all three
    probs[:, 1, 1] = (0.1, 0.7, 0.2)  # margin 0.5; the top class is not the last one
    # probs[:, 1, 2] stays 0: a tile skipped as empty (nothing predicted, nothing to paint)
    out = margin_uncertainty(probs)
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.8], [1.0, 0.5, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(uncertainty_percent(probs), [[100, 0, 80], [100, 50, 0]])
    # float16 (what the predictor streams) gives the same percentages
    np.testing.assert_array_equal(uncertainty_percent(probs.astype(np.float16)),
                                  [[100, 0, 80], [100, 50, 0]])


def test_margin_uncertainty_matches_a_sort_on_random_probabilities(rng):
    logits = rng.normal(size=(5, 16, 16)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(0)
    top = np.sort(probs, axis=0)
    np.testing.assert_allclose(margin_uncertainty(probs), 1 - (top[-1] - top[-2]), atol=1e-6)
    # one class: nothing to decide
    assert not margin_uncertainty(probs[:1]).any()
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        margin_uncertainty(probs[0])
