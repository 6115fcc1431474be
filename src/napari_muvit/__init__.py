"""napari-muvit: multi-resolution vision transformers (MuViT) for gigapixel microscopy in napari.

The public Python API is imported lazily so that napari can read the plugin manifest without
importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# OpenMP reads its wait policy once, when torch loads: set a passive one (unless the user chose
# one) before anything imports torch, so that busy cores do not make torch 6-10x slower.
# engine.threads imports no torch at module level.
from napari_muvit.engine.threads import configure_wait_policy as _configure_wait_policy

_configure_wait_policy()

_LAZY = {
    "MuViTEncoder": "napari_muvit.model",
    "MuViTSegmenter": "napari_muvit.model",
    "MuViTMAE": "napari_muvit.model",
    "load_model": "napari_muvit.model",
    "PyramidSource": "napari_muvit.data",
    "predict": "napari_muvit.engine",
    "Predictor": "napari_muvit.engine",
    "train": "napari_muvit.engine",
    "pretrain": "napari_muvit.engine",
    "default_model_path": "napari_muvit.weights",
    "load_default_model": "napari_muvit.weights",
    "export_bioimageio": "napari_muvit.export",
    "MuViTPointDetector": "napari_muvit.model",
    "train_points": "napari_muvit.engine.points",
    "predict_points": "napari_muvit.engine.points",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_muvit' has no attribute {name!r}")
