"""The trainer's crop dataset: :class:`NestedCropDataset` with anchors from the live label index.

A module-level class (not one defined inside a function) so that DataLoader workers can unpickle
it where Python *spawns* them (macOS, Windows, ``multiprocessing_context="spawn"``).  It lives in
its own module so that importing :mod:`napari_muvit.engine.trainer` does not import the sampler's
dependencies.  The data package's sampler does everything else (nested bboxes, reading, targets
through the label mapping, augmentations); only the choice of the anchor pixel is replaced, so
that newly painted pixels are used without rebuilding the dataset.
"""

from __future__ import annotations

import numpy as np

from napari_muvit.data.sampler import NestedCropDataset


class AnchoredCrops(NestedCropDataset):
    """Crops anchored, with probability ``anchor_prob``, on painted pixels (classes balanced)."""

    # per class index: [(source index, (N, 2) points)], set by Trainer._refresh_anchors
    anchor_table: list[list[tuple[int, np.ndarray]]]

    def _anchor(self, rng: np.random.Generator) -> tuple[int, tuple[int, int] | None]:
        table = getattr(self, "anchor_table", None)
        if table and rng.random() < self.anchor_prob:
            per_class = table[int(rng.integers(len(table)))]  # balance classes
            counts = np.array([len(p) for _, p in per_class], dtype=np.float64)
            j = int(rng.choice(len(per_class), p=counts / counts.sum()))
            src, points = per_class[j]
            y, x = points[int(rng.integers(len(points)))]
            return src, (int(y), int(x))
        return int(rng.choice(len(self.sources), p=self._area_probs)), None
