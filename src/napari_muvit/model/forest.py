"""A random forest evaluated in PyTorch, so that a forest-headed segmenter saves, loads and
predicts like any other model (safetensors buffers, no pickled estimator).

The trees are fitted elsewhere (``napari_muvit.engine.quicktrain`` uses scikit-learn) and
handed over as flat node arrays; here they are only stored and evaluated. All trees share one
padded node table of ``num_nodes`` entries; a leaf points to itself, so descending a fixed
``depth`` times lands every pixel on its leaf whatever the tree's real depth.

On a CPU, when scikit-learn is installed, the walk itself is scikit-learn's compiled
``Tree.apply`` on trees rebuilt from these same tables (2–3× faster than the torch walk, and
it releases the GIL); the leaves' probabilities are averaged here either way, so both paths
give identical results (``tests/test_forest.py``). The buffers stay the only state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["TreeEnsemble", "TreeArrays"]

#: one fitted tree: (feature, threshold, left, right, leaf class probabilities (nodes, K));
#: ``left[i] == -1`` marks a leaf; a sample goes left when ``x[feature] <= threshold``
TreeArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _round_down_to_float32(values: np.ndarray) -> np.ndarray:
    """The largest float32 ``<=`` each value: ``x <= t`` equals ``x <= f32(t)`` for float32 ``x``."""
    t32 = values.astype(np.float32)
    above = t32.astype(np.float64) > values
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


class TreeEnsemble(nn.Module):
    """Mean class probabilities of ``num_trees`` decision trees over ``num_features`` inputs.

    Shapes are fixed at construction (they are part of the checkpoint config); :meth:`load_trees`
    fills the tables. An empty ensemble (``num_trees == 0``) predicts uniform probabilities.
    """

    def __init__(self, num_features: int, num_classes: int, num_trees: int = 0,
                 num_nodes: int = 1, depth: int = 0) -> None:
        super().__init__()
        self._compiled: tuple[tuple, list] | None = None  # (key, scikit-learn trees)
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.depth = int(depth)
        t, n = int(num_trees), max(1, int(num_nodes))
        self.register_buffer("feature", torch.zeros(t, n, dtype=torch.int32))
        self.register_buffer("threshold", torch.zeros(t, n, dtype=torch.float32))
        self.register_buffer("child_nodes", torch.zeros(t, n, 2, dtype=torch.int32))
        self.register_buffer("leaf_probs", torch.zeros(t, n, self.num_classes))

    @property
    def num_trees(self) -> int:
        return int(self.feature.shape[0])

    @property
    def shape_config(self) -> dict[str, int]:
        """What rebuilds this ensemble's buffers: stored in the head's checkpoint options."""
        return {"forest_trees": self.num_trees, "forest_nodes": int(self.feature.shape[1]),
                "forest_depth": self.depth}

    def load_trees(self, trees: Sequence[TreeArrays]) -> None:
        """Replace the ensemble by ``trees`` (new buffer shapes: update the checkpoint config
        from :attr:`shape_config`)."""
        n = max(len(t[0]) for t in trees)
        k = self.num_classes
        feature = np.zeros((len(trees), n), np.int32)
        threshold = np.zeros((len(trees), n), np.float32)
        child_nodes = np.zeros((len(trees), n, 2), np.int32)
        probs = np.zeros((len(trees), n, k), np.float32)
        depth = 0
        for i, (feat, thr, left, right, value) in enumerate(trees):
            m = len(feat)
            leaf = left < 0
            own = np.arange(m)
            feature[i, :m] = np.where(leaf, 0, feat)
            threshold[i, :m] = _round_down_to_float32(np.asarray(thr, np.float64))
            child_nodes[i, :m, 0] = np.where(leaf, own, left)
            child_nodes[i, :m, 1] = np.where(leaf, own, right)
            value = np.asarray(value, np.float64)
            probs[i, :m] = value / np.clip(value.sum(1, keepdims=True), 1e-12, None)
            depth = max(depth, _tree_depth(left, right))
        device = self.feature.device
        self.feature = torch.from_numpy(feature).to(device)
        self.threshold = torch.from_numpy(threshold).to(device)
        self.child_nodes = torch.from_numpy(child_nodes).to(device)
        self.leaf_probs = torch.from_numpy(probs).to(device)
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        """Class probabilities (P, K) of feature rows ``x`` (P, num_features)."""
        P = x.shape[0]
        if self.num_trees == 0:
            return x.new_full((P, self.num_classes), 1.0 / self.num_classes)
        leaves = self._compiled_leaves(x)
        if leaves is not None:
            T, N = self.feature.shape
            probs = self.leaf_probs.reshape(T * N, -1).index_select(0, leaves)
            return probs.view(T, P, -1).mean(0)
        return self._walk(x)

    def _compiled_leaves(self, x: Tensor) -> Tensor | None:
        """Flat leaf indices (T * P) of every (tree, row), by scikit-learn's compiled walk;
        ``None`` where it does not apply (a GPU, autograd, no scikit-learn)."""
        if x.device.type != "cpu" or self.feature.device.type != "cpu" or x.requires_grad:
            return None
        trees = self._sklearn_trees()
        if trees is None:
            return None
        rows = x.detach().to(torch.float32).contiguous().numpy()
        N = self.feature.shape[1]
        leaves = np.empty((len(trees), rows.shape[0]), np.int64)
        for t, tree in enumerate(trees):
            leaves[t] = tree.apply(rows) + t * N
        return torch.from_numpy(leaves.reshape(-1))

    def _sklearn_trees(self) -> list | None:
        """scikit-learn ``Tree`` objects of the current tables, rebuilt when they change."""
        key = tuple((id(b), b._version) for b in (self.feature, self.threshold,
                                                  self.child_nodes))
        if self._compiled is not None and self._compiled[0] == key:
            return self._compiled[1]
        try:
            trees = _to_sklearn(self.feature.numpy(), self.threshold.numpy(),
                                self.child_nodes.numpy(), self.num_features, self.depth)
        except Exception:  # noqa: BLE001 - no scikit-learn, or its private Tree changed
            trees = None
        self._compiled = (key, trees)
        return trees

    def _walk(self, x: Tensor) -> Tensor:
        """The torch walk: any device, any dtype."""
        P = x.shape[0]
        T, N = self.feature.shape
        dev = x.device
        # every (tree, sample) as one flat walk over one node table of all trees, on int32
        # indices: 1-D index_select is several times faster than gathers over (T, P) int64
        # tensors on a CPU (benchmarks/bench_forest.py)
        small = x.numel() < 2**31 and T * N * 2 < 2**31
        i32 = torch.int32 if small else torch.int64
        offsets = (torch.arange(T, device=dev, dtype=i32) * N)[:, None]
        feature = self.feature.reshape(-1).to(i32)
        threshold = self.threshold.reshape(-1)
        children = (self.child_nodes.to(i32) + offsets[..., None]).reshape(-1)
        node = offsets.expand(T, P).reshape(-1).clone()
        cells = torch.arange(P, device=dev, dtype=i32).repeat(T) * x.shape[1]
        values = x.float().reshape(-1)
        for _ in range(self.depth):
            value = values.index_select(0, cells + feature.index_select(0, node))
            right = (value > threshold.index_select(0, node)).to(i32)
            node = children.index_select(0, node * 2 + right)
        probs = self.leaf_probs.reshape(T * N, -1).index_select(0, node).view(T, P, -1)
        return probs.mean(0)

    def log_probs(self, features: Tensor, floor: float = 1e-4) -> Tensor:
        """Log class probabilities (B, K, H, W) of a feature map (B, F, H, W) whose channels
        are the columns the trees were grown on, floored so an unseen class stays finite."""
        B, _, H, W = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(B * H * W, -1)
        probs = self(rows).reshape(B, H, W, -1).permute(0, 3, 1, 2)
        return torch.log(probs.clamp_min(floor))


def _to_sklearn(feature: np.ndarray, threshold: np.ndarray, children: np.ndarray,
                num_features: int, depth: int) -> list:
    """One scikit-learn ``Tree`` per row of the padded tables (only ``apply`` is used: the
    node values are dummies).  Padding rows (both children 0) become leaves."""
    from sklearn.tree._tree import NODE_DTYPE, Tree

    N = feature.shape[1]
    own = np.arange(N)
    trees = []
    for f, thr, ch in zip(feature, threshold, children):
        left, right = ch[:, 0].astype(np.int64), ch[:, 1].astype(np.int64)
        leaf = (left == own) | (left == right)
        nodes = np.zeros(N, dtype=NODE_DTYPE)
        nodes["left_child"] = np.where(leaf, -1, left)
        nodes["right_child"] = np.where(leaf, -1, right)
        nodes["feature"] = np.where(leaf, -2, f)
        # the torch walk goes right when x > threshold (float32): the same comparison
        nodes["threshold"] = np.where(leaf, -2.0, thr.astype(np.float64))
        nodes["n_node_samples"] = 1
        nodes["weighted_n_node_samples"] = 1.0
        tree = Tree(num_features, np.array([1], dtype=np.intp), 1)
        tree.__setstate__({"max_depth": max(1, depth), "node_count": N, "nodes": nodes,
                           "values": np.zeros((N, 1, 1))})
        trees.append(tree)
    return trees


def _tree_depth(left: np.ndarray, right: np.ndarray) -> int:
    """Edges on the longest root-to-leaf path."""
    depth = np.zeros(len(left), np.int64)
    deepest = 0
    for i in range(len(left)):  # sklearn numbers a parent before its children
        if left[i] >= 0:
            depth[left[i]] = depth[right[i]] = depth[i] + 1
            deepest = max(deepest, depth[i] + 1)
    return int(deepest)
