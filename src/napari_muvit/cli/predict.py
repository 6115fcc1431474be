"""``napari-muvit predict``: segment an image into a resumable OME-Zarr labels store.

Examples::

    napari-muvit predict slide.ome.zarr --out slide_labels.zarr
    napari-muvit predict big.tif --model my_model/ --out big.zarr --region 0,0,8192,8192
    napari-muvit predict big.zarr --out big_labels.zarr --workers 4      # Dask LocalCluster
    napari-muvit predict big.zarr --out big_labels.zarr --scheduler tcp://10.0.0.1:8786
    napari-muvit predict slide.ome.zarr --into-source --labels-name muvit   # slide.ome.zarr/labels/muvit
    napari-muvit predict snapshot.jpg --model my_model/ --out snapshot_labels.tif    # one file

Re-running the same command after an interruption resumes the unfinished store (a one-file
output is written once, when every tile is done).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from napari_muvit.cli._args import non_negative_int, parse_region, positive_int
from napari_muvit.cli._terminal import StatusLine, clock
from napari_muvit.errors import InputError, MuViTError

DEBUG_ENV = "NAPARI_MUVIT_DEBUG"


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






# "-100,0,50,50" is a --region value, not an option: argparse only treats plain negative
# numbers as values, so the sub-parser gets a matcher that also accepts comma lists of them
_NEGATIVE_VALUE = re.compile(r"^-\d+(\.\d*)?(,\s*-?\d+(\.\d*)?)*$|^-\.\d+$")


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Show Python warnings raised during the command as ``napari-muvit CMD: warning: ...``
    (one line each, like the errors) instead of Python's two-line format."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        print(f"napari-muvit {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def _runtime_line(args: argparse.Namespace) -> str:
    """Device, precision, threads and batch this run will use (one line)."""
    from napari_muvit.engine.device import resolve_amp, resolve_device
    from napari_muvit.engine.hardware import describe_runtime
    from napari_muvit.engine.predictor import CPU_BATCH

    device = resolve_device(args.device)
    dtype = resolve_amp(args.amp, device, check=False)  # the engine warns, once
    batch = args.batch or (CPU_BATCH if device.type != "cuda" else None)
    if args.workers:  # each local worker gets its share of the cores
        from napari_muvit.engine.threads import worker_threads

        threads = args.threads or worker_threads(args.workers)
        line = describe_runtime(device, dtype, threads, batch)
        return f"{line} each · {args.workers} local workers"
    return describe_runtime(device, dtype, args.threads, batch)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``predict`` sub-command."""
    p = subparsers.add_parser(
        "predict",
        help="segment an image into an OME-Zarr labels store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="OME-Zarr/zarr group or array, TIFF, .npy, or a PNG/JPEG picture")
    p.add_argument("--model", metavar="FOLDER", default=None,
                   help="segmenter folder (default: the bundled model)")
    # --- where the labels go: a new store (--out) or the source OME-Zarr (--into-source)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", metavar="OUT.zarr",
                        help="output OME-Zarr store (resumable), or one .tif/.png/.npy label "
                             "file for images up to 64 Mpx (a point detector: a .csv table "
                             "y,x,class,score)")
    target.add_argument("--into-source", action="store_true",
                        help="write the labels into IMAGE (an OME-Zarr 0.4/0.5 image) as "
                             "labels/NAME; the image itself is not modified")
    p.add_argument("--labels-name", metavar="NAME", default=None,
                   help="label image name with --into-source (default: muvit)")
    p.add_argument("--region", metavar="Y0,X0,Y1,X1", default=None,
                   help="only predict this world-pixel box (default: whole image)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch", type=positive_int, default=None, metavar="N",
                   help="tiles per batch (default: adapted to free memory)")
    p.add_argument("--overlap", type=non_negative_int, default=None, metavar="PX",
                   help="tile overlap in pixels, blended smoothly (default: tile size / 8, / 4 for "
                   "a forest head, which removes tile seams; 0 is faster)")
    p.add_argument("--tile-size", type=positive_int, default=None, metavar="PX",
                   help="tile size (default: the model's training crop size)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision: auto (default) = bf16/fp16 on GPUs that have it "
                        "natively, float32 elsewhere; bf16 also speeds up CPUs with native "
                        "bfloat16 (AVX512-BF16/AMX) and warns where it is emulated (slower)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch, exactly N (default: up to every core, fewer "
                        "when that is measured faster, e.g. with other programs busy; with "
                        "--workers: per worker, default cores / workers)")
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
                   help="replace an existing napari-muvit output at --out (with --into-source: "
                        "labels/NAME, only if napari-muvit wrote it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    p._negative_number_matcher = _NEGATIVE_VALUE  # see _NEGATIVE_VALUE
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``predict``; user errors raise MuViTError (one line, exit 2)."""
    try:
        with one_line_warnings("predict"):
            return _run(args)
    except (MuViTError, KeyboardInterrupt):
        raise
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        if _is_disk_full(err):
            from napari_muvit.data.picture_files import is_label_file

            kept = ("nothing was written" if is_label_file(args.out) else
                    "rerun the same command to resume (the tiles written so far are kept)")
            raise MuViTError(
                f"no space left on the disk of {args.out or args.image}: free some space and "
                f"{kept}"
            ) from None
        raise MuViTError(
            f"{type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)"
        ) from None


def _into_source(args: argparse.Namespace) -> bool | str:
    """``predict(into_source=...)`` from ``--into-source`` / ``--labels-name``."""
    if args.labels_name is not None and not args.into_source:
        raise InputError("--labels-name: only used with --into-source")
    return (args.labels_name or True) if args.into_source else False


def _is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception chain (zarr may wrap the OSError)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _run(args: argparse.Namespace) -> int:
    from napari_muvit.engine.api import predict

    image = Path(args.image)
    if not image.exists():
        raise InputError(f"IMAGE {args.image!r} does not exist")
    if args.out is not None and not str(args.out).strip():
        raise InputError("--out: expected the path of an output .zarr store or label file, got "
                         "an empty string")
    if args.out is not None and Path(args.out).suffix.lower() == ".csv":
        return _run_points(args)
    region = parse_region(args.region) if args.region else None
    if not args.quiet:
        print(f"napari-muvit predict: {_runtime_line(args)}", file=sys.stderr)
    return _report_run(args, lambda bar: predict(
        image, model=args.model, region=region, out=args.out, device=args.device,
        batch_size=args.batch, overlap=args.overlap, probabilities=args.probabilities,
        progress=bar, scheduler=args.scheduler, workers=args.workers,
        overwrite=args.overwrite, skip_empty=args.skip_empty, tile_size=args.tile_size,
        amp=args.amp, into_source=_into_source(args), threads=args.threads,
    ))


def _report_run(args: argparse.Namespace, run: Callable[[Any], Any]) -> int:
    """Run ``run(progress_bar)`` with the terminal progress bar (unless --quiet), then report
    where the output went and how long it took; the output path is printed on stdout."""
    bar = None if args.quiet else ProgressBar()
    t0 = time.monotonic()
    try:
        out = run(bar)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(f"napari-muvit predict: wrote {out} in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
    print(out)
    return 0


# ------------------------------------------------------------------------------ points
def _run_points(args: argparse.Namespace) -> int:
    """``predict --out PRED.csv`` with a point detector: ``y,x,class,score`` rows in level-0
    pixel coordinates, streamed (resumable) and renamed into place when complete."""
    from napari_muvit.engine.points import is_detector, predict_points
    from napari_muvit.engine.predictor import resolve_model

    model = resolve_model(args.model)
    if not is_detector(model):
        raise InputError(
            f"--out {args.out}: a .csv output needs a point detector; "
            f"{args.model or 'the bundled model'} is a segmenter (write an OME-Zarr store instead)"
        )
    if args.scheduler is not None or args.workers is not None or args.probabilities:
        raise InputError("a point detector runs in one process and has no --probabilities")
    region = parse_region(args.region) if args.region else None
    return _report_run(args, lambda bar: predict_points(
        Path(args.image), model, region=region, out=args.out, device=args.device,
        batch_size=args.batch, overlap=0 if args.overlap is None else args.overlap,
        progress=bar, overwrite=args.overwrite, tile_size=args.tile_size, amp=args.amp,
    ))
