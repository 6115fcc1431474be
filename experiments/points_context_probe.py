"""Do the encoder's features carry a cell's context class? A linear probe (issue 15).

Before blaming the encoder or the point head for a detector that finds cells but not their
classes, ask the frozen encoder: for every cell centre of one 2048² synthetic ring field
(``experiments/points_synthetic.py``'s data: the class is outer / inner ring, which only the
coarse context shows), a 64² level-1 crop with the cell at a random position, nested crops of
the other levels around it; the features at the cell centre are

* ``level1_token``: the last layer's level-1 token map, bilinearly upsampled to the cell;
* ``coarse_context``: the final tokens of the coarser levels sampled at the cell's world
  position (:func:`napari_muvit.model.heads.level_tokens_at`, what the separate type head of a
  point detector sees besides the decoder).

A logistic regression fitted on the training field's cells is scored on the test field's
(macro F1 over the two classes). MuViT[1] is the same encoder restricted to level 1
(``select_levels``).

    python experiments/points_context_probe.py --out experiments/runs/points_probe \\
        --init-from src/napari_muvit/weights/default_segmenter \\
        --json docs/data/points_context_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cell_features(encoder, image: Path, points: Path, normalization, crop: int, seed: int):
    """Features at every cell centre: ``(level1_token, coarse_context or None, classes)``."""
    import torch
    import torch.nn.functional as F

    from napari_muvit.data import open_image
    from napari_muvit.data.geometry import centered_nested_bboxes
    from napari_muvit.data.points_io import read_points
    from napari_muvit.model.heads import level_tokens_at
    from napari_muvit.model.segmenter import level1_skip_maps

    source = open_image(np.load(image))
    source.normalization = normalization
    table = read_points(points)
    levels = encoder.levels
    rng = np.random.default_rng(seed)
    fine, context = [], []
    for i in range(0, len(table.yx), 32):
        crops, boxes, at = [], [], []
        for y, x in table.yx[i : i + 32]:
            origin = np.floor([y, x]).astype(int) - rng.integers(4, crop - 4, 2)
            bb = centered_nested_bboxes(origin, crop, levels)
            crops.append(source.read_nested(bb, levels, crop)[0])
            boxes.append(bb)
            at.append((int(round(y - origin[0])), int(round(x - origin[1]))))
        x_t = encoder.check_input(torch.from_numpy(np.stack(crops)))
        with torch.no_grad():
            maps, tokens, coords = level1_skip_maps(
                encoder, x_t, torch.from_numpy(np.stack(boxes)), [encoder.num_layers - 1]
            )
            up = F.interpolate(maps[0], size=(crop, crop), mode="bilinear", align_corners=False)
            ctx = (level_tokens_at(tokens, coords, len(levels), encoder.patch_size, (crop, crop))
                   if len(levels) > 1 else None)
        for j, (py, px) in enumerate(at):
            fine.append(up[j, :, py, px].numpy())
            if ctx is not None:
                context.append(ctx[j, :, py, px].numpy())
    return np.array(fine), (np.array(context) if context else None), table.classes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the synthetic images")
    p.add_argument("--init-from", type=Path, required=True, help="model folder of the encoder")
    p.add_argument("--levels", default="1,4", help="levels of the probed encoder (select_levels)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from napari_muvit.model import load_model
    from points_synthetic import TEST_SEED, TRAIN_SEED, make_image

    torch.set_num_threads(1)
    model = load_model(args.init_from)
    levels = [float(v) for v in args.levels.split(",")]
    encoder = getattr(model, "encoder", model).eval().select_levels(levels)
    norm = getattr(model, "normalization", None)
    train = make_image(args.out / "data", TRAIN_SEED)
    test = make_image(args.out / "data", TEST_SEED)
    results = {}
    t0 = time.perf_counter()
    label = "MuViT[" + ",".join(f"{v:g}" for v in levels) + "]"
    for name, enc in ((label, encoder), ("MuViT[1]", encoder.select_levels([1.0]))):
        tr = cell_features(enc, *train, norm, args.crop, TRAIN_SEED)
        te = cell_features(enc, *test, norm, args.crop, TEST_SEED)
        for feature, k in (("level1_token", 0), ("coarse_context", 1)):
            if tr[k] is None:
                continue
            clf = LogisticRegression(max_iter=2000).fit(tr[k], tr[2])
            pred = clf.predict(te[k])
            results[f"{name} {feature}"] = {
                "train_accuracy": round(float(clf.score(tr[k], tr[2])), 4),
                "test_accuracy": round(float((pred == te[2]).mean()), 4),
                "test_macro_f1": round(float(f1_score(te[2], pred, average="macro")), 4),
            }
            print(name, feature, results[f"{name} {feature}"], flush=True)
    summary = {
        "script": "experiments/points_context_probe.py",
        "command": " ".join(["python", *sys.argv]),
        "init_from": str(args.init_from),
        "levels": levels,
        "cells": {"train": int(len(tr[2])), "test": int(len(te[2])),
                  "test_per_class": np.bincount(te[2])[1:].tolist()},
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
