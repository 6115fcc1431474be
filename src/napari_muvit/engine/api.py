"""The Python entry points that compose the engines: :func:`predict` and :func:`train`.

They sit above everything else in ``engine/`` (its import graph points downward only;
``tests/test_package.py`` checks that it has no cycle)::

    api -> distributed -> stores -> predictor -> sinks
    api -> points, quicktrain -> trainer -> predictor

:func:`predict` chooses the path (a point detector's table, a Dask cluster, a zarr store or
numpy in memory) and :func:`train` the recipe (a quick pixel-head fit, or fine-tuning); the
work itself is done by :class:`~napari_muvit.engine.predictor.Predictor` and
:class:`~napari_muvit.engine.trainer.Trainer`. Also exported as ``napari_muvit.predict`` and
``napari_muvit.train``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_muvit.data import open_image
from napari_muvit.data.picture_files import is_label_file, write_label_picture
from napari_muvit.engine import _checkpointing
from napari_muvit.engine._loop import StepProgress
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.distributed import predict_distributed
from napari_muvit.engine.points import predict_points
from napari_muvit.engine.predictor import (
    Predictor,
    Progress,
    default_overlap,
    resolve_model,
    tile_size_of,
)
from napari_muvit.engine.quicktrain import (
    QuickTrainer,
    check_quick_options_apply,
    starts_with_quick_fit,
)
from napari_muvit.engine.stores import (
    check_label_file_output,
    create_zarr_sink,
    output_path,
    source_labels_target,
)
from napari_muvit.engine.trainer import (
    TrainConfig,
    Trainer,
    _describe,
    _pair_lists,
    prepare_start_model,
)
from napari_muvit.errors import InputError
from napari_muvit.model import load_model

__all__ = ["predict", "train"]


def predict(
    image_or_source: Any,
    model: Any = None,
    region: Any = None,
    out: str | Path | None = None,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    overlap: int | None = 0,
    probabilities: bool = False,
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    *,
    overwrite: bool = False,
    skip_empty: bool | float = False,
    tile_size: int | None = None,
    amp: str | bool | None = "auto",
    into_source: bool | str = False,
    threads: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray] | Path:
    """Segment an image with a MuViT segmenter (or detect points with a point detector).

    With a point detector (``model.task == "points"``) the result is a table
    ``{"y", "x", "class", "score"}`` of numpy arrays (level-0 pixel coordinates), or with
    ``out`` a ``.csv`` file of those columns (see :func:`napari_muvit.engine.points.predict_points`).

    Parameters
    ----------
    image_or_source
        A path (OME-Zarr/zarr, TIFF, ``.npy``, PNG/JPEG), an array, a list of pyramid levels or a
        :class:`~napari_muvit.data.PyramidSource`.
    model
        A ``MuViTSegmenter``, a model folder, or ``None`` for the bundled default model.
    region
        World bbox ``[[y0, x0], [y1, x1]]`` (default: the whole image).
    out
        ``None``: return the labels as numpy (``(labels, probs)`` with ``probabilities``).
        A ``.zarr`` path: write a resumable OME-Zarr there and return its path. A ``.png``,
        ``.tif``/``.tiff`` or ``.npy`` path: write the region's labels as one file (at most
        64 Mpx; written once every tile is predicted) and return its path.
    scheduler, workers
        Run on Dask (a scheduler address, or a ``LocalCluster`` with ``workers`` processes);
        needs ``out``.
    overwrite
        Replace an existing napari-muvit output at ``out`` (foreign data is never deleted).
    into_source
        Write the labels into the source OME-Zarr (``image_or_source`` must be its path) as
        ``labels/muvit`` (``True``) or ``labels/<into_source>`` (a name), instead of ``out``;
        returns that group's path. See :mod:`napari_muvit.engine.ome_labels`.
    threads
        torch CPU threads (default: torch's, i.e. every core); with Dask, threads per worker
        (default: cores // workers on a local cluster).
    overlap
        Blending overlap in pixels; ``None``: :func:`default_overlap` of the tile and model (no tile
        seams, about 1.5× the time of ``0``; the CLI's default).

    The other arguments are those of :class:`Predictor`. Bad input raises
    :class:`~napari_muvit.errors.InputError` before any tile is computed.
    """
    if into_source:
        out = source_labels_target(image_or_source, out, into_source)
    if out is None and (scheduler is not None or workers is not None):
        raise InputError("scheduler/workers: distributed prediction writes to a zarr store; pass out=")
    # --- point detectors (engine/points.py): a table in memory, or a CSV at ``out``
    resolved = resolve_model(model)
    if getattr(resolved, "task", None) == "points":
        if scheduler is not None or workers is not None or probabilities:
            raise InputError("a point detector predicts points: no Dask, no probabilities")
        return predict_points(
            image_or_source, resolved, region, out, device, batch_size,
            0 if overlap is None else overlap, progress,
            cancel, overwrite=overwrite, tile_size=tile_size, amp=amp,
        )
    # ---
    if overlap is None:
        overlap = default_overlap(tile_size_of(resolved, tile_size), resolved)
    to_file = not into_source and is_label_file(out)
    if to_file and (scheduler is not None or workers is not None or probabilities):
        raise InputError(
            f"out {str(out)!r}: a one-file output is written by one process and holds labels "
            "only; write a .zarr store for Dask (scheduler/workers) or probabilities"
        )
    if out is not None and (scheduler is not None or workers is not None):
        return predict_distributed(
            image_or_source, model, out, scheduler=scheduler, workers=workers, region=region,
            device=device, batch_size=batch_size, overlap=overlap, probabilities=probabilities,
            progress=progress, cancel=cancel, overwrite=overwrite, skip_empty=skip_empty,
            tile_size=tile_size, amp=amp, torch_threads=threads,
        )
    if out is not None and not into_source:
        out = output_path(out, label_file=to_file)
    source = open_image(image_or_source)
    if to_file:
        check_label_file_output(source, out, region, overwrite)
    seg = resolved
    in_memory = out is None or to_file
    pred = Predictor(seg, device=device, batch_size=batch_size, amp=amp, overlap=overlap,
                     skip_empty=skip_empty, cache_tiles=512 if in_memory else 0,
                     tile_size=tile_size, threads=threads)
    pred.check_source(source)
    if in_memory:
        sink = pred.predict(source, region, probabilities=probabilities, progress=progress,
                            cancel=cancel)
        if to_file:  # nothing is written unless every tile was predicted (cancel raises)
            return write_label_picture(out, sink.labels, overwrite=overwrite)
        return (sink.labels, sink.probs) if probabilities else sink.labels
    sink = create_zarr_sink(pred, source, out, region=region, probabilities=probabilities,
                            overwrite=overwrite)
    try:
        pred.predict(source, sink=sink, progress=progress, cancel=cancel)
    finally:
        sink.release_lock()  # predict() closes the sink; this covers errors before it starts
    return sink.path


def train(
    images: Any,
    labels: Any,
    out: str | os.PathLike[str] | None = None,
    init: str | os.PathLike[str] | nn.Module | None = None,
    levels: str | Sequence[float] | None = None,
    preset: str | None = None,
    head: str | None = None,
    config: TrainConfig | None = None,
    progress: StepProgress | None = None,
    cancel: CancelToken | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    class_names: Mapping[int, str] | None = None,
    forest_levels: str | None = None,
    color_space: str | None = None,
    tune_threads: bool = True,
) -> nn.Module:
    """Train a segmenter on images and their (sparse or dense) labels; returns the segmenter.

    ``images``/``labels``: one or a list of each (paths, arrays or PyramidSources; labels as
    arrays or .npy/TIFF/PNG/zarr paths).  ``init``/``levels``/``preset``: see
    :func:`~napari_muvit.engine.trainer.prepare_start_model`; ``head`` overrides ``config.head`` (default ``"unetr"``).
    With ``out``, checkpoints are written there; an existing ``out`` is resumed with
    ``resume=True``, replaced with ``overwrite=True`` and otherwise refused (a folder that is
    not a napari-muvit model is never written to).
    ``forest_levels`` (``"auto"``, ``"level1"``, ``"all"``, ``"mix"``) and ``color_space``
    (``"auto"``, ``"rgb"``, ``"lab"``, ``"hed"``) override ``config``'s: what the quick fit of a
    pixel head reads (see :class:`~napari_muvit.engine.trainer.TrainConfig`); a value other than
    ``"auto"`` that cannot apply (``"lab"``/``"hed"`` on a grey image, a head without quick fit) raises
    :class:`~napari_muvit.errors.InputError`.
    ``tune_threads``: on the CPU, choose each step's torch thread count by measured speed (at
    most the calling thread's count; see :class:`~napari_muvit.engine.threads.ThreadTuner`);
    ``False`` keeps the calling thread's count.
    """
    config = config or TrainConfig()
    overrides = {"head": head, "forest_levels": forest_levels, "color_space": color_space}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    images, labels = _pair_lists(images, labels)
    sources = [open_image(i) for i in images]
    lock = _checkpointing.run_folder_lock(out) if out is not None else contextlib.nullcontext()
    with lock:  # one run per output folder, from the first look at it to the last checkpoint
        resuming = _checkpointing.check_out_folder(out, resume, overwrite) if out is not None else False
        if resuming:
            model, notes = load_model(out), [f"resuming the run in {Path(out).name}"]
            head_module = getattr(model, "head", None)
            if getattr(head_module, "forest", None) is not None and not head_module.uses_encoder:
                raise InputError(
                    f"{Path(out).name}: its forest pixel head has no fine-tuning to resume; "
                    "train again with --overwrite (a forest takes seconds) or --classifier mlp"
                )
            if init is not None or levels is not None or preset is not None:
                notes.append(
                    "init/levels/preset are ignored when resuming: the run's model is used"
                )
        else:
            model, notes = prepare_start_model(
                init, levels, preset, sources[0].channels, config.seed
            )
        provenance = {
            "init": Path(out).name if resuming else (model.meta.get("init") or _describe(init)),
            "images": [_describe(i) for i in images],
            "labels": [_describe(lab) for lab in labels],
            "steps": config.steps,
            "preset": preset,
        }
        quick_fit = not resuming and starts_with_quick_fit(model, config.head)
        check_quick_options_apply(
            config, quick_fit, "resuming a run fine-tunes its model" if resuming
            else f"the {getattr(model, 'head_type', None) or config.head} head is fine-tuned")
        if quick_fit:
            # quick fit of the pixel head on cached features first (seconds), then fine-tuning
            quick = QuickTrainer(
                model, list(zip(sources, labels)), config, progress=progress, cancel=cancel,
                out=out, class_names=class_names, provenance=provenance, notes=notes,
            )
            if tune_threads:
                quick.trainer.tune_threads()
            quick.run()
            return quick.model
        trainer = Trainer(
            model,
            list(zip(sources, labels)),
            config,
            progress,
            cancel,
            out,
            resume=resuming,
            class_names=class_names,
            provenance=provenance,
            notes=notes,
        )
        if tune_threads:
            trainer.tune_threads()
        trainer.run()
    return trainer.model
