"""Point F1 (napari_muvit.metrics): hand-made cases with exact counts."""

from __future__ import annotations

import numpy as np
import pytest

from napari_muvit.errors import InputError
from napari_muvit.metrics import detection_f1, match_points, point_f1


# ============================================================================ points
def test_match_is_one_to_one():
    # two predictions around one true point: one match, one false positive
    pred = [[10.0, 10.0], [10.0, 12.0]]
    true = [[10.0, 11.0]]
    pi, ti = match_points(pred, true, 3.0)
    assert len(pi) == len(ti) == 1
    s = detection_f1(pred, true, 3.0)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["f1"] == pytest.approx(2 / 3)


def test_hungarian_beats_greedy_nearest():
    # greedy nearest-first may pair P1-T1 (distance 2) and leave P2 without a partner; the
    # optimal assignment pairs P1-T2 (3) and P2-T1 (2): two matches
    pred = [[0.0, 0.0], [0.0, 4.0]]
    true = [[0.0, 2.0], [0.0, -3.0]]
    pi, ti = match_points(pred, true, 3.5)
    assert sorted(zip(pi.tolist(), ti.tolist())) == [(0, 1), (1, 0)]
    assert detection_f1(pred, true, 3.5)["f1"] == 1.0


def test_radius_is_inclusive_and_order_does_not_matter():
    rng = np.random.default_rng(0)
    # integer coordinates 20 px apart: shifts of exactly 5 px are exact in floating point
    true = np.stack(np.meshgrid(np.arange(6) * 20.0, np.arange(10) * 20.0), -1).reshape(-1, 2)
    pred = np.concatenate([true[:40] + [5.0, 0.0], true[40:50] + [0.0, 5.01], [[500.0, 500.0]]])
    s = detection_f1(pred, true, 5.0)
    assert (s["tp"], s["fp"], s["fn"]) == (40, 11, 20)
    perm = rng.permutation(len(pred))
    s2 = detection_f1(pred[perm], true[::-1], 5.0)
    assert (s2["tp"], s2["fp"], s2["fn"]) == (40, 11, 20)


def test_per_class_matching_mean_and_detection():
    true = [[0, 0], [0, 20], [0, 40], [0, 60]]
    true_cls = [1, 1, 2, 2]
    # right place, classes: correct, wrong, correct; one missed; one spurious of class 3
    pred = [[1, 0], [0, 21], [0, 41], [50, 50]]
    pred_cls = [1, 2, 2, 3]
    s = point_f1(pred, pred_cls, true, true_cls, 3.0)
    c = s["classes"]
    assert (c[1]["tp"], c[1]["fp"], c[1]["fn"]) == (1, 0, 1)
    assert (c[2]["tp"], c[2]["fp"], c[2]["fn"]) == (1, 1, 1)
    assert (c[3]["tp"], c[3]["fp"], c[3]["fn"]) == (0, 1, 0)
    assert c[1]["f1"] == pytest.approx(2 / 3)
    assert c[2]["f1"] == pytest.approx(0.5)
    assert c[3]["f1"] == 0.0
    assert s["mean_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    d = s["detection"]
    assert (d["tp"], d["fp"], d["fn"]) == (3, 1, 1)
    # restricting the classes averages over those only
    s12 = point_f1(pred, pred_cls, true, true_cls, 3.0, classes=[1, 2])
    assert s12["mean_f1"] == pytest.approx((2 / 3 + 0.5) / 2)


def test_empty_inputs():
    assert detection_f1([], [], 5.0)["f1"] == 1.0
    s = detection_f1([], [[1.0, 1.0]], 5.0)
    assert (s["tp"], s["fp"], s["fn"], s["f1"]) == (0, 0, 1, 0.0)
    s = detection_f1([[1.0, 1.0]], np.zeros((0, 2)), 5.0)
    assert (s["tp"], s["fp"], s["fn"], s["f1"]) == (0, 1, 0, 0.0)


def test_large_sets_use_components_and_stay_exact():
    # a 50 x 50 grid of points 10 px apart, predictions shifted by 2 px: all matched
    g = np.stack(np.meshgrid(np.arange(50) * 10.0, np.arange(50) * 10.0), -1).reshape(-1, 2)
    s = detection_f1(g + 2.0, g, 3.0)
    assert (s["tp"], s["fp"], s["fn"]) == (2500, 0, 0)


def test_bad_input():
    with pytest.raises(InputError, match="radius"):
        match_points([[0, 0]], [[0, 0]], 0)
    with pytest.raises(InputError, match="pred_yx"):
        detection_f1([[0, 0, 0]], [[0, 0]], 1.0)
    with pytest.raises(InputError, match="one class per point"):
        point_f1([[0, 0]], [1, 2], [[0, 0]], [1], 1.0)
