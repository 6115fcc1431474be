"""Time of the random-forest head's tree walk per 64² tile (the forest pixel head's prediction).

Baseline, in the same process: the walk as first written (per-tree ``gather`` over ``(T, P)``
int64 tensors, kept here verbatim as the reference); then ``TreeEnsemble.forward`` (one flat
walk over all trees' node tables with int32 ``index_select``). Both must give identical
probabilities. The forest: 100 class-balanced trees of depth <= 20 (the quick fit's defaults)
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3000, 63)).astype(np.float32)
    classes = (rows[:, 0] + 0.5 * rng.normal(size=3000) > 0).astype(int) + (rows[:, 1] > 1)
    ens = TreeEnsemble(63, 3)
    ens.load_trees(fit_tree_arrays(rows, classes, 3, 100, 20, 0))
    tile = torch.from_numpy(rng.normal(size=(64 * 64, 63)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(gather_walk(ens, tile), ens(tile)), "the walks disagree"
        before = timed(lambda: gather_walk(ens, tile), args.repeats)
        after = timed(lambda: ens(tile), args.repeats)
    result = {
        "script": "benchmarks/bench_forest.py",
        "command": "python benchmarks/bench_forest.py " + " ".join(sys.argv[1:]),
        "trees": ens.num_trees, "depth": ens.depth, "threads": args.threads,
        "gather_walk_ms_per_tile": round(before * 1000, 1),
        "flat_int32_walk_ms_per_tile": round(after * 1000, 1),
        "speedup": round(before / after, 2),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
