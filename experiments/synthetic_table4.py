"""Reproduce the paper's Synthetic experiment (MuViT main text 4.4, Table 4; supplement Fig. S3).

Trains MuViT[1,4], MuViT[1] and MuViT[1,4] with naive bboxes through the project's own CLI
(``napari-muvit train``), then predicts held-out ring systems tile by tile over whole images
with the prediction engine and reports per-class Dice and mDSC (outer, inner) — Table 4.
Optionally: robustness to Gaussian bbox noise at inference (``--noise``) and MAE pre-training
followed by fine-tuning (``--mae``).

CPU scale (this repository's default): ring systems of 512² (the generator scales rings with
the image), level-1 crops 64², levels [1, 4], D=128, 4 layers, 4 heads, UNETR width 32,
trained 4000 steps, encoder and head at lr 1e-3 (the bundled model's recipe). The crop/image
ratio is the paper's 256²-in-2048² scaled by ¼. Paper scale: ``--scale paper`` (2048² systems,
crops 256², D=512, 12 layers) — for a GPU.

    python experiments/synthetic_table4.py --out experiments/runs/cpu --parallel 3
    python experiments/synthetic_table4.py --out experiments/runs/cpu --eval-only --noise 8,16,32,64
    python experiments/synthetic_table4.py --bundled --noise 8,16,32,64   # shipped model, ~1 min

Model folders and the full ``results.json`` stay in ``--out`` (git-ignored); every run also
merges its scores, command, date and machine load into ``docs/data/synthetic_table4.json``
(``--summary``), the small committed file that ``tests/test_docs.py`` checks the tables of
``docs/results.md`` against.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

SCALES = {
    # ring-system size, crop, encoder width/depth/heads, UNETR width, steps, batch, head lr,
    # encoder lr factor (from scratch the encoder needs more than the fine-tuning 0.1×)
    # schedule: (steps, head lr) stages, each a fresh cosine run started from the previous one
    # (``train --init``). CPU: the bundled model's recipe, one 4000-step cosine run with the
    # encoder at the head's lr: from scratch, a slower encoder (0.3×, the first recipe) rarely
    # learned to use the context's position within 4000 steps (docs/results.md)
    "cpu": dict(system=512, crop=64, dim=128, layers=4, heads=4, head_dim=32, batch=8,
                schedule=((4000, 1e-3),), enc_factor=1.0),
    "paper": dict(system=2048, crop=256, dim=512, layers=12, heads=8, head_dim=256, batch=16,
                  schedule=((20000, 1e-4),), enc_factor=0.1),
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
SUMMARY = Path(__file__).resolve().parents[1] / "docs" / "data" / "synthetic_table4.json"
BUNDLED_LABEL = "MuViT[1,4]+UNETR (the bundled model)"


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


def initial_model(name: str, scale: dict, folder: Path, seed: int = 0) -> Path:
    """A randomly initialised segmenter of the scale's size for ``--init``."""
    import torch

    from napari_muvit.model import MuViTEncoder, MuViTSegmenter

    levels = [float(v) for v in VARIANTS[name]["levels"].split(",")]
    torch.manual_seed(seed)
    encoder = MuViTEncoder(1, levels, patch_size=8, dim=scale["dim"],
                           num_layers=scale["layers"], heads=scale["heads"])
    model = MuViTSegmenter(encoder, head="unetr", num_classes=3, head_dim=scale["head_dim"],
                           class_names=["background", "outer", "inner"], label_values=[0, 1, 2],
                           meta={"crop_size": scale["crop"]})
    model.save(folder, overwrite=True)
    return folder


def train_variant(name: str, scale: dict, images: list[Path], labels: list[Path], out: Path,
                  schedule: tuple[tuple[int, float], ...], seed: int = 0) -> float:
    """Train one variant with the CLI, stage by stage (stage ``i`` starts from stage ``i-1``,
    seed ``seed + i``; initial weights from ``seed``); the last stage writes ``out``, earlier
    ones ``out_stage{i}``. Wall seconds."""
    v = VARIANTS[name]
    init = initial_model(name, scale, out.parent / f"{name}_init", seed)
    t0 = time.perf_counter()
    for i, (steps, lr) in enumerate(schedule):
        stage_out = out if i == len(schedule) - 1 else out.parent / f"{out.name}_stage{i}"
        cmd = [
            sys.executable, "-m", "napari_muvit", "train", *map(str, images),
            "--labels", *map(str, labels), "--out", str(stage_out), "--levels", v["levels"],
            "--crop", str(scale["crop"]), "--steps", str(steps), "--batch", str(scale["batch"]),
            "--lr", str(lr), "--encoder-lr-factor", str(scale["enc_factor"]), "--dense",
            "--seed", str(seed + i), "--no-pseudo-labels", "--overwrite", "--quiet", "--init", str(init),
        ]
        if v["naive"]:
            cmd.append("--naive-bbox")
        print("$", " ".join(cmd[1:]), flush=True)
        # One thread per run: small convolutions scale badly across the 2 cores under load, so
        # variants run side by side instead (see main).
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        init = stage_out
    return time.perf_counter() - t0


def parse_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """``"800@1e-3,1600@5e-4"`` -> ((800, 0.001), (1600, 0.0005))."""
    stages = []
    try:
        for part in filter(None, text.split(",")):
            steps, _, lr = part.partition("@")
            stages.append((int(steps), float(lr)))
    except ValueError:
        stages = []
    if not stages or any(n < 1 or lr <= 0 for n, lr in stages):
        raise SystemExit(f"--schedule: expected STEPS@LR[,STEPS@LR...], got {text!r}")
    return tuple(stages)


def run_cli(args: list[str]) -> float:
    """Run ``napari-muvit ARGS`` on one thread; returns wall seconds."""
    t0 = time.perf_counter()
    print("$ napari-muvit", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "napari_muvit", *args], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def mae_experiment(scale: dict, images: list[Path], out: Path, pretrain_steps: int,
                   finetune_steps: list[int]) -> dict:
    """MAE pre-training on the (unlabelled) training fields, then fine-tuning MuViT[1,4] from it
    vs from the same random initialisation, same settings, for each budget in
    ``finetune_steps``: does pre-training converge faster (paper Table S3)? The MAE uses levels
    [1, 4, 16]; fine-tuning selects [1, 4]."""
    from napari_muvit.model import MuViTEncoder

    import torch

    torch.manual_seed(0)
    enc = MuViTEncoder(1, [1, 4, 16], patch_size=8, dim=scale["dim"], num_layers=scale["layers"],
                       heads=scale["heads"])
    enc.save(out / "mae_init_encoder", overwrite=True)
    result: dict = {"pretrain_steps": pretrain_steps, "pretrain_seconds": run_cli([
        "pretrain", *map(str, images), "--init", str(out / "mae_init_encoder"),
        "--levels", "1,4,16", "--crop", str(scale["crop"]), "--steps", str(pretrain_steps),
        "--batch", "8", "--out", str(out / "mae"), "--overwrite", "--quiet", "--seed", "0"])}
    _, labels = make_training_data(out / "data", scale["system"])
    starts = {"from_mae": out / "mae", "from_random": out / "mae_init_encoder"}
    runs = [(name, steps) for steps in finetune_steps for name in starts]

    def finetune(run: tuple[str, int]) -> float:
        name, steps = run
        return run_cli([
            "train", *map(str, images), "--labels", *map(str, labels), "--levels", "1,4",
            "--crop", str(scale["crop"]), "--steps", str(steps), "--batch", str(scale["batch"]),
            "--lr", str(scale["schedule"][0][1]), "--encoder-lr-factor", str(scale["enc_factor"]),
            "--dense", "--seed", "0", "--no-pseudo-labels", "--overwrite", "--quiet",
            "--init", str(starts[name]), "--out", str(out / f"ft_{name}_{steps}")])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(finetune, runs))
    for name, steps in runs:
        result.setdefault(name, {})[str(steps)] = evaluate(out / f"ft_{name}_{steps}",
                                                           scale["system"])
        print(name, steps, json.dumps(result[name][str(steps)]), flush=True)
    return result


def evaluate(model_folder: Path, system: int, noise_sigma: float = 0.0, grid: int = 2) -> dict:
    """Whole-image tiled prediction of the held-out field; per-class Dice and mDSC."""
    import torch

    from napari_muvit.data import PyramidSource, synthetic_field
    from napari_muvit.engine.predictor import Predictor
    from napari_muvit.metrics import dice_scores
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
    per_class = dice_scores(pred, np.asarray(field.labels), values=(1, 2))
    dice = {"outer": per_class[1], "inner": per_class[2]}
    dice["mDSC"] = (dice["outer"] + dice["inner"]) / 2
    dice["predict_seconds"] = seconds
    return dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/runs/cpu"))
    parser.add_argument("--scale", choices=SCALES, default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--schedule", default=None, metavar="STEPS@LR,...",
                        help="training stages, each a cosine run started from the previous "
                             "one (default: the scale's, 4000@1e-3 on CPU), e.g. "
                             "800@1e-3,1600@5e-4,1600@3e-4")
    parser.add_argument("--encoder-lr-factor", type=float, default=None,
                        help="encoder lr / head lr (default: the scale's, 1.0 on CPU)")
    parser.add_argument("--system", type=int, default=None,
                        help="ring-system size in px (default: the scale's, 512 on CPU); larger "
                             "systems make the context a smaller part of a system")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights and sampling seed (replicates: 0, 10, 20, ...)")
    parser.add_argument("--noise", default="", help="bbox noise sigmas (px), e.g. 0,8,16,32,64")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--parallel", type=int, default=2, help="variants trained side by side")
    parser.add_argument("--mae", default="", metavar="PRETRAIN,FINETUNE[,FINETUNE...]",
                        help="run the MAE experiment: pre-training steps, then one or more "
                             "fine-tuning budgets, e.g. 5000,300,800")
    parser.add_argument("--bundled", action="store_true",
                        help="evaluate the bundled default_segmenter as MuViT[1,4] (no training)")
    parser.add_argument("--summary", type=Path, default=SUMMARY,
                        help="committed summary JSON to merge this run's scores into "
                             "(default docs/data/synthetic_table4.json)")
    args = parser.parse_args()
    if args.bundled:
        evaluate_bundled(args)
        return
    scale = dict(SCALES[args.scale])
    if args.encoder_lr_factor is not None:
        scale["enc_factor"] = args.encoder_lr_factor
    if args.system is not None:
        scale["system"] = args.system
    schedule = parse_schedule(args.schedule) if args.schedule else scale["schedule"]
    images, labels = make_training_data(args.out / "data", scale["system"])
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.mae:
        pre, *fine = (int(v) for v in args.mae.split(","))
        if not fine:
            raise SystemExit("--mae: expected PRETRAIN,FINETUNE[,FINETUNE...], e.g. 5000,300,800")
        results["mae"] = mae_experiment(scale, images, args.out, pre, fine)
        results_file.write_text(json.dumps(results, indent=2))
    names = [n for n in args.variants.split(",") if n]
    if not args.eval_only:
        with ThreadPoolExecutor(args.parallel) as pool:
            seconds = pool.map(lambda n: train_variant(n, scale, images, labels, args.out / n,
                                                       schedule, args.seed), names)
            for name, sec in zip(names, seconds):
                entry = results.setdefault(name, {"label": VARIANTS[name]["label"]})
                entry["train_seconds"] = sec
                entry["schedule"] = [list(stage) for stage in schedule]
                entry["seed"] = args.seed
                entry["encoder_lr_factor"] = scale["enc_factor"]
    for name in names:
        folder = args.out / name
        entry = results.setdefault(name, {"label": VARIANTS[name]["label"]})
        entry["test"] = evaluate(folder, scale["system"])
        print(name, json.dumps(entry["test"]), flush=True)
        for sigma in filter(None, args.noise.split(",")):
            entry.setdefault("noise", {})[sigma] = evaluate(folder, scale["system"], float(sigma))
            print(name, "sigma", sigma, json.dumps(entry["noise"][sigma]), flush=True)
        results_file.write_text(json.dumps(results, indent=2))
    write_summary(args.summary, args.out.name, results)
    print_table(results)


def evaluate_bundled(args: argparse.Namespace) -> None:
    """Table 4's MuViT[1,4] row (and ``--noise``) for the shipped model: no training."""
    from napari_muvit.weights import default_model_path

    system = args.system or SCALES["cpu"]["system"]
    entry: dict = {"label": BUNDLED_LABEL, "variant": "muvit14"}
    entry["test"] = evaluate(Path(default_model_path()), system)
    print("bundled", json.dumps(entry["test"]), flush=True)
    for sigma in filter(None, args.noise.split(",")):
        entry.setdefault("noise", {})[sigma] = evaluate(Path(default_model_path()), system,
                                                        float(sigma))
        print("bundled sigma", sigma, json.dumps(entry["noise"][sigma]), flush=True)
    results = {"muvit14": entry}
    write_summary(args.summary, "bundled", results)
    print_table(results)


def write_summary(path: Path, run: str, results: dict) -> None:
    """Merge this run's scores, command and conditions into the committed summary ``path``
    (one entry per ``--out`` folder name, or ``bundled``) and rebuild its doc tables."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary["script"] = "experiments/synthetic_table4.py"
    summary["command"] = "python experiments/synthetic_table4.py [options]: see each run"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs = summary.setdefault("runs", {})
    runs[run] = {
        "command": " ".join(["python", "experiments/synthetic_table4.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {_torch_version()}, "
                   f"python {platform.python_version()}",
        "load_average_1_5_15min": None if load is None else [round(v, 1) for v in load],
        "results": results,
    }
    summary["tables"] = summary_tables(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"summary: {path}", flush=True)


def _torch_version() -> str:
    import torch

    return torch.__version__


def summary_tables(runs: dict) -> dict[str, list[list[str]]]:
    """Markdown table rows (header first) per run, as docs/results.md shows them: Table 4
    (``RUN/table4``) and the bbox-noise mDSC (``RUN/noise``)."""
    tables: dict[str, list[list[str]]] = {}
    for run, info in runs.items():
        variants = {k: v for k, v in info["results"].items() if k != "mae" and "test" in v}
        if variants:
            rows = [["Method", "outer", "inner", "mDSC", "paper outer", "paper inner",
                     "paper mDSC"]]
            for name, entry in variants.items():
                t = entry["test"]
                paper = PAPER.get(VARIANTS[entry.get("variant", name)]["label"])
                rows.append([entry["label"], *(f"{t[k]:.3f}" for k in ("outer", "inner", "mDSC")),
                             *(f"{v:.3f}" for v in paper or ())])
            tables[f"{run}/table4"] = rows
        noisy = {k: v for k, v in variants.items() if v.get("noise")}
        if noisy:
            sigmas = sorted({s for v in noisy.values() for s in v["noise"]}, key=float)
            rows = [["σ (px)", "0", *sigmas]]
            for entry in noisy.values():
                rows.append([entry["label"], f"{entry['test']['mDSC']:.3f}",
                             *(f"{entry['noise'][s]['mDSC']:.3f}" if s in entry["noise"] else ""
                               for s in sigmas)])
            tables[f"{run}/noise"] = rows
    return tables


def print_table(results: dict) -> None:
    print("| Method | steps | outer | inner | mDSC | paper mDSC | train min |")
    print("|---|---|---|---|---|---|---|")
    for key, entry in results.items():
        if key == "mae":
            continue
        t = entry.get("test", {})
        paper = PAPER.get(VARIANTS[entry.get("variant", key)]["label"], (None,) * 3)[2]
        steps = sum(n for n, _ in entry.get("schedule", []))
        print(f"| {entry['label']} | {steps} | {t.get('outer', 0):.4f} | {t.get('inner', 0):.4f} | "
              f"{t.get('mDSC', 0):.4f} | {paper} | {entry.get('train_seconds', 0) / 60:.1f} |")
        for sigma, r in entry.get("noise", {}).items():
            print(f"|   bbox noise σ={sigma} px | | {r['outer']:.4f} | {r['inner']:.4f} | "
                  f"{r['mDSC']:.4f} | | |")
    mae = results.get("mae")
    if mae:
        print(f"\nMAE pre-training ({mae.get('pretrain_steps', '?')} steps), then fine-tuning "
              "MuViT[1,4]: mDSC on the held-out field")
        print("| fine-tuning steps | from random | from MAE |")
        print("|---|---|---|")
        for steps in mae.get("from_random", {}):
            rand, pre = mae["from_random"][steps], mae.get("from_mae", {}).get(steps, {})
            print(f"| {steps} | {rand.get('mDSC', 0):.4f} | {pre.get('mDSC', 0):.4f} |")


if __name__ == "__main__":
    main()
