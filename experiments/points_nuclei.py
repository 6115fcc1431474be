"""Nucleus detection F1 on a real fluorescence image (issue 15 acceptance).

Data: the 2-D nuclei test image that ships with the StarDist package (``img2d.tif`` and its
instance mask ``mask2d.tif``, 512², a crop from the 2018 Data Science Bowl, stage 1 training
set: Caicedo et al., Nature Methods 16, 2019; StarDist is BSD-3-Clause). Nothing of it is
stored in this repository; get it offline-friendly with::

    pip download stardist==0.9.2 --no-deps -d /tmp/sd && cd /tmp/sd && unzip -o stardist-*.whl 'stardist/data/*'

The nucleus centroids of the left half (x < 256) are the training points, the left half is the
annotated region (``--region 0,0,512,256``); the detector is trained through the CLI and
predicts the whole image through the CLI; F1 (5 px, one-to-one Hungarian matching) is scored
on the right half against the centroids there.

    python experiments/points_nuclei.py --data /tmp/sd/stardist/data/images --out experiments/runs/points_nuclei
    python experiments/points_nuclei.py --defaults --out experiments/runs/points_nuclei_defaults \
        --json docs/data/points_nuclei_defaults.json      # what a user types
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RADIUS = 5.0
SPLIT_X = 256


def find_data(folder: Path | None) -> Path:
    if folder is None:
        import importlib.util

        # located, not imported: stardist itself needs csbdeep and tensorflow
        spec = importlib.util.find_spec("stardist")
        if spec is not None and spec.origin:
            folder = Path(spec.origin).parent / "data" / "images"
        else:
            raise SystemExit("pass --data DIR holding img2d.tif and mask2d.tif (see the docstring)") from None
    if not (folder / "img2d.tif").is_file() or not (folder / "mask2d.tif").is_file():
        raise SystemExit(f"{folder}: expected img2d.tif and mask2d.tif (see the docstring)")
    return folder


def prepare(data: Path, out: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    import tifffile

    from napari_muvit.data.points_io import points_from_labels, write_points_csv

    out.mkdir(parents=True, exist_ok=True)
    img = tifffile.imread(data / "img2d.tif")
    mask = tifffile.imread(data / "mask2d.tif")
    table = points_from_labels(mask)
    left = table.yx[:, 1] < SPLIT_X - 0.5
    np.save(out / "img2d.npy", img)
    train = type(table)(table.yx[left], table.classes[left], {}, "train")
    write_points_csv(out / "train_points.csv", train)
    return out / "img2d.npy", out / "train_points.csv", table.yx[~left], table.yx[left]


def cli(argv: list[str]) -> float:
    t0 = time.perf_counter()
    print("$ napari-muvit", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "napari_muvit", *argv], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return time.perf_counter() - t0


def score(pred_csv: Path, truth: np.ndarray, right: bool = True) -> dict:
    from napari_muvit.metrics import detection_f1, match_points

    rows = np.loadtxt(pred_csv, delimiter=",", skiprows=1, ndmin=2)
    yx = rows[:, :2] if len(rows) else np.zeros((0, 2))
    side = yx[:, 1] >= SPLIT_X - 0.5 if right else yx[:, 1] < SPLIT_X - 0.5
    yx = yx[side]
    s = detection_f1(yx, truth, RADIUS)
    pi, ti = match_points(yx, truth, RADIUS)
    err = np.linalg.norm(yx[pi] - truth[ti], axis=1) if len(pi) else np.zeros(0)
    s["mean_localisation_error_px"] = round(float(err.mean()), 3) if len(err) else None
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--levels", default="1,4")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--extra", default="", help="extra train options, e.g. '--pseudo-labels'")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--defaults", action="store_true",
                   help="the CLI's defaults (bundled start, steps, lr, crop, batch, levels): "
                        "only the points and the annotated region are given")
    args = p.parse_args()
    image, train_csv, test_yx, train_yx = prepare(find_data(args.data), args.out)
    model = args.out / "model"
    argv = ["train", str(image), "--points", str(train_csv), "--out", str(model),
            "--region", f"0,0,512,{SPLIT_X}", "--overwrite", "--quiet"]
    if not args.defaults:
        argv += ["--levels", args.levels, "--crop", str(args.crop), "--steps", str(args.steps),
                 "--batch", str(args.batch), "--lr", str(args.lr)]
    train_s = cli([*argv, *args.extra.split()])
    pred = args.out / "pred.csv"
    pred_s = cli(["predict", str(image), "--model", str(model), "--out", str(pred),
                  "--overwrite", "--quiet"])
    result = {
        "script": "experiments/points_nuclei.py",
        "command": " ".join(sys.argv),
        "image": "StarDist img2d.tif (DSB 2018), 512x512; train: left half, test: right half",
        "n_train_points": int(len(train_yx)),
        "n_test_points": int(len(test_yx)),
        "radius_px": RADIUS,
        "steps": None if args.defaults else args.steps,
        "test_right_half": score(pred, test_yx, right=True),
        "train_left_half": score(pred, train_yx, right=False),
        "train_seconds": round(train_s, 1),
        "predict_seconds": round(pred_s, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
