"""Time of the random-forest head's tree walk per 64² tile (the forest pixel head's prediction).

Baseline, in the same process: the walk as first written (per-tree ``gather`` over ``(T, P)``
int64 tensors, kept here verbatim as the reference); then the torch walk of ``TreeEnsemble``
(one flat walk over all trees' node tables with int32 ``index_select``, used on a GPU), and
``TreeEnsemble.forward`` on a CPU (scikit-learn's compiled ``Tree.apply`` on trees rebuilt from
the same tables). All must give identical probabilities.

``--model``: also a whole forest-headed segmenter (the default quick fit on 6 strokes per class
of a synthetic field, as ``benchmarks/bench_seams.py`` builds it) predicting another 1024²
field with the engine's defaults, torch walk vs compiled walk: labels must be identical. The forest: 100 class-balanced trees of depth <= 20 (the quick fit's defaults)
grown on 3,000 rows of 63 features (the bank of three levels) with a learnable 3-class signal.

    python benchmarks/bench_forest.py --json docs/data/bench_forest.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_seams (--model)

from napari_muvit.engine.forests import fit_tree_arrays
from napari_muvit.model.forest import TreeEnsemble


def gather_walk(ens: TreeEnsemble, x: torch.Tensor) -> torch.Tensor:
    """The first implementation: per-(tree, sample) gathers on (T, P) int64 tensors."""
    T, P = ens.num_trees, x.shape[0]
    node = torch.zeros(T, P, dtype=torch.long)
    feature = ens.feature.long()
    children = ens.child_nodes.long().view(T, -1)
    rows = torch.arange(P).expand(T, P)
    for _ in range(ens.depth):
        f = feature.gather(1, node)
        right = (x[rows, f] > ens.threshold.gather(1, node)).long()
        node = children.gather(1, node * 2 + right)
    probs = ens.leaf_probs.gather(1, node[..., None].expand(T, P, ens.num_classes))
    return probs.mean(0)


def timed(func, repeats: int) -> float:
    func()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        best.append(time.perf_counter() - t0)
    return float(np.median(best))


def time_segmenter(repeats: int) -> dict:
    """Seconds per tile of a quick-fit forest segmenter, torch walk vs compiled walk."""
    from bench_seams import scribble_models

    from napari_muvit.data import PyramidSource
    from napari_muvit.data.synthetic import synthetic_field
    from napari_muvit.engine.predictor import Predictor

    model = scribble_models(0, 0, ("quick",))["quick"]
    source = PyramidSource(synthetic_field(grid=1, seed=5).pyramid)
    region = (0, 0, 1024, 1024)
    forests = [m for m in model.modules() if isinstance(m, TreeEnsemble)]

    def run(compiled: bool):
        for forest in forests:  # the torch walk: no compiled leaves
            if compiled:
                forest.__dict__.pop("_compiled_leaves", None)
            else:
                forest._compiled_leaves = lambda x: None
        pred = Predictor(model, device="cpu")
        t0 = time.perf_counter()
        out = pred.predict(source, region=region)
        return time.perf_counter() - t0, out.labels, pred.stats.get("tiles_computed", 0)

    times = {True: [], False: []}
    labels = {}
    for _ in range(max(1, repeats // 3)):
        for compiled in (False, True):  # alternating: both see the same machine load
            dt, labels[compiled], tiles = run(compiled)
            times[compiled].append(dt)
    assert np.array_equal(labels[True], labels[False]), "the walks disagree on the labels"
    torch_s, compiled_s = float(np.median(times[False])), float(np.median(times[True]))
    return {"region": list(region), "tiles": tiles,
            "torch_walk_s": round(torch_s, 2), "compiled_walk_s": round(compiled_s, 2),
            "speedup": round(torch_s / compiled_s, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--model", action="store_true",
                   help="also time a forest-headed segmenter's prediction (~1 min)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3000, 63)).astype(np.float32)
    classes = (rows[:, 0] + 0.5 * rng.normal(size=3000) > 0).astype(int) + (rows[:, 1] > 1)
    ens = TreeEnsemble(63, 3)
    ens.load_trees(fit_tree_arrays(rows, classes, 3, 100, 20, 0))
    tile = torch.from_numpy(rng.normal(size=(64 * 64, 63)).astype(np.float32))
    with torch.no_grad():
        reference = gather_walk(ens, tile)
        assert torch.equal(reference, ens._walk(tile)), "the torch walks disagree"
        assert torch.equal(reference, ens(tile)), "the compiled walk disagrees"
        before = timed(lambda: gather_walk(ens, tile), args.repeats)
        after = timed(lambda: ens._walk(tile), args.repeats)
        compiled = timed(lambda: ens(tile), args.repeats)
    result = {
        "script": "benchmarks/bench_forest.py",
        "command": "python benchmarks/bench_forest.py " + " ".join(sys.argv[1:]),
        "trees": ens.num_trees, "depth": ens.depth, "threads": args.threads,
        "gather_walk_ms_per_tile": round(before * 1000, 1),
        "flat_int32_walk_ms_per_tile": round(after * 1000, 1),
        "speedup": round(before / after, 2),
        "compiled_walk_ms_per_tile": round(compiled * 1000, 1),
        "compiled_speedup_vs_flat": round(after / compiled, 2),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if args.model:
        result["segmenter"] = time_segmenter(args.repeats)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
