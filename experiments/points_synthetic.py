"""Point detection + classification with context on the Synthetic rings (issue 15).

A cell's class (outer / inner) depends only on the ring band it lies in, which only coarse
context shows. This trains point detectors through the CLI (``napari-muvit train --points``)
on the cell centres of one 2048² synthetic image (a field of 4×4 ring systems of 512², the
layout of ``experiments/synthetic_table4.py``), predicts another 2048² image through the CLI
(``napari-muvit predict --out PRED.csv``) and scores mean class F1 (6 px matching):
MuViT[1,4] vs MuViT[1] vs MuViT[1,4] with naive bboxes.

    python experiments/points_synthetic.py --out experiments/runs/points_syn --steps 1500
    python experiments/points_synthetic.py --out experiments/runs/points_syn_defaults --defaults \
        --variants muvit14,muvit1 --parallel 2 --json docs/data/points_synthetic_defaults.json
    python experiments/points_synthetic.py --out experiments/runs/points_syn_pl \
        --variants muvit14 --region 0,0,1024,1024 --pseudo both   # consistency loss on / off

Results: ``docs/data/points_synthetic.json`` (and the ``_pretrained`` / ``_typeloss`` variants:
the shared-softmax head; ``points_synthetic_separate_*.json``: the separate type head, today's
default) and docs/results.md. ``--extra "--type-head shared"`` repeats the shared-head runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

VARIANTS = {
    "muvit141": dict(levels="1,4,16", naive=False, label="MuViT[1,4,16]"),
    "muvit14": dict(levels="1,4", naive=False, label="MuViT[1,4]"),
    "muvit1": dict(levels="1", naive=False, label="MuViT[1]"),
    "naive": dict(levels="1,4", naive=True, label="MuViT[1,4] (naive bboxes)"),
}
TRAIN_SEED, TEST_SEED = 0, 1000
SYSTEM, GRID = 512, 4  # 4 × 4 systems of 512² = one 2048² image
RADIUS = 6.0
# Scored region of the 2048² test image (set by --eval-region; None = the whole image)
EVAL_REGION: str | None = None


def make_image(folder: Path, seed: int) -> tuple[Path, Path]:
    """A 2048² field as .npy and its cell centres (``y,x,class``) as CSV."""
    from scipy import ndimage

    from napari_muvit.data import synthetic_field
    from napari_muvit.data.points_io import points_from_labels, write_points_csv

    folder.mkdir(parents=True, exist_ok=True)
    img, pts = folder / f"field_{seed}.npy", folder / f"field_{seed}_cells.csv"
    if not pts.exists():
        syn = synthetic_field(grid=GRID, system_size=SYSTEM, seed=seed)
        instances, _ = ndimage.label(syn.labels > 0)
        np.save(img, syn.image)
        write_points_csv(pts, points_from_labels(instances, syn.labels))
    return img, pts


def initial_encoder(folder: Path, levels: str, args: argparse.Namespace) -> Path:
    """A random encoder of the CPU-scale size (D=128, 4 layers) for ``--init``."""
    import torch

    from napari_muvit.model import MuViTEncoder, load_encoder

    if args.init_from is not None:
        # a pretrained encoder, restricted to the variant's levels (same weights for all)
        enc = load_encoder(args.init_from).select_levels([float(v) for v in levels.split(",")])
        enc.meta = {"crop_size": args.crop}
        enc.save(folder, overwrite=True)
        return folder
    torch.manual_seed(args.seed)
    enc = MuViTEncoder(1, [float(v) for v in levels.split(",")], patch_size=8, dim=args.dim,
                       num_layers=args.layers, heads=4)
    enc.meta = {"crop_size": args.crop}
    enc.save(folder, overwrite=True)
    return folder


def cli(argv: list[str]) -> float:
    t0 = time.perf_counter()
    print("$ napari-muvit", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "napari_muvit", *argv], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def run_variant(name: str, pseudo: bool, train: tuple[Path, Path], test: tuple[Path, Path],
                out: Path, args: argparse.Namespace) -> dict:
    v = VARIANTS[name]
    tag = f"{name}_{'pl' if pseudo else 'nopl'}"
    model = out / tag
    if args.eval_only:
        return evaluate_model(model, v, pseudo, test, out, tag)
    init = out / f"{name}_init"  # written by main() before the runs start
    if args.defaults:
        # what a user types: the bundled start and every training default, only the levels
        argv = ["train", str(train[0]), "--points", str(train[1]), "--out", str(model),
                "--levels", v["levels"], "--overwrite", "--quiet"]
        train_s = cli(argv)
        score = evaluate_model(model, v, pseudo, test, out, tag)
        score["train_seconds"] = round(train_s, 1)
        return score
    argv = ["train", str(train[0]), "--points", str(train[1]), "--out", str(model),
            "--init", str(init), "--levels", v["levels"], "--crop", str(args.crop),
            "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
            "--encoder-lr-factor", "1.0", "--seed", str(args.seed), "--overwrite", "--quiet",
            "--pseudo-labels" if pseudo else "--no-pseudo-labels"]
    if args.region:
        argv += ["--region", args.region]
    argv += args.extra.split()
    if v["naive"]:
        argv.append("--naive-bbox")
    train_s = cli(argv)
    score = evaluate_model(model, v, pseudo, test, out, tag)
    score["train_seconds"] = round(train_s, 1)
    return score


def evaluate_model(model: Path, v: dict, pseudo: bool, test: tuple[Path, Path], out: Path,
                   tag: str) -> dict:
    """Predict the test image with the (possibly stopped early) model through the CLI; score."""
    pred = out / f"{tag}_pred.csv"
    region = ["--region", EVAL_REGION] if EVAL_REGION else []
    predict_s = cli(["predict", str(test[0]), "--model", str(model), "--out", str(pred),
                     "--overwrite", "--quiet", "--batch", "16", *region])
    score = evaluate(pred, test[1], EVAL_REGION)
    history = json.loads((model / "history.json").read_text())
    score.update(variant=v["label"], pseudo_labels=pseudo, steps_trained=history["step"],
                 status=history["status"], predict_seconds=round(predict_s, 1))
    print(json.dumps(score), flush=True)
    return score


def evaluate(pred_csv: Path, truth_csv: Path, region: str | None = None) -> dict:
    """Class F1 of the predicted points against the true cell centres (inside ``region``:
    the true points whose pixel lies in it, all predictions, which were made for it only)."""
    from napari_muvit.data.points_io import read_points
    from napari_muvit.metrics import point_f1

    truth = read_points(truth_csv)
    true_yx, true_cls = truth.yx, truth.classes
    if region:
        y0, x0, y1, x1 = (float(v) for v in region.split(","))
        inside = truth.in_region([[y0, x0], [y1, x1]])
        true_yx, true_cls = true_yx[inside], true_cls[inside]
    rows = np.loadtxt(pred_csv, delimiter=",", skiprows=1, ndmin=2)
    pred_yx = rows[:, :2] if len(rows) else np.zeros((0, 2))
    pred_cls = rows[:, 2].astype(int) if len(rows) else np.zeros(0, int)
    s = point_f1(pred_yx, pred_cls, true_yx, true_cls, RADIUS, classes=[1, 2])
    return {
        "mean_class_f1": round(s["mean_f1"], 4),
        "f1_outer": round(s["classes"][1]["f1"], 4),
        "f1_inner": round(s["classes"][2]["f1"], 4),
        "detection_f1": round(s["detection"]["f1"], 4),
        "n_pred": int(len(pred_yx)),
        "n_true": int(len(true_yx)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="muvit14,muvit1,naive")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--region", default=None, help="annotated rectangle of the training image")
    p.add_argument("--pseudo", choices=("off", "on", "both"), default="off")
    p.add_argument("--parallel", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--eval-only", action="store_true",
                   help="only predict + score the models already in --out (e.g. runs stopped "
                        "with Ctrl-C: their last checkpoint)")
    p.add_argument("--extra", default="", help="extra train options, e.g. '--stride 1'")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start every variant from this model's encoder (select_levels) instead "
                        "of a random one, e.g. the bundled segmenter")
    p.add_argument("--eval-region", default=None, metavar="Y0,X0,Y1,X1",
                   help="predict and score only this box of the test image (CPU budget)")
    p.add_argument("--defaults", action="store_true",
                   help="train with the CLI's defaults (bundled start, steps, lr, head) and "
                        "only --levels; ignores --steps/--batch/--crop/--lr/--init-from")
    args = p.parse_args()
    global EVAL_REGION
    EVAL_REGION = args.eval_region
    args.out.mkdir(parents=True, exist_ok=True)
    train = make_image(args.out / "data", TRAIN_SEED)
    test = make_image(args.out / "data", TEST_SEED)
    pseudo = {"off": [False], "on": [True], "both": [False, True]}[args.pseudo]
    runs = [(v, pl) for v in args.variants.split(",") if v for pl in pseudo]
    if not args.eval_only and not args.defaults:
        # once per variant, before the parallel runs (with/without pseudo-labels share it)
        for name in dict.fromkeys(v for v, _ in runs):
            initial_encoder(args.out / f"{name}_init", VARIANTS[name]["levels"], args)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda r: run_variant(*r, train, test, args.out, args), runs))
    load = os.getloadavg()
    summary = {"script": "experiments/points_synthetic.py", "command": " ".join(sys.argv), "radius_px": RADIUS, "steps": args.steps,
               "region": args.region, "eval_region": args.eval_region, "load_average": [round(v, 2) for v in load],
               "results": results}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
