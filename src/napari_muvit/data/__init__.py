"""Data access for napari-muvit: image pyramids, coordinate geometry, training samples and the
Synthetic task. No Qt/napari imports here (``samples.py`` returns plain layer-data tuples).

Heavy submodules (torch for the sampler) are imported lazily.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from napari_muvit.data.geometry import (
    Tile,
    affine_from_scale_translate,
    bbox_contains,
    blend_weights,
    centered_nested_bboxes,
    level_to_world,
    naive_bboxes,
    plan_tiles,
    random_nested_bboxes,
    visible_data_bbox,
    world_to_level,
)
from napari_muvit.data.normalization import Normalization, compute_normalization
from napari_muvit.data.pyramid import PyramidSource, open_image
from napari_muvit.data.synthetic import (
    SyntheticImage,
    synthetic_field,
    synthetic_rings,
    synthetic_rings_lazy,
)

_LAZY = {
    "NestedCropDataset": "napari_muvit.data.sampler",
    "annotated_points": "napari_muvit.data.sampler",
}

__all__ = [
    "NestedCropDataset",
    "Normalization",
    "PyramidSource",
    "SyntheticImage",
    "Tile",
    "affine_from_scale_translate",
    "annotated_points",
    "bbox_contains",
    "blend_weights",
    "centered_nested_bboxes",
    "compute_normalization",
    "level_to_world",
    "naive_bboxes",
    "open_image",
    "plan_tiles",
    "random_nested_bboxes",
    "synthetic_field",
    "synthetic_rings",
    "synthetic_rings_lazy",
    "visible_data_bbox",
    "world_to_level",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_muvit.data' has no attribute {name!r}")
