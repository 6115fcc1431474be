"""MuViT encoder + segmentation head → per-pixel class logits of the level-1 crop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
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
from napari_muvit.model.heads import Mask2FormerHead, PixelHead, UNETRHead, default_skips

__all__ = ["HEAD_TYPES", "MuViTSegmenter", "level1_skip_maps"]

HEAD_TYPES = ("unetr", "mask2former", "pixel")


def level1_skip_maps(
    encoder: MuViTEncoder, x: Tensor, bbox: Any, skips: list[int]
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Run the encoder on a checked nest ``x`` (B, L, C, H, W) and return the level-1 token
    maps (B, D, h, w) of the layers in ``skips``, the final tokens of all levels (B, N, D) and
    their centred world coordinates: what every dense head (segmentation, points) consumes."""
    enc = encoder
    coords = enc.token_coords(bbox, x.shape, x.device)
    tokens0, _ = enc.embed(x)
    level_idx = None
    B, _, _, H, W = x.shape
    P = enc.patch_size
    h, w = H // P, W // P
    if enc.attention_mode != "all":
        level_idx = enc.level_index(h * w, x.device)
    feats, inter = enc.run_layers(tokens0, coords, skips, level_idx)
    n = h * w
    maps = [t[:, :n].reshape(B, h, w, -1).permute(0, 3, 1, 2) for t in inter]
    return maps, feats, coords


class MuViTSegmenter(nn.Module):
    """Semantic segmenter: :class:`MuViTEncoder` + UNETR or Mask2Former head.

    Args:
        encoder: the (usually pre-trained) encoder.
        head: ``"unetr"``, ``"mask2former"`` or ``"pixel"`` (a per-pixel classifier on filters
            and encoder maps, fitted in seconds by :func:`napari_muvit.engine.quicktrain.quick_fit`).
        num_classes: K output classes (class index k is written as ``label_values[k]``).
        head_dim: decoder width (256 in the paper).
        class_names: K names (default ``"class 0"`` ...).
        label_values: K label values written to the output (default ``0..K-1``).
        normalization: the input normalisation dict the model was trained with (or None).
        meta: free-form provenance/history dict, stored in the checkpoint.
        class_colors: optional K colours (any YAML-able value, e.g. ``[r, g, b, a]``).
        head_options: extra head kwargs (``skips``; Mask2Former: ``num_queries``,
            ``num_decoder_layers``, ``heads``, ``ff_mult``).

    ``seg(x, bbox)`` with ``x`` (B, L, C, H, W), ``bbox`` (B, L, 2, 2) returns (B, K, H, W)
    logits for the level-1 (first) crop.
    """

    #: what the engines dispatch on (a point detector says ``"points"``)
    task = "segmentation"

    def __init__(
        self,
        encoder: MuViTEncoder,
        head: str = "unetr",
        num_classes: int = 2,
        head_dim: int = 256,
        class_names: list[str] | None = None,
        label_values: list[int] | None = None,
        normalization: dict | None = None,
        meta: dict | None = None,
        class_colors: list | None = None,
        head_options: dict | None = None,
    ):
        super().__init__()
        if head not in HEAD_TYPES:
            raise InputError(f"head: expected one of {HEAD_TYPES}, got {head!r}")
        K = int(num_classes)
        if K < 1:
            raise InputError(f"num_classes: expected >= 1, got {num_classes}")
        class_names, label_values, class_colors = class_fields(
            K, class_names, label_values, class_colors, first_value=0, names_from_values=False)
        normalization = normalization_dict(normalization)
        opts = dict(head_options or {})
        opts.setdefault("skips", default_skips(encoder.num_layers))
        opts["skips"] = [int(s) for s in opts["skips"]]
        for s in opts["skips"]:
            if not 0 <= s < encoder.num_layers:
                raise InputError(
                    f"head_options.skips: expected layer indices in [0, {encoder.num_layers}), got {s}"
                )
        self.encoder = encoder
        self.head_type = head
        self.num_classes = K
        self.head_dim = int(head_dim)
        self.head_options = opts
        self.class_names = class_names
        self.label_values = label_values
        self.class_colors = class_colors
        self.normalization = normalization
        self.meta = dict(meta or {})
        common = {
            "dim": encoder.dim,
            "in_channels": encoder.in_channels,
            "patch_size": encoder.patch_size,
            "num_classes": K,
            "head_dim": self.head_dim,
        }
        if head == "unetr":
            self.head: nn.Module = UNETRHead(**common, **opts)
        elif head == "pixel":
            self.head = PixelHead(**common, num_levels=encoder.num_levels, **opts)
        else:
            opts.setdefault("rotary_base", encoder.rotary_base)
            self.head = Mask2FormerHead(**common, **opts)
            self.head_options["num_queries"] = self.head.num_queries
            self.head_options["heads"] = self.head.heads

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
    def head_config(self) -> dict[str, Any]:
        """The ``head`` section of the checkpoint config."""
        return {
            "type": self.head_type,
            "num_classes": self.num_classes,
            "head_dim": self.head_dim,
            **self.head_options,
        }

    # -------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, bbox: Any = None) -> Tensor:
        """Logits (B, K, H, W) for the level-1 crop ``x[:, 0]``."""
        maps, feats, coords, x = self.encode(x, bbox)
        return self.head(maps, x[:, 0], tokens=feats, coords=coords, nest=x)

    def encode(self, x: Tensor, bbox: Any = None) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """What the head sees: level-1 skip maps (B, D, h, w) shallow → deep, the final tokens
        of all levels (B, N, D), their centred world coordinates and the checked input (no maps and
        no tokens for a head that does not use the encoder)."""
        x = self.encoder.check_input(x)
        if not getattr(self.head, "uses_encoder", True):
            # a filter-bank head needs only the levels' world positions: skip the transformer
            return [], None, self.encoder.token_coords(bbox, x.shape, x.device), x
        maps, feats, coords = level1_skip_maps(self.encoder, x, bbox, self.head_options["skips"])
        return maps, feats, coords, x

    @torch.no_grad()
    def predict_labels(self, x: Tensor, bbox: Any = None) -> Tensor:
        """Label values (B, H, W) int64 (argmax mapped through ``label_values``)."""
        idx = self.forward(x, bbox).argmax(1)
        lut = torch.as_tensor(self.label_values, device=idx.device)
        return lut[idx]

    # -------------------------------------------------------------------------- I/O
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.yaml`` + ``model.safetensors`` (kind ``segmenter``)."""
        return save_model(self, folder, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, map_location: str | torch.device = "cpu"
    ) -> MuViTSegmenter:
        """Load a segmenter folder written by :meth:`save`."""
        return load_folder(
            folder, MuViTEncoder, {"segmenter": cls}, map_location,
            expected="a segmenter (kind: segmenter)", hint="; fine-tune it first or use load_model",
        )

    def checkpoint_config(self) -> dict[str, Any]:
        """Everything of ``config.yaml`` but format fields and meta (used by save_model)."""
        return labelled_config(self, "segmenter")

    @classmethod
    def from_checkpoint_config(
        cls, encoder: MuViTEncoder, cfg: dict[str, Any], meta: dict[str, Any]
    ) -> MuViTSegmenter:
        """Inverse of :meth:`checkpoint_config` (weights are loaded by the caller)."""
        head = dict(cfg["head"])
        return cls(
            encoder,
            head=head.pop("type", None),
            num_classes=head.pop("num_classes", None),
            head_dim=head.pop("head_dim", 256),
            head_options=head,
            **labelled_kwargs(cfg, meta),
        )
