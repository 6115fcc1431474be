"""Segmentation heads for MuViT (supplement C.2): UNETR-style and Mask2Former-style.

Both heads receive:

* ``maps``: list of level-1 feature maps (B, D, h, w) from the encoder layers in ``skips``
  (shallow → deep). Only level-1 tokens feed the heads *spatially*; the coarse levels inform
  them through attention inside the encoder (and, for Mask2Former, through cross-attention).
* ``image``: the raw level-1 crop (B, C, H, W) (last UNETR skip).
* Mask2Former additionally gets all final tokens (B, N, D) and their centred world coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_muvit.model.encoder import Attention, FeedForward
from napari_muvit.model.rope import AxialRoPE

__all__ = ["ConvBlock", "Mask2FormerHead", "PixelDecoder", "UNETRHead", "default_skips"]


def default_skips(num_layers: int, count: int = 3) -> list[int]:
    """Evenly spaced encoder layers for the skips: ``[0, 5, 11]`` for 12 layers."""
    if num_layers <= 0:
        return []
    if count <= 1 or num_layers == 1:
        return [num_layers - 1]
    step = (num_layers - 1) / (count - 1)
    return sorted({math.floor(i * step + 1e-9) for i in range(count)})


class ConvBlock(nn.Sequential):
    """3×3 conv (no bias) → BatchNorm → ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class PixelDecoder(nn.Module):
    """Progressive bilinear ×2 upsampling from the token grid to full resolution.

    * every encoder skip is projected D → channels by a 1×1 conv;
    * the deepest projection passes two conv blocks at token resolution (bottleneck);
    * each of the ``log2(P)`` stages: bilinear ×2 → add the next shallower skip (bilinearly
      resized) → two conv blocks; the last stage adds the raw image processed by two conv
      blocks instead of an encoder skip.

    Channels: ``head_dim`` everywhere (``taper=False``, the paper's layout, matching its
    parameter counts) or halved at every stage down to 16 (``taper=True``: for 256² crops and
    ``head_dim=256`` the decoder costs about 1/15 of the FLOPs per crop; see "Decoder heads" in
    docs/benchmarks.md, measured by ``benchmarks/model_size.py``).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        patch_size: int,
        head_dim: int,
        num_skips: int,
        taper: bool = False,
    ):
        super().__init__()
        n_up = round(math.log2(patch_size))
        if 2**n_up != patch_size:
            raise ValueError(
                f"the UNETR/Mask2Former heads need a power-of-two patch size, got {patch_size}"
            )
        self.n_up = n_up
        dims = [max(head_dim >> i, 16) if taper else head_dim for i in range(n_up + 1)]
        self.dims = dims
        self.out_dim = dims[-1]
        # Which stage each encoder skip feeds: deepest -> bottleneck (dims[0]); the others,
        # deep -> shallow, -> stages 0 .. n_up-2 (channels dims[stage]); extra skips are unused
        # spatially but still projected (kept simple; default skips never exceed the stages).
        n_enc = min(max(num_skips - 1, 0), max(n_up - 1, 0))
        self.targets = list(range(n_enc))
        proj_dims = [dims[t] for t in self.targets][::-1] + [dims[0]]  # shallow -> deep order
        proj_dims = [dims[0]] * (num_skips - len(proj_dims)) + proj_dims
        self.proj = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in proj_dims)
        self.bottleneck = nn.Sequential(ConvBlock(dims[0], dims[0]), ConvBlock(dims[0], dims[0]))
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBlock(dims[i], dims[i + 1]), ConvBlock(dims[i + 1], dims[i + 1]))
            for i in range(n_up)
        )
        img_dim = dims[n_up - 1] if n_up else dims[0]
        self.image_skip = nn.Sequential(
            ConvBlock(in_channels, img_dim), ConvBlock(img_dim, img_dim)
        )

    def forward(self, maps: Sequence[Tensor], image: Tensor) -> Tensor:
        """``maps`` shallow → deep (B, D, h, w); ``image`` (B, C, H, W) -> (B, out_dim, H, W)."""
        projected = [p(m) for p, m in zip(self.proj, maps)]
        x = self.bottleneck(projected[-1])
        # Encoder skips other than the deepest, deep -> shallow, go to the first n_up-1 stages.
        enc_skips = projected[:-1][::-1][: len(self.targets)]
        for i, stage in enumerate(self.stages):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if i == self.n_up - 1:
                x = x + self.image_skip(image.to(x.dtype))
            elif i < len(enc_skips):
                x = x + F.interpolate(
                    enc_skips[i], size=x.shape[-2:], mode="bilinear", align_corners=False
                )
            x = stage(x)
        return x


class UNETRHead(nn.Module):
    """UNETR-style decoder: :class:`PixelDecoder` + 1×1 output conv to ``num_classes``."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        patch_size: int,
        num_classes: int,
        head_dim: int = 256,
        skips: Sequence[int] = (0, 5, 11),
        taper: bool = False,
    ):
        super().__init__()
        self.skips = list(skips)
        self.pixel_decoder = PixelDecoder(
            dim, in_channels, patch_size, head_dim, len(self.skips), taper
        )
        self.out = nn.Conv2d(self.pixel_decoder.out_dim, num_classes, 1)

    def forward(self, maps: Sequence[Tensor], image: Tensor, **_: object) -> Tensor:
        return self.out(self.pixel_decoder(maps, image))


class QueryLayer(nn.Module):
    """Mask2Former decoder layer: query self-attn → cross-attn to encoder tokens → FF.

    Queries are position-free; keys of the cross-attention are rotated with RoPE from the tokens'
    world coordinates (learnable per-layer frequencies), so the queries can attend by location
    relative to the tile centre.
    """

    def __init__(
        self, dim: int, heads: int, ff_mult: int, rotary_base: float, dropout: float = 0.0
    ):
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.norm_ca = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout)
        self.rope = AxialRoPE(dim, heads, rotary_base)

    def forward(self, q: Tensor, memory: Tensor, coords: Tensor) -> Tensor:
        q = q + self.self_attn(self.norm_sa(q))
        q = q + self.cross_attn(self.norm_ca(q), None, memory, self.rope(coords))
        return q + self.ff(self.norm_ff(q))


class Mask2FormerHead(nn.Module):
    """Mask2Former-style head (supplement C.2).

    Pixel decoder → mask features (B, head_dim, H, W); ``num_queries`` learnable queries refined
    by ``num_decoder_layers`` query layers over the final tokens of *all* levels; LayerNorm + MLP
    → mask embeddings; dot product with the mask features → (B, Mq, H, W); a 3×3 refinement conv
    maps the Mq masks to ``num_classes`` logits.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        patch_size: int,
        num_classes: int,
        head_dim: int = 256,
        skips: Sequence[int] = (0, 5, 11),
        num_queries: int | None = None,
        num_decoder_layers: int = 2,
        heads: int | None = None,
        ff_mult: int = 2,
        rotary_base: float = 10000.0,
        taper: bool = False,
    ):
        super().__init__()
        if heads is None:
            # Up to 8 heads of >= 32 dims (RoPE needs a head dim >= 20): 256 -> 8, 64 -> 2.
            heads = max(1, min(8, head_dim // 32))
            while head_dim % heads:
                heads -= 1
        self.heads = int(heads)
        self.skips = list(skips)
        # Default: at least 16 queries (a few spare masks per class help on small K).
        self.num_queries = int(num_queries) if num_queries is not None else max(num_classes, 16)
        if self.num_queries < num_classes:
            raise ValueError(f"num_queries ({num_queries}) must be >= num_classes ({num_classes})")
        self.pixel_decoder = PixelDecoder(
            dim, in_channels, patch_size, head_dim, len(self.skips), taper
        )
        self.memory_proj = nn.Sequential(nn.Linear(dim, head_dim), nn.LayerNorm(head_dim))
        self.queries = nn.Parameter(torch.randn(self.num_queries, head_dim) * 0.02)
        self.layers = nn.ModuleList(
            QueryLayer(head_dim, heads, ff_mult, rotary_base) for _ in range(num_decoder_layers)
        )
        self.mask_embed = nn.Sequential(
            nn.LayerNorm(head_dim),
            nn.Linear(head_dim, head_dim),
            nn.ReLU(inplace=True),
            nn.Linear(head_dim, self.pixel_decoder.out_dim),
        )
        self.refine = nn.Conv2d(self.num_queries, num_classes, 3, padding=1)

    def forward(
        self,
        maps: Sequence[Tensor],
        image: Tensor,
        *,
        tokens: Tensor,
        coords: Tensor,
        **_: object,
    ) -> Tensor:
        pix = self.pixel_decoder(maps, image)  # (B, hd, H, W)
        memory = self.memory_proj(tokens)
        # Queries (and so the query residual stream) stay in the parameter dtype under autocast.
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, memory, coords)
        emb = self.mask_embed(q)  # (B, Mq, hd)
        masks = torch.einsum("bqc,bchw->bqhw", emb, pix.to(emb.dtype))
        # Scale like attention logits so the refinement conv sees O(1) inputs at init.
        masks = masks / math.sqrt(emb.shape[-1])
        return self.refine(masks)
