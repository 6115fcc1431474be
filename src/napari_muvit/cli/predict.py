"""``napari-muvit predict``: segment an image into a resumable OME-Zarr labels store.

Examples::

    napari-muvit predict slide.ome.zarr --out slide_labels.zarr
    napari-muvit predict big.tif --model my_model/ --out big.zarr --region 0,0,8192,8192
    napari-muvit predict big.zarr --out big_labels.zarr --workers 4      # Dask LocalCluster
    napari-muvit predict big.zarr --out big_labels.zarr --scheduler tcp://10.0.0.1:8786

Re-running the same command after an interruption resumes the unfinished store.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from napari_muvit.cli._args import non_negative_int, positive_int
from napari_muvit.cli._terminal import StatusLine, clock
from napari_muvit.errors import InputError, MuViTError

DEBUG_ENV = "NAPARI_MUVIT_DEBUG"


def parse_region(text: str) -> list[list[int]]:
    """``"y0,x0,y1,x1"`` -> ``[[y0, x0], [y1, x1]]`` (world pixels)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        y0, x0, y1, x1 = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"--region: expected four integers y0,x0,y1,x1, got {text!r}") from None
    if y1 <= y0 or x1 <= x0:
        raise InputError(f"--region: expected y0 < y1 and x0 < x1, got {text!r} (empty region)")
    return [[y0, x0], [y1, x1]]


class ProgressBar(StatusLine):
    """A dependency-free progress bar for ``progress(done, total, message)`` callbacks."""

    def __init__(self, stream: TextIO | None = None, width: int = 30, interval: float = 0.2,
                 log_interval: float = 10.0) -> None:
        super().__init__(stream, interval, log_interval)
        self.width = width
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.due(final=done >= total):
            return
        frac = done / total if total else 1.0
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        filled = round(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = "--:--" if math.isnan(eta) else clock(eta)
        self.write(f"[{bar}] {100 * frac:5.1f}% {done}/{total} tiles "
                   f"{rate:6.1f} tiles/s ETA {eta_text}")






def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``predict`` sub-command."""
    p = subparsers.add_parser(
        "predict",
        help="segment an image into an OME-Zarr labels store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="OME-Zarr/zarr group or array, TIFF or .npy")
    p.add_argument("--model", metavar="FOLDER", default=None,
                   help="segmenter folder (default: the bundled model)")
    p.add_argument("--out", metavar="OUT.zarr", required=True, help="output OME-Zarr store")
    p.add_argument("--region", metavar="Y0,X0,Y1,X1", default=None,
                   help="only predict this world-pixel box (default: whole image)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch", type=positive_int, default=None, metavar="N",
                   help="tiles per batch (default: adapted to free memory)")
    p.add_argument("--overlap", type=non_negative_int, default=None, metavar="PX",
                   help="tile overlap in pixels, blended smoothly (default: tile size / 8, "
                   "which removes tile seams; 0 is faster)")
    p.add_argument("--tile-size", type=positive_int, default=None, metavar="PX",
                   help="tile size (default: the model's training crop size)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision: auto (default) = bf16/fp16 on CUDA, float32 elsewhere; "
                        "bf16 also speeds up CPUs with native bfloat16 (AVX512-BF16/AMX)")
    p.add_argument("--skip-empty", action="store_true",
                   help="skip tiles whose coarse context is flat background (label 0)")
    dist = p.add_mutually_exclusive_group()
    dist.add_argument("--scheduler", metavar="ADDRESS", default=None,
                      help="run on an existing Dask scheduler")
    dist.add_argument("--workers", type=positive_int, default=None, metavar="N",
                      help="run on a local Dask cluster with N worker processes")
    p.add_argument("--probabilities", action="store_true",
                   help="also store float16 class probabilities")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing napari-muvit output at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``predict``; user errors raise MuViTError (one line, exit 2)."""
    try:
        return _run(args)
    except (MuViTError, KeyboardInterrupt):
        raise
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        raise MuViTError(
            f"{type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)"
        ) from None


def _run(args: argparse.Namespace) -> int:
    from napari_muvit.engine.predict import predict

    image = Path(args.image)
    if not image.exists():
        raise InputError(f"IMAGE {args.image!r} does not exist")
    region = parse_region(args.region) if args.region else None
    bar = None if args.quiet else ProgressBar()
    t0 = time.monotonic()
    try:
        out = predict(
            image, model=args.model, region=region, out=args.out, device=args.device,
            batch_size=args.batch, overlap=args.overlap, probabilities=args.probabilities,
            progress=bar, scheduler=args.scheduler, workers=args.workers,
            overwrite=args.overwrite, skip_empty=args.skip_empty, tile_size=args.tile_size,
            amp=args.amp,
        )
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(f"napari-muvit predict: wrote {out} in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
    print(out)
    return 0
