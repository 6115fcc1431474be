"""Random forests fitted by scikit-learn, handed to the model as node tables.

The model side (:class:`~napari_muvit.model.forest.TreeEnsemble`) only stores and evaluates
trees in torch, so a forest-headed model saves, loads and predicts like any other. Here the
trees are grown: class-balanced, so a class with few painted pixels or clicked points counts
as much as a frequent one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from napari_muvit.model.forest import TreeArrays, TreeEnsemble

__all__ = ["TREE_KINDS", "fit_ensemble", "fit_tree_arrays", "random_forest"]


#: tree kinds of :func:`random_forest`
TREE_KINDS = ("random", "extra")


def random_forest(trees: int = 100, depth: int | None = 20, seed: int = 0,
                  kind: str = "random") -> Any:
    """An unfitted class-balanced scikit-learn forest using torch's thread count.

    ``kind="random"``: Breiman's random forest (best split among √F features on a bootstrap
    sample). ``kind="extra"``: extremely randomised trees (a random threshold per feature,
    best of half the features, every sample): smoother class boundaries in feature space,
    which generalise better from a few strokes to the unpainted image
    (benchmarks/bench_scribbles.py, docs/benchmarks.md "Extra trees").
    """
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

    common = {"n_estimators": int(trees), "max_depth": depth, "class_weight": "balanced",
              "random_state": int(seed), "n_jobs": max(1, torch.get_num_threads())}
    if kind == "extra":
        return ExtraTreesClassifier(max_features=0.5, **common)
    if kind != "random":
        raise ValueError(f"kind: expected one of {TREE_KINDS}, got {kind!r}")
    return RandomForestClassifier(**common)


def fit_tree_arrays(
    features: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    trees: int = 100,
    depth: int | None = 20,
    seed: int = 0,
    kind: str = "random",
) -> list[TreeArrays]:
    """Grow a class-balanced forest of ``kind`` (:func:`random_forest`) on ``features`` (N, F)
    for class indices ``classes`` (N,) in ``[0, num_classes)``; a class without samples keeps
    a zero column."""
    rows = np.ascontiguousarray(features, np.float32)
    present = np.unique(classes)
    forest = random_forest(trees, depth, seed, kind).fit(rows, classes)
    out = []
    for estimator in forest.estimators_:
        t = estimator.tree_
        value = np.zeros((t.node_count, int(num_classes)))
        value[:, present] = t.value[:, 0, :]
        out.append((t.feature, t.threshold, t.children_left, t.children_right, value))
    return out


def fit_ensemble(ensemble: TreeEnsemble, features: np.ndarray, classes: np.ndarray,
                 trees: int = 100, depth: int | None = 20, seed: int = 0) -> dict[str, int]:
    """Refit ``ensemble`` in place; returns its new :attr:`~TreeEnsemble.shape_config` (to be
    stored in the checkpoint's head options)."""
    ensemble.load_trees(fit_tree_arrays(features, classes, ensemble.num_classes, trees, depth,
                                        seed))
    return ensemble.shape_config
