"""Time to quality of UNETR head layouts: held-out mDSC after the same CPU seconds of training.

On a CPU the UNETR head's full-resolution convolutions dominate both training and prediction
(71 % of a forward pass of the small benchmark model), so a narrower head trains more steps
in the same time but may learn less per step. This script decides by measurement: every
variant starts from the same bundled MAE-pretrained encoder (levels 1, 4) and the same fresh
head initialisation seed, trains on the Synthetic context task (three 1024² fields of 2×2 ring
systems, dense labels, crops 64², batch 8, lr 1e-3: the bundled model's recipe), and is
scored (mDSC of the outer/inner classes, whole-image tiled prediction of a held-out field, the
evaluation of ``experiments/synthetic_table4.py``) whenever its **own CPU time** crosses a
checkpoint. The variants train alternately, one chunk each, in one process with one torch
thread: other programs on the machine slow every variant alike and CPU time does not count
waiting for a core. Prediction time per tile is measured too.

    python benchmarks/bench_head_ttq.py                                # 60, 120, 180 CPU-s
    python benchmarks/bench_head_ttq.py --checkpoints 30 60 --json head-ttq.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import napari_muvit  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import numpy as np
import torch

from napari_muvit.data import PyramidSource, synthetic_field
from napari_muvit.engine.hardware import cpu_capabilities
from napari_muvit.engine.predictor import Predictor
from napari_muvit.engine.trainer import Trainer, TrainConfig, prepare_start_model
from napari_muvit.model import MuViTSegmenter

VARIANTS: dict[str, dict[str, Any]] = {
    "flat 32 (bundled model's head)": {},
    "tapered (taper=True: 32, 16, 16, 16)": {"taper": True},
    "channels (32, 32, 16, 8)": {"channels": [32, 32, 16, 8]},
}
HEAD_DIM = 32
CROP = 64
TRAIN_SEEDS = (0, 1, 2)
TEST_SEED = 1000


def make_trainer(name: str, encoder: torch.nn.Module, pairs: list, steps: int) -> Trainer:
    torch.manual_seed(0)  # the same head initialisation stream for every variant
    model = MuViTSegmenter(copy.deepcopy(encoder), head="unetr", num_classes=3,
                           head_dim=HEAD_DIM, head_options=dict(VARIANTS[name]),
                           class_names=["background", "outer", "inner"], label_values=[0, 1, 2],
                           meta={"crop_size": CROP})
    cfg = TrainConfig(steps=steps, batch_size=8, crop_size=CROP, lr=1e-3, encoder_lr_factor=1.0,
                      dense=True, device="cpu", amp="off", seed=0)
    return Trainer(model, pairs, cfg)


def train_for(trainer: Trainer, cpu_seconds: float) -> float:
    """Train until this thread has spent ``cpu_seconds`` more CPU time; returns the time used.

    The steps are those of ``Trainer.run`` without its checkpointing and reporting."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < cpu_seconds and trainer.step < trainer.config.steps:
        batch = trainer._batch(trainer.step)
        trainer.train_step(batch)
        trainer.step += 1
    return time.thread_time() - t0


def evaluate(model: torch.nn.Module, field: Any) -> dict[str, float]:
    source = PyramidSource(field.pyramid, field.factors)
    pred = Predictor(model, device="cpu", cache_tiles=0)
    t0 = time.thread_time()
    labels = pred.predict(source).labels
    seconds = time.thread_time() - t0
    gt = np.asarray(field.labels)
    dice = {}
    for value, cls in ((1, "outer"), (2, "inner")):
        a, b = labels == value, gt == value
        dice[cls] = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    dice["mDSC"] = (dice["outer"] + dice["inner"]) / 2
    dice["predict_cpu_ms_per_tile"] = 1000 * seconds / max(pred.stats["tiles_computed"], 1)
    return dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=float, nargs="+", default=[60, 120, 180],
                        help="CPU seconds of training at which every variant is scored")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--chunk", type=float, default=10.0,
                        help="CPU seconds a variant trains before the next one takes over")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    caps = cpu_capabilities()
    print(f"[hardware: {caps.model} | {caps.short} | load avg "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}] torch threads 1", flush=True)

    fields = [synthetic_field(grid=2, system_size=512, seed=s) for s in TRAIN_SEEDS]
    pairs = [(PyramidSource(f.pyramid, f.factors), np.asarray(f.labels)) for f in fields]
    test = synthetic_field(grid=2, system_size=512, seed=TEST_SEED)
    encoder, notes = prepare_start_model(levels="1,4")
    print("start:", "; ".join(notes) or "bundled MAE encoder", flush=True)

    trainers = {n: make_trainer(n, encoder, pairs, steps=100_000) for n in args.variants}
    spent = dict.fromkeys(trainers, 0.0)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in trainers}
    params = {n: sum(p.numel() for p in t.model.head.parameters()) for n, t in trainers.items()}
    for target in sorted(args.checkpoints):
        while any(spent[n] < target for n in trainers):
            for n, tr in trainers.items():  # alternate chunks: load hits all variants alike
                if spent[n] < target:
                    spent[n] += train_for(tr, min(args.chunk, target - spent[n]))
        for n, tr in trainers.items():
            score = evaluate(tr.model, test)
            row = {"cpu_s": spent[n], "steps": tr.step,
                   "cpu_s_per_step": spent[n] / max(tr.step, 1),
                   **score, "loadavg": os.getloadavg()}
            results[n].append(row)
            print(f"{target:>6.0f} CPU-s  {n:<38} steps {tr.step:>5}  "
                  f"{row['cpu_s_per_step']:.3f} CPU-s/step  mDSC {row['mDSC']:.3f} "
                  f"(outer {row['outer']:.3f}, inner {row['inner']:.3f})  predict "
                  f"{row['predict_cpu_ms_per_tile']:.1f} CPU-ms/tile  load "
                  f"{row['loadavg'][0]:.1f}", flush=True)
        if args.json is not None:  # after every checkpoint: a long run stopped early keeps its rows
            out = {"hardware": caps.as_dict(), "head_params": params, "results": results,
                   "script": "benchmarks/bench_head_ttq.py",
                   "command": " ".join(["python", "benchmarks/bench_head_ttq.py", *sys.argv[1:]])}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
