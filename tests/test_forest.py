"""The random forest evaluated in PyTorch (model/forest.py) answers as scikit-learn does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import RandomForestClassifier

from napari_muvit.model.forest import TreeEnsemble


def _trees(forest: RandomForestClassifier) -> list:
    return [(e.tree_.feature, e.tree_.threshold, e.tree_.children_left, e.tree_.children_right,
             e.tree_.value[:, 0, :]) for e in forest.estimators_]


def test_probabilities_equal_scikit_learns_on_unseen_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 10)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] ** 2 > 1).astype(int) + (x[:, 2] > 1)
    forest = RandomForestClassifier(20, random_state=0).fit(x, y)
    ensemble = TreeEnsemble(10, 3)
    ensemble.load_trees(_trees(forest))
    test = rng.normal(size=(5000, 10)).astype(np.float32)
    # rows exactly on a threshold go left in both (thresholds rounded down to float32)
    root = forest.estimators_[0].tree_
    test[:100, root.feature[0]] = root.threshold[0].astype(np.float32)
    got = ensemble(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(got, forest.predict_proba(test), atol=1e-6)
    assert ensemble.shape_config["forest_trees"] == 20
    assert ensemble.shape_config["forest_depth"] == max(e.get_depth() for e in forest.estimators_)


def test_the_shape_config_rebuilds_an_ensemble_that_loads_the_state_dict():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    forest = RandomForestClassifier(5, random_state=0).fit(x, (x[:, 0] > 0).astype(int))
    a = TreeEnsemble(4, 2)
    a.load_trees(_trees(forest))
    cfg = a.shape_config
    b = TreeEnsemble(4, 2, cfg["forest_trees"], cfg["forest_nodes"], cfg["forest_depth"])
    b.load_state_dict(a.state_dict())
    rows = torch.from_numpy(x)
    torch.testing.assert_close(a(rows), b(rows))


@pytest.mark.parametrize("classes", [2, 4])
def test_an_unfitted_ensemble_is_uniform(classes):
    out = TreeEnsemble(3, classes)(torch.zeros(7, 3))
    torch.testing.assert_close(out, torch.full((7, classes), 1.0 / classes))


def test_the_compiled_cpu_walk_equals_the_torch_walk_and_follows_new_tables():
    """On a CPU the leaves come from scikit-learn's compiled walk on trees rebuilt from the
    buffers: the same probabilities as the torch walk (used on a GPU), bfloat16 input
    included, and rebuilt when a state dict replaces the tables."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    shallow = RandomForestClassifier(7, max_depth=3, random_state=0).fit(x, y)
    deep = RandomForestClassifier(7, random_state=1).fit(x, 2 - y)
    a, b = TreeEnsemble(6, 3), TreeEnsemble(6, 3)
    a.load_trees(_trees(deep))  # trees of different sizes: padded node tables
    b.load_trees(_trees(shallow))
    rows = torch.from_numpy(rng.normal(size=(3000, 6)).astype(np.float32))
    with torch.no_grad():
        assert a._sklearn_trees() is not None  # the fast path is taken here
        assert torch.equal(a(rows), a._walk(rows))
        half = rows.to(torch.bfloat16)
        assert torch.equal(a(half), a._walk(half.float()))
        before = a(rows)
        cfg = b.shape_config
        a2 = TreeEnsemble(6, 3, cfg["forest_trees"], cfg["forest_nodes"], cfg["forest_depth"])
        a2(rows)  # compiles the empty tables
        a2.load_state_dict(b.state_dict())  # replaced in place
        assert torch.equal(a2(rows), b._walk(rows))
        np.testing.assert_allclose(a2(rows).numpy(), shallow.predict_proba(rows.numpy()),
                                   atol=1e-6)
    assert not torch.equal(before, b(rows))


@pytest.mark.parametrize("kind", ["random", "extra"])
def test_grown_tree_tables_answer_as_the_scikit_learn_forest_of_their_kind(kind):
    from sklearn.ensemble import ExtraTreesClassifier

    from napari_muvit.engine.forests import fit_tree_arrays

    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 3] > 0.5)  # classes 0-3; class 4 never painted
    ensemble = TreeEnsemble(12, 5)
    ensemble.load_trees(fit_tree_arrays(x, y, 5, trees=10, depth=8, seed=3, kind=kind))
    common = {"n_estimators": 10, "max_depth": 8, "class_weight": "balanced", "random_state": 3}
    reference = (ExtraTreesClassifier(max_features=0.5, **common) if kind == "extra"
                 else RandomForestClassifier(**common)).fit(x, y)
    test = rng.normal(size=(2000, 12)).astype(np.float32)
    got = ensemble(torch.from_numpy(test)).numpy()
    assert np.all(got[:, 4] == 0)  # the class nobody painted keeps a zero column
    np.testing.assert_allclose(got[:, [0, 1, 2, 3]], reference.predict_proba(test), atol=1e-6)


def test_an_unknown_tree_kind_is_refused_by_name():
    from napari_muvit.engine.forests import random_forest
    from napari_muvit.engine.quicktrain import QuickConfig
    from napari_muvit.errors import InputError

    assert QuickConfig().tree_kind == "extra"
    with pytest.raises(ValueError, match="kind"):
        random_forest(kind="boosted")
    with pytest.raises(InputError, match="tree_kind.*random, extra"):
        QuickConfig(tree_kind="boosted")
