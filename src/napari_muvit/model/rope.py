"""Patch world coordinates and 2-D axial rotary position embeddings (RoPE).

MuViT has no additive positional embedding: position enters only through RoPE inside attention,
computed from each patch's *world* coordinate (level-1 pixels, ``(y, x)``). Because RoPE only
sees coordinate differences, we subtract the per-sample centre of the level-1 bbox from every
coordinate before computing angles. That is exact and keeps float32 angles accurate when the
tile sits at gigapixel offsets (|coord| ~ 1e5 would otherwise cost ~4e-5 relative error).

Conventions follow the official package (spec §4.5, §4.7):

* head dim ``dh`` is split into a y block of ``d_y`` dims followed by an x block of ``d_x`` dims;
* each block rotates interleaved pairs ``(2m, 2m+1)`` by ``coord * inv_freq[m]``;
* ``inv_freq`` is learnable (per layer by default) and must always be loaded, never recomputed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "AxialRoPE",
    "apply_rope",
    "default_bbox",
    "patch_coords",
    "rope_cos_sin",
    "split_rope_dims",
]


def split_rope_dims(dim: int, heads: int) -> tuple[int, int]:
    """Split the head dimension into the (y, x) RoPE blocks exactly like the official package.

    ``d_x = 2·((dh // 2) // 2)``, ``d_y = dh − d_x`` (y gets the remainder). Both must exceed 8.
    """
    dh = dim // heads
    d_x = 2 * ((dh // 2) // 2)
    d_y = dh - d_x
    if min(d_y, d_x) <= 8 or d_y % 2:
        raise ValueError(
            f"RoPE needs a head dimension of at least 20 (even blocks > 8); got dim={dim}, "
            f"heads={heads} -> head dim {dh} split into ({d_y}, {d_x})"
        )
    return d_y, d_x


def _init_inv_freq(d: int, base: float) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


class AxialRoPE(nn.Module):
    """Learnable (or fixed) inverse frequencies of the y and x blocks of one attention layer.

    Parameters ``inv_freq_y`` (d_y/2,) and ``inv_freq_x`` (d_x/2,).
    """

    def __init__(self, dim: int, heads: int, base: float = 10000.0, learnable: bool = True):
        super().__init__()
        d_y, d_x = split_rope_dims(dim, heads)
        fy, fx = _init_inv_freq(d_y, base), _init_inv_freq(d_x, base)
        if learnable:
            self.inv_freq_y = nn.Parameter(fy)
            self.inv_freq_x = nn.Parameter(fx)
        else:
            self.register_buffer("inv_freq_y", fy)
            self.register_buffer("inv_freq_x", fx)

    def forward(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """``coords`` (B, N, 2) float32 -> ``(cos, sin)``, each (B, N, dh/2) float32."""
        return rope_cos_sin(coords, self.inv_freq_y, self.inv_freq_x)


def rope_cos_sin(coords: Tensor, inv_freq_y: Tensor, inv_freq_x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair rotation ``cos``/``sin`` (B, N, dh/2), computed in float32 even under autocast.

    Pair ``m`` of the head dimension uses angle ``c_y·inv_freq_y[m]`` for ``m < d_y/2`` and
    ``c_x·inv_freq_x[m − d_y/2]`` after that (y block first), as in the official package.
    """
    with torch.autocast(device_type=coords.device.type, enabled=False):
        c = coords.float()
        ang = torch.cat(
            (c[..., 0:1] * inv_freq_y.float(), c[..., 1:2] * inv_freq_x.float()), dim=-1
        )
        return ang.cos(), ang.sin()


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of the last dim of ``t`` (..., B, H, N, dh) by per-token angles.

    ``cos``/``sin`` have shape (B, N, dh/2); ``t`` may carry leading dims (e.g. q and k stacked
    as (2, B, H, N, dh), possibly a strided view of the fused qkv projection). The rotation runs in
    float32 (like the official ``@disable_autocast``) and the result is a fresh contiguous tensor
    of ``t.dtype`` in ``t``'s logical layout — exactly what the attention kernel wants.

    Pair ``(2m, 2m+1)`` is rotated as the complex product ``(t[2m] + i·t[2m+1])·e^{i·angle[m]}``;
    one complex multiply written straight into a contiguous buffer is much faster on CPU than the
    equivalent real-valued formula on strided views (``benchmarks/bench_attention.py``,
    docs/benchmarks.md).
    """
    B, N, half = cos.shape
    if t.device.type == "mps":  # complex support on MPS is incomplete: real-valued formula
        c = cos.reshape(B, 1, N, half)
        s = sin.reshape(B, 1, N, half)
        tf = t.unflatten(-1, (half, 2)).float()
        t0, t1 = tf[..., 0], tf[..., 1]
        out = torch.stack((t0 * c - t1 * s, t1 * c + t0 * s), dim=-1).flatten(-2)
        return out.to(t.dtype)
    with torch.autocast(device_type=t.device.type, enabled=False):
        tf = t.float()
        if tf.stride(-1) != 1 or tf.storage_offset() % 2 or any(st % 2 for st in tf.stride()[:-1]):
            tf = tf.contiguous()  # view_as_complex needs (re, im) pairs adjacent in memory
        tc = torch.view_as_complex(tf.unflatten(-1, (half, 2)))
        rot = torch.complex(cos, sin).reshape(B, 1, N, half)
        if torch.is_grad_enabled() and (tc.requires_grad or rot.requires_grad):
            out = (tc * rot).contiguous()  # out= does not support autograd
        else:
            out = torch.empty(tc.shape, dtype=tc.dtype, device=tc.device)
            torch.mul(tc, rot, out=out)
        return torch.view_as_real(out).flatten(-2).to(t.dtype)


def _coord_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps gigapixel coordinates exact before centring; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def default_bbox(
    levels: tuple[float, ...],
    height: int,
    width: int,
    mode: str,
    batch: int,
    device: torch.device | None = None,
) -> Tensor:
    """Concentric bboxes centred on world 0, used when ``bbox`` is None.

    ``"linspace"`` reproduces the official default (corners at the first/last pixel centres:
    ``±lv·(H/2 − 0.5)``); ``"center"`` uses the pixel-edge convention of the architecture
    contract (``±lv·H/2``), which places patches at their true centres.
    """
    rows = []
    for lv in levels:
        if mode == "linspace":
            hy, hx = lv * (height / 2 - 0.5), lv * (width / 2 - 0.5)
        else:
            hy, hx = lv * height / 2, lv * width / 2
        rows.append([[-hy, -hx], [hy, hx]])
    bb = torch.tensor(rows, dtype=torch.float32, device=device)
    return bb.unsqueeze(0).expand(batch, -1, -1, -1)


def patch_coords(bbox: Tensor, grid: tuple[int, int], mode: str = "center") -> Tensor:
    """World coordinates of every patch, relative to the centre of each sample's level-1 bbox.

    Args:
        bbox: (B, L, 2, 2) ``[[y0, x0], [y1, x1]]`` per level, world (level-1 pixel) units.
        grid: ``(h, w)`` patches per level.
        mode: ``"center"`` — true patch centres ``y0 + (i + 0.5)·(y1 − y0)/h``;
            ``"linspace"`` — official: first patch at ``bbox[0]``, last at ``bbox[1]``.

    Returns:
        (B, L·h·w, 2) float32, level-major then row-major token order.
    """
    h, w = grid
    dt = _coord_dtype(bbox.device)
    bb = bbox.to(dt)
    centre = bb[:, 0].mean(dim=1)  # (B, 2): centre of the level-1 bbox
    bb = bb - centre[:, None, None, :]
    tl, br = bb[:, :, 0], bb[:, :, 1]  # (B, L, 2)
    if mode == "linspace":
        # torch.linspace in float32 like the official code, for bit-compatible fractions.
        uy = torch.linspace(0, 1, h, device=bbox.device).to(dt)
        ux = torch.linspace(0, 1, w, device=bbox.device).to(dt)
    elif mode == "center":
        uy = (torch.arange(h, device=bbox.device, dtype=dt) + 0.5) / h
        ux = (torch.arange(w, device=bbox.device, dtype=dt) + 0.5) / w
    else:
        raise ValueError(f"coord_mode must be 'center' or 'linspace', got {mode!r}")
    ext = br - tl
    cy = tl[..., 0:1] + uy * ext[..., 0:1]  # (B, L, h)
    cx = tl[..., 1:2] + ux * ext[..., 1:2]  # (B, L, w)
    B, L = cy.shape[:2]
    coords = torch.stack(
        (cy[:, :, :, None].expand(B, L, h, w), cx[:, :, None, :].expand(B, L, h, w)), dim=-1
    )
    return coords.reshape(B, L * h * w, 2).float()


def rope_theta_check(base: float) -> None:
    """Validate a RoPE base (must be a positive finite number)."""
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
        raise ValueError(f"rotary_base must be a finite number > 1, got {base!r}")
