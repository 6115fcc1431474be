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

__all__ = ["fit_ensemble", "fit_tree_arrays", "random_forest"]


def random_forest(trees: int = 100, depth: int | None = 20, seed: int = 0) -> Any:
    """An unfitted class-balanced scikit-learn forest using torch's thread count."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(
        n_estimators=int(trees), max_depth=depth, class_weight="balanced",
        random_state=int(seed), n_jobs=max(1, torch.get_num_threads()),
    )


def fit_tree_arrays(
    features: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    trees: int = 100,
    depth: int | None = 20,
    seed: int = 0,
) -> list[TreeArrays]:
    """Grow a class-balanced random forest on ``features`` (N, F) for class indices
    ``classes`` (N,) in ``[0, num_classes)``; a class without samples keeps a zero column."""
    rows = np.ascontiguousarray(features, np.float32)
    present = np.unique(classes)
    forest = random_forest(trees, depth, seed).fit(rows, classes)
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
