"""Inference and training engines: no Qt, progress callbacks and cancel tokens only.

The entry points ``predict`` and ``train`` live in :mod:`napari_muvit.engine.api`, above the
engines they compose (the import graph of ``engine/`` points downward only, see
``docs/architecture.md``); ``pretrain`` in :mod:`napari_muvit.engine.pretrainer`. Names are
resolved lazily so that ``import napari_muvit`` does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "CancelToken": "napari_muvit.engine.cancel",
    "resolve_device": "napari_muvit.engine.device",
    "Predictor": "napari_muvit.engine.predictor",
    "TileResult": "napari_muvit.engine.sinks",
    "MemorySink": "napari_muvit.engine.sinks",
    "ZarrSink": "napari_muvit.engine.sinks",
    "predict_distributed": "napari_muvit.engine.distributed",
    "TrainConfig": "napari_muvit.engine.trainer",
    "Trainer": "napari_muvit.engine.trainer",
    "PretrainConfig": "napari_muvit.engine.pretrainer",
    "predict": "napari_muvit.engine.api",
    "train": "napari_muvit.engine.api",
    "pretrain": "napari_muvit.engine.pretrainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_muvit.engine' has no attribute {name!r}")
