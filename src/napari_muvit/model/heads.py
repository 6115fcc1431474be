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
from napari_muvit.model.forest import TreeEnsemble
from napari_muvit.model.rope import AxialRoPE

__all__ = [
    "PADDING_MODES",
    "ConvBlock",
    "Mask2FormerHead",
    "PixelDecoder",
    "PixelHead",
    "UNETRHead",
    "default_skips",
    "level_tokens_at",
]

# How the decoder's 3x3 convolutions pad the crop border. "zeros" (the paper's and the official
# package's layout, kept for their checkpoints) makes the edge of every prediction tile look
# like a dark frame around the image, so white background next to a tile border is classified
# as an edge (tile seams, issue 13); "replicate" continues the crop outwards and leaves a
# constant image constant up to the tile border. New models use "replicate".
PADDING_MODES = ("zeros", "replicate")


def default_skips(num_layers: int, count: int = 3) -> list[int]:
    """Evenly spaced encoder layers for the skips: ``[0, 5, 11]`` for 12 layers."""
    if num_layers <= 0:
        return []
    if count <= 1 or num_layers == 1:
        return [num_layers - 1]
    step = (num_layers - 1) / (count - 1)
    return sorted({math.floor(i * step + 1e-9) for i in range(count)})


def _check_padding(padding_mode: str) -> str:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
    return padding_mode


class ConvBlock(nn.Sequential):
    """3×3 conv (no bias) → BatchNorm → ReLU."""

    def __init__(self, cin: int, cout: int, padding_mode: str = "zeros"):
        super().__init__(
            nn.Conv2d(
                cin, cout, 3, padding=1, bias=False, padding_mode=_check_padding(padding_mode)
            ),
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
    docs/benchmarks.md, measured by ``benchmarks/model_size.py``), or explicit ``channels``:
    one width for the bottleneck and one per upsampling stage (``log2(P) + 1`` numbers, coarse
    to full resolution), e.g. ``(32, 32, 16, 8)``. The full-resolution stages dominate the cost
    on CPU, so their width is what to trade for speed (``benchmarks/bench_head_ttq.py``
    measures time to quality).

    ``padding_mode`` (:data:`PADDING_MODES`) is how the 3×3 convolutions pad the crop border:
    ``"zeros"`` for the paper's layout and older checkpoints, ``"replicate"`` for new models
    (no seams at tile borders).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        patch_size: int,
        head_dim: int,
        num_skips: int,
        taper: bool = False,
        channels: Sequence[int] | None = None,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        pad = _check_padding(padding_mode)
        n_up = round(math.log2(patch_size))
        if 2**n_up != patch_size:
            raise ValueError(
                f"the UNETR/Mask2Former heads need a power-of-two patch size, got {patch_size}"
            )
        self.n_up = n_up
        if channels is not None:
            dims = [int(c) for c in channels]
            if taper or len(dims) != n_up + 1 or min(dims) < 1 or dims != list(channels):
                raise ValueError(
                    f"head channels: expected {n_up + 1} positive integers (bottleneck and "
                    f"{n_up} upsampling stages for patch size {patch_size}), not together with "
                    f"taper; got {list(channels)!r}"
                )
        else:
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
        self.bottleneck = nn.Sequential(
            ConvBlock(dims[0], dims[0], pad), ConvBlock(dims[0], dims[0], pad)
        )
        self.stages = nn.ModuleList(
            nn.Sequential(
                ConvBlock(dims[i], dims[i + 1], pad), ConvBlock(dims[i + 1], dims[i + 1], pad)
            )
            for i in range(n_up)
        )
        img_dim = dims[n_up - 1] if n_up else dims[0]
        self.image_skip = nn.Sequential(
            ConvBlock(in_channels, img_dim, pad), ConvBlock(img_dim, img_dim, pad)
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
        channels: Sequence[int] | None = None,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        self.skips = list(skips)
        self.pixel_decoder = PixelDecoder(
            dim, in_channels, patch_size, head_dim, len(self.skips), taper, channels, padding_mode
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
        channels: Sequence[int] | None = None,
        padding_mode: str = "zeros",
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
            dim, in_channels, patch_size, head_dim, len(self.skips), taper, channels, padding_mode
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
        self.refine = nn.Conv2d(
            self.num_queries, num_classes, 3, padding=1, padding_mode=padding_mode
        )

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


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def level_tokens_at(
    tokens: Tensor,
    coords: Tensor,
    num_levels: int,
    patch_size: int,
    size: Sequence[int],
    stride: int = 1,
    first_level: int = 1,
) -> Tensor:
    """Final tokens of levels ``first_level .. L-1`` sampled at level-1 positions.

    ``tokens`` (B, L·h·w, D) and their centred world ``coords`` (B, L·h·w, 2) for level-1 crops
    of ``size`` (H, W) pixels; returns (B, D·(L − first_level), H/stride, W/stride): for every
    cell of a ``stride``-pixel grid on the level-1 crop, each level's token map bilinearly
    interpolated at the cell centre's world position (what lies around it at that scale).
    ``first_level=1`` gives the coarser levels only (the context a level-1 feature map lacks).
    """
    B, N, D = tokens.shape
    L = int(num_levels)
    n = N // L
    H, W = int(size[0]), int(size[1])
    h, w = H // patch_size, W // patch_size
    s = int(stride)
    Hs, Ws = H // s, W // s
    out = []
    for lv in range(int(first_level), L):
        ty, tx = _token_index_of_level1_pixels(coords, lv, L, h, w, H, W, patch_size, s)
        # fractional token index -> [-1, 1] with token centres on the grid points
        gy = ty * (2 / max(h - 1, 1)) - 1
        gx = tx * (2 / max(w - 1, 1)) - 1
        grid = torch.stack(
            (gx[:, None, :].expand(B, Hs, Ws), gy[:, :, None].expand(B, Hs, Ws)), dim=-1
        )
        fmap = tokens[:, lv * n : (lv + 1) * n].reshape(B, h, w, D).permute(0, 3, 1, 2)
        out.append(
            F.grid_sample(
                fmap.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
            )
        )
    return torch.cat(out, 1) if out else tokens.new_zeros((B, 0, Hs, Ws))


class PixelHead(nn.Module):
    """Per-pixel classifier on fixed image filters and encoder features (ilastik-like).

    Features of every level-1 pixel, in this order:

    * a fixed filter bank (replicate-padded, so tile borders are not edges). ``bank="level1"``:
      the level-1 crop's channels, their Gaussian blurs at ``sigmas`` and gradient magnitudes.
      ``bank="levels"``: the ilastik set (channels; per sigma: Gaussian, gradient magnitude,
      Laplacian of Gaussian, the two Hessian eigenvalues) on the crop of *every* level, the
      coarse ones sampled at the pixel's world position: the same filters see 1×, 4×, 16×… the
      area, which is what tells a cell's ring or a tissue's region (issue 13);
    * with ``encoder_features``: the encoder skip maps of level 1, bilinearly upsampled from the
      token grid, and the final tokens of every coarser level at the pixel.

    ``classifier="mlp"``: the standardised features (``feature_mean``/``feature_std``, set from
    the painted pixels) go through an MLP (1×1 convolutions, ``hidden`` units; ``hidden=0``:
    logistic regression). ``classifier="forest"``: a random forest (:class:`TreeEnsemble`,
    fitted by scikit-learn on the filter bank of the painted pixels) gives the class
    probabilities, and with ``encoder_features`` an MLP on all features adds a residual to
    their logarithm; the residual starts at zero, so fine-tuning the segmenter starts from the
    forest's answer. Fitting takes seconds on a CPU
    (:func:`napari_muvit.engine.quicktrain.quick_fit`).

    ``forest_levels``: the forest reads the filter bank of the first ``forest_levels`` levels
    only (``None``: all levels, as in models saved before the option existed). The quick fit
    chooses it from the strokes (context matters for some tasks and is noise for others); a
    forest-only head then skips the filters of the levels it does not read.
    ``forest_sub_levels`` records how the fit built the forest (the level counts of its
    equal-sized sub-forests, e.g. ``[1, 2, 3]`` for a mix); prediction does not need it.

    ``context_sigmas`` (``bank="levels"``): more, wider Gaussian scales for the coarse levels
    only (e.g. 10 and 20 px of a level-16 crop: 160 and 320 level-1 pixels, where a tissue
    layer lies relative to the surface). Level 1 keeps ``sigmas``: wide filters on a
    prediction tile would mostly see its replicated edge, and tiles would disagree.

    ``color_space="lab"``: a 3-channel crop (RGB scaled to [0, 1]) is converted to CIELAB
    before the filters, so lightness and the two colour axes get their own filters instead of
    three correlated channels (``"channels"``, the default of models saved before the option:
    the filters see the channels as they come). ``color_space="hed"``: the crop is unmixed into
    the optical densities of haematoxylin, eosin and DAB (:func:`rgb_to_hed`, colour
    deconvolution), what separates nuclei from cytoplasm and stroma in stained histology. The
    quick fit sets one of them for RGB images.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        patch_size: int,
        num_classes: int,
        head_dim: int = 64,
        skips: Sequence[int] = (0, 5, 11),
        sigmas: Sequence[float] | None = None,
        num_levels: int = 1,
        bank: str = "level1",
        classifier: str = "mlp",
        encoder_features: bool = True,
        forest_trees: int = 0,
        forest_nodes: int = 1,
        forest_depth: int = 0,
        forest_levels: int | None = None,
        forest_sub_levels: Sequence[int] | None = None,
        color_space: str = "channels",
        context_sigmas: Sequence[float] | None = (),
        **_: object,
    ):
        super().__init__()
        if bank not in BANKS:
            raise ValueError(f"bank: expected one of {BANKS}, got {bank!r}")
        if color_space not in COLOR_SPACES:
            raise ValueError(f"color_space: expected one of {COLOR_SPACES}, got {color_space!r}")
        if color_space in COLOR_CONVERSIONS and int(in_channels) != 3:
            raise ValueError(f"color_space {color_space!r} needs 3 input channels, got "
                             f"{in_channels}")
        self.color_space = color_space
        if classifier not in ("mlp", "forest"):
            raise ValueError(f"classifier: expected 'mlp' or 'forest', got {classifier!r}")
        self.skips = list(skips)
        self.num_levels = int(num_levels)
        self.bank = bank
        self.classifier_type = classifier
        self.encoder_features = bool(encoder_features)
        self.sigmas = [float(s) for s in (sigmas if sigmas is not None else BANKS[bank])]
        self.context_sigmas = [float(s) for s in context_sigmas or ()]
        if self.context_sigmas and bank != "levels":
            raise ValueError("context_sigmas: only the 'levels' bank filters the coarse levels")
        self.in_channels = int(in_channels)
        self.patch_size = int(patch_size)
        for i, s in enumerate(self.sigmas + self.context_sigmas):
            self.register_buffer(f"gauss{i}", _gaussian_kernel(s), persistent=False)
        per_sigma = 2 if bank == "level1" else 5
        self._level1_width = self.in_channels * (1 + per_sigma * len(self.sigmas))
        self._context_width = self.in_channels * (
            1 + per_sigma * (len(self.sigmas) + len(self.context_sigmas)))
        bank_levels = 1 if bank == "level1" else self.num_levels
        self.num_image_features = self.bank_columns(bank_levels)
        # skip maps of level 1, plus the final tokens of every coarser level at the pixel
        encoder_count = dim * (len(self.skips) + self.num_levels - 1) if self.encoder_features else 0
        self.num_features = self.num_image_features + encoder_count
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_std", torch.ones(self.num_features))
        bank_levels = self.num_levels if bank == "levels" else 1
        if forest_levels is not None and not 1 <= int(forest_levels) <= bank_levels:
            raise ValueError(f"forest_levels: expected 1..{bank_levels}, got {forest_levels!r}")
        self.forest_levels = None if forest_levels is None else int(forest_levels)
        self.forest_sub_levels = None if forest_sub_levels is None else [
            int(n) for n in forest_sub_levels]
        self.forest: TreeEnsemble | None = None
        if classifier == "forest":
            self.forest = TreeEnsemble(self.num_image_features, num_classes, forest_trees,
                                       forest_nodes, forest_depth)
        hidden = int(head_dim)
        if classifier == "forest" and not self.encoder_features:
            self.classifier: nn.Module | None = None
        elif hidden > 0:
            self.classifier = nn.Sequential(
                nn.Conv2d(self.num_features, hidden, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, num_classes, 1),
            )
        else:
            self.classifier = nn.Conv2d(self.num_features, num_classes, 1)
        if self.forest is not None and self.classifier is not None:
            last = self.classifier[-1] if isinstance(self.classifier, nn.Sequential) else self.classifier
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _blur(self, x: Tensor, kernel: Tensor,
              region: tuple[int, int, int, int] | None = None) -> Tensor:
        """Separable Gaussian blur of ``x`` (replicate padding), only rows ``[r0, r1)`` and
        columns ``[c0, c1)`` of ``region`` (default: all): equal to slicing the full blur."""
        c = x.shape[1]
        r = kernel.numel() // 2
        k = kernel.to(x.dtype)
        height, width = x.shape[-2:]
        r0, r1, c0, c1 = region or (0, height, 0, width)
        rows = torch.arange(r0 - r, r1 + r, device=x.device).clamp_(0, height - 1)
        cols = torch.arange(c0 - r, c1 + r, device=x.device).clamp_(0, width - 1)
        x = x.index_select(-2, rows).index_select(-1, cols)
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def image_features(self, image: Tensor, context: bool = False,
                       window: tuple[int, int, int, int] | None = None) -> Tensor:
        """(B, C, H, W) -> filter responses (B, C·(1 + per-sigma filters·len(sigmas)), H, W);
        ``context``: a coarse level's crop, also filtered at ``context_sigmas``; ``window``
        ``(r0, r1, c0, c1)``: only those rows and columns of the responses (the filters still
        see the whole crop: equal to slicing the full responses, at a fraction of the cost)."""
        image = image.float()
        if self.color_space in COLOR_CONVERSIONS:
            image = COLOR_CONVERSIONS[self.color_space](image)
        height, width = image.shape[-2:]
        r0, r1, c0, c1 = window or (0, height, 0, width)
        # one more row and column each side for the derivatives; replicated at the crop's edge
        around = (max(r0 - 1, 0), min(r1 + 1, height), max(c0 - 1, 0), min(c1 + 1, width))
        edge = (int(c0 == 0), int(c1 == width), int(r0 == 0), int(r1 == height))
        feats = [image[..., r0:r1, c0:c1]]
        scales = len(self.sigmas) + (len(self.context_sigmas) if context else 0)
        for i in range(scales):
            gp = self._blur(image, getattr(self, f"gauss{i}"), around)
            gp = F.pad(gp, edge, mode="replicate") if any(edge) else gp
            g = gp[..., 1:-1, 1:-1]
            gy = (gp[..., 2:, 1:-1] - gp[..., :-2, 1:-1]) / 2
            gx = (gp[..., 1:-1, 2:] - gp[..., 1:-1, :-2]) / 2
            feats += [g, torch.sqrt(gy * gy + gx * gx + 1e-12)]
            if self.bank == "level1":
                continue
            c = gp[..., 1:-1, 1:-1]
            hyy = gp[..., 2:, 1:-1] - 2 * c + gp[..., :-2, 1:-1]
            hxx = gp[..., 1:-1, 2:] - 2 * c + gp[..., 1:-1, :-2]
            hxy = (gp[..., 2:, 2:] - gp[..., 2:, :-2] - gp[..., :-2, 2:] + gp[..., :-2, :-2]) / 4
            half_trace = (hyy + hxx) / 2
            radius = torch.sqrt(((hyy - hxx) / 2) ** 2 + hxy * hxy + 1e-12)
            feats += [hyy + hxx, half_trace + radius, half_trace - radius]
        return torch.cat(feats, 1)

    @property
    def bank_level_width(self) -> int:
        """Filter-bank columns of level 1 (the bank's layout is level after level)."""
        return self._level1_width

    def bank_columns(self, levels: int) -> int:
        """Filter-bank columns of the first ``levels`` levels (a coarse level also has the
        ``context_sigmas`` filters)."""
        return self._level1_width + (int(levels) - 1) * self._context_width

    def level_bank_features(self, nest: Tensor, coords: Tensor,
                            levels: int | None = None) -> Tensor:
        """The filter bank of every level's crop at each level-1 pixel (B, F_img, H, W), or of
        the first ``levels`` levels only (B, bank_columns(levels), H, W)."""
        H, W = nest.shape[-2:]
        parts = [self.image_features(nest[:, 0])]
        for lv in range(1, self.num_levels if levels is None else int(levels)):
            parts.append(self._coarse_level_features(nest[:, lv], coords, lv, H, W))
        return torch.cat(parts, 1)

    def _coarse_level_features(self, crop: Tensor, coords: Tensor, lv: int, H: int,
                               W: int) -> Tensor:
        """Filter responses of level ``lv``'s crop (B, C, S, S) bilinearly sampled at the
        level-1 pixels of the crop (B, F, H, W). Only the window of the crop that the level-1
        pixels fall in is filtered (its centre: 1/4 of a level-4 crop's side, 1/16 of a
        level-16 one's), the filters still reading the whole crop."""
        py, px = self._coarse_pixels(coords, lv, H, W)
        (r0, r1), (c0, c1) = _window_around(py, crop.shape[-2]), _window_around(px, crop.shape[-1])
        fmap = self.image_features(crop, context=True, window=(r0, r1, c0, c1))
        return _sample_bilinear(fmap, py - r0, px - c0)

    def _sample_level(self, fmap: Tensor, coords: Tensor, lv: int, H: int, W: int) -> Tensor:
        """``fmap`` (B, F, S, S) of level ``lv``'s crop sampled at the level-1 pixels of the
        crop (B, F, H, W)."""
        return _sample_bilinear(fmap, *self._coarse_pixels(coords, lv, H, W))

    def _coarse_pixels(self, coords: Tensor, lv: int, H: int, W: int) -> tuple[Tensor, Tensor]:
        """Fractional pixel (row, column) in level ``lv``'s crop of the level-1 pixels' rows
        (B, H) and columns (B, W)."""
        P = self.patch_size
        ty, tx = _token_index_of_level1_pixels(coords, lv, self.num_levels, H // P, W // P,
                                               H, W, P)
        return (ty + 0.5) * P - 0.5, (tx + 0.5) * P - 0.5

    def context_features(self, tokens: Tensor, coords: Tensor, size: Sequence[int]) -> Tensor:
        """Final tokens of every coarser level, bilinearly sampled at each level-1 pixel's world
        position (B, D·(L−1), H, W): what lies around the pixel at the context scales."""
        return level_tokens_at(tokens, coords, self.num_levels, self.patch_size, size)

    def features(
        self,
        maps: Sequence[Tensor],
        image: Tensor,
        tokens: Tensor | None = None,
        coords: Tensor | None = None,
        nest: Tensor | None = None,
        all_levels: bool = False,
    ) -> Tensor:
        """Raw (unstandardised) per-pixel features (B, num_features, H, W).

        A forest-only head whose forest reads fewer levels (``forest_levels``) computes only
        their filters (fewer columns) unless ``all_levels`` (what the quick fit chooses from).
        """
        size = image.shape[-2:]
        read = None if all_levels or self.classifier is not None else self.forest_levels
        if read == 1:
            return self.image_features(image)
        needs_context = self.num_levels > 1 and (self.encoder_features or self.bank == "levels")
        if needs_context and coords is None:
            raise ValueError("PixelHead.features: coords are needed for the coarse levels")
        if self.bank == "levels" and self.num_levels > 1:
            if nest is None:
                raise ValueError("PixelHead.features: the crops of all levels (nest) are needed")
            parts = [self.level_bank_features(nest, coords, read)]
        else:
            parts = [self.image_features(image)]
        if not self.encoder_features:
            return parts[0]
        parts += [
            F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        if self.num_levels > 1:
            if tokens is None:
                raise ValueError("PixelHead.features: tokens are needed for context")
            parts.append(self.context_features(tokens, coords, size))
        return torch.cat(parts, 1)

    @property
    def uses_encoder(self) -> bool:
        """False for a filter-bank-only head: the segmenter then skips the transformer."""
        return self.encoder_features

    def classify(self, features: Tensor) -> Tensor:
        """Logits from raw features (B, F, H, W) or (N, F, 1, 1)."""
        residual = None
        if self.classifier is not None:
            mean = self.feature_mean.view(1, -1, 1, 1)
            std = self.feature_std.view(1, -1, 1, 1)
            residual = self.classifier((features - mean) / std)
        if self.forest is None:
            return residual
        logits = self.forest.log_probs(features[:, : self.num_image_features])
        return logits if residual is None else logits + residual

    def forward(
        self,
        maps: Sequence[Tensor],
        image: Tensor,
        *,
        tokens: Tensor | None = None,
        coords: Tensor | None = None,
        nest: Tensor | None = None,
        **_: object,
    ) -> Tensor:
        return self.classify(self.features(maps, image, tokens, coords, nest))


#: what :class:`PixelHead`'s filters see of the input channels (``color_space``)
COLOR_SPACES = ("channels", "lab", "hed")
# sRGB (D65) -> XYZ, and the D65 white point
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.950456, 1.0, 1.088754)


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIELAB (B, 3, H, W) as L/100, a/128, b/128 (D65; values
    outside [0, 1] are clipped first). Matches ``skimage.color.rgb2lab`` up to that scaling."""
    x = rgb.float().clamp(0.0, 1.0)
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(_D65_WHITE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lightness = 116 * f[:, 1] - 16
    return torch.stack((lightness / 100, 500 * (f[:, 0] - f[:, 1]) / 128,
                        200 * (f[:, 1] - f[:, 2]) / 128), 1)


# Ruifrok & Johnston's haematoxylin, eosin and DAB colours (rows: optical density of R, G, B),
# as scikit-image's ``rgb_from_hed``; unmixing multiplies by the inverse
_RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_HED_FROM_RGB = torch.linalg.inv(torch.tensor(_RGB_FROM_HED, dtype=torch.float64))
_HED_FLOOR = 1e-6


def rgb_to_hed(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> stain densities (B, 3, H, W): haematoxylin, eosin, DAB.

    Colour deconvolution (Ruifrok & Johnston 2001): optical density ``log(rgb) / log(1e-6)``
    unmixed by the inverse of the stains' colour matrix, negative amounts clipped to 0.
    Matches ``skimage.color.rgb2hed``.
    """
    x = rgb.float().clamp(_HED_FLOOR, 1.0)
    density = torch.log(x) / math.log(_HED_FLOOR)
    return torch.einsum("ji,bjhw->bihw", _HED_FROM_RGB.to(x), density).clamp_min(0.0)


#: colour spaces of :data:`COLOR_SPACES` that convert a 3-channel crop before the filters
COLOR_CONVERSIONS = {"lab": srgb_to_lab, "hed": rgb_to_hed}


#: filter-bank layouts of :class:`PixelHead` and their default sigmas (level-1 pixels of each
#: level's crop); "levels" is ilastik's default set
BANKS: dict[str, tuple[float, ...]] = {"level1": (1.0, 2.0, 4.0), "levels": (0.7, 1.6, 3.5, 5.0)}


def _sample_bilinear(fmap: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``fmap`` (B, F, h, w) at fractional pixel ``rows`` (B, H) × ``cols`` (B, W), clamped to
    its border: (B, F, H, W)."""
    gy = rows * (2 / max(fmap.shape[-2] - 1, 1)) - 1  # -> [-1, 1] (align_corners)
    gx = cols * (2 / max(fmap.shape[-1] - 1, 1)) - 1
    B, h, w = fmap.shape[0], gy.shape[1], gx.shape[1]
    grid = torch.stack((gx[:, None, :].expand(B, h, w), gy[:, :, None].expand(B, h, w)), -1)
    return F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _window_around(positions: Tensor, size: int) -> tuple[int, int]:
    """``[start, stop)`` of the pixels of an axis of ``size`` that bilinear sampling at
    ``positions`` (clamped to the axis, as ``padding_mode="border"``) reads; 2 pixels at least
    where the axis has them (a 1-pixel window would need its own normalisation)."""
    lo = int(torch.floor(positions.min().clamp(0, size - 1)))
    hi = int(torch.ceil(positions.max().clamp(0, size - 1))) + 1
    if hi - lo < 2 and size >= 2:
        lo, hi = (lo, lo + 2) if lo + 2 <= size else (size - 2, size)
    return lo, hi


def _token_index_of_level1_pixels(
    coords: Tensor, lv: int, num_levels: int, h: int, w: int, H: int, W: int, patch: int,
    stride: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fractional (row, col) token index in level ``lv``'s grid of the centre of every cell of
    a ``stride``-pixel grid on the level-1 crop (every pixel for ``stride=1``): (B, H/stride)
    and (B, W/stride), from the tokens' centred world coordinates."""
    B = coords.shape[0]
    n = h * w
    s = int(stride)
    grid_c = coords[:, lv * n : (lv + 1) * n].reshape(B, h, w, 2).float()
    # cell centres relative to the level-1 crop centre (the coords' origin)
    py = torch.arange(H // s, device=coords.device, dtype=torch.float32) * s + s / 2 - H / 2
    px = torch.arange(W // s, device=coords.device, dtype=torch.float32) * s + s / 2 - W / 2
    y0, x0 = grid_c[:, 0, 0, 0], grid_c[:, 0, 0, 1]
    dy = (grid_c[:, -1, 0, 0] - y0) / max(h - 1, 1)
    dx = (grid_c[:, 0, -1, 1] - x0) / max(w - 1, 1)
    return (py[None] - y0[:, None]) / dy[:, None], (px[None] - x0[:, None]) / dx[:, None]
