"""Which point head: heatmap + local maxima, or MUSE-style per-location offset regression?

Same data as ``experiments/points_nuclei.py`` (StarDist's 2-D DSB nuclei image: train on the
centroids of the left half, score the right half), same start (the bundled encoder, levels
[1, 4]), same steps and seed; only the head differs:

* ``heatmap``: per-pixel background/type softmax, no offsets; a point is a local maximum of
  the foreground score (``stride=1, offsets=False``);
* ``pixel-offsets``: the same per-pixel maps, every location near a nucleus also regresses the
  offset to it (``stride=1, offsets=True``; the project's default);
* ``grid4-offsets``: MUSE/P2PNet-style: one location per 4×4 cell regresses its nucleus'
  offset (``stride=4, offsets=True``).

``pixel-offsets+pseudo`` adds MUSE's consistency loss on the unannotated half.
Reported: detection F1 at 5 px and 3 px and the mean localisation error of matched points.

    python experiments/points_head_choice.py --data /tmp/sd/stardist/data/images --out experiments/runs/points_head --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from points_nuclei import SPLIT_X, find_data, prepare  # noqa: E402

HEADS = {
    "heatmap": {"stride": 1, "offsets": False},
    "pixel-offsets": {"stride": 1, "offsets": True},
    "grid4-offsets": {"stride": 4, "offsets": True},
}
# the same run with MUSE's consistency loss on the unannotated right half (an EMA teacher's
# confident predictions; semi-supervised on the same image, as in MUSE's fine-tuning)
VARIANTS = {**{k: (k, False) for k in HEADS}, "pixel-offsets+pseudo": ("pixel-offsets", True)}


def run(name: str, image: Path, points: Path, test_yx: np.ndarray, args) -> dict:
    import torch

    from napari_muvit.engine.points import predict_points, train_points
    from napari_muvit.engine.trainer import TrainConfig
    from napari_muvit.metrics import detection_f1, match_points

    torch.set_num_threads(1)
    head, pseudo = VARIANTS[name]
    cfg = TrainConfig(steps=args.steps, batch_size=8, crop_size=64, lr=5e-4, seed=0,
                      device="cpu", pseudo_labels=pseudo)
    t0 = time.perf_counter()
    det = train_points(image, points, levels="1,4", config=cfg, regions=[f"0,0,512,{SPLIT_X}"],
                       head_options=HEADS[head])
    train_s = time.perf_counter() - t0
    table = predict_points(image, det, device="cpu")
    yx = np.stack([table["y"], table["x"]], 1)
    yx = yx[yx[:, 1] >= SPLIT_X - 0.5]
    out = {"variant": name, **HEADS[head], "pseudo_labels": pseudo,
           "train_seconds": round(train_s, 1)}
    for r in (5.0, 3.0):
        out[f"detection_f1_{r:g}px"] = round(detection_f1(yx, test_yx, r)["f1"], 4)
    pi, ti = match_points(yx, test_yx, 5.0)
    out["mean_localisation_error_px"] = round(float(np.linalg.norm(yx[pi] - test_yx[ti], axis=1).mean()), 3) if len(pi) else None
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--heads", default=",".join(VARIANTS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    image, points, test_yx, _ = prepare(find_data(args.data), args.out)
    from concurrent.futures import ProcessPoolExecutor

    names = [h for h in args.heads.split(",") if h]
    with ProcessPoolExecutor(len(names)) as pool:
        results = list(pool.map(run, names, [image] * len(names), [points] * len(names),
                                [test_yx] * len(names), [args] * len(names)))
    summary = {"script": "experiments/points_head_choice.py", "command": " ".join(sys.argv), "steps": args.steps, "results": results,
               "load_average": [round(v, 2) for v in os.getloadavg()]}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
