"""Shared helpers for the prediction tests (tiny models, small images, reference stitching).

Not a test module (no ``test_`` prefix, so pytest does not collect it); the test files import it
as ``_predict_support`` (pytest puts the tests folder on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from napari_muvit.data import PyramidSource, centered_nested_bboxes, plan_tiles, synthetic_rings
from napari_muvit.model import MuViTEncoder, MuViTSegmenter

CROP = 32


def tiny_segmenter(
    levels: Sequence[float] = (1, 4),
    num_classes: int = 3,
    label_values: Sequence[int] | None = (1, 2, 3),
    in_channels: int = 1,
    crop: int = CROP,
    normalization: dict | None = None,
    seed: int = 0,
) -> MuViTSegmenter:
    """dim 48, 2 heads, 1 layer; the output layer is scaled so that labels vary in space."""
    torch.manual_seed(seed)
    enc = MuViTEncoder(in_channels=in_channels, levels=tuple(levels), patch_size=8, dim=48,
                       num_layers=1, heads=2)
    seg = MuViTSegmenter(
        enc, num_classes=num_classes, head_dim=16,
        label_values=None if label_values is None else list(label_values),
        normalization=normalization, meta={"crop_size": crop},
    ).eval()
    with torch.no_grad():
        seg.head.out.weight.mul_(20.0)
        seg.head.out.bias.zero_()
    return seg


_IMAGES: dict[tuple, np.ndarray] = {}


def rings(size: int | tuple[int, int] = 192, seed: int = 1) -> list[np.ndarray]:
    """A small Synthetic-rings pyramid (cached across tests: generation is the slow part)."""
    key = (size, seed)
    if key not in _IMAGES:
        _IMAGES[key] = synthetic_rings(size, seed=seed, min_level_size=32).pyramid
    return _IMAGES[key]


def rings_source(size: int = 192, seed: int = 1) -> PyramidSource:
    return PyramidSource(rings(size, seed))


def reference_labels(model: MuViTSegmenter, source: PyramidSource, region: np.ndarray,
                     crop: int = CROP) -> np.ndarray:
    """Stitch per-tile model outputs (batch 1, plain torch) over ``region``: the ground truth
    the engine must reproduce exactly."""
    region = np.asarray(region, dtype=np.int64)
    out = np.zeros(tuple(region[1] - region[0]), dtype=np.int64)
    lut = np.asarray(model.label_values)
    levels = tuple(float(v) for v in model.levels)
    for tile in plan_tiles(region, crop, source.shape):
        bb = centered_nested_bboxes(tile.origin, crop, levels)
        crops, _ = source.read_nested(bb, levels, crop)
        with torch.inference_mode():
            logits = model(torch.from_numpy(crops)[None], torch.from_numpy(bb)[None])
        lab = lut[logits.argmax(1)[0].numpy()]
        c = tile.core
        out[c[0, 0] - region[0, 0] : c[1, 0] - region[0, 0],
            c[0, 1] - region[0, 1] : c[1, 1] - region[0, 1]] = lab[tile.core_in_tile]
    return out


def tile_probs(model: MuViTSegmenter, source: PyramidSource, origin: Sequence[int],
               crop: int = CROP) -> np.ndarray:
    """Softmax probabilities (K, S, S) of one tile at ``origin``."""
    levels = tuple(float(v) for v in model.levels)
    bb = centered_nested_bboxes(origin, crop, levels)
    crops, _ = source.read_nested(bb, levels, crop)
    with torch.inference_mode():
        logits = model(torch.from_numpy(crops)[None], torch.from_numpy(bb)[None])
    return torch.softmax(logits.float(), 1)[0].numpy()
