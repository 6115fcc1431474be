"""Benchmark: loading the bundled segmenter, new folder layout vs the old one (issue 12).

A model folder's ``config.yaml`` used to carry the whole training history (2,100 lines for the
bundled segmenter) and was parsed with PyYAML's pure-Python parser. Now it holds only what
builds the model (the history lives in ``history.json``, read only when asked) and is parsed
with libyaml's C safe loader. This script measures, in one process:

* ``load_new_ms``   ``load_model`` of the bundled segmenter as shipped;
* ``load_old_ms``   the same weights in the old layout (history + provenance put back into
                    ``config.yaml``'s ``meta``) loaded with the *old* parser (pure-Python
                    ``SafeLoader``), i.e. what a user of the previous version waited for;
* ``load_old_c_ms`` the old layout with today's loader (C parser): what the split alone buys;
* ``baseline_ms``   constructing ``torch.nn.Linear(1024, 1024)`` (a fixed amount of work, so
                    the ratios below compare across machines and loads);
* ``max_gil_gap_ms`` the longest pause of a thread that sleeps 1 ms in a loop while the model
                    loads (how long loading holds the GIL against, e.g., napari's GUI thread).

Medians over ``--repeats`` runs, one torch thread. Writes ``docs/data/bench_load.json``.

Run: ``python benchmarks/bench_load.py [--repeats 15] [--out docs/data/bench_load.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

from napari_muvit.model import checkpoint, load_history, load_model, read_config
from napari_muvit.weights import default_model_path


def _old_layout(folder: Path, target: Path) -> Path:
    """A copy of ``folder`` with its history back inside config.yaml (the previous layout)."""
    target.mkdir()
    shutil.copy2(folder / "model.safetensors", target / "model.safetensors")
    cfg = read_config(folder)
    history = dict(load_history(folder) or {})
    provenance = history.pop("provenance", None)
    cfg["meta"] = {**cfg["meta"], "history": history, "provenance": provenance}
    (target / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return target


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _max_gil_gap_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Longest gap between wake-ups of a 1 ms sleeper thread while ``fn`` runs."""
    gaps = []
    for _ in range(repeats):
        stop = threading.Event()
        worst = [0.0]

        def sleeper() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                worst[0] = max(worst[0], now - last)
                last = now

        thread = threading.Thread(target=sleeper)
        thread.start()
        time.sleep(0.02)
        fn()
        stop.set()
        thread.join()
        gaps.append(worst[0])
    return 1000 * statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("docs/data/bench_load.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = default_model_path()
    load_model(folder)  # warm imports and caches
    with tempfile.TemporaryDirectory() as tmp:
        old = _old_layout(folder, Path(tmp) / "old_layout")
        pure = mock.patch.object(checkpoint, "_FastTupleSafeLoader", checkpoint.TupleSafeLoader)
        pure_events = mock.patch.object(checkpoint, "_SafeBase", yaml.SafeLoader)

        def load_old_pure() -> None:
            with pure, pure_events:
                load_model(old)

        result = {
            "baseline_ms": _median_ms(lambda: torch.nn.Linear(1024, 1024), args.repeats),
            "load_new_ms": _median_ms(lambda: load_model(folder), args.repeats),
            "load_old_ms": _median_ms(load_old_pure, args.repeats),
            "load_old_c_ms": _median_ms(lambda: load_model(old), args.repeats),
            "max_gil_gap_new_ms": _max_gil_gap_ms(lambda: load_model(folder), args.repeats),
            "max_gil_gap_old_ms": _max_gil_gap_ms(load_old_pure, args.repeats),
            "config_lines_new": len((folder / "config.yaml").read_text().splitlines()),
            "config_lines_old": len((old / "config.yaml").read_text().splitlines()),
        }
    result["load_new_over_baseline"] = result["load_new_ms"] / result["baseline_ms"]
    result["load_old_over_new"] = result["load_old_ms"] / result["load_new_ms"]
    result["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "libyaml": bool(getattr(yaml, "__with_libyaml__", False)),
        "cpu": platform.processor() or platform.machine(),
        "loadavg_1min": os.getloadavg()[0],
        "repeats": args.repeats,
        "torch_threads": 1,
    }
    result["command"] = "python benchmarks/bench_load.py " + " ".join(sys.argv[1:])
    result["script"] = "benchmarks/bench_load.py"
    result["tables"] = {"load": [
        ["what", "time", "ratio"],
        ["`torch.nn.Linear(1024, 1024)` (baseline work)", f"{result['baseline_ms']:.1f} ms", "1×"],
        ["load the bundled segmenter, new layout", f"{result['load_new_ms']:.1f} ms",
         f"{result['load_new_over_baseline']:.1f}× baseline"],
        ["same weights, old layout, old parser", f"{result['load_old_ms']:.1f} ms",
         f"{result['load_old_over_new']:.1f}× the new layout"],
        ["same weights, old layout, C parser", f"{result['load_old_c_ms']:.1f} ms",
         f"{result['load_old_c_ms'] / result['load_new_ms']:.1f}× the new layout"],
        ["longest pause of a 1 ms sleeper thread, new / old layout",
         f"{result['max_gil_gap_new_ms']:.1f} ms", f"old: {result['max_gil_gap_old_ms']:.1f} ms"],
    ]}
    for key, value in result.items():
        if key == "tables":
            continue
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
