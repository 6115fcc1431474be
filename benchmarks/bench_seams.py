"""Tile seams: border/interior label-change ratio against the prediction overlap (issue 13).

A prediction is tiled on a grid of period ``tile_size - overlap``; a seam shows as labels that
change more often between two tiles than anywhere else
(:func:`napari_muvit.metrics.seam_ratio`; 1 = no seam, the issue's acceptance: ≤ 1.5).
Models, all predicted on a held-out Synthetic field (one 512² ring system, large flat
background):

``bundled``
    The bundled segmenter (zero-padded decoder, trained densely).
``scribbles-zeros`` / ``scribbles-replicate``
    A fresh UNETR head on the bundled MAE encoder trained ``--steps`` steps on simulated
    strokes of another field, with the old zero padding and with the new replicate padding.
``quick``
    The default pixel head (a random forest on the filter bank of every level's crop) after the
    quick fit (:mod:`napari_muvit.engine.quicktrain`) on the same strokes.
``quick-mlp``
    The MLP pixel head (level-1 filters and encoder features) after its quick fit.

For every model and overlap it prints the ratio, the mDSC and the prediction's CPU time
relative to overlap 0 (the cost of blending). ``--constant-only`` measures the root cause
instead: the bundled model on constant images, with zero and with replicate padding. Usage::

    python benchmarks/bench_seams.py --steps 40 --json docs/data/seams.json
    python benchmarks/bench_seams.py --constant-only --json docs/data/seams_constant.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_muvit.data import PyramidSource
from napari_muvit.data.strokes import simulate_strokes
from napari_muvit.data.synthetic import synthetic_field
from napari_muvit.metrics import mean_dice, seam_ratio
from napari_muvit.engine.api import predict
from napari_muvit.engine.quicktrain import QuickTrainer
from napari_muvit.engine.trainer import TrainConfig, Trainer, prepare_start_model
from napari_muvit.weights import load_default_model


MODELS = ("bundled", "scribbles-zeros", "scribbles-replicate", "quick", "quick-mlp")


def scribble_models(steps: int, seed: int, names: tuple[str, ...] = MODELS) -> dict[str, Any]:
    """The models trained on strokes of a training field (seed + 1)."""
    train_im = synthetic_field(grid=1, seed=seed + 1)
    source = PyramidSource(train_im.pyramid)
    strokes = simulate_strokes(train_im.labels, strokes_per_class=6, seed=seed)
    models: dict[str, Any] = {}
    for padding in ("zeros", "replicate"):
        if f"scribbles-{padding}" not in names:
            continue
        start, _ = prepare_start_model()
        trainer = Trainer(start, [(source, strokes)], TrainConfig(steps=steps, device="cpu"))
        trainer.model.head_options["padding_mode"] = padding
        for m in trainer.model.head.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.padding_mode = padding
        trainer.run()
        models[f"scribbles-{padding}"] = trainer.model.eval()
    for name, classifier in (("quick", "forest"), ("quick-mlp", "mlp")):
        if name not in names:
            continue
        start, _ = prepare_start_model()
        quick = QuickTrainer(start, [(source, strokes)],
                             TrainConfig(device="cpu", classifier=classifier), fine_tune=False)
        quick.run()
        models[name] = quick.model.eval()
    return models


def constant_image_rows(values: list[int]) -> list[dict]:
    """The root cause on the bundled model: a constant image, one interior tile; how far the
    class probabilities of its first row/column and of its interior deviate from its centre,
    with the model's zero padding and with the same weights padded by replication."""
    model = load_default_model()
    tile = int(model.meta.get("crop_size") or 128)
    rows = []
    for padding in ("zeros", "replicate"):
        for m in model.head.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.padding_mode = padding
        for value in values:
            img = np.full((8 * tile, 8 * tile), value, np.uint8)
            _, probs = predict(img, model, device="cpu", probabilities=True)
            t = probs[:, 4 * tile : 5 * tile, 4 * tile : 5 * tile].astype(np.float32)
            dev = np.abs(t - t[:, tile // 2 : tile // 2 + 1, tile // 2 : tile // 2 + 1]).max(0)
            row = {"padding": padding, "value": value, "row0": float(dev[0].max()),
                   "col0": float(dev[:, 0].max()), "row1": float(dev[1].max()),
                   "interior": float(dev[8:-8, 8:-8].max())}
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(f"constant {value:3d}, {padding:9s}: max probability deviation from the tile "
                  f"centre: row 0 {row['row0']:.3f}, column 0 {row['col0']:.3f}, row 1 "
                  f"{row['row1']:.3f}, interior {row['interior']:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--overlaps", type=int, nargs="+", default=[0, 8, 16])
    p.add_argument("--steps", type=int, default=100, help="training steps of the stroke models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--constant-only", action="store_true",
                   help="only the constant-image root-cause measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.constant_only:
        rows = constant_image_rows([60, 120, 200, 255])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "script": "benchmarks/bench_seams.py",
                "command": "python benchmarks/bench_seams.py " + " ".join(sys.argv[1:]),
                "rows": rows}, indent=1))
        return 0
    test = synthetic_field(grid=1, seed=args.seed + 100)
    source = PyramidSource(test.pyramid)
    names = tuple(args.models)
    models = {**({"bundled": load_default_model()} if "bundled" in names else {}),
              **scribble_models(args.steps, args.seed, names)}
    rows = []
    for name, model in models.items():
        tile = int(model.meta.get("crop_size") or 128)
        base = None
        for ov in args.overlaps:
            t0 = time.process_time()
            lab = predict(source, model, device="cpu", overlap=ov)
            cpu = time.process_time() - t0
            base = cpu if base is None else base
            s = seam_ratio(lab, tile - ov)
            score = mean_dice(lab, test.labels.astype(np.int64) + (model.label_values[0] != 0))
            row = {"model": name, "overlap": ov, "tile": tile, **{k: round(v, 4) for k, v in
                   s.items()}, "mdsc": round(score, 4), "cpu_s": round(cpu, 2),
                   "cost_vs_overlap0": round(cpu / base, 2)}
            rows.append(row)
            print(f"{name:20s} overlap {ov:3d}: ratio {s['ratio']:.2f} (border {s['border']:.4f}"
                  f", interior {s['interior']:.4f}) mDSC {score:.3f} cost x{cpu / base:.2f}",
                  flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "script": "benchmarks/bench_seams.py",
            "command": "python benchmarks/bench_seams.py " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg(), "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
