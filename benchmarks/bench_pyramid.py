"""Benchmark: a 256² crop at 32× costs O(crop), not O(image).

For zarr (v3) pyramids of growing size (default 4k², 16k², 65k²) whose chunks are written only
under the crop's footprint (every other chunk is never written and reads as the fill value, so
creating a 65k² pyramid takes seconds), it reads one 256² crop at factor 32 through
:class:`napari_muvit.data.PyramidSource` and reports wall time, store requests (chunk reads,
including misses) and bytes actually fetched, counted by a wrapping zarr store:

* ``pyramid``        OME-Zarr with levels 1, 2, ..., 32: served from the stored 32× level.
* ``stops@8x``       levels 1..8 only: the 32× level is built once from 8× (one-time cost
                     reported separately), then reads are O(crop).
* ``no-coarse``      only full resolution: the 8× and 32× levels are built once (a single full
                     scan), then reads are O(crop). Skipped above ``--no-coarse-max``.
* ``naive``          full resolution only and lazy levels disabled: the 8192² world window is
                     read and area-averaged for every crop (what we avoid).

Run: ``python benchmarks/bench_pyramid.py [--sizes 4096 16384 65536]``. Writes a small JSON
summary (default ``docs/data/pyramid_reads.json``: rows, machine, load, and the doc table's
rows that ``tests/test_docs.py`` checks docs/benchmarks.md against).
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
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore

from napari_muvit.data import Normalization, PyramidSource, open_image
from napari_muvit.data.geometry import centered_nested_bboxes

DEFAULT_JSON = Path(__file__).resolve().parents[1] / "docs" / "data" / "pyramid_reads.json"


class CountingStore(WrapperStore):
    """Wraps a store and counts chunk requests (hits and misses) and bytes returned."""

    def __init__(self, store):
        super().__init__(store)
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.misses = 0
        self.nbytes = 0

    async def get(self, key, prototype=None, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if not key.endswith("zarr.json"):
            self.requests += 1
            if buf is None:
                self.misses += 1
            else:
                self.nbytes += len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        out = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, out):
            if not key.endswith("zarr.json"):
                self.requests += 1
                if buf is None:
                    self.misses += 1
                else:
                    self.nbytes += len(buf)
        return out


def make_pyramid(
    path: Path, size: int, levels: int, chunk: int, footprint: np.ndarray, seed: int = 0
) -> None:
    """OME-Zarr 0.5 (zarr v3) pyramid, uncompressed, data written only under ``footprint``."""
    rng = np.random.default_rng(seed)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for i in range(levels):
        f = 2**i
        n = -(-size // f)
        a = g.create_array(
            str(i),
            shape=(n, n),
            chunks=(chunk, chunk),
            dtype="uint8",
            fill_value=0,
            compressors=None,
        )
        (y0, x0), (y1, x1) = (np.clip(footprint // f, 0, n)).astype(int)
        # align the written window to chunks so that every touched chunk is really stored
        y0, x0 = y0 // chunk * chunk, x0 // chunk * chunk
        y1, x1 = min(-(-y1 // chunk) * chunk, n), min(-(-x1 // chunk) * chunk, n)
        a[y0:y1, x0:x1] = rng.integers(0, 255, (y1 - y0, x1 - x0), dtype=np.uint8)
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [f, f]}]}
        )
    g.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                "datasets": datasets,
            }
        ],
    }


def _timed_reads(
    src: PyramidSource, store: CountingStore, bboxes: list[np.ndarray], factor: int, crop: int
):
    times, reqs, nbytes, px = [], [], [], []
    for bb in bboxes:
        store.reset()
        p0 = src.pixels_read
        t = time.perf_counter()
        out = src.read(bb, factor, crop)
        times.append(time.perf_counter() - t)
        assert out.shape == (1, crop, crop)
        reqs.append(store.requests)
        nbytes.append(store.nbytes)
        px.append(src.pixels_read - p0)
    return (
        statistics.median(times),
        int(statistics.median(reqs)),
        int(statistics.median(nbytes)),
        int(statistics.median(px)),
    )


def _case(
    rows: list[dict],
    name: str,
    src: PyramidSource,
    store: CountingStore,
    bbs: list,
    size: int,
    factor: int,
    crop: int,
    build: tuple | None = None,
) -> None:
    """Optionally build lazy levels (timed), then time the reads; append and print a row."""
    t0 = time.perf_counter()
    store.reset()
    p0 = src.pixels_read
    if build:
        src.prepare(build)
    t_build = time.perf_counter() - t0
    b_req, b_bytes, b_px = store.requests, store.nbytes, src.pixels_read - p0
    tm, req, nb, px = _timed_reads(src, store, bbs, factor, crop)
    rows.append(
        {
            "size": size,
            "case": name,
            "read_ms": tm * 1e3,
            "requests": req,
            "bytes": nb,
            "pixels": px,
            "build_s": t_build if build else 0.0,
            "build_requests": b_req,
            "build_bytes": b_bytes,
            "build_pixels": b_px,
        }
    )
    line = f"{size:>6}² {name:<10} read {tm * 1e3:8.2f} ms  chunks {req:5d}  "
    line += f"bytes {nb:>11,d}  level px {px:>11,d}"
    if build:
        line += f"   | one-time build {t_build:7.2f} s, {b_req} chunk requests, "
        line += f"{b_bytes:,d} B, {b_px:,d} px"
    print(line, flush=True)


def run(
    sizes: list[int], crop: int, factor: int, chunk: int, no_coarse_max: int, root: Path
) -> list[dict]:
    """Run all cases for every size; returns one dict per (size, case)."""
    rows: list[dict] = []
    norm = Normalization("divide", 0, 255.0)  # fixed: keep percentile sampling out of the timings
    for size in sizes:
        path = root / f"pyr_{size}.zarr"
        centre = size // 2
        # five neighbouring 256-px tiles in the image centre; their 32× crops share the grid
        offsets = [(0, 0), (256, 0), (0, 256), (-256, 0), (0, -256)]
        tiles = [(centre + dy, centre + dx) for dy, dx in offsets]
        bbs = [centered_nested_bboxes(t, crop, (1, factor))[1] for t in tiles]
        fp = np.array([np.min([b[0] for b in bbs], 0), np.max([b[1] for b in bbs], 0)])
        t = time.perf_counter()
        make_pyramid(path, size, 6, chunk, fp)
        print(f"{size:>6}² pyramid store created in {time.perf_counter() - t:.2f} s", flush=True)
        store = CountingStore(LocalStore(str(path), read_only=True))
        group = zarr.open_group(store=store, mode="r")
        arrays = [group[str(i)] for i in range(6)]
        args = (store, bbs, size, factor, crop)
        _case(rows, "pyramid", open_image(group, normalization=norm), *args)
        _case(
            rows,
            "stops@8x",
            PyramidSource(arrays[:4], normalization=norm),
            *args,
            build=(1, factor),
        )
        if size <= no_coarse_max:
            _case(
                rows,
                "no-coarse",
                PyramidSource(arrays[:1], normalization=norm),
                *args,
                build=(1, 8, factor),
            )
        _case(
            rows, "naive", PyramidSource(arrays[:1], normalization=norm, lazy_levels=False), *args
        )
        shutil.rmtree(path, ignore_errors=True)
    return rows


def doc_table(rows: list[dict]) -> list[list[str]]:
    """The rows of the table in docs/benchmarks.md (header first)."""
    table = [["image", "case", "read (ms)", "chunks read", "bytes read", "level px read",
              "one-time build"]]
    for r in rows:
        build = "–"
        if r["case"] in ("stops@8x", "no-coarse"):
            build = (f"{r['build_s']:.2f} s, {r['build_requests']} chunks, "
                     f"{r['build_bytes'] / 1e6:.2f} MB")
        read = r["read_ms"]
        table.append([f"{r['size']}²", r["case"], f"{read:.2f}" if read < 10 else f"{read:.0f}",
                      str(r["requests"]), f"{r['bytes']:,d}", f"{r['pixels']:,d}", build])
    return table


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--factor", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument(
        "--no-coarse-max",
        type=int,
        default=16384,
        help="largest size for the no-coarse case (its one-time build scans the image)",
    )
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="summary file to write")
    a = ap.parse_args(argv)
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}, "
        f"{platform.machine()}, {platform.processor() or platform.platform()}"
    )
    print(
        f"crop {a.crop}² at {a.factor}x (world window {a.crop * a.factor}²), chunks {a.chunk}², uint8, "
        "median of 5 reads"
    )
    root = a.dir or Path(tempfile.mkdtemp(prefix="bench-pyramid-"))
    load_before = os.getloadavg()[0]
    try:
        rows = run(a.sizes, a.crop, a.factor, a.chunk, a.no_coarse_max, root)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = {
        "script": "benchmarks/bench_pyramid.py",
        "command": " ".join(["python", "benchmarks/bench_pyramid.py", *argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python "
                   f"{platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}",
        "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "rows": rows,
        "tables": {"reads": doc_table(rows)},
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
