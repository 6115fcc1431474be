"""``napari-muvit train`` and ``napari-muvit pretrain``: fine-tuning and MAE pre-training.

Examples::

    napari-muvit train slide.ome.zarr --labels scribbles.npy --out my_model
    napari-muvit train a.tif b.tif --labels a_labels.tif b_labels.tif --out my_model \\
        --init pretrained_mae/ --levels 1,8,32 --steps 2000
    napari-muvit train slide.zarr --labels scribbles.zarr --out my_model --resume
    napari-muvit pretrain slide1.zarr slide2.zarr --levels 1,8,32 --out my_mae --steps 20000

Checkpoints are written atomically to --out (every 60 s by default); Ctrl-C stops after the
current step and writes one (a second Ctrl-C aborts at once). Re-running the same command with
--resume continues where the run stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from napari_muvit.cli._args import parse_region, positive_float, positive_int
from napari_muvit.cli._terminal import StatusLine, clock
from napari_muvit.engine.quick_choices import COLOR_SPACE_CHOICES, FOREST_LEVEL_CHOICES
from napari_muvit.errors import InputError, MuViTError

DEBUG_ENV = "NAPARI_MUVIT_DEBUG"
EXIT_CANCELLED = 130


# ------------------------------------------------------------------------------ parsing
def parse_interval(text: str) -> tuple[float, str]:
    """``"60"``/``"60s"``/``"5m"`` -> seconds; ``"200steps"`` -> steps."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|steps?)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--checkpoint-every: expected e.g. 60s, 5m or 200steps, got {text!r}")
    value, unit = float(match.group(1)), match.group(2) or "s"
    if unit.startswith("step"):
        return float(max(1, round(value))), "steps"
    return (value * 60.0 if unit.startswith("m") else value), "seconds"


# ------------------------------------------------------------------------------ progress
class ProgressLine(StatusLine):
    """One status line per step: step, loss, learning rate, speed and time left."""

    def __init__(
        self, stream: TextIO | None = None, interval: float = 0.2, log_interval: float = 10.0
    ) -> None:
        super().__init__(stream, interval, log_interval)
        self._first: tuple[int, float] | None = None

    def __call__(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        step, steps = int(info["step"]), int(info["steps"])
        if self._first is None and info.get("stage") in (None, "fine-tune"):
            self._first = (step, now)  # a resumed run starts counting its speed here
        if self.due(final=info.get("status") not in (None, "running")):
            self.write(self._format(info, step, steps, now))

    def _format(self, info: dict[str, Any], step: int, steps: int, now: float) -> str:
        stage = info.get("stage")
        if stage == "features":
            return f"quick head: features of the painted pixels, tile {info['done']}/{info['total']}"
        if stage == "quick":
            return (
                f"quick head: fitted on {info['pixels']} pixels in {info['seconds']:.1f} s; "
                "fine-tuning"
            )
        first_step, first_time = self._first or (step, now)
        rate = (step - first_step) / (now - first_time) if now > first_time else 0.0
        eta = clock((steps - step) / rate) if rate > 0 else "--:--"
        line = (
            f"step {step}/{steps} loss {info['loss']:.4f} lr {info['lr']:.2e} "
            f"{rate:5.2f} steps/s ETA {eta}"
        )
        if "val_dice" in info:
            line += f" val Dice {info['val_dice']:.3f}"
        if "val_f1" in info:
            line += f" val F1 {info['val_f1']:.3f}"
        return line


@contextlib.contextmanager
def graceful_interrupt(cancel: Any, stream: TextIO) -> Iterator[None]:
    """First Ctrl-C cancels ``cancel`` (the run checkpoints and stops after the current step);
    a second one raises KeyboardInterrupt as usual."""
    if sys.platform == "win32" or not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        stream.write(
            "\ninterrupt: stopping after this step and writing a checkpoint "
            "(Ctrl-C again to abort)\n"
        )
        stream.flush()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------ parsers
def _common(p: argparse.ArgumentParser) -> None:
    """Options shared by train and pretrain."""
    p.add_argument(
        "--out",
        metavar="FOLDER",
        required=True,
        help="output model folder (checkpoints are written here)",
    )
    p.add_argument(
        "--init",
        metavar="FOLDER",
        default=None,
        help="starting model: encoder, MAE or segmenter folder (ours or official "
        "muvit); default: the bundled encoder, or a fresh --preset",
    )
    p.add_argument(
        "--levels",
        metavar="1,8,32",
        default=None,
        help="downsampling factors (a subset of --init's levels)",
    )
    p.add_argument(
        "--preset",
        choices=("tiny", "small", "paper"),
        default=None,
        help="size of a fresh, randomly initialised encoder (when no --init)",
    )
    p.add_argument(
        "--crop",
        type=positive_int,
        default=None,
        metavar="S",
        help="crop size in pixels per level (default: the model's, else 128)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="optimisation steps (default: train 500, pretrain 1000)",
    )
    p.add_argument("--batch", type=positive_int, default=8, metavar="N", help="default 8")
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        metavar="X",
        help="learning rate (default: train 1e-4 for the head, --points 1e-3; pretrain 6e-5 "
        "at D=512, scaled up for narrower encoders)",
    )
    p.add_argument(
        "--checkpoint-every",
        default="60s",
        metavar="60s|200steps",
        help="checkpoint interval in seconds (60s, 5m) or steps (default 60s)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "off"),
        help="mixed precision (default auto: bf16/fp16 where the GPU has it natively, float32 "
        "on CPU); a choice the hardware emulates warns how much slower it measured",
    )
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch, exactly N (default: up to every core, fewer "
                        "when that is measured faster, e.g. with other programs busy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in --out (starts fresh if there is none)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing napari-muvit model/run in --out",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``pretrain`` sub-commands."""
    t = subparsers.add_parser(
        "train",
        help="fine-tune a segmenter on painted (sparse) or dense labels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "images", nargs="+", metavar="IMAGE", help="OME-Zarr/zarr, TIFF, .npy or PNG/JPEG image(s)"
    )
    t.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="LABELS",
        help="one label image per IMAGE (.npy, TIFF, PNG, zarr); 0 = not annotated",
    )
    _add_points_options(t)
    _common(t)
    t.add_argument(
        "--head",
        choices=("pixel", "unetr", "mask2former"),
        default="pixel",
        help="pixel (default): a model within seconds, written to --out at once (a per-pixel "
        "classifier, see --classifier); unetr/mask2former: the paper's heads, trained from "
        "scratch (docs/benchmarks.md, annotation loop)",
    )
    t.add_argument(
        "--classifier",
        choices=("forest", "mlp"),
        default="forest",
        help="of the pixel head: forest (default): a random forest on image filters of every "
        "level's crop (the context), done in seconds, --steps unused; mlp: an MLP on level-1 "
        "filters and the encoder's features, then --steps of fine-tuning",
    )
    t.add_argument(
        "--forest-levels",
        choices=FOREST_LEVEL_CHOICES,
        default="auto",
        help="which levels' filters the forest reads: auto (default): chosen from the strokes "
        "(judged on strokes held out of the fit); level1: the pixel's own level only; all: "
        "every level (the context); mix: sub-forests on level 1, 1-2, ... all levels, averaged",
    )
    t.add_argument(
        "--color-space",
        choices=COLOR_SPACE_CHOICES,
        default="auto",
        help="what the pixel head's filters see of an RGB image: auto (default): for a new "
        "forest head CIELAB or the stain densities, whichever predicts held-out strokes "
        "better; rgb: R, G, B as they come; lab: lightness and two colour axes (CIELAB); hed: "
        "haematoxylin, eosin and DAB densities (colour deconvolution, for stained histology); "
        "lab and hed need RGB images",
    )
    t.add_argument(
        "--encoder-lr-factor",
        type=float,
        default=None,
        metavar="F",
        help="encoder learning rate = F x --lr (default 0.1; --points: 1.0)",
    )
    t.add_argument("--freeze-encoder", action="store_true", help="train the head only")
    t.add_argument(
        "--dense",
        action="store_true",
        help="labels are dense: 0 is a class (background), not 'unannotated'",
    )
    t.add_argument(
        "--naive-bbox",
        action="store_true",
        help="the paper's naive-bbox ablation (concentric boxes)",
    )
    t.add_argument(
        "--pseudo-labels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="MUSE-style pseudo-labels on unannotated pixels (default: TrainConfig)",
    )
    t.add_argument(
        "--val-region",
        metavar="Y0,X0,Y1,X1",
        default=None,
        help="hold out the annotations in this box of the first image; report Dice",
    )
    t.set_defaults(func=run_train)
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train an encoder with the multi-resolution MAE (no labels)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="OME-Zarr/zarr, TIFF, .npy or PNG/JPEG")
    _common(p)
    p.add_argument(
        "--mask-ratio",
        type=float,
        default=0.75,
        metavar="R",
        help="fraction of tokens masked (default 0.75)",
    )
    p.set_defaults(func=run_pretrain)


# ------------------------------------------------------------------------------ commands
def _guarded(fn: Any, args: argparse.Namespace) -> int:
    """Run ``fn(args)``: user errors stay MuViTError, anything else becomes one line."""
    try:
        return fn(args)
    except (MuViTError, KeyboardInterrupt):
        raise
    except Exception as err:  # the CLI promises one line, never a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        raise MuViTError(
            f"{type(err).__name__}: {err} (set {DEBUG_ENV}=1 for the traceback)"
        ) from None


def run_train(args: argparse.Namespace) -> int:
    """Execute ``train``; returns 0 when finished, 130 when interrupted (checkpoint written)."""
    from napari_muvit.engine.threads import thread_budget

    with thread_budget(getattr(args, "threads", None)):
        return _guarded(_train, args)


def run_pretrain(args: argparse.Namespace) -> int:
    """Execute ``pretrain``; returns 0 when finished, 130 when interrupted."""
    from napari_muvit.engine.threads import thread_budget

    with thread_budget(getattr(args, "threads", None)):
        return _guarded(_pretrain, args)


def _check_paths(paths: list[str], what: str) -> None:
    for path in paths:
        if not Path(path).exists():
            raise InputError(f"{what} {path!r} does not exist")


def _shared_config(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig/PretrainConfig fields both commands take from the same options."""
    every, unit = parse_interval(args.checkpoint_every)
    return {"batch_size": args.batch, "crop_size": args.crop, "checkpoint_every": every,
                "checkpoint_unit": unit, "device": args.device, "amp": args.amp, "seed": args.seed}


def _run_interruptible(run: Any, quiet: bool) -> Any:
    """``run(progress, cancel)`` with a progress line and Ctrl-C turned into a clean stop."""
    from napari_muvit.engine.cancel import CancelToken

    cancel = CancelToken()
    bar = None if quiet else ProgressLine()
    with graceful_interrupt(cancel, sys.stderr):
        try:
            return run(bar, cancel)
        finally:
            if bar is not None:
                bar.close()


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from napari_muvit.engine.api import train
    from napari_muvit.engine.trainer import TrainConfig

    _check_paths(args.images, "IMAGE")
    if args.points is not None:
        return _train_points(args)
    if args.labels is None:
        raise InputError("train: pass --labels (label images) or --points (points CSV files)")
    _check_paths(args.labels, "--labels")
    if len(args.labels) != len(args.images):
        raise InputError(
            f"--labels: expected one label image per IMAGE ({len(args.images)}), "
            f"got {len(args.labels)}"
        )
    config = TrainConfig(
        **_shared_config(args),
        encoder_lr_factor=(0.1 if args.encoder_lr_factor is None else args.encoder_lr_factor),
        dense=args.dense,
        naive_bbox=args.naive_bbox,
        freeze_encoder=args.freeze_encoder,
        head=args.head,
        classifier=args.classifier,
        forest_levels=args.forest_levels,
        color_space=args.color_space,
        val_region=parse_region(args.val_region, "--val-region") if args.val_region else None,
    )
    overrides = {"steps": args.steps, "lr": args.lr, "pseudo_labels": args.pseudo_labels}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    model = _run_interruptible(
        lambda progress, cancel: train(
            args.images, args.labels, out=args.out, init=args.init, levels=args.levels,
            preset=args.preset, config=config, progress=progress, cancel=cancel,
            resume=args.resume, overwrite=args.overwrite,
            tune_threads=getattr(args, "threads", None) is None,  # --threads N: exactly N
        ),
        quiet=args.quiet,
    )
    return _finish("train", model, args)


def _pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from napari_muvit.engine.pretrainer import PretrainConfig, pretrain

    _check_paths(args.images, "IMAGE")
    config = PretrainConfig(**_shared_config(args), lr=args.lr, masking_ratio=args.mask_ratio)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    model = _run_interruptible(
        lambda progress, cancel: pretrain(
            args.images, levels=args.levels, out=args.out, preset=args.preset, init=args.init,
            config=config, progress=progress, cancel=cancel, resume=args.resume,
            overwrite=args.overwrite,
        ),
        quiet=args.quiet,
    )
    return _finish("pretrain", model, args)


def _finish(command: str, model: Any, args: argparse.Namespace) -> int:
    """Print warnings and a summary; the exit code tells finished (0) from cancelled (130)."""
    history = model.meta.get("history", {})
    for warning in history.get("warnings", []):
        print(f"napari-muvit {command}: warning: {warning}", file=sys.stderr)
    status, step = history.get("status"), history.get("step")
    loss = history.get("loss") or [float("nan")]
    if status == "cancelled":
        print(
            f"napari-muvit {command}: stopped at step {step}; checkpoint in {args.out} "
            "(add --resume to continue)",
            file=sys.stderr,
        )
        return EXIT_CANCELLED
    from napari_muvit.engine.quicktrain import quick_fit_message

    fitted = quick_fit_message(history)
    if not args.quiet:
        summary = (f"{fitted}, nothing to fine-tune" if fitted and not step
                   else f"{step} steps, final loss {loss[-1]:.4f}")
        print(f"napari-muvit {command}: {summary}; model in {args.out}", file=sys.stderr)
    print(args.out)
    return 0


# ------------------------------------------------------------------------------ points
def _add_points_options(t: argparse.ArgumentParser) -> None:
    """Options of ``train --points`` (a point detector instead of a segmenter)."""
    g = t.add_argument_group(
        "point detection (instead of --labels)",
        "Train a nucleus detector from points: CSV files with a header y,x[,class] (class >= 1) "
        "or the CSV napari saves for a Points layer (axis-0, axis-1, a 'class' feature).",
    )
    g.add_argument("--points", nargs="+", default=None, metavar="POINTS.csv",
                   help="one points CSV per IMAGE (level-0 pixel coordinates)")
    g.add_argument("--region", nargs="+", default=None, metavar="Y0,X0,Y1,X1",
                   help="the completely annotated rectangle (one for all images or one per "
                        "image; default: the whole image is annotated)")
    g.add_argument("--class-names", default=None, metavar="A,B",
                   help="names of classes 1, 2, ... (text classes in a napari CSV use them)")
    g.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="detector grid in pixels (default 4; 1 = per-pixel maps)")
    g.add_argument("--pos-radius", type=positive_float, default=None, metavar="PX",
                   help="locations within this distance of a point learn it (default: 0.3x "
                        "the median distance between neighbouring points, 3-10 px)")
    g.add_argument("--min-distance", type=positive_float, default=None, metavar="PX",
                   help="two detections closer than this are one nucleus (default: 0.5x the "
                        "median neighbour distance, 4-16 px)")
    g.add_argument("--type-head", choices=("separate", "shared"), default=None,
                   help="separate (default): an objectness output and an independent type head "
                        "trained on the points only; shared: background and types in one "
                        "softmax (the layout of older detectors)")
    g.add_argument("--type-context", action=argparse.BooleanOptionalAction, default=None,
                   help="the type head also sees every level's tokens at the point (default: "
                        "on; separate type head with --type-classifier mlp only)")
    g.add_argument("--type-classifier", choices=("forest", "mlp"), default=None,
                   help="forest (default): the type of a point is given by a random forest on "
                        "the filters of every level's crop, fitted on the points in seconds; "
                        "mlp: a type head trained with the detector (separate type head only)")


def _train_points(args: argparse.Namespace) -> int:
    """``train --points``: a MuViT point detector, through the same Trainer machinery."""
    from dataclasses import replace

    from napari_muvit.engine.points import POINT_TRAIN_DEFAULTS, train_points
    from napari_muvit.engine.trainer import TrainConfig

    if args.labels is not None:
        raise InputError("train: pass either --labels or --points, not both")
    if args.forest_levels != "auto" or args.color_space != "auto":
        raise InputError("--forest-levels and --color-space apply to a pixel head trained on "
                         "--labels, not to a point detector (--points): leave them out")
    _check_paths(args.points, "--points")
    if len(args.points) != len(args.images):
        raise InputError(
            f"--points: expected one points file per IMAGE ({len(args.images)}), "
            f"got {len(args.points)}"
        )
    regions = args.region or [None]
    if len(regions) == 1:
        regions = regions * len(args.images)
    if len(regions) != len(args.images):
        raise InputError(
            f"--region: expected one rectangle for all images or one per IMAGE "
            f"({len(args.images)}), got {len(regions)}"
        )
    config = TrainConfig(
        **{**_shared_config(args), **POINT_TRAIN_DEFAULTS},
        naive_bbox=args.naive_bbox,
        freeze_encoder=args.freeze_encoder,
        val_region=parse_region(args.val_region) if args.val_region else None,
    )
    overrides = {"steps": args.steps, "lr": args.lr, "pseudo_labels": args.pseudo_labels,
                 "encoder_lr_factor": args.encoder_lr_factor}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    head = {k: v for k, v in (("stride", args.stride), ("pos_radius", args.pos_radius),
                               ("min_distance", args.min_distance),
                               ("type_head", args.type_head), ("context", args.type_context),
                               ("type_classifier", args.type_classifier))
            if v is not None}
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    model = _run_interruptible(
        lambda progress, cancel: train_points(
            args.images, args.points, out=args.out, init=args.init, levels=args.levels,
            preset=args.preset, config=config, progress=progress, cancel=cancel,
            regions=regions, resume=args.resume, overwrite=args.overwrite,
            class_names=names, head_options=head,
        ),
        quiet=args.quiet,
    )
    return _finish("train", model, args)
