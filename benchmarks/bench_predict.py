"""Benchmark the prediction engine: throughput vs a naive loop, prefetch, seams, bounded RSS.

Sections (``--section``, default all):

* ``throughput``: on an 8192² Synthetic-rings pyramid (levels 1, 2, …, 32) with a fixed small
  MuViT[1, 8, 32] model, the :class:`~napari_muvit.engine.Predictor` over a central region vs a
  naive baseline in the same process: a per-tile loop that reads each tile's level crops
  straight from full resolution (``lazy_levels=False``: every 32× crop area-averages a 4096²
  window), batch 1, no cache, no prefetch. Reports Mpx/s, the ratio and the peak RSS of each
  phase; then the engine with the prefetch thread on/off and several batch sizes, and a cache
  re-run of a panned region.
* ``seams``: the same region with ``overlap`` 0, 16 and 32: label disagreement and mean
  total-variation distance of the class probabilities between horizontally/vertically
  adjacent pixels, across tile-cell borders vs inside cells. Seams show up as border/interior
  ratios above 1.
* ``precision``: the bundled model on a held-out Synthetic field (2×2 ring systems of 512²,
  seed 1000: the test image of ``experiments/synthetic_table4.py``), float32 vs bf16 autocast,
  timed alternately; label agreement and mDSC of each against the ground truth. bf16 pays off
  on CPUs with native bfloat16 (AVX512-BF16, AMX) and is emulated (slower) elsewhere.
* ``contention``: the bundled model on a 512² region of the sample, idle and with one busy
  process per core (started and killed by the benchmark): the package default (passive OpenMP
  wait policy, every core) against simple settings (GNU OpenMP's own spin-wait default,
  passive, a short spin, one thread). The wait policy is read when torch loads, so every
  setting runs in a fresh child process, round-robin; the parent reports ratios against the
  best setting of the same load. Then ``--workers 2`` on this machine (a Dask LocalCluster,
  cores divided between the workers) against one process, alternately in one process.
* ``profile``: why the engine / naive ratio is what it is: CPU ms per tile of reading (full
  resolution vs pyramid), the encoder and the head (batch 1 and 4), for the default flat UNETR
  head and narrower layouts, the engine / naive ratio those costs allow, and the top ops of the
  torch profiler.
* ``rss``: whole-image zarr prediction (a :class:`~napari_muvit.engine.ZarrSink` spanning the
  full image) of lazy dask pyramids of 4096², 16384² and 65536², each in a fresh subprocess,
  stopped (cancel token) after a fixed number of tiles because a full 64k² run takes hours on
  2 CPU cores. Reports the peak RSS during prediction, which must not depend on the image size.

Every section prints the detected hardware (CPU flags, native bf16, torch dispatch level)
and the load average next to its rows.

Run: ``python benchmarks/bench_predict.py [--section throughput|seams|precision|contention|rss|all]
[--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import napari_muvit  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import numpy as np
import torch

from napari_muvit.data import PyramidSource, centered_nested_bboxes, plan_tiles, synthetic_rings
from napari_muvit.engine import CancelToken, Predictor
from napari_muvit.engine.stores import create_zarr_sink
from napari_muvit.errors import CancelledError
from napari_muvit.engine.hardware import cpu_capabilities
from napari_muvit.engine.threads import wait_policy
from napari_muvit.model import MuViTEncoder, MuViTSegmenter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import LOADS, cores, load_context  # noqa: E402  (a sibling module of this script)

LEVELS = (1, 8, 32)
TILE = 128
NORM = {"kind": "divide", "low": 0.0, "high": 255.0}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


MODELS = {
    # name: (dim, layers, heads, head_dim)
    "small": (64, 2, 2, 32),
    "tiny": (48, 1, 2, 16),
}


def bench_model(kind: str = "small", seed: int = 0) -> MuViTSegmenter:
    """A fixed small model: MuViT[1, 8, 32] + UNETR, 3 classes ("small": dim 64, 2 layers,
    head 32; "tiny": dim 48, 1 layer, head 16 like the tests)."""
    dim, layers, heads, head_dim = MODELS[kind]
    torch.manual_seed(seed)
    enc = MuViTEncoder(in_channels=1, levels=LEVELS, patch_size=8, dim=dim, num_layers=layers,
                       heads=heads)
    seg = MuViTSegmenter(enc, num_classes=3, head_dim=head_dim, label_values=[0, 1, 2],
                         normalization=NORM, meta={"crop_size": TILE}).eval()
    with torch.no_grad():  # sharpen the untrained output layer so labels vary in space
        seg.head.out.weight.mul_(20.0)
        seg.head.out.bias.zero_()
    return seg


def hardware_line() -> str:
    """Detected capabilities and the load, printed next to every section's rows."""
    caps = cpu_capabilities()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"[hardware: {caps.model or 'cpu'} | torch dispatch {caps.isa} | avx512 {caps.avx512} "
            f"| avx512_bf16 {caps.avx512_bf16} | amx_bf16 {caps.amx_bf16} | native bf16 "
            f"{caps.native_bf16} | {wait_policy().short} | load avg {load}]")


def hwm_mb() -> float:
    """The kernel's exact RSS high-water mark of this process image (``VmHWM``; unlike
    ``ru_maxrss`` it is not inherited from the parent across fork+exec), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@contextmanager
def peak_rss(out: dict[str, float], interval: float = 0.005) -> Iterator[None]:
    """Sample this process's RSS in a thread; ``out`` gets ``start`` and ``peak`` (MiB)."""
    stop = threading.Event()
    out["start"] = out["peak"] = rss_mb()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_mb())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(out["peak"], rss_mb())


def naive_predict(model: MuViTSegmenter, full_res: PyramidSource, tiles: list) -> np.ndarray:
    """The baseline: per tile, read every level from full resolution, batch 1, no cache."""
    lut = np.asarray(model.label_values)
    levels = tuple(float(v) for v in model.levels)
    out = []
    for tile in tiles:
        bb = centered_nested_bboxes(tile.origin, TILE, levels)
        crops, _ = full_res.read_nested(bb, levels, TILE)
        with torch.inference_mode():
            logits = model(torch.from_numpy(crops)[None], torch.from_numpy(bb)[None])
        out.append(lut[logits.argmax(1)[0].numpy()])
    return np.stack(out)


def central_region(shape: tuple[int, int], side: int) -> np.ndarray:
    c = np.asarray(shape) // 2
    return np.stack([c - side // 2, c + side // 2])


def timed(fn: Any, repeats: int = 1) -> tuple[Any, float, float]:
    """Result, best-of-``repeats`` wall time and best CPU time of this process (all threads).

    The CPU is shared with other jobs: the minimum wall time is the least disturbed run, and
    CPU time (work actually done by this process) is much less sensitive to the load.
    """
    best = cpu_best = float("inf")
    res = None
    for _ in range(max(1, repeats)):
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        best = min(best, time.perf_counter() - t0)
        cpu_best = min(cpu_best, time.process_time() - c0)
    return res, best, cpu_best


_PYRAMIDS: dict[int, Any] = {}


def rings_pyramid(size: int) -> Any:
    if size not in _PYRAMIDS:
        t0 = time.perf_counter()
        _PYRAMIDS[size] = synthetic_rings(size, seed=0, min_level_size=128)
        print(f"synthetic {size}² pyramid factors {_PYRAMIDS[size].factors} "
              f"in {time.perf_counter() - t0:.1f} s")
    return _PYRAMIDS[size]


# --------------------------------------------------------------------------------------------
# throughput
# --------------------------------------------------------------------------------------------


def _run_case(pred: Predictor, source: PyramidSource, region: np.ndarray, repeats: int,
              n_tiles: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Time ``pred.predict`` (best of ``repeats``) and collect its per-run statistics."""
    mem: dict[str, float] = {}
    with peak_rss(mem):
        sink, dt, cpu = timed(lambda: pred.predict(source, region), repeats)
    pred.reset_stats()
    pred.predict(source, region)  # statistics of exactly one run
    px = n_tiles * TILE * TILE
    row = {"tiles": n_tiles, "seconds": dt, "cpu_s": cpu, "mpx_s": px / dt / 1e6,
           "mpx_cpu_s": px / cpu / 1e6, "peak_rss_mb": mem["peak"], "start_rss_mb": mem["start"],
           "read_s": pred.stats["read_s"], "compute_s": pred.stats["compute_s"],
           "wait_s": pred.stats["wait_s"]}
    return sink.labels, row


def _read_costs(full_res: PyramidSource, pyramid: PyramidSource, tiles: list) -> dict[str, float]:
    """CPU ms per tile to read the nested crops: full resolution (naive) vs the pyramid."""
    out = {}
    for name, src in (("full-res", full_res), ("pyramid", pyramid)):
        c0 = time.process_time()
        for t in tiles:
            src.read_nested(centered_nested_bboxes(t.origin, TILE, LEVELS), LEVELS, TILE)
        out[name] = (time.process_time() - c0) / len(tiles) * 1000
    return out


def _print_rows(rows: dict[str, dict[str, Any]]) -> None:
    print(f"{'case':<22}{'tiles':>6}{'wall s':>8}{'Mpx/s':>8}{'CPU s':>8}{'Mpx/CPU-s':>10}"
          f"{'peak RSS MiB':>13}{'read s':>8}{'model s':>8}{'wait s':>8}")
    nan = float("nan")
    for name, r in rows.items():
        print(f"{name:<22}{r['tiles']:>6}{r['seconds']:>8.2f}{r['mpx_s']:>8.3f}{r['cpu_s']:>8.2f}"
              f"{r['mpx_cpu_s']:>10.3f}{r['peak_rss_mb']:>13.0f}{r.get('read_s', nan):>8.2f}"
              f"{r.get('compute_s', nan):>8.2f}{r.get('wait_s', nan):>8.2f}")


def section_throughput(args: argparse.Namespace) -> dict[str, Any]:
    img = rings_pyramid(args.size)
    pyramid = PyramidSource(img.pyramid, downsample_factors=img.factors, normalization=NORM)
    full_res = PyramidSource([img.pyramid[0]], normalization=NORM, lazy_levels=False)
    model = bench_model(args.model)
    region = central_region(pyramid.shape, args.region)
    tiles = plan_tiles(region, TILE, pyramid.shape)
    n_naive = min(args.naive_tiles, len(tiles))

    # warm-up (first oneDNN calls per shape are slow), not counted
    for bs in (1, 4, 8, 16):
        Predictor(model, device="cpu", batch_size=bs, cache_tiles=0).predict(
            pyramid, [[0, 0], [TILE * 4, TILE * 4]])
    naive_predict(model, full_res, tiles[:1])
    reads = _read_costs(full_res, pyramid, tiles[:n_naive])

    rows: dict[str, Any] = {}
    mem: dict[str, float] = {}
    with peak_rss(mem):
        ref, dt, cpu = timed(lambda: naive_predict(model, full_res, tiles[:n_naive]), args.repeats)
    px = n_naive * TILE * TILE
    rows["naive (batch 1)"] = {"tiles": n_naive, "seconds": dt, "cpu_s": cpu, "mpx_s": px / dt / 1e6,
                               "mpx_cpu_s": px / cpu / 1e6, "peak_rss_mb": mem["peak"]}
    variants = [  # "engine" = the defaults on CPU: batch 4, no prefetch thread, float32
        ("engine", {}),
        ("engine + prefetch", {"prefetch": True}),
        ("engine batch 1", {"batch_size": 1}),
        ("engine batch 8", {"batch_size": 8}),
        ("engine batch 16", {"batch_size": 16}),
        ("engine amp=bf16", {"amp": "bf16"}),
    ]
    results = {}
    for name, kw in variants:
        pred = Predictor(model, device="cpu", cache_tiles=0, **kw)
        results[name], rows[name] = _run_case(pred, pyramid, region, args.repeats, len(tiles))

    # where reading is expensive (a lazily rendered dask pyramid), the prefetch thread matters
    lazy = PyramidSource(lazy_pyramid(args.size), downsample_factors=LEVELS, normalization=NORM)
    lazy_region = central_region(lazy.shape, args.region // 2)
    n_lazy = len(plan_tiles(lazy_region, TILE, lazy.shape))
    for name, pf in (("lazy dask, prefetch", True), ("lazy dask, no prefetch", False)):
        pred = Predictor(model, device="cpu", cache_tiles=0, prefetch=pf)
        _, rows[name] = _run_case(pred, lazy, lazy_region, args.repeats, n_lazy)

    # the user pans by a quarter of the region: only the new tiles are computed
    pred = Predictor(model, device="cpu", cache_tiles=512)
    pred.predict(pyramid, region)
    panned = region + args.region // 4
    pred.reset_stats()
    _, dt_pan, _cpu = timed(lambda: pred.predict(pyramid, panned))
    pan = {"tiles": len(plan_tiles(panned, TILE, pyramid.shape)), "seconds": dt_pan,
           "computed": pred.stats["tiles_computed"], "cache_hits": pred.stats["cache_hits"]}

    # agreement with the naive loop on the tiles both computed (the stored pyramid levels are
    # uint8-rounded means, the naive loop averages full resolution exactly: rare flips)
    eng = results["engine"]
    same = float(np.mean([
        (ref[i] == eng[t.core[0, 0] - region[0, 0] : t.core[1, 0] - region[0, 0],
                       t.core[0, 1] - region[0, 1] : t.core[1, 1] - region[0, 1]]).mean()
        for i, t in enumerate(tiles[:n_naive])
    ]))
    fp32 = [v for k, v in results.items() if "bf16" not in k]
    same_fp32 = min(float((eng == v).mean()) for v in fp32)
    same_bf16 = float((eng == results["engine amp=bf16"]).mean())
    naive = rows["naive (batch 1)"]
    ratio = rows["engine"]["mpx_s"] / naive["mpx_s"]
    ratio_cpu = rows["engine"]["mpx_cpu_s"] / naive["mpx_cpu_s"]
    ratio_bf16 = rows["engine amp=bf16"]["mpx_cpu_s"] / naive["mpx_cpu_s"]
    prefetch_gain = rows["engine + prefetch"]["mpx_s"] / rows["engine"]["mpx_s"]
    prefetch_lazy = rows["lazy dask, prefetch"]["mpx_s"] / rows["lazy dask, no prefetch"]["mpx_s"]

    dim, layers, heads, head_dim = MODELS[args.model]
    print(f"\n{hardware_line()}")
    print(f"throughput on {args.size}², central {args.region}² region, tile {TILE}, "
          f"levels {LEVELS}, model {args.model!r} (dim {dim}, {layers} layers, {heads} heads, "
          f"UNETR {head_dim}), torch threads {torch.get_num_threads()}")
    print(f"nested-crop read, CPU ms/tile: full resolution {reads['full-res']:.1f}, "
          f"pyramid {reads['pyramid']:.2f} ({reads['full-res'] / reads['pyramid']:.0f}x)")
    _print_rows(rows)
    print(f"(the amp=bf16 row ran on: {cpu_capabilities().short})")
    print(f"pan by {args.region // 4} px: {pan['tiles']} tiles, {pan['computed']} computed, "
          f"{pan['cache_hits']} from cache, {pan['seconds']:.2f} s")
    print(f"engine / naive: {ratio:.1f}x wall, {ratio_cpu:.1f}x per CPU-second "
          f"(amp=bf16: {ratio_bf16:.1f}x per CPU-second)")
    print(f"prefetch on/off (wall): in-memory pyramid {prefetch_gain:.2f}x, lazy dask {prefetch_lazy:.2f}x")
    print(f"identical pixels: engine vs naive {100 * same:.2f}%, fp32 engine variants "
          f"{100 * same_fp32:.4f}%, bf16 vs fp32 {100 * same_bf16:.2f}%")
    return {"rows": rows, "reads_ms": reads, "pan": pan, "ratio": ratio, "ratio_cpu": ratio_cpu,
            "ratio_bf16_cpu": ratio_bf16, "prefetch_gain": prefetch_gain,
            "prefetch_gain_lazy": prefetch_lazy, "identical_vs_naive": same,
            "hardware": cpu_capabilities().as_dict(), "loadavg": os.getloadavg()}


# --------------------------------------------------------------------------------------------
# seams
# --------------------------------------------------------------------------------------------


def seam_stats(labels: np.ndarray, probs: np.ndarray, origin: np.ndarray, step: int) -> dict[str, float]:
    """Label disagreement and probability TV distance of adjacent pixel pairs, across cell
    borders (world coordinate of the right/lower pixel a multiple of ``step``) vs inside."""
    p = probs.astype(np.float32)
    out: dict[str, list[np.ndarray]] = {"lab_b": [], "lab_i": [], "tv_b": [], "tv_i": []}
    for axis in (0, 1):
        n = labels.shape[axis]
        border = (np.arange(1, n) + origin[axis]) % step == 0
        lab = np.diff(labels.astype(np.int64), axis=axis) != 0
        tv = 0.5 * np.abs(np.diff(p, axis=axis + 1)).sum(0)
        sel_b = (slice(None), border) if axis == 1 else (border, slice(None))
        sel_i = (slice(None), ~border) if axis == 1 else (~border, slice(None))
        out["lab_b"].append(lab[sel_b].ravel())
        out["lab_i"].append(lab[sel_i].ravel())
        out["tv_b"].append(tv[sel_b].ravel())
        out["tv_i"].append(tv[sel_i].ravel())
    m = {k: float(np.concatenate(v).mean()) for k, v in out.items()}
    m["lab_ratio"] = m["lab_b"] / max(m["lab_i"], 1e-12)
    m["tv_ratio"] = m["tv_b"] / max(m["tv_i"], 1e-12)
    return m


def section_seams(args: argparse.Namespace) -> dict[str, Any]:
    img = rings_pyramid(args.size)
    src = PyramidSource(img.pyramid, downsample_factors=img.factors, normalization=NORM)
    model = bench_model(args.model)
    region = central_region(src.shape, args.region)
    print(f"\nseams on {args.size}², central {args.region}² region (borders = tile-cell edges)")
    print(f"{'overlap':>8}{'tiles':>7}{'s':>8}{'label diff border':>19}{'interior':>10}{'ratio':>7}"
          f"{'prob TV border':>16}{'interior':>10}{'ratio':>7}")
    rows = {}
    for ov in (0, 16, 32):
        pred = Predictor(model, device="cpu", batch_size=8, overlap=ov, cache_tiles=0)
        sink, dt, _cpu = timed(lambda p=pred: p.predict(src, region, probabilities=True))
        m = seam_stats(sink.labels, sink.probs, region[0], TILE - ov)
        m.update(tiles=pred.stats["tiles_computed"], seconds=dt)
        rows[ov] = m
        print(f"{ov:>8}{m['tiles']:>7}{dt:>8.2f}{m['lab_b']:>19.4f}{m['lab_i']:>10.4f}"
              f"{m['lab_ratio']:>7.2f}{m['tv_b']:>16.4f}{m['tv_i']:>10.4f}{m['tv_ratio']:>7.2f}")
    return rows


# --------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------


def section_precision(args: argparse.Namespace) -> dict[str, Any]:
    """Bundled model, float32 vs bf16 autocast: speed (alternating runs), agreement, mDSC."""
    from napari_muvit.data import synthetic_field
    from napari_muvit.metrics import dice_scores
    from napari_muvit.model import load_model
    from napari_muvit.weights import default_model_path

    model = load_model(default_model_path())
    field = synthetic_field(grid=2, system_size=512, seed=1000)
    src = PyramidSource(field.pyramid, downsample_factors=field.factors,
                        normalization=model.normalization)
    gt = np.asarray(field.labels)
    region = None
    if args.precision_side:  # a central part only (bf16 is ~30x slower where it is emulated)
        region = central_region(gt.shape, args.precision_side)
        gt = gt[region[0, 0]:region[1, 0], region[0, 1]:region[1, 1]]
    preds = {amp: Predictor(model, device="cpu", amp=amp, cache_tiles=0) for amp in ("off", "bf16")}
    for pred in preds.values():  # warm-up (oneDNN primitive creation)
        pred.predict(src, [[0, 0], [256, 256]])
    times: dict[str, list[float]] = {amp: [] for amp in preds}
    labels: dict[str, np.ndarray] = {}
    for rep in range(max(2, args.repeats) * 2):
        for amp in (("off", "bf16") if rep % 2 == 0 else ("bf16", "off")):
            t0 = time.perf_counter()
            labels[amp] = preds[amp].predict(src, region).labels
            times[amp].append(time.perf_counter() - t0)

    def dice(pred: np.ndarray) -> tuple[float, float]:
        scores = dice_scores(pred, gt, values=(1, 2))
        return scores[1], scores[2]

    caps = cpu_capabilities()
    cpu_bf16 = caps.native_bf16
    print(f"\n{hardware_line()}")
    print(f"precision: bundled model on a held-out {gt.shape[0]}x{gt.shape[1]} field, "
          f"{len(times['off'])} alternating runs each; native CPU bf16: {cpu_bf16} "
          f"(capability {torch.backends.cpu.get_cpu_capability()})")
    rows = {}
    for amp, name in (("off", "float32"), ("bf16", "bf16 autocast")):
        med = float(np.median(times[amp]))
        outer, inner = dice(labels[amp])
        rows[amp] = {"median_s": med, "mpx_s": gt.size / med / 1e6, "outer": outer,
                     "inner": inner, "mDSC": (outer + inner) / 2}
        print(f"{name:<15} median {med:6.2f} s  {gt.size / med / 1e6:6.2f} Mpx/s  "
              f"Dice outer {outer:.4f} inner {inner:.4f} mDSC {(outer + inner) / 2:.4f}  "
              f"[{caps.short}]")
    same = float((labels["off"] == labels["bf16"]).mean())
    speedup = rows["off"]["median_s"] / rows["bf16"]["median_s"]
    print(f"bf16 / float32 speed-up x{speedup:.2f}; identical labels {100 * same:.4f}%")
    return {"rows": rows, "speedup": speedup, "identical": same, "native_bf16": cpu_bf16,
            "hardware": caps.as_dict(), "loadavg": os.getloadavg()}


# --------------------------------------------------------------------------------------------
# profile: why the engine / naive ratio is what it is
# --------------------------------------------------------------------------------------------


def _component_ms(model: MuViTSegmenter, crops: torch.Tensor, bbs: torch.Tensor,
                  repeats: int) -> dict[str, float]:
    """CPU ms per tile of the encoder and of the head (forward hooks), batch of ``len(crops)``."""
    marks: dict[str, float] = {}
    spent = {"head": 0.0, "total": 0.0}
    head = model.head  # the segmenter runs the encoder's parts itself: encoder = total - head
    hooks = [head.register_forward_pre_hook(lambda *_: marks.__setitem__("t", time.process_time())),
             head.register_forward_hook(lambda *_: spent.__setitem__(
                 "head", spent["head"] + time.process_time() - marks["t"]))]
    try:
        with torch.inference_mode():
            model(crops, bbs)  # warm-up
            spent["head"] = 0.0
            c0 = time.process_time()
            for _ in range(repeats):
                model(crops, bbs)
            spent["total"] = time.process_time() - c0
    finally:
        for h in hooks:
            h.remove()
    spent["encoder"] = spent["total"] - spent["head"]
    n = repeats * len(crops)
    return {k: 1000 * v / n for k, v in spent.items()}


def section_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Per-tile CPU cost of reading (naive vs pyramid), encoder and head, for the default head
    and narrower layouts; the engine / naive ratio these costs allow; top ops (torch profiler)."""
    img = rings_pyramid(args.size)
    pyramid = PyramidSource(img.pyramid, downsample_factors=img.factors, normalization=NORM)
    full_res = PyramidSource([img.pyramid[0]], normalization=NORM, lazy_levels=False)
    tiles = plan_tiles(central_region(pyramid.shape, args.region), TILE, pyramid.shape)[:8]
    reads = _read_costs(full_res, pyramid, tiles)
    crops = np.stack([pyramid.read_nested(centered_nested_bboxes(t.origin, TILE, LEVELS),
                                          LEVELS, TILE)[0] for t in tiles[:4]])
    bbs = np.stack([centered_nested_bboxes(t.origin, TILE, LEVELS) for t in tiles[:4]])
    x, bb = torch.from_numpy(crops), torch.from_numpy(bbs)
    dim, layers, heads, head_dim = MODELS[args.model]
    layouts = {"flat (default)": {}, "taper=True": {"taper": True},
               "channels (32, 32, 16, 8)": {"channels": [head_dim, head_dim, head_dim // 2,
                                                         head_dim // 4]}}
    print(f"\n{hardware_line()}")
    print(f"profile: model {args.model!r}, tile {TILE}, torch threads {torch.get_num_threads()}; "
          f"CPU ms per tile. Reading nested crops: full resolution (naive) "
          f"{reads['full-res']:.1f}, pyramid (engine) {reads['pyramid']:.2f}")
    print(f"{'head layout':<28}{'batch':>6}{'encoder':>9}{'head':>8}{'model':>8}{'head %':>8}"
          f"{'engine/naive bound':>20}")
    rows: dict[str, Any] = {}
    for name, opts in layouts.items():
        torch.manual_seed(0)
        enc = MuViTEncoder(in_channels=1, levels=LEVELS, patch_size=8, dim=dim, num_layers=layers,
                           heads=heads)
        model = MuViTSegmenter(enc, num_classes=3, head_dim=head_dim, head_options=opts,
                               meta={"crop_size": TILE}).eval()
        one = _component_ms(model, x[:1], bb[:1], args.profile_repeats * 4)
        four = _component_ms(model, x, bb, args.profile_repeats)
        # naive = batch 1 + full-res reads; engine = batch 4 + pyramid reads
        bound = (reads["full-res"] + one["total"]) / (reads["pyramid"] + four["total"])
        rows[name] = {"batch1": one, "batch4": four, "engine_vs_naive_bound": bound}
        for b, r in (("1", one), ("4", four)):
            print(f"{name:<28}{b:>6}{r['encoder']:>9.2f}{r['head']:>8.2f}{r['total']:>8.2f}"
                  f"{100 * r['head'] / max(r['total'], 1e-9):>7.0f}%"
                  f"{(f'{bound:.2f}x' if b == '4' else ''):>20}")
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = bench_model(args.model)
    with torch.inference_mode():
        model(x, bb)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_repeats):
                model(x, bb)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(table)
    return {"reads_ms": reads, "layouts": rows, "top_ops": table,
            "hardware": cpu_capabilities().as_dict(), "loadavg": os.getloadavg()}


# --------------------------------------------------------------------------------------------
# contention
# --------------------------------------------------------------------------------------------

# name: (environment, torch threads: None for the default, "all" for every core as a fixed
# count). GOMP_SPINCOUNT=300000 is what GNU OpenMP does when no policy is set (~3 ms of spinning
# per wait): torch's behaviour before this package set a passive policy. Every setting but the
# default fixes its count (a "simple setting"); the default lets the engine tune it.
CONTENTION_CONFIGS: dict[str, tuple[dict[str, str], int | str | None]] = {
    "default": ({}, None),
    "spin (GNU OpenMP default)": ({"GOMP_SPINCOUNT": "300000"}, "all"),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, "all"),
    "short spin (GOMP_SPINCOUNT=10000)": ({"GOMP_SPINCOUNT": "10000"}, "all"),
    "1 thread (spin)": ({"GOMP_SPINCOUNT": "300000"}, 1),
    "1 thread, passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
}
# candidate defaults (--candidates): another wait policy with the engine's tuned thread count
CANDIDATE_CONFIGS: dict[str, tuple[dict[str, str], int | str | None]] = {
    "tuned, short spin": ({"GOMP_SPINCOUNT": "10000"}, None),
    "tuned, spin": ({"GOMP_SPINCOUNT": "300000"}, None),
}
POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def _sample_source(model: Any, side: int) -> tuple[PyramidSource, np.ndarray]:
    from napari_muvit.data.samples import synthetic_sample_image

    syn = synthetic_sample_image(size=max(1024, 2 * side))
    src = PyramidSource(syn.pyramid, downsample_factors=syn.factors,
                        normalization=model.normalization)
    return src, central_region(src.shape, side)


def contention_child(threads: int | None, side: int, min_seconds: float) -> dict[str, Any]:
    """One setting in this (fresh) process: bundled model, ``side``² region, repeated runs."""
    from napari_muvit.model import load_model
    from napari_muvit.weights import default_model_path

    model = load_model(default_model_path())
    src, region = _sample_source(model, side)
    pred = Predictor(model, device="cpu", cache_tiles=0, threads=threads)
    pred.predict(src, [[0, 0], [128, 128]])  # warm-up (oneDNN primitives)
    times = []
    t_start = time.perf_counter()
    while not times or (time.perf_counter() - t_start < min_seconds and len(times) < 5):
        t0 = time.perf_counter()
        pred.predict(src, region)
        times.append(time.perf_counter() - t0)
    return {"seconds": float(np.median(times)), "runs": len(times), "mpx_s": side * side / float(np.median(times)) / 1e6,
            "threads": torch.get_num_threads() if threads is None else threads,
            "policy": wait_policy().short, "describe": pred.describe(),
            "loadavg": os.getloadavg()}


def workers_child(side: int, rounds: int) -> dict[str, Any]:
    """One process vs ``--workers 2`` (Dask LocalCluster on this machine), alternately."""
    from napari_muvit.engine.distributed import predict_distributed
    from napari_muvit.engine.api import predict as predict_api
    from napari_muvit.model import load_model
    from napari_muvit.weights import default_model_path

    model = load_model(default_model_path())
    src, region = _sample_source(model, side)
    folder = str(default_model_path())
    times: dict[str, list[float]] = {"1 process": [], "--workers 2": []}
    stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(rounds):
            order = list(times) if rep % 2 == 0 else list(times)[::-1]
            for name in order:
                out = Path(tmp) / f"{name.replace(' ', '_')}_{rep}.zarr"
                t0 = time.perf_counter()
                if name == "1 process":
                    predict_api(src, model=folder, region=region, out=out, device="cpu")
                else:
                    predict_distributed(src, folder, out, workers=2, region=region, device="cpu",
                                        stats=stats)
                times[name].append(time.perf_counter() - t0)
    block_s = [r["seconds"] for r in stats.get("results", [])]
    return {"seconds": {k: float(np.median(v)) for k, v in times.items()},
            "worker_block_seconds_sum": float(sum(block_s)), "blocks": len(block_s),
            "tiles": int(stats.get("total", 0)), "loadavg": os.getloadavg()}


def _child(argv: list[str], env_extra: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS}
    env.update(env_extra)
    res = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         env=env)
    if res.returncode:
        raise RuntimeError(f"child {argv} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def section_contention(args: argparse.Namespace) -> dict[str, Any]:
    side = args.contention_region
    configs = {**CONTENTION_CONFIGS, **(CANDIDATE_CONFIGS if args.candidates else {})}
    names = list(configs)
    out: dict[str, Any] = {"region": side, "cores": cores(), "loads": {}}
    print(f"\n{hardware_line()}")
    print(f"contention: bundled model, {side}² region of the sample, {cores()} cores; each "
          f"setting in a fresh process, {args.contention_rounds} rounds round-robin")
    for load in args.loads:
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        ctx = load_context(load)
        with ctx:
            for rnd in range(args.contention_rounds):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                for name in order:
                    env, threads = configs[name]
                    argv = ["--contention-child", str(side), "--min-seconds", str(args.min_seconds)]
                    if threads is not None:
                        argv += ["--child-threads", str(cores() if threads == "all" else threads)]
                    runs[name].append(_child(argv, env))
            workers = None
            if not args.no_workers:
                workers = _child(["--workers-child", str(args.workers_region)], {})
        med = {n: float(np.median([r["seconds"] for r in rs])) for n, rs in runs.items()}
        best = min(med.values())
        simple_best = min(v for n, v in med.items() if n in CONTENTION_CONFIGS and n != "default")
        started = {"idle": "nothing started", "busy": "one busy process per core",
                   "desktop": "one busy process per core, each in a session of its own"}
        print(f"-- {load}: {started[load]}")
        print(f"{'setting':<36}{'threads':>8}{'median s':>10}{'Mpx/s':>8}{'vs best':>9}  load avg")
        rows = {}
        for n in names:
            r = runs[n][-1]
            la = ", ".join(f"{x[0]:.1f}" for x in (rr["loadavg"] for rr in runs[n]))
            rows[n] = {"seconds": med[n], "mpx_s": side * side / med[n] / 1e6,
                       "vs_best": best / med[n], "threads": r["threads"], "policy": r["policy"],
                       "loadavg_1min": [rr["loadavg"][0] for rr in runs[n]],
                       "all_seconds": [rr["seconds"] for rr in runs[n]]}
            print(f"{n:<36}{r['threads']:>8}{med[n]:>10.2f}{side * side / med[n] / 1e6:>8.3f}"
                  f"{best / med[n]:>9.2f}  {la}")
        ratio = simple_best / med["default"]
        print(f"default / best simple setting: {ratio:.2f}x   ({runs['default'][-1]['describe']})")
        entry: dict[str, Any] = {"rows": rows, "default_vs_best_simple": ratio}
        if workers is not None:
            w = workers["seconds"]
            wr = w["1 process"] / w["--workers 2"]
            print(f"--workers 2 on this machine ({workers['tiles']} tiles, {workers['blocks']} "
                  f"blocks): 1 process {w['1 process']:.2f} s, --workers 2 {w['--workers 2']:.2f} s "
                  f"(incl. cluster start) -> {wr:.2f}x; worker block time summed "
                  f"{workers['worker_block_seconds_sum']:.2f} s")
            entry["workers"] = {**workers, "ratio_vs_1_process": wr}
        out["loads"][load] = entry
    return out



# --------------------------------------------------------------------------------------------
# bounded memory
# --------------------------------------------------------------------------------------------


def lazy_pyramid(size: int, chunk: int = 1024) -> list[Any]:
    """Dask pyramid (levels 1, 8, 32) of a cheap analytic ring pattern, rendered on demand."""
    import dask.array as da

    levels = []
    for f in LEVELS:
        n = -(-size // f)
        chunks = tuple(tuple(min(chunk, n - i) for i in range(0, n, chunk)) for _ in range(2))

        def block(block_info: dict | None = None, f: int = f) -> np.ndarray:
            (y0, y1), (x0, x1) = block_info[None]["array-location"]
            y = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) * f
            x = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) * f
            r = np.hypot(y - size / 2, x - size / 2)
            v = 120 + 60 * np.sin(r * (12 * np.pi / size)) + 25 * np.sin(x * 0.21) * np.sin(y * 0.17)
            return np.clip(v, 0, 255).astype(np.uint8)

        levels.append(da.map_blocks(block, dtype=np.uint8, chunks=chunks,
                                    meta=np.empty((0, 0), np.uint8)))
    return levels


def rss_child(size: int, tiles: int) -> dict[str, Any]:
    """One whole-image zarr prediction, cancelled after ``tiles`` tiles (runs in a subprocess)."""
    torch.set_num_threads(2)
    src = PyramidSource(lazy_pyramid(size), downsample_factors=LEVELS, normalization=NORM)
    model = bench_model()
    pred = Predictor(model, device="cpu", batch_size=8, cache_tiles=0)
    token = CancelToken()
    with tempfile.TemporaryDirectory() as tmp:
        sink = create_zarr_sink(pred, src, Path(tmp) / "out.zarr")
        state = {"done": 0}

        def progress(done: int, total: int, message: str) -> None:
            state.update(done=done, total=total)
            if done >= tiles:
                token.cancel()

        mem: dict[str, float] = {}
        t0 = time.perf_counter()
        with peak_rss(mem):
            try:
                pred.predict(src, sink=sink, progress=progress, cancel=token)
            except CancelledError:
                pass
        dt = time.perf_counter() - t0
        end_rss = rss_mb()
        chunks = sink.chunks_written
        store_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
    return {"size": size, "tiles": state["done"], "total": state["total"], "seconds": dt,
            "tiles_s": state["done"] / dt, "start_rss_mb": mem["start"],
            "sampled_peak_rss_mb": mem["peak"], "end_rss_mb": end_rss,
            "peak_rss_mb": hwm_mb(),
            "chunks_written": chunks, "store_mb": store_mb}


def section_rss(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    print(f"\nwhole-image zarr prediction, lazy dask pyramid, stopped after {args.rss_tiles} tiles")
    # glibc's dynamic mmap threshold keeps freed batch buffers in the heap, which makes the peak
    # jitter by ~100 MiB from run to run; a fixed threshold shows the engine's own footprint
    for alloc, env in (("glibc default", {}), ("MALLOC_MMAP_THRESHOLD_=1MiB",
                                                {"MALLOC_MMAP_THRESHOLD_": "1048576"})):
        print(f"-- allocator: {alloc}")
        print(f"{'image':>8}{'tiles done':>11}{'of':>11}{'tiles/s':>9}{'RSS before MiB':>16}"
              f"{'peak MiB':>10}{'end MiB':>9}{'peak-before':>13}{'chunks':>8}")
        peaks = []
        for size in args.rss_sizes:
            cmd = [sys.executable, __file__, "--rss-child", str(size), "--rss-tiles",
                   str(args.rss_tiles), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, **env})
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["allocator"] = alloc
            rows.append(row)
            peaks.append(row["peak_rss_mb"])
            print(f"{size:>7}²{row['tiles']:>11}{row['total']:>11}{row['tiles_s']:>9.1f}"
                  f"{row['start_rss_mb']:>16.0f}{row['peak_rss_mb']:>10.0f}{row['end_rss_mb']:>9.0f}"
                  f"{row['peak_rss_mb'] - row['start_rss_mb']:>13.0f}{row['chunks_written']:>8}")
        print(f"peak RSS spread across sizes: {max(peaks) - min(peaks):.0f} MiB "
              f"({max(peaks) / min(peaks):.2f}x) for a "
              f"{args.rss_sizes[-1] ** 2 / args.rss_sizes[0] ** 2:.0f}x larger image")
    return rows


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=("throughput", "seams", "precision", "profile", "contention", "rss",
                                 "all"),
                        default="all")
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=["idle", "busy"],
                        help="contention: without / with one busy process per core")
    parser.add_argument("--contention-region", type=int, default=512)
    parser.add_argument("--contention-rounds", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="contention: repeat a setting's prediction for this long (max 5 runs)")
    parser.add_argument("--workers-region", type=int, default=2048,
                        help="contention: region side for the --workers 2 comparison")
    parser.add_argument("--no-workers", action="store_true", help="skip the --workers 2 row")
    parser.add_argument("--candidates", action="store_true",
                        help="contention: also time other wait policies with the tuned count")
    parser.add_argument("--profile-repeats", type=int, default=5)
    parser.add_argument("--precision-side", type=int, default=None,
                        help="precision: predict only a central square of this side")
    parser.add_argument("--size", type=int, default=8192, help="synthetic pyramid side")
    parser.add_argument("--region", type=int, default=1024, help="central region side")
    parser.add_argument("--naive-tiles", type=int, default=16)
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--rss-tiles", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--repeats", type=int, default=2, help="best-of-N timings")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--contention-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args()
    if args.contention_child is not None:  # the defaults under test: no explicit thread count
        print(json.dumps(contention_child(args.child_threads, args.contention_child,
                                          args.min_seconds)))
        return
    if args.workers_child is not None:
        print(json.dumps(workers_child(args.workers_child, rounds=2)))
        return
    torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        print(json.dumps(rss_child(args.rss_child, args.rss_tiles)))
        return
    if args.quick:
        args.size, args.region, args.naive_tiles = 2048, 512, 4
        args.rss_sizes, args.rss_tiles, args.repeats = [2048, 8192], 32, 1
    print(f"{platform.platform()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | torch {torch.__version__} threads {torch.get_num_threads()}")
    out: dict[str, Any] = {}
    if args.section in ("throughput", "all"):
        out["throughput"] = section_throughput(args)
    if args.section in ("seams", "all"):
        out["seams"] = section_seams(args)
    if args.section in ("precision", "all"):
        out["precision"] = section_precision(args)
    if args.section in ("profile", "all"):
        out["profile"] = section_profile(args)
    if args.section in ("contention", "all"):
        out["contention"] = section_contention(args)
    if args.section in ("rss", "all"):
        out["rss"] = section_rss(args)
    if args.json is not None:
        out["script"] = "benchmarks/bench_predict.py"
        out["command"] = " ".join(["python", out["script"], *sys.argv[1:]])
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
