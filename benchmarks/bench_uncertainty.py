"""Cost of the uncertainty layer (active-learning hint, issue 13) relative to the prediction.

The uncertainty layer needs the class probabilities of every tile (softmax, float16 copy to the
host; with an overlap they are computed anyway for blending) and one ``1 - margin`` map per
tile (:func:`napari_muvit.engine.uncertainty.uncertainty_percent`).  This script predicts the
same region with the bundled segmenter twice per round, labels only and labels + uncertainty
map, alternating in one process (tile cache off, so every pass computes every tile), and
prints the ratio of the median CPU times per overlap. Usage::

    python benchmarks/bench_uncertainty.py --json docs/data/uncertainty.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_muvit.data import PyramidSource
from napari_muvit.data.synthetic import synthetic_field
from napari_muvit.engine.predictor import Predictor
from napari_muvit.engine.uncertainty import uncertainty_percent
from napari_muvit.weights import load_default_model


def one_pass(pred: Predictor, source: PyramidSource, region: np.ndarray, hint: bool) -> float:
    """CPU seconds to stream every tile of ``region`` (and its uncertainty map if ``hint``)."""
    t0 = time.process_time()
    for res in pred.iter_tiles(source, region=region, probabilities=hint):
        if hint:
            uncertainty_percent(res.probs)
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="region side, pixels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--overlaps", default="0,8", help="comma-separated overlaps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_default_model()
    image = synthetic_field(grid=1, seed=11)
    source = PyramidSource(image.pyramid)
    region = np.array([[0, 0], [args.size, args.size]])
    rows = []
    for overlap in (int(v) for v in args.overlaps.split(",")):
        pred = Predictor(model, device="cpu", overlap=overlap, cache_tiles=0)
        one_pass(pred, source, region, True)  # warm-up (allocations, first-call paths)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for hint in ((False, True) if r % 2 == 0 else (True, False)):
                times[hint].append(one_pass(pred, source, region, hint))
        base, with_hint = statistics.median(times[False]), statistics.median(times[True])
        row = {
            "overlap": overlap,
            "tile": pred.tile_size,
            "classes": int(model.num_classes),
            "tiles": len(pred.plan(source, region)),
            "labels_cpu_s": round(base, 3),
            "with_uncertainty_cpu_s": round(with_hint, 3),
            "ratio": round(with_hint / base, 3),
        }
        rows.append(row)
        print(f"overlap {overlap:3d}: labels {base:.2f} s, + uncertainty {with_hint:.2f} s "
              f"CPU → ratio {row['ratio']:.3f}")
    result = {
        "script": "benchmarks/bench_uncertainty.py",
        "command": "python benchmarks/bench_uncertainty.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "load_average": list(os.getloadavg()),
        "threads": args.threads,
        "size": args.size,
        "rounds": args.rounds,
        "rows": rows,
        # the table of docs/benchmarks.md, cell for cell
        "tables": {"cost": [
            ["overlap", "tiles", "labels only (CPU s)", "+ uncertainty (CPU s)", "ratio"],
            *[[str(r["overlap"]), str(r["tiles"]), f"{r['labels_cpu_s']:.3f}",
               f"{r['with_uncertainty_cpu_s']:.3f}", f"{r['ratio']:.3f}"] for r in rows],
        ]},
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
