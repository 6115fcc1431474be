"""MuViT point detector: nucleus detection + classification as points (MUSE-style fine-tuning).

The MUSE paper (Downstream Fine-Tuning) regresses nucleus coordinates and predicts their types
with two independent heads, trained with an MSE regression loss and a cross-entropy type loss
inside the annotated region, plus a confidence-filtered consistency (pseudo-label) loss on the
unannotated surroundings of large-field-of-view samples.  Here the same losses sit on the
MuViT encoder's level-1 features:

* a UNETR pixel decoder (:class:`~napari_muvit.model.heads.PixelDecoder`) brings the level-1
  tokens back to full resolution (the coarse levels inform them through attention);
* every location of a ``stride``-pixel grid predicts whether a nucleus is there, its type
  and, with ``offsets``, the sub-cell offset ``(dy, dx)`` of the nucleus it belongs to;
* a location is *positive* when a point lies within ``pos_radius`` pixels of its centre (the
  nearest point wins); positives regress the offset to that point (MSE).

Two layouts of objectness and type (head option ``type_head``):

* ``"separate"`` (MUSE's, the default of new detectors): one objectness logit (binary
  cross-entropy on every annotated location) and an independent type head with its own K
  logits, trained by a cross-entropy on the positive locations only. With ``context`` the type
  head also sees the final tokens of every level sampled at the location's world position
  (:func:`~napari_muvit.model.heads.level_tokens_at`): the coarse levels say in which tissue
  (ring) the nucleus lies, which is what MuViT adds. Raw outputs: ``[objectness, K types,
  offsets]``.
  With ``type_classifier="forest"`` (new detectors) the type logits are the log-probabilities
  of a random forest (:class:`~napari_muvit.model.forest.TreeEnsemble`) on the filter bank of
  every level's crop at the location (:meth:`PixelHead.level_bank_features`, ``type_sigmas``
  up to 32 level pixels), average-pooled to the ``stride`` grid. The trainer fits it on the
  positive locations of the clicked points in seconds, before fine-tuning objectness and
  offsets; it needs no encoder that already knows the tissue (measured on the synthetic
  rings: mean class F1 0.99 with levels 1,4,16 from the default MAE start, against 0.49 for
  the trained type MLP; docs/results.md).
* ``"shared"`` (detectors trained before the separate head; P2PNet-style): ``K + 1`` logits
  (background + K types) in one softmax. Measured on the synthetic rings, the background term
  drowned the type distinction (mean class F1 0.46 with an encoder that knows the context;
  docs/results.md). Raw outputs: ``[background, K types, offsets]``.

In both, channels ``0 .. K`` are objectness/type and ``K + 1, K + 2`` the offsets.

Decoding (:func:`decode_points`) takes the local maxima of the foreground score above a
threshold, moves each to ``location + offset`` and keeps the best-scoring point within
``min_distance`` pixels.  ``stride=1, offsets=False`` is the heatmap + local-maximum decoder;
``stride>1, offsets=True`` is the MUSE/P2PNet-style per-location regression, the default
(``stride=4``), chosen by a measurement (``experiments/points_head_choice.py``: detection F1
0.904 vs 0.819 per-pixel offsets vs 0.804 heatmap; docs/results.md).

Point coordinates follow napari and scikit-image: pixel ``i`` has its centre at ``i`` (level-0
pixel index coordinates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_muvit.errors import InputError
from napari_muvit.model.checkpoint import load_folder, save_model
from napari_muvit.model._labelled import (
    class_fields,
    labelled_config,
    labelled_kwargs,
    normalization_dict,
)
from napari_muvit.model.encoder import MuViTEncoder
from napari_muvit.model.heads import PixelDecoder, PixelHead, default_skips, level_tokens_at
from napari_muvit.model.segmenter import level1_skip_maps

__all__ = [
    "MuViTPointDetector",
    "PointHead",
    "decode_points",
    "nms_points",
    "point_consistency_loss",
    "point_loss",
    "point_maps",
    "point_targets",
]

#: defaults of the head options (stored in the checkpoint's ``head`` section)
DEFAULT_POINT_OPTIONS: dict[str, Any] = {
    # 4 where the patch size allows (else 1): the MUSE/P2PNet-style grid beat per-pixel maps
    # and the heatmap decoder in experiments/points_head_choice.py (docs/results.md)
    "stride": 4,
    "offsets": True,
    "pos_radius": 3.0,
    "min_distance": 4.0,
    "threshold": 0.5,
    "taper": True,
    # MUSE's layout: objectness + an independent type head (see the module docstring);
    # checkpoints without the key are "shared" (MuViTPointDetector.from_checkpoint_config)
    "type_head": "separate",
    # the type head sees every level's final tokens at the location ("separate" only)
    "context": True,
    "type_hidden": 64,
    # "forest" (new detectors): the type comes from a random forest on the filter bank of every
    # level's crop, fitted by the trainer in seconds; "mlp": a trained type head (checkpoints
    # without the key). See the module docstring.
    "type_classifier": "forest",
    # the forest's filter scales (level pixels of every level's crop): the large ones see the
    # tissue (ring) around a nucleus at the coarse levels
    "type_sigmas": [0.7, 1.6, 3.5, 5.0, 10.0, 20.0, 32.0],
    # circles (radii in pixels of the coarsest level's crop) on which the forest also sees the
    # smoothed coarse crop around the location, sorted: what lies around a nucleus in every
    # direction, whatever the orientation ([] = off); measured on the synthetic rings with
    # levels 1,4: class F1 0.872 without, 0.899 with (experiments/points_type_forest.py)
    "type_rings": [6.0, 12.0, 18.0, 24.0],
    "forest_trees": 0,
    "forest_nodes": 1,
    "forest_depth": 0,
}
TYPE_HEADS = ("shared", "separate")
TYPE_CLASSIFIERS = ("mlp", "forest")


class PointHead(nn.Module):
    """Pixel decoder → (average-pooled to ``stride``) → objectness/type logits [+ offsets (2)].

    ``type_head="shared"``: one 1×1 conv to ``K + 1`` logits (background + K types).
    ``type_head="separate"``: a 1×1 conv to one objectness logit, and a type MLP (1×1 convs,
    ``type_hidden`` units) to K logits on the decoder features, concatenated with the
    layer-normalised final tokens of all ``num_levels`` levels at the location when
    ``context`` is set (``dim`` channels per level).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        patch_size: int,
        num_classes: int,
        head_dim: int = 64,
        skips: list[int] | tuple[int, ...] = (0, 5, 11),
        taper: bool = True,
        stride: int = 1,
        offsets: bool = True,
        type_head: str = "shared",
        context: bool = False,
        num_levels: int = 1,
        type_hidden: int = 64,
        *,
        type_classifier: str = "mlp",
        type_sigmas: Sequence[float] | None = None,
        forest_shape: Mapping[str, int] | None = None,
        type_rings: Sequence[float] = (),
    ):
        super().__init__()
        if type_head not in TYPE_HEADS:
            raise InputError(
                f"head_options.type_head: expected one of {TYPE_HEADS}, got {type_head!r}"
            )
        self.stride = int(stride)
        self.offsets = bool(offsets)
        self.patch_size = int(patch_size)
        self.separate = type_head == "separate"
        self.context = self.separate and bool(context)
        self.num_levels = int(num_levels)
        self.pixel_decoder = PixelDecoder(
            dim, in_channels, patch_size, head_dim, len(list(skips)), taper
        )
        c = self.pixel_decoder.out_dim
        self.type_forest: PixelHead | None = None
        if self.separate and type_classifier == "forest":
            self.object_head = nn.Conv2d(c, 1, 1)
            shape = dict(forest_shape or {})
            self.type_forest = PixelHead(
                dim, in_channels, patch_size, num_classes, sigmas=type_sigmas,
                num_levels=self.num_levels, bank="levels", classifier="forest",
                encoder_features=False, forest_trees=shape.get("forest_trees", 0),
                forest_nodes=shape.get("forest_nodes", 1),
                forest_depth=shape.get("forest_depth", 0),
            )
            self.type_rings = [float(r) for r in type_rings]
            self.context = False
        elif self.separate:
            self.object_head = nn.Conv2d(c, 1, 1)
            ctx = dim * self.num_levels if self.context else 0
            self.context_norm = nn.LayerNorm(ctx) if ctx else None
            self.class_head = nn.Sequential(
                nn.Conv2d(c + ctx, int(type_hidden), 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(int(type_hidden), num_classes, 1),
            )
        else:
            self.type_head = nn.Conv2d(c, num_classes + 1, 1)
        self.offset_head = nn.Conv2d(c, 2, 1) if self.offsets else None

    def forward(
        self,
        maps: list[Tensor],
        image: Tensor,
        tokens: Tensor | None = None,
        coords: Tensor | None = None,
        nest: Tensor | None = None,
    ) -> Tensor:
        f = self.pixel_decoder(maps, image)
        if self.stride > 1:
            f = F.avg_pool2d(f, self.stride)
        if self.type_forest is not None:
            if nest is None or coords is None:
                raise ValueError("PointHead: the forest type head needs the nest and coords")
            types = self.type_forest.forest.log_probs(self.type_features(nest, coords))
            outs = [self.object_head(f), types]
        elif self.separate:
            feats = f
            if self.context_norm is not None:
                if tokens is None or coords is None:
                    raise ValueError("PointHead: the context type head needs tokens and coords")
                ctx = level_tokens_at(
                    tokens, coords, self.num_levels, self.patch_size, image.shape[-2:],
                    self.stride, first_level=0,
                )
                ctx = self.context_norm(ctx.to(f.dtype).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                feats = torch.cat([f, ctx], 1)
            outs = [self.object_head(f), self.class_head(feats)]
        else:
            outs = [self.type_head(f)]
        if self.offset_head is not None:
            outs.append(self.offset_head(f))
        return torch.cat(outs, 1)

    def type_features(self, nest: Tensor, coords: Tensor) -> Tensor:
        """The forest's features on the ``stride`` grid (B, F, H/stride, W/stride): the filter
        bank of every level's crop at each level-1 pixel, averaged over the grid cell."""
        if self.type_forest is None:
            raise ValueError("PointHead.type_features: this head has no forest type head")
        feats = self.type_forest.level_bank_features(nest, coords)
        if self.type_rings:
            B, L, _, H, W = nest.shape
            rings = ring_profile(nest[:, -1].float(), self.type_rings)
            if L > 1:
                rings = self.type_forest._sample_level(rings, coords, L - 1, H, W)
            feats = torch.cat([feats, rings], 1)
        return F.avg_pool2d(feats, self.stride) if self.stride > 1 else feats


def ring_profile(crop: Tensor, radii: Sequence[float], directions: int = 8,
                 smooth: int = 5) -> Tensor:
    """What surrounds every pixel of ``crop`` (B, C, S, S): the crop, box-smoothed over
    ``smooth`` pixels, at ``directions`` points on a circle of each radius around the pixel,
    sorted (so the profile does not depend on the orientation), plus their mean and standard
    deviation: (B, C·len(radii)·(directions + 2), S, S). Past the crop the edge repeats."""
    B, C, S, S2 = crop.shape
    base = F.avg_pool2d(crop, smooth, 1, smooth // 2, count_include_pad=False)
    reach = int(math.ceil(max(radii)))
    padded = F.pad(base, (reach, reach, reach, reach), mode="replicate")
    out = []
    for r in radii:
        angles = [2 * math.pi * k / directions for k in range(directions)]
        shifts = [(round(r * math.sin(a)), round(r * math.cos(a))) for a in angles]
        samples = torch.stack([
            padded[..., reach + dy : reach + dy + S, reach + dx : reach + dx + S2]
            for dy, dx in shifts
        ], 2)  # (B, C, directions, S, S)
        ordered = samples.sort(2).values
        out += [ordered.flatten(1, 2), samples.mean(2), samples.std(2)]
    return torch.cat(out, 1)


class MuViTPointDetector(nn.Module):
    """:class:`MuViTEncoder` + :class:`PointHead`: points with a class and a score.

    Args:
        encoder: the (usually pre-trained) encoder.
        num_classes: K point classes.
        head_dim: pixel-decoder width.
        class_names: K names (default ``"class 1"`` ...).
        label_values: K class ids written to the output (default ``1..K``).
        normalization: input normalisation dict the model was trained with (or None).
        meta: provenance/history dict stored in the checkpoint.
        class_colors: optional K colours.
        head_options: ``skips``, ``taper``, ``stride``, ``offsets``, ``pos_radius``,
            ``min_distance``, ``threshold``, ``type_head`` (``"separate"``/``"shared"``),
            ``context``, ``type_hidden`` (see the module docstring).

    ``det(x, bbox)`` returns raw outputs (B, K+1 [+2], H/stride, W/stride); :func:`point_maps`
    turns them into per-pixel maps and :func:`decode_points` into points.
    """

    task = "points"
    head_type = "points"

    def __init__(
        self,
        encoder: MuViTEncoder,
        num_classes: int = 1,
        head_dim: int = 64,
        class_names: list[str] | None = None,
        label_values: list[int] | None = None,
        normalization: dict | None = None,
        meta: dict | None = None,
        class_colors: list | None = None,
        head_options: dict | None = None,
    ):
        super().__init__()
        K = int(num_classes)
        if K < 1:
            raise InputError(f"num_classes: expected >= 1, got {num_classes}")
        class_names, label_values, class_colors = class_fields(
            K, class_names, label_values, class_colors, first_value=1, names_from_values=True)
        normalization = normalization_dict(normalization)
        opts = {**DEFAULT_POINT_OPTIONS, **dict(head_options or {})}
        if "stride" not in (head_options or {}) and encoder.patch_size % opts["stride"]:
            opts["stride"] = 1
        opts.setdefault("skips", default_skips(encoder.num_layers))
        opts["skips"] = [int(s) for s in opts["skips"]]
        for s in opts["skips"]:
            if not 0 <= s < encoder.num_layers:
                raise InputError(
                    f"head_options.skips: expected layer indices in "
                    f"[0, {encoder.num_layers}), got {s}"
                )
        stride = int(opts["stride"])
        if stride < 1 or stride > encoder.patch_size or encoder.patch_size % stride:
            raise InputError(
                f"head_options.stride: expected a divisor of the patch size {encoder.patch_size}, "
                f"got {opts['stride']!r}"
            )
        for key in ("pos_radius", "min_distance"):
            if not float(opts[key]) > 0:
                raise InputError(
                    f"head_options.{key}: expected a positive number, got {opts[key]!r}"
                )
        if not 0.0 < float(opts["threshold"]) < 1.0:
            raise InputError(
                f"head_options.threshold: expected a value in (0, 1), got {opts['threshold']!r}"
            )
        if opts["type_head"] not in TYPE_HEADS:
            raise InputError(
                f"head_options.type_head: expected one of {TYPE_HEADS}, got {opts['type_head']!r}"
            )
        if int(opts["type_hidden"]) < 1:
            raise InputError(
                f"head_options.type_hidden: expected a positive int, got {opts['type_hidden']!r}"
            )
        if opts["type_classifier"] not in TYPE_CLASSIFIERS:
            raise InputError(
                f"head_options.type_classifier: expected one of {TYPE_CLASSIFIERS}, "
                f"got {opts['type_classifier']!r}"
            )
        sigmas = opts["type_sigmas"]
        if (not isinstance(sigmas, (list, tuple)) or not sigmas
                or not all(isinstance(v, (int, float)) and 0 < v <= 256 for v in sigmas)):
            raise InputError(
                f"head_options.type_sigmas: expected a list of scales in (0, 256], got {sigmas!r}"
            )
        rings = opts["type_rings"]
        if (not isinstance(rings, (list, tuple))
                or not all(isinstance(v, (int, float)) and 0 < v <= 64 for v in rings)):
            raise InputError(
                f"head_options.type_rings: expected a list of radii in (0, 64], got {rings!r}"
            )
        separate = opts["type_head"] == "separate"
        opts.update(
            type_rings=[float(v) for v in rings],
            type_hidden=int(opts["type_hidden"]),
            # the shared softmax has no type head to give context to, nor to replace by a forest
            context=bool(opts["context"]) and separate,
            type_classifier=opts["type_classifier"] if separate else "mlp",
            type_sigmas=[float(v) for v in sigmas],
            **{k: int(opts[k]) for k in ("forest_trees", "forest_nodes", "forest_depth")},
            stride=stride,
            offsets=bool(opts["offsets"]),
            taper=bool(opts["taper"]),
            pos_radius=float(opts["pos_radius"]),
            min_distance=float(opts["min_distance"]),
            threshold=float(opts["threshold"]),
        )
        self.encoder = encoder
        self.num_classes = K
        self.head_dim = int(head_dim)
        self.head_options = opts
        self.class_names = class_names
        self.label_values = label_values
        self.class_colors = class_colors
        self.normalization = normalization
        self.meta = dict(meta or {})
        self.head = PointHead(
            encoder.dim,
            encoder.in_channels,
            encoder.patch_size,
            K,
            self.head_dim,
            opts["skips"],
            opts["taper"],
            stride,
            opts["offsets"],
            opts["type_head"],
            opts["context"],
            len(encoder.levels),
            opts["type_hidden"],
            type_classifier=opts["type_classifier"],
            type_sigmas=opts["type_sigmas"],
            forest_shape=opts,
            type_rings=opts["type_rings"],
        )

    # -------------------------------------------------------------------------- properties
    @property
    def levels(self) -> tuple[float | int, ...]:
        return self.encoder.levels

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    @property
    def stride(self) -> int:
        return int(self.head_options["stride"])

    @property
    def type_head(self) -> str:
        """``"separate"`` (objectness + independent type head) or ``"shared"`` (one softmax)."""
        return str(self.head_options["type_head"])

    @property
    def type_forest(self) -> PixelHead | None:
        """The forest type head (its filter bank and :class:`TreeEnsemble`), or None."""
        return self.head.type_forest

    @property
    def map_channels(self) -> int:
        """Channels of :func:`point_maps`: score, dy, dx, then K class probabilities."""
        return 3 + self.num_classes

    @property
    def head_config(self) -> dict[str, Any]:
        """The ``head`` section of the checkpoint config."""
        return {
            "type": "points",
            "num_classes": self.num_classes,
            "head_dim": self.head_dim,
            **self.head_options,
        }

    # -------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, bbox: Any = None) -> Tensor:
        """Raw outputs (B, K+1 [+2], H/stride, W/stride) for the level-1 crop."""
        x = self.encoder.check_input(x)
        maps, feats, coords = level1_skip_maps(self.encoder, x, bbox, self.head_options["skips"])
        return self.head(maps, x[:, 0], feats, coords, x)

    def maps(self, raw: Tensor, size: int | None = None) -> Tensor:
        """Per-pixel maps of raw outputs (see :func:`point_maps`)."""
        return point_maps(
            raw, self.num_classes, self.stride, self.head_options["pos_radius"], size,
            type_head=self.type_head,
        )

    def loss_scale(self) -> float:
        """Offsets are learnt in units of this many pixels (keeps the MSE O(1))."""
        return offset_scale(self.stride, self.head_options["pos_radius"])

    # -------------------------------------------------------------------------- I/O
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.yaml`` + ``model.safetensors`` (kind ``points``)."""
        return save_model(self, folder, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, map_location: str | torch.device = "cpu"
    ) -> MuViTPointDetector:
        """Load a point-detector folder written by :meth:`save`."""
        return load_folder(
            folder, MuViTEncoder, {"points": cls}, map_location,
            expected="a point detector (kind: points)", hint="; train one with --points",
        )

    def checkpoint_config(self) -> dict[str, Any]:
        """Everything of ``config.yaml`` but format fields and meta (used by save_model)."""
        return labelled_config(self, "points")

    @classmethod
    def from_checkpoint_config(
        cls, encoder: MuViTEncoder, cfg: dict[str, Any], meta: dict[str, Any]
    ) -> MuViTPointDetector:
        """Inverse of :meth:`checkpoint_config` (weights are loaded by the caller)."""
        head = dict(cfg.get("head") or {})
        head.pop("type", None)
        K = head.pop("num_classes", None)
        if not isinstance(K, int):
            raise InputError(f"head.num_classes: expected an int, got {K!r}")
        head_dim = head.pop("head_dim", 64)
        # detectors saved before the separate type head existed had the shared softmax, and
        # before the forest type head a trained type MLP
        head.setdefault("type_head", "shared")
        head.setdefault("type_classifier", "mlp")
        return cls(
            encoder,
            num_classes=K,
            head_dim=head_dim,
            head_options=head,
            **labelled_kwargs(cfg, meta),
        )


# ============================================================================ targets, losses
def offset_scale(stride: int, pos_radius: float) -> float:
    """Offsets are regressed in units of ``max(stride, pos_radius)`` pixels."""
    return float(max(stride, pos_radius, 1.0))


def _cell_centres(h: int, w: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-index coordinates of the centres of a ``stride`` grid of ``h×w`` cells."""
    half = (stride - 1) / 2.0
    cy = torch.arange(h, device=device, dtype=torch.float32) * stride + half
    cx = torch.arange(w, device=device, dtype=torch.float32) * stride + half
    return cy, cx


def point_targets(
    target: Tensor, stride: int, pos_radius: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-location targets from a point raster.

    ``target`` (B, S, S) int: -1 = not annotated (or padding), 0 = annotated, no point,
    ``k >= 1`` = a point of class ``k`` at that pixel.

    Returns ``(types, offsets, positive, annotated)`` on the ``stride`` grid (B, h, w):
    ``types`` in ``[0, K]`` (0 = background) with -1 where not annotated; ``offsets``
    (B, 2, h, w) from the location centre to its nearest point in pixels; ``positive`` (bool)
    where a point lies within ``max(pos_radius, 0.75·stride)`` px; ``annotated`` (bool) where
    every pixel of the location is annotated.
    """
    B, S, S2 = target.shape
    h, w = S // stride, S2 // stride
    dev = target.device
    known = (target >= 0).float()[:, None]
    annotated = (-F.max_pool2d(-known, stride))[:, 0] > 0.5 if stride > 1 else known[:, 0] > 0.5
    types = torch.where(annotated, 0, -1).long()
    offsets = torch.zeros(B, 2, h, w, device=dev)
    positive = torch.zeros(B, h, w, dtype=torch.bool, device=dev)
    cy, cx = _cell_centres(h, w, stride, dev)
    reach = max(float(pos_radius), 0.75 * stride)
    for b in range(B):
        pts = torch.nonzero(target[b] >= 1)
        if len(pts) == 0:
            continue
        py, px = pts[:, 0].float(), pts[:, 1].float()
        cls = target[b][pts[:, 0], pts[:, 1]].long()
        dy = py[None, None, :] - cy[:, None, None]  # (h, 1, n)
        dx = px[None, None, :] - cx[None, :, None]  # (1, w, n)
        d2 = dy * dy + dx * dx  # (h, w, n)
        best, idx = d2.min(-1)
        pos = best <= reach * reach
        positive[b] = pos
        types[b] = torch.where(pos, cls[idx], types[b])
        offsets[b, 0] = torch.gather(dy.expand(h, w, -1), 2, idx[..., None])[..., 0]
        offsets[b, 1] = torch.gather(dx.expand(h, w, -1), 2, idx[..., None])[..., 0]
    return types, offsets, positive, annotated


def point_loss(
    raw: Tensor,
    target: Tensor,
    num_classes: int,
    stride: int,
    pos_radius: float,
    type_weight: float = 1.0,
    reg_weight: float = 1.0,
    background_weight: float = 1.0,
    type_head: str = "shared",
) -> tuple[Tensor, dict[str, float]]:
    """MUSE's supervised fine-tuning loss inside the annotated region.

    ``type_head="separate"``: BCE(objectness) over annotated locations (negatives weighted by
    ``background_weight``) + ``type_weight``·CE(K types) over the *positive* locations only.
    ``"shared"``: ``type_weight``·CE(K+1 types incl. background) over annotated locations.
    Both: + ``reg_weight``·MSE(offsets) over positive locations (offsets in units of
    :func:`offset_scale`). Returns the scalar and its parts (``loss_type``, ``loss_obj``,
    ``loss_reg``). Exactly 0 (with a graph) when nothing in the batch is annotated.
    """
    K = int(num_classes)
    types, offsets, positive, _annotated = point_targets(target, stride, pos_radius)
    zero = raw.float().sum() * 0.0
    if not bool((types >= 0).any()):
        return zero, {"loss_type": 0.0, "loss_obj": 0.0, "loss_reg": 0.0}
    if type_head == "separate":
        annotated = types >= 0
        obj = raw[:, 0].float()[annotated]
        is_pos = positive[annotated].float()
        weight = torch.where(is_pos > 0, 1.0, float(background_weight))
        obj_loss = F.binary_cross_entropy_with_logits(obj, is_pos, weight=weight)
        typed = positive & (types > 0)
        ce = zero
        if bool(typed.any()):
            type_logits = raw[:, 1 : K + 1].float().permute(0, 2, 3, 1)[typed]
            ce = F.cross_entropy(type_logits, types[typed] - 1)
        loss = obj_loss + type_weight * ce
    elif type_head == "shared":
        weight = torch.ones(K + 1, device=raw.device)
        weight[0] = float(background_weight)
        ce = F.cross_entropy(raw[:, : K + 1].float(), types, weight=weight, ignore_index=-1)
        obj_loss = zero
        loss = type_weight * ce
    else:
        raise InputError(f"type_head: expected one of {TYPE_HEADS}, got {type_head!r}")
    reg = zero
    if raw.shape[1] > K + 1 and bool(positive.any()):
        scale = offset_scale(stride, pos_radius)
        pred = raw[:, K + 1 : K + 3].float()
        diff = (pred - offsets / scale).permute(0, 2, 3, 1)[positive]
        reg = (diff * diff).sum(-1).mean()
        loss = loss + reg_weight * reg
    return loss, {
        "loss_type": float(ce.detach()),
        "loss_obj": float(obj_loss.detach()) + 0.0,  # no -0.0 in the curves
        "loss_reg": float(reg.detach()),
    }


def point_consistency_loss(
    raw: Tensor,
    teacher_raw: Tensor,
    target: Tensor,
    valid: Tensor,
    num_classes: int,
    stride: int,
    threshold: float,
    reg_weight: float = 1.0,
    type_head: str = "shared",
) -> tuple[Tensor, float]:
    """MUSE's consistency term on the unannotated surroundings.

    The teacher's confident locations in cells with no annotated pixel (and inside the image,
    ``valid`` (B, S, S)) become pseudo labels. ``"shared"``: max softmax ``>= threshold``
    (background or a type) → CE towards the teacher's class. ``"separate"``: objectness
    probability ``>= threshold`` (a point) or ``<= 1 - threshold`` (background) → BCE towards
    it, and on the confident points whose type probability is ``>= threshold`` CE towards the
    teacher's type. Both: MSE towards the teacher's offsets where it predicts a point.
    Returns the loss and the fraction of locations used.
    """
    K = int(num_classes)
    s = int(stride)
    any_known = (target >= 0).float()[:, None]
    inside = valid.float()[:, None]
    if s > 1:
        any_known = F.max_pool2d(any_known, s)
        inside = -F.max_pool2d(-inside, s)
    free = (any_known[:, 0] < 0.5) & (inside[:, 0] > 0.5)
    zero = raw.float().sum() * 0.0
    if type_head == "separate":
        p_obj = torch.sigmoid(teacher_raw[:, 0].float())
        use = free & ((p_obj >= threshold) | (p_obj <= 1.0 - threshold))
        pos = use & (p_obj >= threshold)
        frac = float(use.float().mean())
        if not bool(use.any()):
            return zero, frac
        loss = F.binary_cross_entropy_with_logits(raw[:, 0].float()[use], pos[use].float())
        t_conf, t_type = torch.softmax(teacher_raw[:, 1 : K + 1].float(), 1).max(1)
        typed = pos & (t_conf >= threshold)
        if bool(typed.any()):
            loss = loss + F.cross_entropy(
                raw[:, 1 : K + 1].float().permute(0, 2, 3, 1)[typed], t_type[typed]
            )
    elif type_head == "shared":
        conf, lab = torch.softmax(teacher_raw[:, : K + 1].float(), 1).max(1)
        use = free & (conf >= threshold)
        frac = float(use.float().mean())
        if not bool(use.any()):
            return zero, frac
        pseudo = torch.where(use, lab, torch.full_like(lab, -1))
        loss = F.cross_entropy(raw[:, : K + 1].float(), pseudo, ignore_index=-1)
        pos = use & (lab > 0)
    else:
        raise InputError(f"type_head: expected one of {TYPE_HEADS}, got {type_head!r}")
    if raw.shape[1] > K + 1 and bool(pos.any()):
        diff = (raw[:, K + 1 : K + 3].float() - teacher_raw[:, K + 1 : K + 3].float())
        diff = diff.permute(0, 2, 3, 1)[pos]
        loss = loss + reg_weight * (diff * diff).sum(-1).mean()
    return loss, frac


# ============================================================================ decoding
def point_maps(
    raw: Tensor,
    num_classes: int,
    stride: int,
    pos_radius: float,
    size: int | None = None,
    type_head: str = "shared",
) -> Tensor:
    """Per-pixel maps (B, 3+K, S, S) of raw outputs: foreground score, offset ``dy``, ``dx``
    (pixels from *this pixel* to the point it votes for) and K class probabilities. The score
    is the objectness probability (``"separate"``) or 1 − P(background) (``"shared"``); the
    class probabilities are the type head's softmax (``"separate"``) or the foreground types'
    share of the softmax (``"shared"``). A ``stride`` grid is expanded to pixels (each pixel of
    a cell carries the cell's prediction, its offset re-expressed from the pixel)."""
    K = int(num_classes)
    if type_head == "separate":
        score = torch.sigmoid(raw[:, :1].float())
        cls = torch.softmax(raw[:, 1 : K + 1].float(), 1)
    elif type_head == "shared":
        probs = torch.softmax(raw[:, : K + 1].float(), 1)
        score = 1.0 - probs[:, :1]
        cls = probs[:, 1:] / probs[:, 1:].sum(1, keepdim=True).clamp_min(1e-12)
    else:
        raise InputError(f"type_head: expected one of {TYPE_HEADS}, got {type_head!r}")
    B, _, h, w = raw.shape
    if raw.shape[1] > K + 1:
        off = raw[:, K + 1 : K + 3].float() * offset_scale(stride, pos_radius)
    else:
        off = torch.zeros(B, 2, h, w, device=raw.device)
    cy, cx = _cell_centres(h, w, stride, raw.device)
    S = size or h * stride
    if stride > 1:
        score = score.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
        cls = cls.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
        ty = (off[:, 0] + cy[None, :, None]).repeat_interleave(stride, 1)
        ty = ty.repeat_interleave(stride, 2)
        tx = (off[:, 1] + cx[None, None, :]).repeat_interleave(stride, 1)
        tx = tx.repeat_interleave(stride, 2)
        py = torch.arange(ty.shape[1], device=raw.device, dtype=torch.float32)
        px = torch.arange(tx.shape[2], device=raw.device, dtype=torch.float32)
        off = torch.stack([ty - py[None, :, None], tx - px[None, None, :]], 1)
    out = torch.cat([score, off, cls], 1)
    return out[:, :, :S, :S]


def decode_points(
    maps: Tensor, threshold: float, min_distance: float
) -> list[dict[str, Tensor]]:
    """Points of per-pixel maps (B, 3+K, H, W) in the maps' pixel coordinates.

    Local maxima (3×3) of the score ``>= threshold`` vote at ``pixel + offset``; a greedy
    non-maximum suppression keeps the best point within ``min_distance`` px. Returns per image
    ``{"yx": (N, 2) float32, "class_index": (N,) int64 in [0, K), "score": (N,)}``.
    """
    score = maps[:, 0]
    peak = (score == F.max_pool2d(score[:, None], 3, 1, 1)[:, 0]) & (score >= threshold)
    out = []
    for b in range(maps.shape[0]):
        yy, xx = torch.nonzero(peak[b], as_tuple=True)
        yx = torch.stack([yy.float() + maps[b, 1, yy, xx], xx.float() + maps[b, 2, yy, xx]], 1)
        sc = score[b, yy, xx]
        cls = maps[b, 3:, yy, xx].argmax(0) if maps.shape[1] > 3 else torch.zeros_like(yy)
        keep = torch.as_tensor(
            nms_points(yx.cpu().numpy(), sc.cpu().numpy(), min_distance), device=yx.device
        )
        out.append({"yx": yx[keep], "class_index": cls[keep].long(), "score": sc[keep]})
    return out


def nms_points(yx: Any, score: Any, min_distance: float) -> np.ndarray:
    """Indices of the points kept by greedy suppression: best score first (ties: input
    order); a point is dropped when a kept one lies closer than ``min_distance`` px."""
    from scipy.spatial import cKDTree

    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    n = len(yx)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-score, kind="stable")
    tree = cKDTree(yx)
    alive = np.ones(n, dtype=bool)
    keep = []
    for i in order:
        if not alive[i]:
            continue
        keep.append(i)
        for j in tree.query_ball_point(yx[i], np.nextafter(min_distance, 0)):
            alive[j] = False
    return np.asarray(keep, dtype=np.int64)
