"""Model folders to model objects: which class a folder, package or user's choice loads as.

:mod:`napari_muvit.model.checkpoint` reads and writes the files and knows no model class; the
classes (:mod:`~napari_muvit.model.encoder`, :mod:`~napari_muvit.model.segmenter`,
:mod:`~napari_muvit.model.mae`, :mod:`~napari_muvit.model.points`) save themselves through it
and their ``from_pretrained`` load only their own kind. This module sits above all of them and
loads whatever a folder holds, so the import graph of ``model/`` points one way::

    loading -> bioimageio -> segmenter, points, mae -> encoder -> checkpoint
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from napari_muvit.errors import CheckpointError
from napari_muvit.model.bioimageio import load_package
from napari_muvit.model.checkpoint import is_official_folder, load_folder, model_folder
from napari_muvit.model.encoder import MuViTEncoder
from napari_muvit.model.mae import MuViTMAE
from napari_muvit.model.points import MuViTPointDetector
from napari_muvit.model.segmenter import MuViTSegmenter
from napari_muvit.weights import default_model_path

__all__ = ["load_encoder", "load_model", "load_predictor_model"]

#: every kind of our folders, by the ``kind`` of its config.yaml
MODEL_CLASSES: dict[str, type] = {
    "encoder": MuViTEncoder,
    "segmenter": MuViTSegmenter,
    "mae": MuViTMAE,
    "points": MuViTPointDetector,
}


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load whatever the folder holds: MuViTEncoder, MuViTSegmenter, MuViTMAE or
    MuViTPointDetector (eval mode).

    Accepts our folders and official muvit folders (encoder → MuViTEncoder with
    ``coord_mode="linspace"``, MAE → MuViTMAE reproducing the official loss), and bioimage.io
    packages (``.zip``) exported by napari-muvit (see :mod:`napari_muvit.model.bioimageio`).
    """
    if str(folder).lower().endswith(".zip"):
        return load_package(folder, map_location=map_location)
    return load_folder(folder, MuViTEncoder, MODEL_CLASSES, map_location)


def load_predictor_model(
    model: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """The model that predicts from a folder or bioimage.io package (a segmenter or a point
    detector); ``None`` is the bundled segmenter.

    The one place that turns a user's model choice into a model (engine, widgets, CLI): a
    missing path, a loose file and a backbone without a head (an encoder or MAE, ours or
    official) are refused with one line that says what to do.
    """
    if model is None:
        path = default_model_path()
    else:
        path = model_folder(model) if not str(model).lower().endswith(".zip") else Path(model)
        path = path.expanduser()
        if not path.exists():
            raise CheckpointError(f"model folder {str(path)!r} does not exist")
        if path.is_file() and path.suffix.lower() != ".zip":
            raise CheckpointError(
                f"{str(path)!r} is a file; choose the model *folder* that holds config.yaml, "
                "or a bioimage.io package (.zip)")
    loaded = load_model(path, map_location=map_location)
    if not hasattr(loaded, "num_classes"):
        kind = type(loaded).__name__.replace("MuViT", "").lower() or "encoder"
        origin = "an official muvit " if is_official_folder(path) else "a MuViT "
        raise CheckpointError(
            f"{path} holds {origin}{kind} (a pre-trained backbone without a segmentation "
            "head), not a segmenter. Fine-tune it first: napari-muvit train --init <folder>, "
            "or choose it as the starting model in 'MuViT fine-tune'."
        )
    return loaded


def load_encoder(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load only the encoder of any model folder (ours of any kind, official encoder or MAE)."""
    return MuViTEncoder.from_pretrained(folder, map_location=map_location)
