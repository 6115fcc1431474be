"""Which features let the detector's type forest tell the cells' rings apart (issue 15)?

The forest type head (``type_classifier: forest``) is fitted on the grid locations around the
clicked cell centres of one 2048² synthetic field (seed 0) by the point trainer itself, then
scored on the same kind of locations around the true centres of another field (seed 1000):
the class alone (detection is assumed; it is measured end to end in
``experiments/points_synthetic.py``). Per variant: the encoder's levels, the filter scales
(``type_sigmas``) and the ring profile of the coarsest level (``type_rings``).

    python experiments/points_type_forest.py --json docs/data/points_type_forest.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from points_synthetic import GRID, SYSTEM  # noqa: E402  (a sibling script)

SMALL_SIGMAS = [0.7, 1.6, 3.5, 5.0]
LARGE_SIGMAS = [0.7, 1.6, 3.5, 5.0, 10.0, 20.0, 32.0]
RINGS = [6.0, 12.0, 18.0, 24.0]
VARIANTS = [
    ("1", SMALL_SIGMAS, []), ("1", LARGE_SIGMAS, []), ("1", LARGE_SIGMAS, RINGS),
    ("1,4", SMALL_SIGMAS, []), ("1,4", LARGE_SIGMAS, []), ("1,4", LARGE_SIGMAS, RINGS),
    ("1,4,16", SMALL_SIGMAS, []), ("1,4,16", LARGE_SIGMAS, []), ("1,4,16", LARGE_SIGMAS, RINGS),
]


def field(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    from napari_muvit.data import synthetic_field
    from napari_muvit.data.points_io import points_from_labels

    syn = synthetic_field(grid=GRID, system_size=SYSTEM, seed=seed)
    instances, _ = ndimage.label(syn.labels > 0)
    table = points_from_labels(instances, syn.labels)
    return syn.image, np.c_[table.yx, table.classes]


def macro_f1(pred: np.ndarray, truth: np.ndarray) -> tuple[list[float], float]:
    f1 = [float(2 * ((pred == k) & (truth == k)).sum() / max((pred == k).sum() + (truth == k).sum(), 1))
          for k in np.unique(truth)]
    return f1, float(np.mean(f1))


def run(levels: str, sigmas: list[float], rings: list[float], train, test) -> dict:
    from napari_muvit.data import open_image
    from napari_muvit.data.points_io import PointRaster
    from napari_muvit.engine.points import PointTrainer, as_point_table
    from napari_muvit.engine.trainer import TrainConfig, prepare_start_model

    encoder, _ = prepare_start_model(levels=levels)
    t0 = time.perf_counter()
    trainer = PointTrainer(
        encoder, [(train[0], as_point_table(train[1]), None)], TrainConfig(steps=1),
        head_options={"type_sigmas": sigmas, "type_rings": rings},
    )
    fit_s = time.perf_counter() - t0
    source = trainer.pairs[0][0]
    test_source = open_image(test[0])
    test_source.normalization = source.normalization
    table = as_point_table(test[1])
    trainer.pairs = [(test_source, PointRaster(table, test_source.shape))]
    rows, types, _ = trainer._type_rows()
    head = trainer.model.head
    with torch.no_grad():
        logits = head.type_forest.forest.log_probs(torch.from_numpy(rows)[:, :, None, None])
    pred = logits[:, :, 0, 0].argmax(1).numpy()
    f1, mean = macro_f1(pred, types)
    return {"levels": levels, "type_sigmas": sigmas, "type_rings": rings,
            "features": int(rows.shape[1]), "test_locations": int(len(types)),
            "outer_f1": round(f1[0], 3), "inner_f1": round(f1[1], 3),
            "mean_class_f1": round(mean, 3), "fit_seconds": round(fit_s, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--only", type=int, nargs="*", help="indices of VARIANTS to run")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = field(0), field(1000)
    rows = []
    for i, variant in enumerate(VARIANTS):
        if args.only and i not in args.only:
            continue
        rows.append(run(*variant, train, test))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "script": "experiments/points_type_forest.py",
            "command": "python experiments/points_type_forest.py " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
