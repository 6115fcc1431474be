"""Pure-PyTorch MuViT model core (no napari/Qt imports).

* :class:`MuViTEncoder` — multi-resolution ViT encoder with world-coordinate axial RoPE;
* :class:`MuViTSegmenter` — encoder + UNETR / Mask2Former head → level-1 logits;
* :class:`MuViTMAE` — multi-resolution masked auto-encoder pre-training;
* :func:`segmentation_loss` — CE + 0.1·Dice with ignore index;
* :func:`load_model` / :func:`save_model` — our folder format and official muvit folders
  (:mod:`~napari_muvit.model.checkpoint` knows the files, :mod:`~napari_muvit.model.loading`
  which class a folder loads as).
"""

from __future__ import annotations

from napari_muvit.model.checkpoint import (
    count_parameters,
    is_official_folder,
    load_history,
    read_config,
    save_model,
    save_official,
)
from napari_muvit.model.encoder import MuViTEncoder
from napari_muvit.model.heads import Mask2FormerHead, UNETRHead, default_skips
from napari_muvit.model.loading import load_encoder, load_model, load_predictor_model
from napari_muvit.model.losses import segmentation_loss, soft_dice_loss
from napari_muvit.model.mae import MuViTMAE
from napari_muvit.model.points import MuViTPointDetector
from napari_muvit.model.segmenter import MuViTSegmenter

__all__ = [
    "Mask2FormerHead",
    "MuViTEncoder",
    "MuViTMAE",
    "MuViTPointDetector",
    "MuViTSegmenter",
    "UNETRHead",
    "count_parameters",
    "default_skips",
    "is_official_folder",
    "load_encoder",
    "load_history",
    "load_model",
    "load_predictor_model",
    "read_config",
    "save_model",
    "save_official",
    "segmentation_loss",
    "soft_dice_loss",
]
