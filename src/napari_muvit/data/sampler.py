"""Training samples: random nested multi-resolution crops (paper sec. 4.4, supplement B.2/B.3).

:class:`NestedCropDataset` draws a nested crop (one ``S×S`` crop per level, the level-1 crop
anywhere inside its context, not centred), reads it through :class:`PyramidSource`, cuts the
level-1 target from the labels and applies the supplement's augmentations:

* horizontal / vertical flips of the *whole nest* (all levels, targets and validity masks
  together), with the bboxes mirrored about the level-1 crop centre so that world coordinates
  stay consistent with the flipped pixels;
* intensity jitter (one random gain/offset per sample, on image pixels only, padding stays 0);
* bbox perturbation: small random shift and scaling of each *reported* bbox (the pixels are
  not moved), which makes models robust to coordinate noise (paper sec. 4.7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_muvit.data.geometry import random_nested_bboxes
from napari_muvit.data.pyramid import PyramidSource, open_image
from napari_muvit.errors import InputError

__all__ = ["NestedCropDataset", "annotated_points", "label_lut"]


def label_lut(
    mapping: Mapping[int, int] | None, max_value: int, ignore_index: int = -1
) -> np.ndarray:
    """Lookup table label value -> class index (``ignore_index`` for unmapped values).

    ``mapping=None`` is napari's sparse convention: 0 = not annotated (ignored), painted value
    ``v >= 1`` -> class ``v - 1`` (so ``label_values = [1..K]``).
    """
    n = int(max_value) + 1
    lut = np.full(n, ignore_index, dtype=np.int64)
    if mapping is None:
        lut[1:] = np.arange(n - 1)
    else:
        for k, v in mapping.items():
            k = int(k)
            if 0 <= k < n:
                lut[k] = int(v)
    return lut


def _blocks(shape: tuple[int, int], chunks: tuple[int, int] | None, target: int = 2048):
    """Row-major windows covering ``shape``, aligned to ``chunks`` when known."""
    by, bx = (target, target)
    if chunks is not None:
        cy, cx = chunks
        by = max(cy, (target // cy) * cy)
        bx = max(cx, (target // cx) * cx)
    for y0 in range(0, shape[0], by):
        for x0 in range(0, shape[1], bx):
            yield y0, min(y0 + by, shape[0]), x0, min(x0 + bx, shape[1])


def _label_chunks(labels: Any) -> tuple[int, int] | None:
    ch = getattr(labels, "chunks", None)
    if ch is None:
        return None
    try:
        a, b = ch[-2], ch[-1]
        return int(a[0] if isinstance(a, tuple) else a), int(b[0] if isinstance(b, tuple) else b)
    except (TypeError, IndexError):
        return None


def annotated_points(
    labels: Any,
    max_points: int = 200_000,
    label_mapping: Mapping[int, int] | None = None,
    seed: int = 0,
    return_classes: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """World ``(y, x)`` coordinates of annotated pixels, scanned chunk by chunk (once).

    A pixel is annotated when its value maps to a class (``label_mapping``; default: value
    != 0). When there are more than ``max_points`` such pixels a uniform random subset is kept
    (bottom-k of random keys, so memory stays ~2·``max_points`` even for gigapixel labels).

    Returns ``(N, 2)`` int64 coordinates, plus ``(N,)`` class indices with
    ``return_classes=True``.
    """
    if isinstance(labels, (list, tuple)):  # napari multiscale labels: level 0
        labels = labels[0]
    shape = tuple(int(s) for s in labels.shape)
    if len(shape) != 2:
        raise InputError(f"labels: expected a 2-D (Y, X) array, got shape {shape}")
    rng = np.random.default_rng(seed)
    keep_pts = np.zeros((0, 2), np.int64)
    keep_cls = np.zeros(0, np.int64)
    keep_key = np.zeros(0, np.float64)
    for y0, y1, x0, x1 in _blocks(shape, _label_chunks(labels)):
        block = np.asarray(labels[y0:y1, x0:x1])
        if not block.any() and (label_mapping is None or 0 not in label_mapping):
            continue
        if block.dtype.kind not in "iub":
            raise InputError(f"labels: expected an integer array, got dtype {block.dtype}")
        bmax = int(block.max()) if block.size else 0
        kmax = max(label_mapping, default=0) if label_mapping else 0
        lut = label_lut(label_mapping, max(bmax, kmax))
        cls = lut[np.clip(block, 0, len(lut) - 1).astype(np.int64)]
        cls[block < 0] = -1
        yy, xx = np.nonzero(cls >= 0)
        if yy.size == 0:
            continue
        pts = np.stack([yy + y0, xx + x0], axis=1).astype(np.int64)
        c = cls[yy, xx]
        key = rng.random(yy.size)
        keep_pts = np.concatenate([keep_pts, pts])
        keep_cls = np.concatenate([keep_cls, c])
        keep_key = np.concatenate([keep_key, key])
        if keep_key.size > 2 * max_points:
            sel = np.argpartition(keep_key, max_points)[:max_points]
            keep_pts, keep_cls, keep_key = keep_pts[sel], keep_cls[sel], keep_key[sel]
    if keep_key.size > max_points:
        sel = np.argpartition(keep_key, max_points)[:max_points]
        keep_pts, keep_cls = keep_pts[sel], keep_cls[sel]
    order = np.lexsort((keep_pts[:, 1], keep_pts[:, 0])) if keep_pts.size else np.zeros(0, np.int64)
    keep_pts, keep_cls = keep_pts[order], keep_cls[order]
    if return_classes:
        return keep_pts, keep_cls
    return keep_pts


class NestedCropDataset(Dataset):
    """Random nested multi-resolution training crops with level-1 targets.

    Parameters
    ----------
    sources
        One or more images (:class:`PyramidSource`, arrays, paths: anything :func:`open_image`
        accepts).
    labels
        ``None`` (self-supervised) or one labels array per source (``None`` entries allowed),
        2-D at world (level-1) resolution. napari sparse labels: 0 = not annotated.
    size
        Crop size ``S``.
    levels
        Ascending downsampling factors, e.g. ``(1, 8, 32)``.
    length
        Samples per epoch (``len(dataset)``).
    weighted
        Anchor crops on annotated pixels (``anchor_prob`` of the samples; classes balanced when
        ``balance_classes``), so sparse annotations are actually seen.
    augment
        Flips of the whole nest, intensity jitter and bbox shift/scale noise.
    naive
        The paper's naive-bbox ablation (:func:`~napari_muvit.data.geometry.naive_bboxes`).
    seed
        Every sample is a pure function of ``(seed, epoch, index)`` (not of the DataLoader
        worker), so results do not depend on ``num_workers``. Call :meth:`set_epoch` to draw
        new samples per epoch.
    ignore_index
        Target value for unannotated, unmapped and padding pixels.
    label_mapping
        ``{label value: class index}``; unmapped values are ignored. ``None`` = sparse napari
        convention (value ``v >= 1`` -> class ``v - 1``, 0 ignored). Dense ground truth such
        as :func:`synthetic_rings` uses ``{0: 0, 1: 1, 2: 2}``.
    points
        Optional precomputed annotated coordinates per source (``(N, 2)`` world y, x), e.g.
        from :func:`annotated_points`, to skip the scan of huge labels.
    anchor_prob
        Fraction of anchored samples when ``weighted`` (the rest are uniform, so background
        context is seen too).
    balance_classes
        Pick the anchor's class uniformly first, then a point of that class.
    bbox_shift, bbox_scale
        Std of the bbox shift (fraction of each level's extent) and of the log-scale factor.
    intensity_gain, intensity_offset
        Ranges (±) of the uniform intensity gain (multiplicative, around 1) and offset.
    """

    def __init__(
        self,
        sources: Any,
        labels: Any = None,
        size: int = 256,
        levels: Sequence[float] = (1, 8, 32),
        length: int = 4096,
        weighted: bool = True,
        augment: bool = True,
        naive: bool = False,
        seed: int = 0,
        ignore_index: int = -1,
        label_mapping: Mapping[int, int] | None = None,
        *,
        points: Sequence[np.ndarray | None] | None = None,
        anchor_prob: float = 0.8,
        balance_classes: bool = True,
        max_points: int = 200_000,
        bbox_shift: float = 0.01,
        bbox_scale: float = 0.02,
        intensity_gain: float = 0.2,
        intensity_offset: float = 0.1,
        flips: bool = True,
    ) -> None:
        if isinstance(sources, (PyramidSource, str)) or hasattr(sources, "shape"):
            sources = [sources]
        self.sources = [open_image(s) for s in sources]
        if not self.sources:
            raise InputError("sources: expected at least one image, got none")
        if labels is None:
            labels = [None] * len(self.sources)
        elif not isinstance(labels, (list, tuple)):
            labels = [labels]  # one labels array
        elif len(self.sources) == 1 and len(labels) > 1:
            labels = [labels]  # a napari multiscale labels list for the single source
        if len(labels) != len(self.sources):
            raise InputError(
                f"labels: expected {len(self.sources)} entries (one per source), got {len(labels)}"
            )
        self.labels = []
        for i, (src, lab) in enumerate(zip(self.sources, labels)):
            if isinstance(lab, (list, tuple)):
                lab = lab[0]
            if lab is not None and tuple(lab.shape[-2:]) != tuple(src.shape):
                raise InputError(
                    f"labels[{i}]: expected shape {src.shape} (the image's level-1 shape), got {tuple(lab.shape)}"
                )
            if lab is not None and len(lab.shape) != 2:
                raise InputError(f"labels[{i}]: expected a 2-D array, got shape {tuple(lab.shape)}")
            self.labels.append(lab)
        self.size = int(size)
        self.levels = tuple(float(v) for v in levels)
        for src in self.sources:
            src.check_levels(self.levels)
        self.length = int(length)
        if self.length < 1:
            raise InputError(f"length: expected a positive number of samples, got {length}")
        self.weighted = bool(weighted)
        self.augment = bool(augment)
        self.naive = bool(naive)
        self.seed = int(seed)
        self.epoch = 0
        self.ignore_index = int(ignore_index)
        self.label_mapping = (
            None if label_mapping is None else {int(k): int(v) for k, v in label_mapping.items()}
        )
        self.anchor_prob = float(anchor_prob)
        self.balance_classes = bool(balance_classes)
        self.bbox_shift = float(bbox_shift)
        self.bbox_scale = float(bbox_scale)
        self.intensity_gain = float(intensity_gain)
        self.intensity_offset = float(intensity_offset)
        self.flips = bool(flips)
        self._luts: dict[int, np.ndarray] = {}

        # Everything expensive happens here, in the main process, before DataLoader workers
        # fork: lazy pyramid levels, normalisation statistics, annotated point lists.
        for src in self.sources:
            src.prepare(self.levels)
            _ = src.normalization
        self.points: list[np.ndarray | None] = []
        self.point_classes: list[np.ndarray | None] = []
        for i, lab in enumerate(self.labels):
            given = None if points is None else points[i]
            if given is not None:
                pts = np.asarray(given, dtype=np.int64).reshape(-1, 2)
                cls = (
                    self._classes_at(lab, pts) if lab is not None else np.zeros(len(pts), np.int64)
                )
            elif lab is not None and self.weighted:
                pts, cls = annotated_points(
                    lab, max_points, self.label_mapping, seed=self.seed + i, return_classes=True
                )
            else:
                pts, cls = None, None
            self.points.append(pts)
            self.point_classes.append(cls)
        areas = np.array([s.shape[0] * s.shape[1] for s in self.sources], dtype=np.float64)
        if self.weighted and any(p is not None and len(p) for p in self.points):
            n = np.array([0 if p is None else len(p) for p in self.points], dtype=np.float64)
            # anchored draws pick sources by annotation count, uniform ones by area
            self._anchor_probs = n / n.sum()
        else:
            self._anchor_probs = None
        self._area_probs = areas / areas.sum()

    # ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (still deterministic) set of samples for ``epoch``."""
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` (pure function of seed, epoch, index)."""
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, int(index)])

    @property
    def num_classes(self) -> int | None:
        """Number of classes seen in the annotated points (``max class + 1``), if any."""
        cl = [c for c in self.point_classes if c is not None and len(c)]
        return int(max(int(c.max()) for c in cl) + 1) if cl else None

    def _lut(self, max_value: int) -> np.ndarray:
        n = max(int(max_value), max(self.label_mapping, default=0) if self.label_mapping else 0)
        if n not in self._luts:
            self._luts[n] = label_lut(self.label_mapping, n, self.ignore_index)
        return self._luts[n]

    def _map(self, block: np.ndarray) -> np.ndarray:
        if block.dtype.kind not in "iub":
            raise InputError(f"labels: expected an integer array, got dtype {block.dtype}")
        mx = int(block.max()) if block.size else 0
        lut = self._lut(mx)
        out = lut[np.clip(block, 0, len(lut) - 1).astype(np.int64)]
        out[block < 0] = self.ignore_index
        return out

    def _classes_at(self, lab: Any, pts: np.ndarray) -> np.ndarray:
        if isinstance(lab, np.ndarray):
            vals = lab[pts[:, 0], pts[:, 1]]
        else:
            # chunked labels: read each 2048² block holding points once, not one read per point
            vals = np.zeros(len(pts), dtype=np.int64)
            if len(pts):
                blk = pts // 2048
                keys, inv = np.unique(blk, axis=0, return_inverse=True)
                for k, (by, bx) in enumerate(keys):
                    sel = np.flatnonzero(inv.reshape(-1) == k)
                    y0, x0 = int(by) * 2048, int(bx) * 2048
                    block = np.asarray(lab[y0 : y0 + 2048, x0 : x0 + 2048])
                    vals[sel] = block[pts[sel, 0] - y0, pts[sel, 1] - x0]
        return self._map(np.asarray(vals).reshape(-1))

    def _target(self, lab: Any, bbox: np.ndarray) -> np.ndarray:
        s = self.size
        t = np.full((s, s), self.ignore_index, dtype=np.int64)
        if lab is None:
            return t
        oy, ox = round(bbox[0, 0]), round(bbox[0, 1])
        ly, lx = lab.shape
        y0, y1 = max(oy, 0), min(oy + s, ly)
        x0, x1 = max(ox, 0), min(ox + s, lx)
        if y1 > y0 and x1 > x0:
            t[y0 - oy : y1 - oy, x0 - ox : x1 - ox] = self._map(np.asarray(lab[y0:y1, x0:x1]))
        return t

    def _anchor(self, rng: np.random.Generator) -> tuple[int, tuple[int, int] | None]:
        if self._anchor_probs is not None and rng.random() < self.anchor_prob:
            i = int(rng.choice(len(self.sources), p=self._anchor_probs))
            pts, cls = self.points[i], self.point_classes[i]
            if self.balance_classes and cls is not None and len(cls):
                uniq = np.unique(cls)
                c = uniq[rng.integers(len(uniq))]
                idx = np.flatnonzero(cls == c)
                j = int(idx[rng.integers(len(idx))])
            else:
                j = int(rng.integers(len(pts)))
            return i, (int(pts[j, 0]), int(pts[j, 1]))
        return int(rng.choice(len(self.sources), p=self._area_probs)), None

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index`` as numpy arrays (``image``, ``bbox``, ``target``, ``valid``,
        ``bbox_read`` = where the crops were actually read, ``source``)."""
        rng = self.rng_for(index)
        i, anchor = self._anchor(rng)
        src = self.sources[i]
        s, lv = self.size, self.levels
        reported, read = random_nested_bboxes(
            rng, src.shape, s, lv, naive=self.naive, anchor=anchor, return_read=True
        )
        image, valid = src.read_nested(read, lv, s)
        target = self._target(self.labels[i], read[0])
        target[~valid[0]] = self.ignore_index
        bbox = reported.copy()
        if self.augment:
            image, bbox, target, valid = self._augment(rng, image, bbox, target, valid)
        return {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "bbox": bbox.astype(np.float32),
            "target": np.ascontiguousarray(target, dtype=np.int64),
            "valid": np.ascontiguousarray(valid),
            "bbox_read": read.astype(np.float32),
            "source": np.int64(i),
        }

    def _augment(
        self,
        rng: np.random.Generator,
        image: np.ndarray,
        bbox: np.ndarray,
        target: np.ndarray,
        valid: np.ndarray,
    ):
        # flips of the whole nest; mirror world coordinates about the level-1 centre
        c = (bbox[0, 0] + bbox[0, 1]) / 2.0
        if self.flips:
            for ax in range(2):
                if rng.random() < 0.5:
                    image = np.flip(image, axis=2 + ax)
                    valid = np.flip(valid, axis=1 + ax)
                    target = np.flip(target, axis=ax)
                    lo = 2 * c[ax] - bbox[:, 1, ax]
                    hi = 2 * c[ax] - bbox[:, 0, ax]
                    bbox[:, 0, ax], bbox[:, 1, ax] = lo, hi
        # intensity jitter: one gain/offset per sample (all levels see the same intensities)
        gain = 1.0 + rng.uniform(-self.intensity_gain, self.intensity_gain)
        offset = rng.uniform(-self.intensity_offset, self.intensity_offset)
        image = np.where(valid[:, None], image * np.float32(gain) + np.float32(offset), 0).astype(
            np.float32
        )
        # bbox noise: per level shift (fraction of extent) and log-normal scaling about the centre
        if self.bbox_shift > 0 or self.bbox_scale > 0:
            ext = bbox[:, 1] - bbox[:, 0]
            centre = (bbox[:, 1] + bbox[:, 0]) / 2.0
            shift = rng.normal(0.0, self.bbox_shift, size=(len(bbox), 2)) * ext
            scale = np.exp(rng.normal(0.0, self.bbox_scale, size=(len(bbox), 1)))
            centre = centre + shift
            half = ext * scale / 2.0
            bbox = np.stack([centre - half, centre + half], axis=1)
        return image, bbox, target, valid

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """``image`` (L, C, S, S) float32, ``bbox`` (L, 2, 2) float32, ``target`` (S, S) int64
        (``ignore_index`` = unannotated/padding), ``valid`` (L, S, S) bool, as torch tensors
        (plus ``bbox_read`` and ``source``)."""
        if not -self.length <= index < self.length:
            raise IndexError(index)
        d = self.sample(index % self.length)
        return {k: torch.as_tensor(v) for k, v in d.items()}
