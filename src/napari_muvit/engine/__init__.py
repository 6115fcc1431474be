"""Inference and training engines: no Qt, progress callbacks and cancel tokens only.

The convenience functions ``predict``, ``train`` and ``pretrain`` share their names with the
submodules that define them, so they are exported from the top-level package
(``napari_muvit.predict``) and from their modules (``napari_muvit.engine.predictor.predict``),
not from here, where an imported submodule would shadow them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "CancelToken": "napari_muvit.engine.cancel",
    "resolve_device": "napari_muvit.engine.device",
    "Predictor": "napari_muvit.engine.predictor",
    "TileResult": "napari_muvit.engine.predictor",
    "MemorySink": "napari_muvit.engine.sinks",
    "ZarrSink": "napari_muvit.engine.sinks",
    "predict_distributed": "napari_muvit.engine.distributed",
    "TrainConfig": "napari_muvit.engine.trainer",
    "Trainer": "napari_muvit.engine.trainer",
    "PretrainConfig": "napari_muvit.engine.pretrainer",
    "predict": "napari_muvit.engine.predictor",
    "train": "napari_muvit.engine.trainer",
    "pretrain": "napari_muvit.engine.pretrainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_muvit.engine' has no attribute {name!r}")
