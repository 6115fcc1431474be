"""Does training on scribbles work on a CPU, and do MUSE-style pseudo-labels help?

Two experiments on the paper's Synthetic task (:func:`napari_muvit.data.synthetic_rings`: cells
whose class, outer or inner ring, is only visible with context), trained on *scribbles* (short
painted strokes, a few hundred pixels per class) of one image and scored by mean Dice over the
three classes on a *held-out* image (another seed), predicted with the engine's tiled
:func:`~napari_muvit.engine.api.predict`:

``pseudo``
    Same steps, same seeds, with and without pseudo-labels (EMA teacher, threshold 0.9,
    consistency weight ramped up from 0 over the first third of the run).  Result (see
    "Training benchmarks" in ``docs/benchmarks.md``, ``docs/data/pseudolabels.json``): no
    measurable gain, so ``TrainConfig.pseudo_labels`` defaults to off.

``cpu``
    The CPU-usability check of "Training benchmarks" in ``docs/benchmarks.md``: the default
    starting encoder (the bundled, MAE-pretrained ``default_encoder`` if the installation has
    one, else a random ``small`` preset encoder), trained for a fixed wall-clock budget
    (default 120 s); Dice before (fresh head) and after.

Usage::

    python benchmarks/bench_pseudolabel.py pseudo --seeds 0 1 --steps 150
    python benchmarks/bench_pseudolabel.py cpu --budget 120
    python benchmarks/bench_pseudolabel.py pseudo --json results.json

Prints a Markdown table (and optionally writes JSON).  Runs on one torch thread by default
(``--threads``): on a shared CPU more threads are slower, and one thread is reproducible.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_muvit import metrics
from napari_muvit.data import PyramidSource, synthetic_rings
from napari_muvit.engine.api import predict
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.trainer import TrainConfig, Trainer, prepare_start_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import machine  # noqa: E402  (a sibling module of this script)

CLASSES = ("background", "outer", "inner")


# ------------------------------------------------------------------------------ data
def scribbles(truth: np.ndarray, per_class: int, seed: int, length: int = 25) -> np.ndarray:
    """Napari-style sparse labels: straight 1-px strokes inside each class (value = class+1).

    Strokes start at random pixels of the class and run in a random direction; only the pixels
    that stay inside the class are painted (a careful annotator), until ``per_class`` pixels.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(truth.shape, np.uint8)
    for k in range(len(CLASSES)):
        ys, xs = np.nonzero(truth == k)
        while np.sum(labels == k + 1) < per_class:
            i = int(rng.integers(len(ys)))
            angle = rng.uniform(0, np.pi)
            t = np.arange(-length // 2, length // 2 + 1)
            py = np.clip(np.round(ys[i] + t * np.sin(angle)).astype(int), 0, truth.shape[0] - 1)
            px = np.clip(np.round(xs[i] + t * np.cos(angle)).astype(int), 0, truth.shape[1] - 1)
            keep = truth[py, px] == k
            labels[py[keep], px[keep]] = k + 1
    return labels


def task(size: int, per_class: int) -> dict[str, Any]:
    """Training image + scribbles and a held-out image with dense ground truth."""
    train_img = synthetic_rings(size, seed=0)
    test_img = synthetic_rings(size, seed=1)
    return {
        "train": PyramidSource(train_img.pyramid),
        "labels": scribbles(train_img.labels, per_class, seed=0),
        "test": PyramidSource(test_img.pyramid),
        "truth": test_img.labels.astype(np.int64),
    }


# ------------------------------------------------------------------------------ scoring
def dice_scores(model: torch.nn.Module, source: PyramidSource, truth: np.ndarray) -> dict:
    """Per-class and mean Dice of the model's prediction of ``source`` (labels = class+1)."""
    pred = np.asarray(predict(source, model, device="cpu")).astype(np.int64) - 1
    scores = metrics.dice_scores(pred, truth, values=range(len(CLASSES)))
    per_class = {name: scores[k] for k, name in enumerate(CLASSES)}
    return {"mean": float(np.mean(list(per_class.values()))), **per_class}


def run(
    data: dict[str, Any],
    config: TrainConfig,
    init: Any,
    levels: Any,
    preset: str | None,
    budget: float | None = None,
) -> dict[str, Any]:
    """Train once; Dice on the held-out image before and after, wall time, steps done."""
    model, notes = prepare_start_model(init, levels, preset, data["train"].channels, config.seed)
    cancel = CancelToken()
    start = time.monotonic()

    def stop_at_budget(info: dict) -> None:
        if budget is not None and time.monotonic() - start > budget:
            cancel.cancel()

    trainer = Trainer(
        model, [(data["train"], data["labels"])], config, stop_at_budget, cancel, notes=notes
    )
    before = dice_scores(trainer.model, data["test"], data["truth"])
    start = time.monotonic()
    history = trainer.run()
    seconds = time.monotonic() - start
    after = dice_scores(trainer.model, data["test"], data["truth"])
    return {
        "steps": history["step"],
        "seconds": round(seconds, 1),
        "dice_before": before,
        "dice_after": after,
        "final_loss": float(np.mean(history["loss"][-10:])),
        "pseudo_fraction": float(np.mean(history["pseudo_fraction"][-10:] or [0.0])),
        "start": notes,
        "warnings": history["warnings"],
    }


# ------------------------------------------------------------------------------ experiments
def experiment_pseudo(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = task(args.size, args.per_class)
    base = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        crop_size=args.crop,
        lr=args.lr,
        device="cpu",
        checkpoint_every=1e9,
        pseudo_threshold=args.threshold,
        pseudo_teacher=args.teacher,
        ema_decay=args.ema_decay,
        pseudo_weight=args.pseudo_weight,
    )
    rows = []
    for seed in args.seeds:
        for pseudo in (False, True):
            cfg = replace(base, seed=seed, pseudo_labels=pseudo)
            result = run(data, cfg, None, args.levels, args.preset)
            rows.append({"seed": seed, "pseudo_labels": pseudo, **result})
            print(
                f"seed {seed} pseudo={pseudo}: Dice {result['dice_after']['mean']:.3f} "
                f"({result['seconds']} s)",
                file=sys.stderr,
            )
    return rows


def experiment_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = task(args.size, args.per_class)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        crop_size=args.crop,
        lr=args.lr,
        device="cpu",
        checkpoint_every=1e9,
        seed=args.seeds[0],
    )
    result = run(data, cfg, None, args.levels, None, budget=args.budget)
    return [{"budget_s": args.budget, **result}]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and one row of text cells per run (the Markdown table and the JSON's table)."""
    head = [
        "setting",
        "steps",
        "time (s)",
        "Dice before",
        "Dice after",
        *(f"after: {c}" for c in CLASSES),
    ]
    out = [head]
    for r in rows:
        setting = (
            f"seed {r['seed']}, pseudo-labels {'on' if r['pseudo_labels'] else 'off'}"
            if "seed" in r
            else f"{r['budget_s']:g} s budget"
        )
        after = r["dice_after"]
        out.append([
            setting,
            str(r["steps"]),
            f"{r['seconds']:.0f}",
            f"{r['dice_before']['mean']:.3f}",
            f"{after['mean']:.3f}",
            *(f"{after[c]:.3f}" for c in CLASSES),
        ])
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head, *body = table_rows(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=("pseudo", "cpu"))
    parser.add_argument("--size", type=int, default=512, help="synthetic image side")
    parser.add_argument("--per-class", type=int, default=300, help="painted pixels per class")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--budget", type=float, default=120.0, help="cpu: wall-clock seconds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--levels", default=None)
    parser.add_argument("--preset", default="tiny", help="pseudo: encoder preset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.9, help="pseudo: confidence")
    parser.add_argument("--teacher", default="ema", choices=("ema", "model"))
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--pseudo-weight", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.experiment == "pseudo":
        args.steps = args.steps or 150
        args.crop, args.lr = args.crop or 64, args.lr or 1e-3
        args.levels = args.levels or "1,8"
        rows = experiment_pseudo(args)
    else:
        args.steps = args.steps or 100_000  # the budget stops it
        args.crop, args.lr = args.crop or 128, args.lr or 1e-3
        args.levels = args.levels or None
        rows = experiment_cpu(args)
    meta = {
        "experiment": args.experiment,
        "args": vars(args),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
    }
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({
                "script": "benchmarks/bench_pseudolabel.py",
                "command": "python benchmarks/bench_pseudolabel.py " + " ".join(sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": machine(),
                "meta": meta,
                "rows": rows,
                "tables": {args.experiment: table_rows(rows)},
            }, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
