"""MuViT encoder: one transformer over the patch tokens of several resolution levels.

The math is the official ``muvit`` 0.1.0 package's, so official checkpoints load and reproduce
their features to ~1e-6 (``tests/test_model_official.py``, against outputs the official package
saved: ``tests/fixtures/muvit-official``). The implementation differs for speed:

* q, k, v come from one fused ``qkv`` projection (official ``to_q/to_k/to_v`` are concatenated
  on load and split on export);
* RoPE angles are computed once per layer and forward, in float32; q and k are rotated together
  as one complex multiply whose result is written into a fresh contiguous ``(2, B, H, N, dh)``
  tensor (:func:`~napari_muvit.model.rope.apply_rope`);
* attention is ``F.scaled_dot_product_attention`` on contiguous ``(B, H, N, dh)`` q, k and v
  (v is copied out of the projection: the CPU flash kernel is slower on strided inputs);
* under autocast the residual stream stays float32 (the level embedding is added in float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_muvit.errors import InputError
from napari_muvit.model.checkpoint import load_folder, save_model
from napari_muvit.model.rope import (
    AxialRoPE,
    apply_rope,
    default_bbox,
    patch_coords,
    rope_theta_check,
    split_rope_dims,
)

__all__ = ["Attention", "FeedForward", "MuViTEncoder", "TransformerLayer", "as_bbox_tensor"]

ROTARY_MODES = ("none", "fixed", "shared", "per_layer")
ATTENTION_MODES = ("all", "causal", "same")
COORD_MODES = ("center", "linspace")


class FeedForward(nn.Module):
    """``fc2(dropout(GELU_erf(fc1(x))))`` with hidden size ``mult·dim``."""

    def __init__(self, dim: int, mult: int = 2, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * mult)
        self.fc2 = nn.Linear(dim * mult, dim)
        self.dropout = float(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc1(x))
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return self.fc2(h)


def _dense(t: Tensor) -> Tensor:
    """Contiguous (B, H, N, dh) for SDPA (cheap: only copies views of the fused projection)."""
    return t if t.is_contiguous() else t.contiguous()


class Attention(nn.Module):
    """Multi-head attention without biases, fused qkv, RoPE on q and k, SDPA kernel.

    ``to_out`` is the identity when ``heads == 1`` (official quirk: x-transformers drops the
    output projection then; keeping it would break the parameter count and checkpoints).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out: nn.Module = nn.Linear(dim, dim, bias=False) if heads > 1 else nn.Identity()
        self.dropout = float(dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        context: Tensor | None = None,
        context_rope: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Self-attention over ``x`` (B, N, D), or cross-attention to ``context`` (B, M, D).

        ``rope``/``context_rope`` are ``(cos, sin)`` pairs (B, N|M, dh/2) for queries/keys; None
        means no rotation (e.g. position-free queries).
        """
        B, N, D = x.shape
        H, dh = self.heads, self.dh
        if context is None:
            # (3, B, H, N, dh) view straight out of the fused projection. RoPE writes q and k as
            # one fresh tensor in this (contiguous) layout; the CPU flash-attention kernel is ~2x
            # slower in bf16 on strided inputs, so v is made contiguous as well.
            qkv = self.qkv(x).view(B, N, 3, H, dh).permute(2, 0, 3, 1, 4)
            if rope is not None:
                q, k = apply_rope(qkv[:2], *rope)
            else:
                q, k = qkv[0], qkv[1]
            v = qkv[2]
        else:
            M = context.shape[1]
            w = self.qkv.weight
            q = F.linear(x, w[:D]).view(B, N, H, dh).transpose(1, 2)
            kv = F.linear(context, w[D:]).view(B, M, 2, H, dh).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
            if rope is not None:
                q = apply_rope(q, *rope)
            if context_rope is not None:
                k = apply_rope(k, *context_rope)
        o = F.scaled_dot_product_attention(
            _dense(q),
            _dense(k),
            _dense(v),
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.to_out(o.transpose(1, 2).reshape(B, N, D))


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``x + Attn(LN1 x)`` then ``x + FF(LN2 x)`` (FF mult 2, exact GELU).

    With ``cross=True`` the attention is cross-attention only (official MAE decoder layer 0):
    keys/values come from the *un-normalised* context.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        rope: str = "per_layer",
        rotary_base: float = 10000.0,
        cross: bool = False,
    ):
        super().__init__()
        self.cross = cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 2, dropout)
        # Per-layer learnable frequencies; for "shared"/"fixed"/"none" the owner passes angles.
        self.rope = AxialRoPE(dim, heads, rotary_base) if rope == "per_layer" else None

    def forward(
        self,
        x: Tensor,
        coords: Tensor | None,
        context: Tensor | None = None,
        context_coords: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        context_rope: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """``coords`` (B, N, 2) float32 world coordinates (centred), or precomputed ``rope``."""
        if rope is None and self.rope is not None and coords is not None:
            rope = self.rope(coords)
        if self.cross:
            if context_rope is None and self.rope is not None and context_coords is not None:
                context_rope = self.rope(context_coords)
            x = x + self.attn(self.norm1(x), rope, context, context_rope, attn_mask)
        else:
            x = x + self.attn(self.norm1(x), rope, attn_mask=attn_mask)
        return x + self.ff(self.norm2(x))


def as_bbox_tensor(bbox: Any, batch: int, levels: int, device: torch.device) -> Tensor:
    """Validate a bbox (B, L, 2, 2) (torch or numpy) and return it as a tensor on ``device``."""
    if isinstance(bbox, Tensor):
        bb = bbox
    else:
        try:
            arr = np.asarray(bbox)
        except Exception as exc:  # pragma: no cover - exotic array likes
            raise InputError(
                f"bbox: expected an array (B, L, 2, 2), got {type(bbox).__name__}"
            ) from exc
        if not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"bbox: expected a numeric array (B, L, 2, 2), got dtype {arr.dtype}")
        bb = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    given = tuple(bb.shape)
    if given == (levels, 2, 2) and batch == 1:
        bb = bb.unsqueeze(0)  # a single sample's (L, 2, 2) bbox
    if tuple(bb.shape) != (batch, levels, 2, 2):
        raise InputError(
            f"bbox: expected shape (B, L, 2, 2) = ({batch}, {levels}, 2, 2), got {given}"
        )
    if not bb.is_floating_point():
        bb = bb.double() if bb.device.type != "mps" else bb.float()
    if not torch.isfinite(bb).all():
        raise InputError("bbox: expected finite values, got NaN or inf")
    ext = bb[:, :, 1] - bb[:, :, 0]
    if not (ext > 0).all():
        bad = (ext <= 0).nonzero()[0].tolist()
        raise InputError(
            f"bbox: expected y1 > y0 and x1 > x0 for every level, got bbox[{bad[0]}, {bad[1]}] = "
            f"{bb[bad[0], bad[1]].tolist()}"
        )
    if device.type == "mps":
        bb = bb.float()  # MPS has no float64
    return bb.to(device)


def _level_list(levels: Sequence[float]) -> list[float | int]:
    out: list[float | int] = []
    for lv in levels:
        v = float(lv)
        out.append(int(v) if v.is_integer() else v)
    return out


class MuViTEncoder(nn.Module):
    """Multi-resolution ViT encoder (MuViT).

    Args:
        in_channels: image channels ``C``.
        levels: downsampling factors, ascending, finest first, e.g. ``(1, 8, 32)``.
        patch_size: square patch size ``P`` in pixels of each level crop.
        dim: token dimension ``D``.
        num_layers: transformer layers.
        heads: attention heads (head dim ``D/heads`` ≥ 20 for the RoPE split).
        rotary_base: RoPE base for the frequency initialisation.
        use_level_embed: add a learnable embedding per level to its tokens.
        dropout: attention-probability and feed-forward dropout.
        coord_mode: ``"center"`` (true patch centres, ours) or ``"linspace"`` (official).
        rotary_mode: ``"per_layer"`` (default, learnable per layer), ``"shared"`` (learnable,
            shared by all layers), ``"fixed"`` (analytic), ``"none"``.
        attention_mode: ``"all"`` (default), ``"causal"`` (tokens see their own and finer
            levels), ``"same"`` (within-level only).

    Input ``x`` (B, L, C, H, W) and ``bbox`` (B, L, 2, 2) ``[[y0, x0], [y1, x1]]`` in world
    (level-1 pixel) units; output tokens (B, L·h·w, D), level-major, row-major within a level.
    """

    def __init__(
        self,
        in_channels: int,
        levels: Sequence[float],
        patch_size: int = 8,
        dim: int = 512,
        num_layers: int = 12,
        heads: int = 8,
        rotary_base: float = 10000.0,
        use_level_embed: bool = True,
        dropout: float = 0.0,
        coord_mode: str = "center",
        rotary_mode: str = "per_layer",
        attention_mode: str = "all",
    ):
        super().__init__()
        levels = _level_list(levels)
        if not levels:
            raise InputError("levels: expected at least one level, got an empty sequence")
        if any(lv <= 0 for lv in levels):
            raise InputError(f"levels: expected positive factors, got {levels}")
        if coord_mode not in COORD_MODES:
            raise InputError(f"coord_mode: expected one of {COORD_MODES}, got {coord_mode!r}")
        if rotary_mode not in ROTARY_MODES:
            raise InputError(f"rotary_mode: expected one of {ROTARY_MODES}, got {rotary_mode!r}")
        if attention_mode not in ATTENTION_MODES:
            raise InputError(
                f"attention_mode: expected one of {ATTENTION_MODES}, got {attention_mode!r}"
            )
        if isinstance(patch_size, (tuple, list)):
            if len(set(patch_size)) != 1:
                raise InputError(f"patch_size: expected a square patch, got {tuple(patch_size)}")
            patch_size = int(patch_size[0])
        rope_theta_check(float(rotary_base))
        if rotary_mode != "none":
            try:
                split_rope_dims(dim, heads)
            except ValueError as exc:
                raise InputError(f"dim/heads: {exc}") from None
        self.in_channels = int(in_channels)
        self.levels: tuple[float | int, ...] = tuple(levels)
        self.patch_size = int(patch_size)
        self.dim = int(dim)
        self.num_layers = int(num_layers)
        self.heads = int(heads)
        self.rotary_base = float(rotary_base)
        self.use_level_embed = bool(use_level_embed)
        self.dropout = float(dropout)
        self.coord_mode = coord_mode
        self.rotary_mode = rotary_mode
        self.attention_mode = attention_mode
        self.meta: dict[str, Any] = {}  # provenance, filled by from_pretrained / save(meta=...)

        L, P, C, D = len(levels), self.patch_size, self.in_channels, self.dim
        if use_level_embed:
            self.level_embed = nn.Parameter(torch.randn(L, 1, 1, D) * 0.02)
        else:
            self.register_parameter("level_embed", None)
        # Key names proj.{l}.0 (Linear) / proj.{l}.1 (LayerNorm) match the official files.
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(P * P * C, D), nn.LayerNorm(D)) for _ in range(L)
        )
        self.layers = nn.ModuleList(
            TransformerLayer(D, heads, dropout, rotary_mode, rotary_base) for _ in range(num_layers)
        )
        if rotary_mode in ("shared", "fixed"):
            self.rope = AxialRoPE(D, heads, rotary_base, learnable=rotary_mode == "shared")
        else:
            self.rope = None

    # ----------------------------------------------------------------------------- config
    @property
    def config(self) -> dict[str, Any]:
        """Constructor kwargs (plain Python types, YAML/JSON-able)."""
        return {
            "in_channels": self.in_channels,
            "levels": list(self.levels),
            "patch_size": self.patch_size,
            "dim": self.dim,
            "num_layers": self.num_layers,
            "heads": self.heads,
            "rotary_base": self.rotary_base,
            "use_level_embed": self.use_level_embed,
            "dropout": self.dropout,
            "coord_mode": self.coord_mode,
            "rotary_mode": self.rotary_mode,
            "attention_mode": self.attention_mode,
        }

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    # ----------------------------------------------------------------------------- validation
    def check_input(self, x: Any) -> Tensor:
        """Validate ``x`` (B, L, C, H, W); raise :class:`InputError` naming what is wrong."""
        if not isinstance(x, Tensor):
            raise InputError(f"x: expected a torch.Tensor (B, L, C, H, W), got {type(x).__name__}")
        if x.ndim != 5:
            raise InputError(
                f"x: expected 5 dims (B, L, C, H, W), got {x.ndim} dims with shape {tuple(x.shape)}"
            )
        _B, L, C, H, W = x.shape
        if L != self.num_levels:
            raise InputError(
                f"x: expected {self.num_levels} levels {list(self.levels)} on dim 1, got {L} "
                f"(shape {tuple(x.shape)})"
            )
        if C != self.in_channels:
            raise InputError(
                f"x: expected {self.in_channels} channels on dim 2, got {C} (shape {tuple(x.shape)})"
            )
        P = self.patch_size
        if H % P or W % P or H == 0 or W == 0:
            raise InputError(
                f"x: expected H and W to be positive multiples of the patch size {P}, got {H}x{W}"
            )
        if not x.is_floating_point():
            raise InputError(f"x: expected a floating point tensor, got {x.dtype}")
        # One reduction instead of an elementwise isfinite pass: NaN/inf propagate into the sum.
        # Only if the sum is non-finite (NaN/inf, or an overflow of huge values) look closer.
        if not bool(torch.isfinite(x.sum(dtype=torch.float32))):
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                idx = tuple(bad.nonzero()[0].tolist())
                raise InputError(
                    f"x: expected finite values, got {x[idx].item()} at index {idx} "
                    f"({int(bad.sum())} non-finite values)"
                )
        return x

    # ----------------------------------------------------------------------------- pieces
    def patchify(self, x: Tensor) -> Tensor:
        """(B, L, C, H, W) -> patches (B, L, h·w, P·P·C), element order (p1, p2, c)."""
        B, L, C, H, W = x.shape
        P = self.patch_size
        h, w = H // P, W // P
        p = x.reshape(B, L, C, h, P, w, P).permute(0, 1, 3, 5, 4, 6, 2)
        return p.reshape(B, L, h * w, P * P * C)

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Token embeddings entering layer 0 and the raw patches.

        Returns ``(tokens0 (B, N, D), patches (B, N, P·P·C))``.
        """
        patches = self.patchify(x)
        toks = []
        for lvl, proj in enumerate(self.proj):
            # Keep the residual stream in the input dtype (float32) under autocast: a bf16
            # residual stream roughly quadruples the bf16-vs-fp32 feature error over 12 layers.
            t = proj(patches[:, lvl]).to(x.dtype)
            if self.level_embed is not None:
                t = t + self.level_embed[lvl, 0, 0].to(x.dtype)
            toks.append(t)
        return torch.cat(toks, dim=1), patches.flatten(1, 2)

    def token_coords(self, bbox: Any, x_shape: Sequence[int], device: torch.device) -> Tensor:
        """Centred world coordinates (B, N, 2) float32 of all tokens for ``bbox`` (or default)."""
        B, L, _, H, W = x_shape
        if bbox is None:
            bb = default_bbox(self.levels, H, W, self.coord_mode, B, device)
        else:
            bb = as_bbox_tensor(bbox, B, L, device)
        P = self.patch_size
        return patch_coords(bb, (H // P, W // P), self.coord_mode).to(device)

    def level_index(self, n_per_level: int, device: torch.device) -> Tensor:
        """Level index of every token (N,) int64."""
        return torch.arange(self.num_levels, device=device).repeat_interleave(n_per_level)

    def _mask(self, level_idx: Tensor | None) -> Tensor | None:
        if self.attention_mode == "all" or level_idx is None:
            return None
        li = level_idx if level_idx.ndim == 2 else level_idx[None]
        if self.attention_mode == "causal":
            m = li[:, :, None] >= li[:, None, :]
        else:
            m = li[:, :, None] == li[:, None, :]
        return m[:, None]

    def run_layers(
        self,
        tokens: Tensor,
        coords: Tensor,
        return_layers: Sequence[int] | None = None,
        level_idx: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Apply the transformer to any token subset (used by the MAE on visible tokens).

        Args:
            tokens: (B, N, D) embeddings; coords: (B, N, 2) centred world coordinates.
            return_layers: layer indices (negative allowed) whose outputs to return, in the
                requested order.
            level_idx: (N,) or (B, N) level of each token; only needed for masked attention modes.
        """
        want = self._layer_indices(return_layers)
        shared = self.rope(coords) if self.rope is not None else None
        mask = self._mask(level_idx)
        outs: dict[int, Tensor] = {}
        x = tokens
        per_layer = coords if self.rotary_mode == "per_layer" else None
        for i, layer in enumerate(self.layers):
            x = layer(x, per_layer, rope=shared, attn_mask=mask)
            if i in want:
                outs[i] = x
        return x, [outs[i] for i in want]

    def _layer_indices(self, return_layers: Sequence[int] | None) -> list[int]:
        if return_layers is None:
            return []
        if isinstance(return_layers, int):
            raise InputError("return_layers: expected a sequence of layer indices, got an int")
        out = []
        for i in return_layers:
            j = int(i) + self.num_layers if int(i) < 0 else int(i)
            if not 0 <= j < self.num_layers:
                raise InputError(
                    f"return_layers: expected indices in [-{self.num_layers}, {self.num_layers}), "
                    f"got {i}"
                )
            out.append(j)
        return out

    # ----------------------------------------------------------------------------- forward
    def forward(
        self, x: Tensor, bbox: Any = None, return_layers: Sequence[int] | None = None
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode ``x`` (B, L, C, H, W) with world bboxes (B, L, 2, 2).

        ``bbox=None`` uses concentric crops centred on each other (official default; only correct
        if the crops really are concentric). Returns tokens (B, L·h·w, D), or with
        ``return_layers`` a tuple ``(tokens, [output of each requested layer])``.
        """
        x = self.check_input(x)
        coords = self.token_coords(bbox, x.shape, x.device)
        tokens0, _ = self.embed(x)
        level_idx = None
        if self.attention_mode != "all":
            P = self.patch_size
            level_idx = self.level_index((x.shape[3] // P) * (x.shape[4] // P), x.device)
        feats, inter = self.run_layers(tokens0, coords, return_layers, level_idx)
        if return_layers is None:
            return feats
        return feats, inter

    def feature_maps(self, x: Tensor, bbox: Any = None) -> Tensor:
        """Encoder output as spatial maps (B, L, D, h, w)."""
        feats = self.forward(x, bbox)
        B, L, _, H, W = x.shape
        P = self.patch_size
        return feats.reshape(B, L, H // P, W // P, self.dim).permute(0, 1, 4, 2, 3)

    def tokens_to_maps(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """(B, L·h·w, D) tokens -> (B, L', D, h, w) for crops of ``height``×``width`` pixels."""
        P = self.patch_size
        h, w = height // P, width // P
        B, N, D = tokens.shape
        return tokens.reshape(B, N // (h * w), h, w, D).permute(0, 1, 4, 2, 3)

    # ----------------------------------------------------------------------------- levels
    def select_levels(self, levels: Sequence[float]) -> MuViTEncoder:
        """Encoder on a subset/re-ordering of this encoder's levels.

        The transformer layers, RoPE frequencies and patch projections are *shared* (same
        modules); level embeddings are copied rows (a new parameter). Raises InputError for a
        level this encoder does not have.
        """
        sel = []
        for lv in _level_list(levels):
            matches = [i for i, own in enumerate(self.levels) if math.isclose(own, lv)]
            if not matches:
                raise InputError(
                    f"levels: expected a subset of the encoder levels {list(self.levels)}, got {lv}"
                )
            sel.append(matches[0])
        cfg = self.config
        cfg["levels"] = [self.levels[i] for i in sel]
        cfg["num_layers"] = 0  # layers are attached below, not re-created
        new = MuViTEncoder(**cfg)
        new.num_layers = self.num_layers
        new.layers = self.layers
        new.rope = self.rope
        new.proj = nn.ModuleList(self.proj[i] for i in sel)
        if self.level_embed is not None:
            new.level_embed = nn.Parameter(self.level_embed.detach()[sel].clone())
        return new.to(next(self.parameters()).device)

    # ----------------------------------------------------------------------------- I/O
    def save(self, folder: str | Path, overwrite: bool = False, meta: dict | None = None) -> Path:
        """Write ``config.yaml`` + ``model.safetensors`` (our format, kind ``encoder``)."""
        return save_model(self, folder, overwrite=overwrite, meta=meta)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, map_location: str | torch.device = "cpu"
    ) -> MuViTEncoder:
        """Load an encoder from our folder (any kind: the encoder part) or an official folder
        (encoder or MAE)."""
        return load_folder(folder, cls, {"encoder": cls}, map_location, encoder_only=True)

    def checkpoint_config(self) -> dict[str, Any]:
        """Everything of ``config.yaml`` but format fields and meta (used by save_model)."""
        return {
            "kind": "encoder",
            "encoder": self.config,
            "head": None,
            "class_names": None,
            "label_values": None,
            "class_colors": None,
            "normalization": None,
        }

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, patch_size={self.patch_size}, dim={self.dim}, "
            f"heads={self.heads}, coord_mode={self.coord_mode!r}"
        )
