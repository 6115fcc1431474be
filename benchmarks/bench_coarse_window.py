"""Time of a forest pixel head's filter bank per 64² tile: coarse crops filtered whole or only
in the window the tile's pixels are read from.

A level-1 tile of 64 px falls in the centre 16 px of its level-4 crop and 4 px of its level-16
crop; the filter bank of a new forest head (``NEW_PIXEL_HEAD_OPTIONS``: ilastik's set at
σ 0.7–5 on every level, 10 and 20 more on the coarse levels) used to be computed on the whole
64² coarse crops. ``PixelHead.level_bank_features`` now filters only that window (the blurs
still read the whole crop). Both are timed in the same process, alternating, on batches of
``--batch`` tiles of an RGB crop nest (CIELAB filters, levels 1, 4, 16), with and without the
wide coarse scales; the script asserts they give the same features.

    python benchmarks/bench_coarse_window.py --json docs/data/bench_coarse_window.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from napari_muvit.data.geometry import centered_nested_bboxes
from napari_muvit.engine._models import NEW_PIXEL_HEAD_OPTIONS, fresh_encoder
from napari_muvit.model import MuViTSegmenter, heads
from napari_muvit.model.heads import PixelHead

LEVELS = (1, 4, 16)


def _whole_axis(positions: torch.Tensor, size: int) -> tuple[int, int]:
    return 0, size


def measure(context_sigmas: list[float], batch: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    options = {**NEW_PIXEL_HEAD_OPTIONS, "context_sigmas": context_sigmas}
    head = PixelHead(64, 3, 8, 4, num_levels=len(LEVELS), color_space="lab", **options).eval()
    encoder = fresh_encoder("tiny", 3, LEVELS)
    seg = MuViTSegmenter(encoder, head="pixel", num_classes=4, head_dim=8,
                         label_values=[1, 2, 3, 4])
    nest = torch.rand(batch, len(LEVELS), 3, 64, 64)
    centres = [(300 + 56 * i, 700 + 48 * i) for i in range(batch)]
    bb = torch.from_numpy(np.stack([centered_nested_bboxes(c, 64, LEVELS) for c in centres]))
    with torch.no_grad():
        _, _, coords, _ = seg.encode(nest, bb)

    def windowed() -> torch.Tensor:
        with torch.no_grad():
            return head.level_bank_features(nest, coords)

    def whole() -> torch.Tensor:
        with torch.no_grad(), mock.patch.object(heads, "_window_around", _whole_axis):
            return head.level_bank_features(nest, coords)

    torch.testing.assert_close(windowed(), whole(), atol=2e-5, rtol=1e-5)
    times: dict[str, list[float]] = {"whole": [], "window": []}
    for _ in range(repeats):  # alternating: the machine's load hits both alike
        for name, func in (("whole", whole), ("window", windowed)):
            t0 = time.perf_counter()
            func()
            times[name].append(time.perf_counter() - t0)
    whole_ms = 1e3 * float(np.median(times["whole"])) / batch
    window_ms = 1e3 * float(np.median(times["window"])) / batch
    return {"context_sigmas": context_sigmas, "features": head.num_image_features,
            "whole_ms_per_tile": round(whole_ms, 2), "window_ms_per_tile": round(window_ms, 2),
            "speedup": round(whole_ms / window_ms, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "script": "benchmarks/bench_coarse_window.py",
        "command": "python benchmarks/bench_coarse_window.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "load_average_start": os.getloadavg(), "runs": [],
    }
    for wide in ([], [10.0, 20.0]):
        run = measure(wide, args.batch, args.repeats)
        result["runs"].append(run)
        print(f"coarse sigmas +{wide or 'none'}: {run['features']} features, whole crops "
              f"{run['whole_ms_per_tile']} ms per tile, window {run['window_ms_per_tile']} ms "
              f"({run['speedup']}x)", flush=True)
    result["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
