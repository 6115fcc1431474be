"""The MuViT *Synthetic* task (paper sec. 4.1 / 4.4): cells whose class depends on global context.

The image shows two concentric annular bands around a jittered centre, deformed by a smooth
low-frequency random field (a sum of random plane waves, Perlin-like in effect). Both bands
have the same faint texture, and both contain the same kind of cells: bright, noisy
elliptical blobs of radius 4–9 px whose size does *not* scale with the image. A cell's class is
the band it lies in: ``1 = "outer"``, ``2 = "inner"``; ``0`` is background. Locally (a 128²
crop of a 1024² image) the bands, and therefore the classes, are indistinguishable; a
coarser view (e.g. 4× = 512 px of world context) reveals the ring geometry.

Everything is a pure function of the pixel's world position and the seed (integer hashing,
analytic low-frequency field evaluated on a fixed global lattice), so any window can be
rendered independently: :func:`synthetic_rings_lazy` builds dask arrays chunk by chunk and
cells crossing chunk borders come out identical to the eager :func:`synthetic_rings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_muvit.errors import InputError

__all__ = [
    "CLASS_NAMES",
    "SyntheticImage",
    "synthetic_field",
    "synthetic_rings",
    "synthetic_rings_lazy",
]

CLASS_NAMES = ("background", "outer", "inner")

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_GOLD = np.uint32(0x9E3779B9)


def _mix(x: np.ndarray) -> np.ndarray:
    """lowbias32 integer hash (C. Wellons), vectorised on uint32 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint32(16))
    x = x * _M1
    x = x ^ (x >> np.uint32(15))
    x = x * _M2
    return x ^ (x >> np.uint32(16))


def _hash_uniform(seed: int, stream: int, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Deterministic uniform [0, 1) float32 for integer lattice positions (broadcasting)."""
    with np.errstate(over="ignore"):
        s = _mix(np.uint32((seed * 0x9E3779B1 + stream * 0x85EBCA77) & 0xFFFFFFFF))
        h = _mix(s ^ np.asarray(iy).astype(np.int64).astype(np.uint32) * _GOLD)
        h = _mix(h + np.asarray(ix).astype(np.int64).astype(np.uint32))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


@dataclass(frozen=True)
class _Params:
    shape: tuple[int, int]
    seed: int
    centre: tuple[float, float]
    scale: float  # ring radii are in units of this (min image side)
    inner: tuple[float, float]
    outer: tuple[float, float]
    wave_k: np.ndarray  # (K, 2) spatial frequencies in cycles per `scale` pixels
    wave_amp: np.ndarray  # (K,)
    wave_phase: np.ndarray  # (K,)
    lattice: int = 16  # deformation field lattice (px)
    tex_lattice: int = 6  # texture value-noise lattice (px)
    slot: int = 26  # one potential cell per slot×slot square (cells never cross slots)
    jitter: int = 4
    rmin: float = 4.0
    rmax: float = 9.0
    occupancy: float = 0.55
    background: float = 22.0
    band_level: float = 48.0
    texture: float = 10.0
    cell_level: tuple[float, float] = (140.0, 215.0)
    noise: float = 7.0
    edge: float = 0.006  # soft band edge width (units of scale)
    extra: dict = field(default_factory=dict)


def _make_params(shape: tuple[int, int], seed: int, noise: float, deformation: float) -> _Params:
    rng = np.random.default_rng(seed)
    n = float(min(shape))
    centre = (
        shape[0] / 2 + rng.uniform(-0.04, 0.04) * n,
        shape[1] / 2 + rng.uniform(-0.04, 0.04) * n,
    )
    k = 6
    ang = rng.uniform(0, 2 * np.pi, k)
    freq = rng.uniform(0.8, 3.0, k)
    wave_k = np.stack([freq * np.sin(ang), freq * np.cos(ang)], axis=1)
    amp = rng.uniform(0.5, 1.0, k) / freq  # more amplitude at lower frequencies (1/f)
    amp = amp / amp.sum() * deformation
    phase = rng.uniform(0, 2 * np.pi, k)
    jit = rng.uniform(-0.01, 0.01, 4)
    return _Params(
        shape=shape,
        seed=int(seed),
        centre=centre,
        scale=n,
        inner=(0.13 + jit[0], 0.26 + jit[1]),
        outer=(0.32 + jit[2], 0.46 + jit[3]),
        wave_k=wave_k,
        wave_amp=amp,
        wave_phase=phase,
        noise=noise,
    )


def _deform_at(p: _Params, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Analytic low-frequency deformation (units of ``scale``) at world positions."""
    out = np.zeros(np.broadcast_shapes(np.shape(y), np.shape(x)), dtype=np.float64)
    for (ky, kx), a, ph in zip(p.wave_k, p.wave_amp, p.wave_phase):
        out += a * np.sin(2 * np.pi * (ky * y + kx * x) / p.scale + ph)
    return out


def _lattice_interp(values_at: Any, lat: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Bilinear interpolation (separable) of a function sampled on the global lattice
    ``lat·(i, j)``; ``values_at(iy (n,1), ix (1,m))`` gives lattice values. Depends only on
    world position, never on the window, hence chunk-consistent."""
    iy0, iy1 = y0 // lat, (y1 - 1) // lat + 1
    ix0, ix1 = x0 // lat, (x1 - 1) // lat + 1
    ly = np.arange(iy0, iy1 + 1)[:, None]
    lx = np.arange(ix0, ix1 + 1)[None, :]
    grid = np.asarray(values_at(ly, lx), dtype=np.float32)  # (ny, nx)
    xs = np.arange(x0, x1)
    jx = xs // lat - ix0
    tx = ((xs % lat) / lat).astype(np.float32)
    gx = grid[:, jx] * (1 - tx) + grid[:, jx + 1] * tx  # (ny, W)
    ys = np.arange(y0, y1)
    jy = ys // lat - iy0
    ty = ((ys % lat) / lat).astype(np.float32)[:, None]
    return gx[jy] * (1 - ty) + gx[jy + 1] * ty


def _band_masks(p: _Params, reff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft membership (0..1) of the inner and outer band."""

    def soft(r0: float, r1: float) -> np.ndarray:
        e = p.edge
        return np.clip((reff - r0) / e + 0.5, 0, 1) * np.clip((r1 - reff) / e + 0.5, 0, 1)

    return soft(*p.inner), soft(*p.outer)


def _reff_block(p: _Params, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    lat = p.lattice
    d = _lattice_interp(lambda iy, ix: _deform_at(p, iy * lat, ix * lat), lat, y0, y1, x0, x1)
    dy = ((np.arange(y0, y1) + 0.5 - p.centre[0]) / p.scale).astype(np.float32)[:, None]
    dx = ((np.arange(x0, x1) + 0.5 - p.centre[1]) / p.scale).astype(np.float32)[None, :]
    return np.sqrt(dy * dy + dx * dx) + d


def _reff_points(p: _Params, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Same field as :func:`_reff_block` at arbitrary points (bilinear on the same lattice)."""
    lat = p.lattice
    fy, fx = y / lat, x / lat
    iy, ix = np.floor(fy), np.floor(fx)
    ty, tx = fy - iy, fx - ix
    v = (
        _deform_at(p, iy * lat, ix * lat) * (1 - ty) * (1 - tx)
        + _deform_at(p, iy * lat, (ix + 1) * lat) * (1 - ty) * tx
        + _deform_at(p, (iy + 1) * lat, ix * lat) * ty * (1 - tx)
        + _deform_at(p, (iy + 1) * lat, (ix + 1) * lat) * ty * tx
    )
    return np.hypot(y - p.centre[0], x - p.centre[1]) / p.scale + v


def _render(
    p: _Params, y0: int, y1: int, x0: int, x1: int, image: bool = True, labels: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Render world window ``[y0, y1) × [x0, x1)``: float32 image (0..255) and uint8 labels."""
    g = p.slot
    # slot-aligned superset so that cells are computed per slot with pure broadcasting
    sy0, sy1 = y0 // g, (y1 - 1) // g + 1
    sx0, sx1 = x0 // g, (x1 - 1) // g + 1
    gy = np.arange(sy0, sy1)[:, None]
    gx = np.arange(sx0, sx1)[None, :]
    u = [_hash_uniform(p.seed, 100 + i, gy, gx) for i in range(7)]
    cy = gy * g + g / 2 + (2 * u[1] - 1) * p.jitter
    cx = gx * g + g / 2 + (2 * u[2] - 1) * p.jitter
    ra = p.rmin + (p.rmax - p.rmin) * u[3]
    rb = p.rmin + (p.rmax - p.rmin) * u[4]
    th = np.pi * u[5]
    bright = p.cell_level[0] + (p.cell_level[1] - p.cell_level[0]) * u[6]
    # class from the band the whole cell lies in (margin = largest radius + soft edge)
    rc = _reff_points(p, cy.astype(np.float64), cx.astype(np.float64))
    m = np.maximum(ra, rb) / p.scale + p.edge
    in_inner = (rc > p.inner[0] + m) & (rc < p.inner[1] - m)
    in_outer = (rc > p.outer[0] + m) & (rc < p.outer[1] - m)
    present = u[0] < p.occupancy
    cls = np.where(present & in_outer, 1, np.where(present & in_inner, 2, 0)).astype(np.uint8)

    ny, nx = sy1 - sy0, sx1 - sx0
    ly = np.arange(g, dtype=np.float32)[None, :, None, None] + 0.5
    lx = np.arange(g, dtype=np.float32)[None, None, None, :] + 0.5

    def slot_field(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, dtype=np.float32).reshape(ny, 1, nx, 1)

    dy = (sy0 * g + np.arange(ny, dtype=np.float32).reshape(ny, 1, 1, 1) * g + ly) - slot_field(cy)
    dx = (sx0 * g + np.arange(nx, dtype=np.float32).reshape(1, 1, nx, 1) * g + lx) - slot_field(cx)
    c, s = slot_field(np.cos(th)), slot_field(np.sin(th))
    q = ((dy * c + dx * s) / slot_field(ra)) ** 2 + ((-dy * s + dx * c) / slot_field(rb)) ** 2
    q = q.reshape(ny * g, nx * g)
    oy, ox = y0 - sy0 * g, x0 - sx0 * g
    q = q[oy : oy + (y1 - y0), ox : ox + (x1 - x0)]
    cls_px = np.repeat(np.repeat(cls, g, axis=0), g, axis=1)[
        oy : oy + (y1 - y0), ox : ox + (x1 - x0)
    ]
    inside = (q < 1.0) & (cls_px > 0)
    lab = np.where(inside, cls_px, 0).astype(np.uint8) if labels else None
    if not image:
        return None, lab

    reff = _reff_block(p, y0, y1, x0, x1)
    b_in, b_out = _band_masks(p, reff)
    band = b_in + b_out
    tl = p.tex_lattice
    tex = _lattice_interp(
        lambda iy, ix: 2 * _hash_uniform(p.seed, 1, iy, ix) - 1, tl, y0, y1, x0, x1
    )
    img = p.background + band * (p.band_level - p.background + p.texture * tex)
    br = np.repeat(np.repeat(bright.astype(np.float32), g, axis=0), g, axis=1)
    br = br[oy : oy + (y1 - y0), ox : ox + (x1 - x0)]
    rmean = np.repeat(np.repeat(((ra + rb) / 2).astype(np.float32), g, axis=0), g, axis=1)
    rmean = rmean[oy : oy + (y1 - y0), ox : ox + (x1 - x0)]
    # soft ~1 px rim so cells are blobs, not aliased ellipses
    alpha = np.clip((1 - np.sqrt(np.minimum(q, 4.0))) * rmean * 0.7, 0, 1) * (cls_px > 0)
    cell = br * (0.8 + 0.2 * np.clip(1 - q, 0, 1)) + 18 * tex
    img = img * (1 - alpha) + cell * alpha
    if p.noise > 0:
        ys = np.arange(y0, y1)[:, None]
        xs = np.arange(x0, x1)[None, :]
        n1 = _hash_uniform(p.seed, 2, ys, xs)
        n2 = _hash_uniform(p.seed, 3, ys, xs)
        img = img + (n1 + n2 - 1) * np.float32(p.noise * math.sqrt(6.0))
    return img.astype(np.float32, copy=False), lab


@dataclass
class SyntheticImage:
    """A synthetic rings image with ground truth.

    Attributes
    ----------
    image
        ``(Y, X)`` uint8/uint16 image (numpy, or dask for :func:`synthetic_rings_lazy`).
    labels
        ``(Y, X)`` uint8 ground truth: 0 background, 1 outer cells, 2 inner cells.
    class_names
        ``("background", "outer", "inner")``.
    pyramid
        Levels, finest first (``pyramid[0] is image``), area-averaged by 2 per level.
    factors
        Downsampling factor of each pyramid level ``(1, 2, 4, ...)``.
    seed
        The seed it was generated with.
    """

    image: Any
    labels: Any
    class_names: tuple[str, ...]
    pyramid: list[Any]
    factors: tuple[int, ...]
    seed: int = 0
    meta: dict = field(default_factory=dict)


def _check_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    shp = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
    if len(shp) != 2 or min(shp) < 64:
        raise InputError(f"size: expected an int or (Y, X) with sides >= 64, got {size!r}")
    return shp  # type: ignore[return-value]


def _to_dtype(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if dtype == np.uint16:  # same picture on a 12-bit-ish scale, like a camera
        return np.clip(np.rint(img * 16), 0, 65535).astype(np.uint16)
    if dtype == np.float32:
        return img.astype(np.float32)
    raise InputError(f"dtype: expected uint8, uint16 or float32, got {dtype}")


def _pyramid(img: np.ndarray, min_size: int) -> tuple[list[np.ndarray], tuple[int, ...]]:
    levels, factors = [img], [1]
    cur = img.astype(np.float32)
    f = 1
    while min(cur.shape) // 2 >= min_size:
        h, w = cur.shape[0] // 2 * 2, cur.shape[1] // 2 * 2
        cur = cur[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        f *= 2
        levels.append(
            _to_dtype(cur / (16 if img.dtype == np.uint16 else 1), img.dtype)
            if img.dtype != np.float32
            else cur.astype(np.float32)
        )
        factors.append(f)
    return levels, tuple(factors)


def synthetic_rings(
    size: int | tuple[int, int] = 1024,
    seed: int = 0,
    dtype: Any = np.uint8,
    noise: float = 7.0,
    deformation: float = 0.035,
    min_level_size: int = 256,
    strip: int = 1024,
) -> SyntheticImage:
    """Generate a Synthetic-task image (deterministic per ``seed``).

    Parameters
    ----------
    size
        Side (or ``(Y, X)``) in pixels; 1k²–16k² are practical in memory (4k² takes ~2 s).
        Ring geometry scales with the image; cells (radius 4–9 px) do not.
    seed
        Controls the ring centre/deformation and all cells and noise.
    dtype
        ``uint8`` (default), ``uint16`` (×16) or ``float32``.
    noise
        Standard deviation of the pixel noise (uint8 units).
    deformation
        Amplitude (fraction of the image side) of the smooth ring deformation.
    min_level_size
        The pyramid stops before a level's smaller side would drop below this.
    strip
        Rows rendered at once (bounds peak memory for large images).
    """
    shp = _check_shape(size)
    dt = np.dtype(dtype)
    p = _make_params(shp, seed, noise, deformation)
    img = np.empty(shp, dtype=dt)
    lab = np.empty(shp, dtype=np.uint8)
    for y0 in range(0, shp[0], strip):
        y1 = min(y0 + strip, shp[0])
        im, lb = _render(p, y0, y1, 0, shp[1])
        img[y0:y1] = _to_dtype(im, dt)
        lab[y0:y1] = lb
    pyr, factors = _pyramid(img, min_level_size)
    return SyntheticImage(
        image=img,
        labels=lab,
        class_names=CLASS_NAMES,
        pyramid=pyr,
        factors=factors,
        seed=int(seed),
        meta={"centre": p.centre, "inner": p.inner, "outer": p.outer, "scale": p.scale},
    )


def synthetic_rings_lazy(
    size: int | tuple[int, int] = 65536,
    seed: int = 0,
    chunk: int = 2048,
    dtype: Any = np.uint8,
    noise: float = 7.0,
    deformation: float = 0.035,
) -> SyntheticImage:
    """Dask-backed Synthetic-task image for huge sizes (e.g. 64k²), rendered chunk by chunk.

    Every chunk is a pure function of its world window, so the result equals
    :func:`synthetic_rings` with the same arguments wherever both exist. ``pyramid`` holds
    only the full-resolution level (``factors == (1,)``); let :class:`PyramidSource` build
    coarse levels lazily.
    """
    import dask.array as da

    shp = _check_shape(size)
    dt = np.dtype(dtype)
    p = _make_params(shp, seed, noise, deformation)
    chunks = tuple(tuple(min(chunk, n - i) for i in range(0, n, chunk)) for n in shp)

    def _img_block(block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        im, _ = _render(p, y0, y1, x0, x1, image=True, labels=False)
        return _to_dtype(im, dt)

    def _lab_block(block_info: dict | None = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return _render(p, y0, y1, x0, x1, image=False, labels=True)[1]

    img = da.map_blocks(_img_block, dtype=dt, chunks=chunks, meta=np.empty((0, 0), dt))
    lab = da.map_blocks(_lab_block, dtype=np.uint8, chunks=chunks, meta=np.empty((0, 0), np.uint8))
    return SyntheticImage(
        image=img,
        labels=lab,
        class_names=CLASS_NAMES,
        pyramid=[img],
        factors=(1,),
        seed=int(seed),
        meta={"centre": p.centre, "inner": p.inner, "outer": p.outer, "scale": p.scale},
    )


def synthetic_field(
    grid: int | tuple[int, int] = 8,
    system_size: int = 512,
    seed: int = 0,
    lazy: bool = False,
    min_level_size: int = 256,
) -> SyntheticImage:
    """A slide-like field of ``grid`` × ``grid`` independent ring systems of ``system_size``².

    :func:`synthetic_rings` scales its rings with the image, so a model trained on
    ``system_size``² images only recognises rings of that scale. Tiling independent systems
    (seeds ``seed·10007 + i``) gives images of any size — e.g. 4096² = 8 × 8 systems of 512² —
    whose structures keep the training scale, like a slide covered with organoids.
    ``lazy=True`` returns dask arrays (chunk = one system) for gigapixel benchmarks; its
    ``pyramid`` holds only full resolution (:class:`PyramidSource` builds the rest lazily).
    """
    gy, gx = (int(grid), int(grid)) if np.ndim(grid) == 0 else (int(grid[0]), int(grid[1]))
    if gy < 1 or gx < 1:
        raise InputError(f"grid: expected >= 1 systems per side, got {grid!r}")
    seeds = [[int(seed) * 10007 + iy * gx + ix for ix in range(gx)] for iy in range(gy)]
    if lazy:
        import dask.array as da

        parts = [[synthetic_rings_lazy(system_size, s, chunk=system_size) for s in row] for row in seeds]
        image = da.block([[p.image for p in row] for row in parts])
        labels = da.block([[p.labels for p in row] for row in parts])
        pyramid, factors = [image], (1,)
    else:
        parts = [[synthetic_rings(system_size, s, min_level_size=system_size) for s in row] for row in seeds]
        image = np.block([[p.image for p in row] for row in parts])
        labels = np.block([[p.labels for p in row] for row in parts])
        pyramid, factors = _pyramid(image, min_level_size)
    return SyntheticImage(
        image=image,
        labels=labels,
        class_names=CLASS_NAMES,
        pyramid=pyramid,
        factors=factors,
        seed=int(seed),
        meta={"grid": (gy, gx), "system_size": int(system_size)},
    )
