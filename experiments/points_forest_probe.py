"""Probe (issue 15): can the forest pixel head's filter bank classify cells by their ring?

The detector finds the cells of the Synthetic rings (detection F1 0.99-1.00) but its class by
context is learnt only from an encoder that already knows the task. This probe asks whether
the quick head's features would do it in seconds: a random forest on the filter bank of every
level's crop (``PixelHead(bank="levels")``, as ``napari-muvit train`` fits for segmentation),
fitted at the true cell centres of one 2048² field (seed 0) and scored at the true centres of
another (seed 1000): per-class F1 of the class alone (detection is assumed perfect), for the
bundled encoder's levels restricted to (1,), (1, 4) and all of them (1, 4, 16).

    python experiments/points_forest_probe.py --json docs/data/points_forest_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.ensemble import RandomForestClassifier

from napari_muvit.data import PyramidSource, synthetic_field
from napari_muvit.data.points_io import points_from_labels
from napari_muvit.engine._models import new_segmenter
from napari_muvit.engine.quicktrain import collect_features
from napari_muvit.engine.trainer import prepare_start_model


def centres(seed: int) -> tuple[PyramidSource, np.ndarray, np.ndarray]:
    syn = synthetic_field(grid=4, system_size=512, seed=seed)
    instances, _ = ndimage.label(syn.labels > 0)
    table = points_from_labels(instances, syn.labels)
    return PyramidSource(list(syn.pyramid)), np.round(table.yx).astype(np.int64), table.classes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = centres(0), centres(1000)
    rows = []
    for levels in ("1", "1,4", None):
        encoder, _ = prepare_start_model(levels=levels)
        head = new_segmenter(encoder, [1, 2], "pixel", None, None, False).eval()
        tile = int(encoder.meta.get("crop_size", 64))
        feats = [collect_features(head, src, yx, tile) for src, yx, _ in (train, test)]
        forest = RandomForestClassifier(100, class_weight="balanced", random_state=0)
        predicted = forest.fit(feats[0], train[2]).predict(feats[1])
        truth = test[2]
        f1 = [float(2 * ((predicted == k) & (truth == k)).sum()
                    / ((predicted == k).sum() + (truth == k).sum())) for k in (1, 2)]
        row = {"levels": list(head.levels), "outer_f1": round(f1[0], 3),
               "inner_f1": round(f1[1], 3), "mean_class_f1": round(float(np.mean(f1)), 3),
               "train_points": int(len(train[2])), "test_points": int(len(truth))}
        rows.append(row)
        print(row, flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "script": "experiments/points_forest_probe.py",
            "command": "python experiments/points_forest_probe.py " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
