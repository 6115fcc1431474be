"""Where a prediction is written: the resumable zarr store of a :class:`Predictor` run, or one
small label file (:func:`check_label_file_output`).

:func:`create_zarr_sink` creates (or resumes) the :class:`~napari_muvit.engine.sinks.ZarrSink`
of a run: a new ``.zarr`` store, or the labels inside the source OME-Zarr
(:mod:`napari_muvit.engine.ome_labels`). It checks the input first (NaN/inf, the output is
not the input) and records :func:`prediction_fingerprint`, which decides whether an unfinished
store may be resumed. The single-process API, the Dask path and the predict panel all create
their stores here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_muvit.data.geometry import clip_region
from napari_muvit.data.picture_files import LABEL_FILE_SUFFIXES, check_label_file_target
from napari_muvit.data.pyramid import input_fingerprint
from napari_muvit.engine import ome_labels
from napari_muvit.engine.predictor import Predictor, model_digest
from napari_muvit.engine.sinks import ZarrSink
from napari_muvit.errors import InputError

__all__ = ["check_label_file_output", "create_zarr_sink", "output_path",
           "prediction_fingerprint", "source_labels_target"]


def source_labels_target(image: Any, out: Any, into_source: bool | str) -> Any:
    """The :class:`~napari_muvit.engine.ome_labels.SourceLabels` target of ``into_source``."""
    if out is not None:
        raise InputError("out/into_source: pass one of them (into_source writes into the image)")
    if not isinstance(image, (str, os.PathLike)):
        raise InputError("into_source: expected the path of an OME-Zarr image, got "
                         f"{type(image).__name__}")
    return ome_labels.SourceLabels(
        Path(image), ome_labels.DEFAULT_LABELS_NAME if into_source is True else str(into_source))


def prediction_fingerprint(pred: Predictor, source: Any) -> dict[str, Any]:
    """What must match for a zarr store to be resumed: the input image (shape, dtype, sampled
    pixels: :func:`~napari_muvit.data.pyramid.input_fingerprint`), model weights, levels,
    normalisation and channels (not the device: results agree across devices up to
    precision). The tile plan and region are compared by the store itself."""
    key, _reader = pred._reading_source(source)
    return {
        "input": input_fingerprint(source),
        "model_sha256": model_digest(pred.model),
        "levels": list(pred.levels),
        "normalization": json.loads(key),
        "skip_empty": pred.empty_std,
        "channels": int(source.channels),
    }


def create_zarr_sink(
    pred: Predictor, source: Any, out: str | Path, region: Any = None,
    probabilities: bool = False, overwrite: bool = False, write_pyramid: bool = True,
    chunk_size: int | None = None,
) -> ZarrSink:
    """The :class:`ZarrSink` for ``pred`` on ``source`` (resuming a matching unfinished one).

    ``out`` is a path, or a :class:`~napari_muvit.engine.ome_labels.SourceLabels` target
    (labels written into the source OME-Zarr).

    The image is checked first (NaN/inf, the output is not the input), so a bad input never
    leaves a store behind. The sink holds the store's lock until it is closed.
    """
    target = out if isinstance(out, ome_labels.SourceLabels) else None
    if target is None:
        out = output_path(out)
    check = getattr(source, "check_finite", None)
    if check is not None:
        check()
    model = pred.model
    class_names = getattr(model, "class_names", None)
    class_colors = getattr(model, "class_colors", None)
    layout = None
    if target is not None:
        if probabilities:
            raise InputError("probabilities: not stored inside a source OME-Zarr; "
                             "write them to a separate store with out= (--out)")
        out, layout = ome_labels.prepare_source_labels(
            target, source.shape, list(pred.label_values), class_names, class_colors)
    _refuse_input_as_output(source, out)  # labels/NAME inside the input image is allowed
    sink = ZarrSink.create(
        out, source.shape, pred.tile_size, pred.num_classes, overlap=pred.overlap,
        region=clip_region(region, source.shape), label_values=pred.label_values,
        class_names=class_names,
        class_colors=class_colors, probabilities=probabilities,
        fingerprint=prediction_fingerprint(pred, source), overwrite=overwrite,
        write_pyramid=write_pyramid, chunk_size=chunk_size, layout=layout,
        input_path=getattr(source, "origin", None),
    )
    if target is not None:
        ome_labels.register_source_labels(target)
    return sink


def output_path(out: Any, label_file: bool = False) -> Path:
    """``out`` as the path of a zarr store (or, with ``label_file``, of a one-file output), or a
    one-line :class:`InputError` for anything else."""
    if isinstance(out, (str, Path)) and str(out).strip() or hasattr(out, "__fspath__"):
        path = Path(out)
        suffix = path.suffix.lower()
        if suffix in LABEL_FILE_SUFFIXES and not label_file:
            # a zarr store is a folder: "pred.tif/" would surprise whoever opens it
            raise InputError(
                f"out {path.name!r}: a zarr store is a folder, not a {suffix} file; name it "
                f"{path.stem}.zarr (`napari-muvit predict` and predict() write one "
                f"{suffix} file for images up to 64 Mpx)"
            )
        if suffix in _FILE_FORMATS:
            raise InputError(
                f"out {path.name!r}: predictions are written as a zarr store (a folder, OME-Zarr "
                f"labels) or as one {', '.join(LABEL_FILE_SUFFIXES)} file, not as "
                f"{path.suffix}; name it e.g. {path.stem}.zarr or {path.stem}.tif"
            )
        return path
    raise InputError(f"out: expected the path of an output .zarr store, got {out!r}")


#: a one-file output holds the whole labels (and the predictor's blending buffers) in memory
LABEL_FILE_MAX_PIXELS = 8192 * 8192
_MEGA = 1 << 20


def check_label_file_output(source: Any, out: Path, region: Any, overwrite: bool) -> None:
    """Refuse, before any tile is computed, a one-file output that cannot or must not be
    written: too large for memory, the input image itself, an existing file, a folder that is
    missing or not writable."""
    box = clip_region(region, source.shape)
    pixels = int(np.prod(box[1] - box[0]))
    if pixels > LABEL_FILE_MAX_PIXELS:
        raise InputError(
            f"out {str(out)!r}: a one-file output holds all {pixels / _MEGA:.1f} Mpx in memory "
            f"(at most {LABEL_FILE_MAX_PIXELS // _MEGA}); write a resumable .zarr store instead"
        )
    _refuse_input_as_output(source, out)
    check_label_file_target(out, overwrite)


_FILE_FORMATS = (".npz", ".jpg", ".jpeg", ".h5", ".hdf5", ".bmp", ".gif", ".webp")


def _source_paths(source: Any) -> list[Path]:
    """Files/folders the pixels of ``source`` are read from (as far as they can be known)."""
    paths = []
    origin = getattr(source, "origin", None)
    if origin:
        paths.append(Path(origin))
    for array in getattr(source, "arrays", None) or []:
        root = getattr(getattr(array, "store", None), "root", None)  # zarr LocalStore
        if root is not None:
            paths.append(Path(str(root)))
        filename = getattr(array, "filename", None)  # numpy memmap
        if filename:
            paths.append(Path(filename))
    return paths


def _refuse_input_as_output(source: Any, out: Path) -> None:
    """Refuse an output that is the input image or contains it (``--overwrite`` would delete
    the image). An output *inside* an input folder (OME-Zarr ``labels/``) is allowed."""
    target = out.expanduser().absolute().resolve()
    for path in _source_paths(source):
        image = path.expanduser().absolute().resolve()
        if target == image or target in image.parents:
            raise InputError(
                f"output {str(out)!r} is the input image {str(path)!r}"
                + ("" if target == image else " or contains it")
                + "; choose another output path (the input is never overwritten)"
            )
