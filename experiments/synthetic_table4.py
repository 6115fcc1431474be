"""Reproduce the paper's Synthetic experiment (MuViT main text 4.4, Table 4; supplement Fig. S3).

Trains MuViT[1,4], MuViT[1] and MuViT[1,4] with naive bboxes through the project's own CLI
(``napari-muvit train``), then predicts held-out ring systems tile by tile over whole images
with the prediction engine and reports per-class Dice and mDSC (outer, inner) — Table 4.
Optionally: robustness to Gaussian bbox noise at inference (``--noise``) and MAE pre-training
followed by fine-tuning (``--mae``).

CPU scale (this repository's default): ring systems of 512² (the generator scales rings with
the image), level-1 crops 64², levels [1, 4], the ``small`` preset (D=192, 4 layers). The
crop/image ratio is the paper's 256²-in-2048² scaled by ¼. Paper scale: ``--scale paper``
(2048² systems, crops 256², D=512, 12 layers) — for a GPU.

    python experiments/synthetic_table4.py --out experiments/runs/cpu
    python experiments/synthetic_table4.py --out experiments/runs/cpu --noise 0,8,16,32,64
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

SCALES = {
    # ring-system size, crop, encoder width/depth/heads, UNETR width, steps, batch, head lr,
    # encoder lr factor (from scratch the encoder needs more than the fine-tuning 0.1×)
    "cpu": dict(system=512, crop=64, dim=128, layers=4, heads=4, head_dim=32, steps=800, batch=8,
                lr=1e-3, enc_factor=0.3),
    "paper": dict(system=2048, crop=256, dim=512, layers=12, heads=8, head_dim=256, steps=20000,
                  batch=16, lr=1e-4, enc_factor=0.1),
}
VARIANTS = {
    "muvit14": dict(levels="1,4", naive=False, label="MuViT[1,4]+UNETR"),
    "muvit1": dict(levels="1", naive=False, label="MuViT[1]+UNETR"),
    "naive": dict(levels="1,4", naive=True, label="MuViT[1,4]+UNETR (naive)"),
}
PAPER = {
    "MuViT[1]+UNETR": (0.5391, 0.4615, 0.5003),
    "MuViT[1,4]+UNETR (naive)": (0.4662, 0.3065, 0.3864),
    "MuViT[1,4]+UNETR": (0.9499, 0.9577, 0.9538),
}
# Training and test images are fields of 2×2 ring systems (synthetic_field), the layout of the
# napari sample: isolated systems would let the model use the zero padding past the image
# border as a cue, which fails on fields where neighbouring systems fill the context.
TRAIN_SEEDS = range(3)  # 3 fields × 4 systems
TEST_SEED = 1000  # a field of 2×2 held-out systems (seeds never used in training)


def make_training_data(folder: Path, system: int) -> tuple[list[Path], list[Path]]:
    """One .npy image + ground-truth labels per training field."""
    from napari_muvit.data import synthetic_field

    folder.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for seed in TRAIN_SEEDS:
        img, lab = folder / f"train_{seed}.npy", folder / f"train_{seed}_labels.npy"
        if not img.exists():
            syn = synthetic_field(grid=2, system_size=system, seed=seed)
            np.save(lab, syn.labels)
            np.save(img, syn.image)
        images.append(img)
        labels.append(lab)
    return images, labels


def initial_model(name: str, scale: dict, folder: Path) -> Path:
    """A randomly initialised segmenter of the scale's size (seed 0) for ``--init``."""
    import torch

    from napari_muvit.model import MuViTEncoder, MuViTSegmenter

    levels = [float(v) for v in VARIANTS[name]["levels"].split(",")]
    torch.manual_seed(0)
    encoder = MuViTEncoder(1, levels, patch_size=8, dim=scale["dim"],
                           num_layers=scale["layers"], heads=scale["heads"])
    model = MuViTSegmenter(encoder, head="unetr", num_classes=3, head_dim=scale["head_dim"],
                           class_names=["background", "outer", "inner"], label_values=[0, 1, 2],
                           meta={"crop_size": scale["crop"]})
    model.save(folder, overwrite=True)
    return folder


def train_variant(name: str, scale: dict, images: list[Path], labels: list[Path], out: Path,
                  init: Path | None = None, steps: int | None = None) -> float:
    """Train one variant with the CLI; returns wall seconds."""
    v = VARIANTS[name]
    init = init or initial_model(name, scale, out.parent / f"{name}_init")
    cmd = [
        sys.executable, "-m", "napari_muvit", "train", *map(str, images),
        "--labels", *map(str, labels), "--out", str(out), "--levels", v["levels"],
        "--crop", str(scale["crop"]), "--steps", str(steps or scale["steps"]),
        "--batch", str(scale["batch"]), "--lr", str(scale["lr"]),
        "--encoder-lr-factor", str(scale["enc_factor"]), "--dense", "--seed", "0",
        "--no-pseudo-labels", "--overwrite", "--quiet",
    ]
    cmd += ["--init", str(init)]
    if v["naive"]:
        cmd.append("--naive-bbox")
    t0 = time.perf_counter()
    print("$", " ".join(cmd[1:]), flush=True)
    # One thread per run: small convolutions scale badly across the 2 cores under load, so
    # variants run side by side instead (see main).
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def run_cli(args: list[str]) -> float:
    """Run ``napari-muvit ARGS`` on one thread; returns wall seconds."""
    t0 = time.perf_counter()
    print("$ napari-muvit", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "napari_muvit", *args], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def mae_experiment(scale: dict, images: list[Path], out: Path, pretrain_steps: int,
                   finetune_steps: int) -> dict:
    """MAE pre-training on the (unlabelled) training fields, then fine-tuning MuViT[1,4] from it
    vs from the same random initialisation, same steps: does pre-training converge faster
    (paper Table S3)? The MAE uses levels [1, 4, 16]; fine-tuning selects [1, 4]."""
    from napari_muvit.model import MuViTEncoder

    import torch

    torch.manual_seed(0)
    enc = MuViTEncoder(1, [1, 4, 16], patch_size=8, dim=scale["dim"], num_layers=scale["layers"],
                       heads=scale["heads"])
    enc.save(out / "mae_init_encoder", overwrite=True)
    result = {"pretrain_seconds": run_cli([
        "pretrain", *map(str, images), "--init", str(out / "mae_init_encoder"),
        "--levels", "1,4,16", "--crop", str(scale["crop"]), "--steps", str(pretrain_steps),
        "--batch", "8", "--out", str(out / "mae"), "--overwrite", "--quiet", "--seed", "0"])}
    _, labels = make_training_data(out / "data", scale["system"])
    common = [*map(str, images), "--labels", *map(str, labels), "--levels", "1,4", "--crop",
              str(scale["crop"]), "--steps", str(finetune_steps), "--batch", str(scale["batch"]),
              "--lr", str(scale["lr"]), "--encoder-lr-factor", str(scale["enc_factor"]),
              "--dense", "--seed", "0", "--no-pseudo-labels", "--overwrite", "--quiet"]
    runs = {"from_mae": out / "mae", "from_random": out / "mae_init_encoder"}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda kv: run_cli(["train", *common, "--init", str(kv[1]), "--out",
                                          str(out / f"ft_{kv[0]}")]), runs.items()))
    for name in runs:
        result[name] = evaluate(out / f"ft_{name}", scale["system"])
        print(name, json.dumps(result[name]), flush=True)
    return result


def evaluate(model_folder: Path, system: int, noise_sigma: float = 0.0, grid: int = 2) -> dict:
    """Whole-image tiled prediction of the held-out field; per-class Dice and mDSC."""
    import torch

    from napari_muvit.data import PyramidSource, synthetic_field
    from napari_muvit.engine.predict import Predictor
    from napari_muvit.model import load_model

    field = synthetic_field(grid=grid, system_size=system, seed=TEST_SEED)
    model = load_model(model_folder)
    if noise_sigma > 0:
        gen = torch.Generator().manual_seed(0)

        def add_bbox_noise(_module, args):
            x, bbox = args[0], args[1]
            # One shift per level and sample (both corners move together): misplaces each
            # level's crop by ~σ px in world coordinates while keeping every bbox valid.
            noise = torch.randn((*bbox.shape[:2], 1, bbox.shape[-1]), generator=gen) * noise_sigma
            return (x, bbox + noise.to(bbox.device, bbox.dtype), *args[2:])

        model.register_forward_pre_hook(add_bbox_noise)
    source = PyramidSource(field.pyramid, field.factors)
    t0 = time.perf_counter()
    pred = Predictor(model, device="cpu", cache_tiles=0).predict(source).labels
    seconds = time.perf_counter() - t0
    gt = np.asarray(field.labels)
    dice = {}
    for value, name in ((1, "outer"), (2, "inner")):
        a, b = pred == value, gt == value
        dice[name] = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    dice["mDSC"] = (dice["outer"] + dice["inner"]) / 2
    dice["predict_seconds"] = seconds
    return dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/runs/cpu"))
    parser.add_argument("--scale", choices=SCALES, default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--noise", default="", help="bbox noise sigmas (px), e.g. 0,8,16,32,64")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--parallel", type=int, default=2, help="variants trained side by side")
    parser.add_argument("--mae", default="", metavar="PRETRAIN,FINETUNE",
                        help="run the MAE experiment with these step counts, e.g. 600,300")
    args = parser.parse_args()
    scale = SCALES[args.scale]
    images, labels = make_training_data(args.out / "data", scale["system"])
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.mae:
        pre, fine = (int(v) for v in args.mae.split(","))
        results["mae"] = mae_experiment(scale, images, args.out, pre, fine)
        results_file.write_text(json.dumps(results, indent=2))
    names = [n for n in args.variants.split(",") if n]
    if not args.eval_only:
        with ThreadPoolExecutor(args.parallel) as pool:
            seconds = pool.map(lambda n: train_variant(n, scale, images, labels, args.out / n,
                                                       steps=args.steps), names)
            for name, sec in zip(names, seconds):
                results.setdefault(name, {"label": VARIANTS[name]["label"]})["train_seconds"] = sec
    for name in names:
        folder = args.out / name
        entry = results.setdefault(name, {"label": VARIANTS[name]["label"]})
        entry["test"] = evaluate(folder, scale["system"])
        print(name, json.dumps(entry["test"]), flush=True)
        for sigma in filter(None, args.noise.split(",")):
            entry.setdefault("noise", {})[sigma] = evaluate(folder, scale["system"], float(sigma))
            print(name, "sigma", sigma, json.dumps(entry["noise"][sigma]), flush=True)
        results_file.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    print("| Method | outer | inner | mDSC | paper mDSC | train min |")
    print("|---|---|---|---|---|---|")
    for key, entry in results.items():
        if key == "mae":
            continue
        t = entry.get("test", {})
        paper = PAPER.get(entry["label"], (None,) * 3)[2]
        print(f"| {entry['label']} | {t.get('outer', 0):.4f} | {t.get('inner', 0):.4f} | "
              f"{t.get('mDSC', 0):.4f} | {paper} | {entry.get('train_seconds', 0) / 60:.1f} |")


if __name__ == "__main__":
    main()
