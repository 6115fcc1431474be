"""Multi-resolution access to (possibly huge) 2-D images: :class:`PyramidSource` and :func:`open_image`.

A :class:`PyramidSource` wraps the levels of an image pyramid (numpy, dask, zarr v2/v3 arrays,
OME-Zarr multiscales, pyramidal TIFF) and serves MuViT crops: ``read(bbox, factor, size)``
returns the ``S×S`` crop whose pixels area-average the world region ``bbox`` (extent
``factor·S``), normalised, with zeros (and ``valid=False``) outside the image.

How a crop is read
------------------
1. The level with the largest factor ``g <= factor`` such that ``factor / g`` is an integer is
   chosen. When the ratio ``factor / g`` exceeds ``max_read_ratio`` (default 2) and lazy levels
   are enabled, a level at exactly ``factor`` is built once from ``g`` (block-wise, never
   holding a whole level of the source in memory; kept in RAM up to ``cache_bytes``, otherwise
   in a temporary zarr store) and cached, so that a 32× read never rescans full resolution.
2. Only the window under the bbox is sliced from that level (chunked access for zarr/dask).
3. The window is area-averaged by the integer ratio (block means): exact whenever the bbox
   origin lies on the chosen level's pixel grid, which :mod:`~napari_muvit.data.geometry`
   guarantees by snapping coarse crops to their factor. Other cases (an off-grid origin, or a
   factor that is no integer multiple of any level) use exact area resampling *of the chosen
   level*: each output pixel is the overlap-weighted mean of the level pixels it covers (so
   accuracy is limited by that level's pixel size). Nothing is ever nearest-neighbour.
4. Out-of-image pixels are excluded from the means; output pixels whose world centre lies
   outside the image are padding: value 0 *after* normalisation and ``valid=False``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_muvit.data.normalization import Normalization, compute_normalization
from napari_muvit.data.picture_files import is_picture, read_picture
from napari_muvit.errors import InputError

__all__ = ["PyramidSource", "input_fingerprint", "open_image"]

_TOL = 1e-6
# TIFFs up to this size are read into RAM (random crops from RAM beat tile decoding per crop)
TIFF_EAGER_BYTES = 128 * 2**20


def _is_int(v: float, tol: float = 1e-6) -> bool:
    return abs(v - round(v)) <= tol * max(1.0, abs(v))


def _spatial_chunks(array: Any, axes: str) -> tuple[int, int] | None:
    """Chunk size along (y, x) of a zarr/dask array (None for numpy)."""
    ch = getattr(array, "chunks", None)
    if ch is None:
        return None
    try:
        out = []
        for a in ("y", "x"):
            c = ch[axes.index(a)]
            out.append(int(c[0] if isinstance(c, tuple) else c))
        return out[0], out[1]
    except (TypeError, IndexError, ValueError):
        return None


class _Level:
    """One pyramid level: a raw array with named axes (``y``, ``x``, ``c``, ``q`` = size-1)."""

    def __init__(
        self,
        array: Any,
        axes: str,
        factor: float,
        rgb_drop_alpha: bool = False,
        derived: bool = False,
    ) -> None:
        self.array = array
        self.axes = axes
        self.factor = float(factor)
        self.derived = derived
        shape = tuple(int(s) for s in array.shape)
        self.shape = (shape[axes.index("y")], shape[axes.index("x")])
        self.channels = shape[axes.index("c")] if "c" in axes else 1
        self._drop_alpha = rgb_drop_alpha and self.channels == 4
        if self._drop_alpha:
            self.channels = 3
        self.dtype = np.dtype(array.dtype)
        self.chunks = _spatial_chunks(array, axes)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Raw ``(C, y1-y0, x1-x0)`` window (native dtype); bounds must be inside the level."""
        idx = []
        for a in self.axes:
            if a == "y":
                idx.append(slice(y0, y1))
            elif a == "x":
                idx.append(slice(x0, x1))
            elif a == "c":
                idx.append(slice(0, 3) if self._drop_alpha else slice(None))
            else:
                idx.append(0)
        out = np.asarray(self.array[tuple(idx)])
        kept = [a for a in self.axes if a in "cyx"]
        if "c" not in kept:
            return out[None]
        return np.transpose(out, [kept.index(a) for a in "cyx"])


def _infer_axes(
    shape: tuple[int, ...], dtype: np.dtype, channel_axis: int | None, rgb: bool | None
) -> tuple[str, bool]:
    """Axis names for an array from napari-style ``channel_axis`` / ``rgb`` hints."""
    nd = len(shape)
    if nd < 2:
        raise InputError(
            f"image: expected a 2-D image (Y, X), (C, Y, X) or (Y, X, RGB), got shape {shape}"
        )
    if rgb and channel_axis is not None:
        raise InputError("rgb/channel_axis: expected at most one of them, got both")
    if (
        rgb is None
        and channel_axis is None
        and nd == 3
        and shape[-1] in (3, 4)
        and dtype == np.uint8
    ):
        rgb = True  # napari's own rule for RGB inference
    if rgb:
        if shape[-1] not in (3, 4) or nd < 3:
            raise InputError(f"rgb: expected a last axis of size 3 or 4, got shape {shape}")
        channel_axis = nd - 1
    if channel_axis is not None:
        ca = int(channel_axis)
        if not -nd <= ca < nd:
            raise InputError(f"channel_axis: expected an axis in [{-nd}, {nd}), got {channel_axis}")
        ca %= nd
        rest = [i for i in range(nd) if i != ca]
        if len(rest) < 2:
            raise InputError(
                f"image: expected 2 spatial axes besides the channel axis, got shape {shape}"
            )
        names = ["q"] * nd
        names[ca] = "c"
        names[rest[-2]] = "y"
        names[rest[-1]] = "x"
    else:
        names = ["q"] * (nd - 2) + ["y", "x"]
    extra = [shape[i] for i, n in enumerate(names) if n == "q" and shape[i] != 1]
    if extra:
        raise InputError(
            f"image: expected a 2-D image (extra axes of size 1 only; pass channel_axis for "
            f"multi-channel data), got shape {shape} with {nd - 2 - (channel_axis is not None)} "
            "extra non-singleton axes"
        )
    return "".join(names), bool(rgb)


def _factor_pairs(downsample_factors: Any, n: int, axes: str) -> list[tuple[float, float]]:
    df = list(downsample_factors)
    if len(df) != n:
        raise InputError(f"downsample_factors: expected {n} entries (one per level), got {len(df)}")
    out = []
    for f in df:
        a = np.asarray(f, dtype=np.float64).reshape(-1)
        if a.size == 1:
            out.append((float(a[0]), float(a[0])))
        elif a.size == len(axes):
            out.append((float(a[axes.index("y")]), float(a[axes.index("x")])))
        elif a.size >= 2:
            out.append((float(a[-2]), float(a[-1])))
        else:
            raise InputError(f"downsample_factors: expected scalars or per-axis tuples, got {f!r}")
    return out


class PyramidSource:
    """A 2-D image pyramid serving normalised MuViT crops in world (level-1 pixel) coordinates.

    Parameters
    ----------
    arrays
        One array or a list of pyramid levels, finest first (numpy, dask, zarr, anything with
        ``shape``, ``dtype`` and numpy slicing). Every level has the same axes.
    downsample_factors
        Per level: a scalar, a ``(fy, fx)`` pair or one entry per axis (napari
        ``layer.downsample_factors``, OME-Zarr ``scale``). Relative to level 0. Inferred from
        the shapes when omitted. Factors must be isotropic and consistent with the shapes
        (``|Y0 / f - Y_l| <= 1``), else :class:`InputError`.
    channel_axis
        Axis of channels for multi-channel data, e.g. 0 for ``(C, Y, X)``.
    rgb
        Last axis is RGB(A) (alpha is dropped). Inferred for uint8 arrays whose last axis is 3/4.
    normalization
        :class:`Normalization`, its dict, or ``None`` to compute it lazily from a coarse level
        (:func:`compute_normalization`) on first use.
    axes
        Explicit axis names (``"yx"``, ``"cyx"``, ``"tczyx"`` ...; non-``cyx`` axes must have
        size 1). Overrides ``channel_axis``/``rgb`` (used for OME-Zarr).
    lazy_levels
        Build missing coarse levels on demand (see module docstring).
    max_read_ratio
        Largest level-to-request ratio read directly before a coarser level is built.
    cache_bytes
        Built levels up to this size live in RAM; larger ones in a temporary zarr store.
    cache_dir
        Where to put such stores (default: a temporary directory removed with the source).
    """

    def __init__(
        self,
        arrays: Any,
        downsample_factors: Sequence[Any] | None = None,
        channel_axis: int | None = None,
        rgb: bool | None = None,
        normalization: Normalization | dict | None = None,
        *,
        axes: str | None = None,
        lazy_levels: bool = True,
        max_read_ratio: int = 2,
        cache_bytes: int = 256 * 2**20,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(arrays, (list, tuple)):
            arrays = list(arrays)
        elif hasattr(arrays, "shape") and hasattr(arrays, "dtype"):
            arrays = [arrays]
        else:
            try:  # napari MultiScaleData and similar sequences
                arrays = list(arrays)
            except TypeError as e:
                raise InputError(
                    f"arrays: expected an array or a list of arrays, got {type(arrays).__name__}"
                ) from e
        if not arrays:
            raise InputError("arrays: expected at least one pyramid level, got an empty list")
        for i, a in enumerate(arrays):
            if not (hasattr(a, "shape") and hasattr(a, "dtype")):
                arrays[i] = np.asarray(a)
        a0 = arrays[0]
        dt = np.dtype(a0.dtype)
        if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating) or dt == np.bool_):
            raise InputError(f"image dtype: expected an integer or float type, got {dt}")
        if axes is not None:
            axes = axes.lower()
            if len(axes) != len(a0.shape) or "y" not in axes or "x" not in axes:
                raise InputError(
                    f"axes: expected {len(a0.shape)} names incl. 'y' and 'x', got {axes!r}"
                )
            axes = "".join(a if a in "cyx" else "q" for a in axes)
            bad = [s for s, n in zip(a0.shape, axes) if n == "q" and s != 1]
            if bad:
                raise InputError(
                    f"image: expected only y, x (and c) to have size > 1, got shape {tuple(a0.shape)} "
                    f"with axes {axes!r}"
                )
            is_rgb = bool(rgb)
        else:
            axes, is_rgb = _infer_axes(tuple(int(s) for s in a0.shape), dt, channel_axis, rgb)
        for i, a in enumerate(arrays):
            if len(a.shape) != len(axes):
                raise InputError(
                    f"arrays[{i}]: expected {len(axes)} dims like level 0 {tuple(a0.shape)}, got {tuple(a.shape)}"
                )
        self._rgb = is_rgb
        levels = [_Level(a, axes, 1.0, rgb_drop_alpha=is_rgb) for a in arrays]
        for i, lv in enumerate(levels[1:], 1):
            if lv.channels != levels[0].channels:
                raise InputError(
                    f"arrays[{i}]: expected {levels[0].channels} channels like level 0, got {lv.channels}"
                )
        for i, lv in enumerate(levels):
            if min(lv.shape) < 1:
                raise InputError(
                    f"image: expected a non-empty 2-D image, got {lv.shape[0]}×{lv.shape[1]} "
                    f"pixels" + (f" in pyramid level {i}" if i else "")
                    + f" (shape {tuple(arrays[i].shape)})"
                )
        factors = self._resolve_factors(levels, downsample_factors, axes)
        for lv, f in zip(levels, factors):
            lv.factor = f
        self._levels: list[_Level] = levels
        self._derived: dict[float, _Level] = {}
        # where the pixels come from (a file path, a layer name): named in error messages
        self.origin: str | None = None
        self._finite_checked = False
        self._lazy = bool(lazy_levels)
        self._max_ratio = max(1, int(max_read_ratio))
        self._cache_bytes = int(cache_bytes)
        self._cache_dir = None if cache_dir is None else str(cache_dir)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._lock = threading.RLock()
        self._keepalive: list[Any] = []
        self.pixels_read = 0  # raw level pixels read (all levels), for benchmarks and tests
        if normalization is None or isinstance(normalization, Normalization):
            self._normalization = normalization
        else:
            self._normalization = Normalization.from_dict(normalization)

    # ---------------------------------------------------------------------------- factors

    @staticmethod
    def _resolve_factors(levels: list[_Level], downsample_factors: Any, axes: str) -> list[float]:
        y0, x0 = levels[0].shape
        for i, lv in enumerate(levels[1:], 1):
            if lv.shape[0] > y0 or lv.shape[1] > x0:
                raise InputError(
                    f"arrays: expected pyramid levels ordered finest first, got level {i} of shape "
                    f"{lv.shape} larger than level 0 {levels[0].shape}"
                )
        if downsample_factors is not None:
            pairs = _factor_pairs(downsample_factors, len(levels), axes)
            by, bx = pairs[0]
            if by <= 0 or bx <= 0:
                raise InputError(f"downsample_factors: expected positive values, got {pairs[0]}")
            out = []
            for i, ((fy, fx), lv) in enumerate(zip(pairs, levels)):
                fy, fx = fy / by, fx / bx
                if not math.isclose(fy, fx, rel_tol=1e-3):
                    raise InputError(
                        f"downsample_factors[{i}]: expected an isotropic factor (fy == fx), got ({fy}, {fx})"
                    )
                f = (fy + fx) / 2
                if abs(y0 / f - lv.shape[0]) > 1 + 1e-6 or abs(x0 / f - lv.shape[1]) > 1 + 1e-6:
                    raise InputError(
                        f"downsample_factors[{i}]: expected factor {f:g} to fit the level shapes "
                        f"(level 0 {levels[0].shape} / {f:g} ≈ {(y0 / f, x0 / f)}), got level shape {lv.shape}"
                    )
                out.append(f)
        else:
            out = []
            for i, lv in enumerate(levels):
                fy, fx = y0 / lv.shape[0], x0 / lv.shape[1]
                cand = [float(round((fy + fx) / 2)), (fy + fx) / 2, fy, fx]
                f = None
                for c in cand:
                    if c >= 1 and abs(y0 / c - lv.shape[0]) <= 1 and abs(x0 / c - lv.shape[1]) <= 1:
                        f = c
                        break
                if f is None:
                    raise InputError(
                        f"arrays[{i}]: expected a consistent downsampling of level 0 {levels[0].shape}, "
                        f"got shape {lv.shape} (factors y {fy:.3f} vs x {fx:.3f})"
                    )
                out.append(f)
        if out[0] != 1.0:
            raise InputError(f"downsample_factors: expected level 0 at factor 1, got {out[0]}")
        if any(b <= a for a, b in itertools.pairwise(out)):
            raise InputError(
                f"arrays: expected pyramid levels ordered finest first (ascending factors), got factors {out}"
            )
        return out

    # ---------------------------------------------------------------------------- properties

    @property
    def shape(self) -> tuple[int, int]:
        """World ``(Y, X)`` shape (level 0)."""
        return self._levels[0].shape

    @property
    def channels(self) -> int:
        """Number of channels ``C`` of every crop."""
        return self._levels[0].channels

    @property
    def dtype(self) -> np.dtype:
        """Raw dtype of level 0."""
        return self._levels[0].dtype

    @property
    def rgb(self) -> bool:
        """True for RGB(A) images (channels last in the raw data)."""
        return self._rgb

    @property
    def factors(self) -> tuple[float, ...]:
        """Factors of all levels available now (native and already built), ascending."""
        return tuple(sorted({lv.factor for lv in self._all_levels()}))

    @property
    def native_factors(self) -> tuple[float, ...]:
        """Factors of the levels given by the caller / file."""
        return tuple(lv.factor for lv in self._levels)

    @property
    def arrays(self) -> list[Any]:
        """The native level arrays (finest first)."""
        return [lv.array for lv in self._levels]

    @property
    def normalization(self) -> Normalization:
        """Normalisation applied to every crop (computed once from a coarse level if not given)."""
        if self._normalization is None:
            with self._lock:
                if self._normalization is None:
                    self._normalization = compute_normalization(self)
        return self._normalization

    @normalization.setter
    def normalization(self, value: Normalization | dict | None) -> None:
        self._normalization = (
            value
            if value is None or isinstance(value, Normalization)
            else Normalization.from_dict(value)
        )

    def describe(self) -> str:
        """How to name this image in a message: its file/layer, else its shape."""
        return repr(self.origin) if self.origin else f"image of shape {self.shape}"

    def check_finite(self, max_pixels: int = 4_000_000) -> None:
        """Raise :class:`InputError` if the image holds NaN or infinite values (float images).

        Cheap: the pixels read for the intensity statistics
        (:meth:`sample_for_statistics`: all of an image up to ``max_pixels``, else its
        coarsest fitting level or a sample). Lazily built coarse levels average blocks, so a
        NaN anywhere under a built level shows there too; an isolated NaN that escapes the
        sample is still caught per tile by the model's input check. Checked once per source.
        """
        if self._finite_checked or not np.issubdtype(self.dtype, np.floating):
            return
        sample = self.sample_for_statistics(max_pixels=max_pixels)
        bad = ~np.isfinite(sample)
        if bad.any():
            kinds = sorted({"NaN" if np.isnan(v) else "infinite" for v in sample[bad][:1000]})
            raise InputError(
                f"{self.describe()}: contains {' and '.join(kinds)} values ({int(bad.sum())} of "
                f"{bad.size} pixels checked); replace them (e.g. numpy.nan_to_num) before "
                "predicting or training"
            )
        self._finite_checked = True

    def __repr__(self) -> str:
        return (
            f"PyramidSource(shape={self.shape}, channels={self.channels}, dtype={self.dtype}, "
            f"factors={self.factors}, rgb={self.rgb})"
        )

    def __getstate__(self) -> dict:
        # DataLoader workers (spawn) pickle the source: drop the lock and the temp-dir owner
        # (only the creating process removes the directory).
        st = self.__dict__.copy()
        st["_lock"] = None
        st["_tmp"] = None
        return st

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)
        self._lock = threading.RLock()

    # ---------------------------------------------------------------------------- levels

    def _all_levels(self) -> list[_Level]:
        return sorted([*self._levels, *self._derived.values()], key=lambda lv: lv.factor)

    def _check_factor(self, factor: float) -> float:
        try:
            f = float(factor)
        except (TypeError, ValueError) as e:
            raise InputError(f"factor: expected a number >= 1, got {factor!r}") from e
        if not math.isfinite(f) or f < 1 - _TOL:
            raise InputError(
                f"factor: expected a downsampling factor >= 1 (no upsampling), got {factor!r}"
            )
        return max(f, 1.0)

    def _pick(self, f: float) -> tuple[_Level, bool]:
        """Best available level for factor ``f`` and whether its ratio is an integer."""
        avail = self._all_levels()
        for lv in avail:
            if math.isclose(lv.factor, f, rel_tol=_TOL):
                return lv, True
        below = [lv for lv in avail if lv.factor <= f * (1 + _TOL)]
        integer = [lv for lv in below if _is_int(f / lv.factor)]
        if integer:
            return max(integer, key=lambda lv: lv.factor), True
        return max(below, key=lambda lv: lv.factor), False

    def can_serve(self, levels: Sequence[float]) -> bool:
        """True when every factor in ``levels`` can be read (any factor >= 1 can, exactly)."""
        try:
            self.check_levels(levels)
        except InputError:
            return False
        return True

    def check_levels(self, levels: Sequence[float]) -> None:
        """Raise :class:`InputError` unless all ``levels`` are valid factors for this image.

        Valid factors are >= 1 and ascending; a factor whose ``f·1`` world pixel is larger than
        the image is still servable (mostly padding), so only malformed input is rejected.
        """
        try:
            lv = [float(v) for v in levels]
        except (TypeError, ValueError) as e:
            raise InputError(f"levels: expected a sequence of numbers, got {levels!r}") from e
        if not lv:
            raise InputError("levels: expected at least one factor, got none")
        for v in lv:
            if not math.isfinite(v) or v < 1 - _TOL:
                raise InputError(
                    f"levels: expected downsampling factors >= 1 (this image has factors {self.factors}), got {lv}"
                )
        if any(b <= a for a, b in itertools.pairwise(lv)):
            raise InputError(f"levels: expected ascending factors, got {lv}")

    def prepare(self, levels: Sequence[float]) -> None:
        """Build (once) all lazy coarse levels ``levels`` need, finest first, so each is built
        from the previous one rather than from full resolution. Call before forking workers."""
        self.check_levels(levels)
        for f in sorted(float(v) for v in levels):
            self._level_for(f)

    def _level_for(self, f: float) -> tuple[_Level, bool]:
        lv, integer = self._pick(f)
        if not (self._lazy and integer):
            return lv, integer
        ratio = round(f / lv.factor)
        if ratio <= self._max_ratio:
            return lv, True
        with self._lock:
            lv2, _ = self._pick(f)
            if math.isclose(lv2.factor, f, rel_tol=_TOL):
                return lv2, True
            built = self._build_level(lv2, round(f / lv2.factor), f)
            self._derived[f] = built
            return built, True

    def _build_level(self, src: _Level, r: int, f: float) -> _Level:
        """Block-wise area-average ``src`` by ``r`` into a float32 ``(C, Y, X)`` level."""
        ys, xs = src.shape
        yd, xd = -(-ys // r), -(-xs // r)  # ceil: border pixels average their in-image part
        c = src.channels
        nbytes = c * yd * xd * 4
        if nbytes <= self._cache_bytes:
            dest: Any = np.zeros((c, yd, xd), dtype=np.float32)
        else:
            import zarr

            if self._cache_dir is None and self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="napari-muvit-levels-")
            root = self._cache_dir if self._cache_dir is not None else self._tmp.name
            path = Path(root) / f"level_{f:g}_{id(self):x}.zarr"
            dest = zarr.open_array(
                str(path),
                mode="w",
                shape=(c, yd, xd),
                chunks=(c, 1024, 1024),
                dtype="float32",
                fill_value=0.0,
            )
        # source block: ~4096² pixels, a multiple of r and (if possible) of the source chunks
        blocks = []
        for ax in range(2):
            ch = src.chunks[ax] if src.chunks else 1
            unit = r * ch // math.gcd(r, ch)
            if unit > 8192:
                unit = r
            blocks.append(max(unit, (4096 // unit) * unit))
        by, bx = blocks
        for y0 in range(0, ys, by):
            y1 = min(y0 + by, ys)
            for x0 in range(0, xs, bx):
                x1 = min(x0 + bx, xs)
                win = src.read(y0, y1, x0, x1).astype(np.float32, copy=False)
                self.pixels_read += (y1 - y0) * (x1 - x0)
                dest[:, y0 // r : -(-y1 // r), x0 // r : -(-x1 // r)] = _block_mean(win, r)
        return _Level(dest, "cyx", f, derived=True)

    # ---------------------------------------------------------------------------- reading

    def _check_bbox(self, bbox: Any, f: float, size: int) -> np.ndarray:
        bb = np.asarray(bbox, dtype=np.float64)
        if bb.shape != (2, 2) or not np.all(np.isfinite(bb)):
            raise InputError(f"bbox: expected a finite [[y0, x0], [y1, x1]], got {bbox!r}")
        ext = bb[1] - bb[0]
        if not np.allclose(ext, f * size, rtol=1e-6, atol=1e-3):
            raise InputError(
                f"bbox: expected an extent of factor*size = {f:g}*{size} = {f * size:g} on both axes, "
                f"got {ext.tolist()}"
            )
        if np.any(bb[1] <= 0) or np.any(bb[0] >= np.asarray(self.shape)):
            raise InputError(
                f"bbox: expected a box overlapping the image [0, {self.shape[0]}) x [0, {self.shape[1]}), "
                f"got {bb.tolist()} (entirely outside)"
            )
        return bb

    def read(
        self, bbox: Any, factor: float, size: int, return_valid: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The ``(C, S, S)`` float32 normalised crop of world ``bbox`` at downsampling ``factor``.

        Parameters
        ----------
        bbox
            World ``[[y0, x0], [y1, x1]]`` of extent ``factor·size`` (checked).
        factor
            Downsampling factor (>= 1) of the crop.
        size
            Output size ``S``.
        return_valid
            Also return the ``(S, S)`` bool mask (False = padding outside the image).
        """
        s = int(size)
        if s != size or s < 1:
            raise InputError(f"size: expected a positive integer, got {size!r}")
        f = self._check_factor(factor)
        bb = self._check_bbox(bbox, f, s)
        lv, integer = self._level_for(f)
        g = lv.factor
        r = f / g
        o = bb[0] / g  # crop origin in level pixels
        if integer and _is_int(r) and np.all(np.abs(o - np.round(o)) < 1e-6):
            vals, counts = self._read_aligned(lv, round(o[0]), round(o[1]), round(r), s)
        else:
            vals, counts = self._read_resampled(lv, o, r, s)
        # valid = world pixel centre inside the image and at least some image data under it
        centres = [bb[0, ax] + (np.arange(s) + 0.5) * f for ax in range(2)]
        vy = (centres[0] >= 0) & (centres[0] < self.shape[0])
        vx = (centres[1] >= 0) & (centres[1] < self.shape[1])
        valid = np.outer(vy, vx) & (counts > 0)
        crop = self.normalization.apply(vals)
        crop[:, ~valid] = 0.0
        if return_valid:
            return crop, valid
        return crop

    def _read_aligned(
        self, lv: _Level, oy: int, ox: int, r: int, s: int
    ) -> tuple[np.ndarray, np.ndarray]:
        n = s * r
        ly, lx = lv.shape
        y0, y1 = max(oy, 0), min(oy + n, ly)
        x0, x1 = max(ox, 0), min(ox + n, lx)
        c = lv.channels
        if y1 <= y0 or x1 <= x0:
            return np.zeros((c, s, s), np.float32), np.zeros((s, s), np.float32)
        raw = lv.read(y0, y1, x0, x1)
        self.pixels_read += (y1 - y0) * (x1 - x0)
        if r == 1 and y0 == oy and x0 == ox and y1 - y0 == n and x1 - x0 == n:
            return raw.astype(np.float32, copy=False), np.ones((s, s), np.float32)
        win = np.zeros((c, n, n), dtype=np.float32)
        win[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = raw
        my = np.zeros(n, np.float32)
        my[y0 - oy : y1 - oy] = 1
        mx = np.zeros(n, np.float32)
        mx[x0 - ox : x1 - ox] = 1
        sums = win.reshape(c, s, r, s, r).sum(axis=(2, 4))
        counts = np.outer(my.reshape(s, r).sum(1), mx.reshape(s, r).sum(1))
        vals = sums / np.maximum(counts, 1)
        return vals.astype(np.float32, copy=False), counts

    def _read_resampled(
        self, lv: _Level, o: np.ndarray, r: float, s: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact area resampling for non-aligned / non-integer cases (separable overlaps)."""
        ws, ranges = [], []
        for ax in range(2):
            edges = o[ax] + np.arange(s + 1) * r
            j0 = max(math.floor(edges[0] + 1e-9), 0)
            j1 = min(math.ceil(edges[-1] - 1e-9), lv.shape[ax])
            if j1 <= j0:
                return np.zeros((lv.channels, s, s), np.float32), np.zeros((s, s), np.float32)
            j = np.arange(j0, j1)
            w = np.clip(
                np.minimum(edges[1:, None], j[None, :] + 1)
                - np.maximum(edges[:-1, None], j[None, :]),
                0,
                None,
            )
            ws.append(w.astype(np.float64))
            ranges.append((j0, j1))
        (y0, y1), (x0, x1) = ranges
        raw = lv.read(y0, y1, x0, x1).astype(np.float64)
        self.pixels_read += (y1 - y0) * (x1 - x0)
        wy, wx = ws
        sums = np.einsum("iy,cyx,jx->cij", wy, raw, wx, optimize=True)
        counts = np.outer(wy.sum(1), wx.sum(1))
        vals = sums / np.where(counts > 0, counts, 1)
        return vals.astype(np.float32), counts.astype(np.float32)

    def read_nested(
        self, bboxes: Any, levels: Sequence[float], size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read one crop per level: ``((L, C, S, S) float32, (L, S, S) bool valid)``."""
        bb = np.asarray(bboxes, dtype=np.float64)
        lv = [float(v) for v in levels]
        if bb.shape != (len(lv), 2, 2):
            raise InputError(
                f"bboxes: expected shape ({len(lv)}, 2, 2) for levels {lv}, got {bb.shape}"
            )
        self.prepare(lv)
        crops = np.empty((len(lv), self.channels, int(size), int(size)), dtype=np.float32)
        valid = np.empty((len(lv), int(size), int(size)), dtype=bool)
        for i, f in enumerate(lv):
            crops[i], valid[i] = self.read(bb[i], f, size, return_valid=True)
        return crops, valid

    # ---------------------------------------------------------------------------- statistics

    def sample_for_statistics(self, max_pixels: int = 4_000_000, seed: int = 0) -> np.ndarray:
        """Raw ``(C, N)`` float32 pixel values for intensity statistics, reading ≤ ~``max_pixels``.

        Uses the finest level (native or built) that fits in ``max_pixels``; without one it
        takes a strided view of in-memory numpy data, or ``max_pixels`` worth of random 128²
        windows from the coarsest native level (deterministic) for chunked arrays, so that a
        huge zarr never gets scanned just for percentiles.
        """
        fits = [lv for lv in self._all_levels() if lv.shape[0] * lv.shape[1] <= max_pixels]
        if fits:
            lv = fits[0]
            win = lv.read(0, lv.shape[0], 0, lv.shape[1])
            return win.reshape(lv.channels, -1).astype(np.float32)
        lv = max(self._levels, key=lambda v: v.factor)
        ly, lx = lv.shape
        if isinstance(lv.array, np.ndarray):
            step = math.ceil(math.sqrt(ly * lx / max_pixels))
            idx = tuple(
                slice(None, None, step) if a in "yx" else (slice(None) if a == "c" else 0)
                for a in lv.axes
            )
            sub = np.asarray(lv.array[idx])
            kept = [a for a in lv.axes if a in "cyx"]
            sub = (
                sub[None] if "c" not in kept else np.transpose(sub, [kept.index(a) for a in "cyx"])
            )
            if lv._drop_alpha:
                sub = sub[:3]
            return sub.reshape(sub.shape[0], -1).astype(np.float32)
        rng = np.random.default_rng(seed)
        w = 128
        n = max(1, max_pixels // (w * w))
        out = []
        for _ in range(n):
            y = int(rng.integers(0, max(ly - w, 0) + 1))
            x = int(rng.integers(0, max(lx - w, 0) + 1))
            win = lv.read(y, min(y + w, ly), x, min(x + w, lx))
            out.append(win.reshape(lv.channels, -1))
        return np.concatenate(out, axis=1).astype(np.float32)

    # ---------------------------------------------------------------------------- constructors

    @classmethod
    def from_layer_data(
        cls,
        data: Any,
        multiscale: bool,
        rgb: bool,
        channel_axis: int | None = None,
        downsample_factors: Sequence[Any] | None = None,
        normalization: Normalization | dict | None = None,
        **kwargs: Any,
    ) -> PyramidSource:
        """Source for a napari Image layer's ``.data`` (``layer.multiscale``, ``layer.rgb``).

        ``downsample_factors`` may be ``layer.downsample_factors`` (per level, per axis); by
        default they are inferred from the level shapes like napari does.
        """
        arrays = list(data) if multiscale else [data]
        return cls(
            arrays,
            downsample_factors=downsample_factors,
            channel_axis=channel_axis,
            rgb=bool(rgb),
            normalization=normalization,
            **kwargs,
        )


def _block_mean(win: np.ndarray, r: int) -> np.ndarray:
    """``(C, h, w)`` -> ``(C, ceil(h/r), ceil(w/r))`` means over the in-image part of each block."""
    c, h, w = win.shape
    hy, hx = -(-h // r), -(-w // r)
    if h % r or w % r:
        pad = np.zeros((c, hy * r, hx * r), dtype=np.float32)
        pad[:, :h, :w] = win
        cy = np.minimum(r, h - np.arange(hy) * r).astype(np.float32)
        cx = np.minimum(r, w - np.arange(hx) * r).astype(np.float32)
        return pad.reshape(c, hy, r, hx, r).sum(axis=(2, 4)) / np.outer(cy, cx)
    return win.reshape(c, hy, r, hx, r).mean(axis=(2, 4), dtype=np.float32)


# -------------------------------------------------------------------------------- open_image


def _ome_multiscales(attrs: dict) -> list | None:
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):  # OME-Zarr 0.5 (zarr v3)
        ms = attrs["ome"].get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def _source_from_group(group: Any, **kw: Any) -> PyramidSource:
    attrs = dict(group.attrs)
    ms = _ome_multiscales(attrs)
    if ms is not None:
        m = ms[0]
        paths = [d["path"] for d in m["datasets"]]
        arrays = [group[p] for p in paths]
        axes = None
        if "axes" in m and kw.get("channel_axis") is None and not kw.get("rgb"):
            names = [a["name"] if isinstance(a, dict) else str(a) for a in m["axes"]]
            axes = "".join(n[0].lower() if n.lower() in ("c", "y", "x") else "q" for n in names)
            if any(
                n.lower() not in ("c", "y", "x") and s != 1 for n, s in zip(names, arrays[0].shape)
            ):
                raise InputError(
                    f"image: expected a 2-D OME-Zarr (t, z of size 1), got axes {names} "
                    f"with shape {tuple(arrays[0].shape)}"
                )
        factors = None
        scales = []
        for d in m["datasets"]:
            sc = [
                t.get("scale")
                for t in d.get("coordinateTransformations", [])
                if t.get("type") == "scale"
            ]
            scales.append(sc[0] if sc else None)
        if all(s is not None for s in scales):
            factors = [list(s) for s in scales]
        return PyramidSource(arrays, downsample_factors=factors, axes=axes, **kw)
    # plain group: arrays named 0, 1, 2, ... form a pyramid
    names = sorted(
        (k for k in group.array_keys()),
        key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k),
    )
    if not names:
        raise InputError(
            f"path: expected a zarr group with arrays or OME-Zarr multiscales, got {group}"
        )
    digit = [k for k in names if k.isdigit()]
    arrays = [group[k] for k in (digit or names[:1])]
    return PyramidSource(arrays, **kw)


def _open_tiff(path: Path, **kw: Any) -> PyramidSource:
    import tifffile
    import zarr

    tf = tifffile.TiffFile(str(path))
    series = tf.series[0]
    tiff_axes = series.axes.upper()
    axes = "".join(
        "c" if a in ("C", "S") else ("y" if a == "Y" else ("x" if a == "X" else "q"))
        for a in tiff_axes
    )
    bad = [(a, s) for a, s in zip(tiff_axes, series.shape) if a not in "CSYX" and s != 1]
    if bad:
        tf.close()
        raise InputError(
            f"image: expected a 2-D TIFF (optionally with channels), got axes {tiff_axes} shape {series.shape}"
        )
    if axes.count("c") > 1:
        tf.close()
        raise InputError(f"image: expected at most one channel axis, got TIFF axes {tiff_axes}")
    rgb = "S" in tiff_axes and tiff_axes.endswith("S")
    if kw.get("channel_axis") is None and "rgb" not in kw:
        kw["rgb"] = rgb
    nbytes = int(np.prod(series.shape)) * np.dtype(series.dtype).itemsize
    if nbytes <= TIFF_EAGER_BYTES:
        arrays = [lv.asarray() for lv in series.levels]
        tf.close()
        keep = None
    else:
        store = series.aszarr()
        z = zarr.open(store, mode="r")
        arrays = [z[str(i)] for i in range(len(series.levels))] if hasattr(z, "array_keys") else [z]
        keep = (tf, store)
    src = PyramidSource(
        arrays,
        axes=axes if kw.get("channel_axis") is None else None,
        **{k: v for k, v in kw.items() if not (k == "channel_axis" and v is None)},
    )
    if keep is not None:
        src._keepalive.append(keep)
    return src


def open_image(path_or_array: Any, **kwargs: Any) -> PyramidSource:
    """Open an image as a :class:`PyramidSource`.

    Accepts an OME-Zarr / zarr group (v2 or v3, multiscales metadata or arrays named
    ``0, 1, ...``), a zarr array, a (pyramidal) TIFF (lazy via ``tifffile``'s zarr store for
    files over 128 MB), a ``.npy`` file (memory-mapped), a PNG/JPEG/BMP/GIF/WebP picture (read
    as napari reads it), a numpy/dask/zarr array, a list of
    arrays (pyramid), or an existing :class:`PyramidSource` (returned as is). Keyword
    arguments go to :class:`PyramidSource` (``channel_axis``, ``rgb``, ``normalization`` ...).
    """
    if isinstance(path_or_array, PyramidSource):
        return path_or_array
    if isinstance(path_or_array, (str, os.PathLike)):
        try:
            return _open_path(Path(path_or_array), **kwargs)
        except InputError as err:
            if str(path_or_array) in str(err):
                raise
            detail = str(err).removeprefix("image: ")
            raise InputError(f"image {str(path_or_array)!r}: {detail}") from None
    if hasattr(path_or_array, "array_keys"):  # zarr group object
        return _source_from_group(path_or_array, **kwargs)
    return PyramidSource(path_or_array, **kwargs)


def _open_path(path: Path, **kwargs: Any) -> PyramidSource:
    """:func:`open_image` of a file or folder."""
    if not path.exists():
        raise InputError(
            f"path: expected an existing image file or folder, got {str(path)!r} (not found)"
        )
    name = path.name.lower()
    if name.endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            raise InputError(
                f"image {str(path)!r}: cannot read this .npy file ({err}); it is truncated "
                "or damaged - copy it again or re-save it with numpy.save"
            ) from None
        return _named(PyramidSource([array], **kwargs), path)
    if name.endswith((".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi", ".scn")):
        try:
            return _named(_open_tiff(path, **kwargs), path)
        except InputError:
            raise
        except Exception as err:  # tifffile raises many types for damaged files
            raise InputError(
                f"image {str(path)!r}: cannot read this TIFF ({type(err).__name__}: {err}); it "
                "is damaged or not a TIFF"
            ) from None
    if is_picture(path):
        return _named(PyramidSource([read_picture(path)], **kwargs), path)
    if path.is_dir() or name.endswith(".zarr"):
        import zarr

        try:
            z = zarr.open(str(path), mode="r")
        except Exception as e:  # zarr raises several types for non-zarr folders
            raise InputError(
                f"path: expected a zarr/OME-Zarr folder, got {str(path)!r} ({e})"
            ) from e
        if hasattr(z, "array_keys"):
            return _named(_source_from_group(z, **kwargs), path)
        return _named(PyramidSource([z], **kwargs), path)
    if name.endswith(".npz"):
        raise InputError(
            f"path: expected .npy (not .npz), a TIFF, a PNG/JPEG or a zarr folder, got "
            f"{str(path)!r}"
        )
    try:  # other formats: let tifffile try (it detects TIFF by content)
        return _named(_open_tiff(path, **kwargs), path)
    except Exception as e:
        raise InputError(
            f"path: expected an OME-Zarr/zarr folder, a TIFF, a .npy file or a PNG/JPEG "
            f"picture, got {str(path)!r}"
        ) from e


def _named(source: PyramidSource, path: Path) -> PyramidSource:
    source.origin = str(Path(path).absolute())
    return source


def input_fingerprint(source: PyramidSource, windows: int = 5, window: int = 64,
                      whole_pixels: int = 1 << 20) -> dict[str, Any]:
    """A cheap identity of an image's pixels: shape, channels, dtype and a content hash.

    The hash covers the raw values of the coarsest native level if it has at most
    ``whole_pixels`` pixels (for a single-level image up to 1 Mpx: every pixel), and
    ``windows × windows`` windows of ``window²`` level-0 pixels on a regular grid (aligned to
    the array's chunks, so each window reads about one chunk). Two different images of the same
    shape get different fingerprints unless they agree on every sampled pixel. Used to refuse
    resuming a prediction store onto another image; independent of the file's name or location.
    """
    digest = hashlib.sha256()
    coarse = max(source._levels, key=lambda lv: lv.factor)
    if coarse.shape[0] * coarse.shape[1] <= whole_pixels:
        digest.update(np.ascontiguousarray(coarse.read(0, coarse.shape[0], 0, coarse.shape[1])).tobytes())
    level = source._levels[0]
    (height, width), chunks = level.shape, level.chunks
    for fy, fx in itertools.product(np.linspace(0, 1, windows), repeat=2):
        y = min(int(fy * max(height - window, 0)), max(height - window, 0))
        x = min(int(fx * max(width - window, 0)), max(width - window, 0))
        if chunks is not None:  # start on a chunk corner: one chunk read per window
            y, x = y // chunks[0] * chunks[0], x // chunks[1] * chunks[1]
        win = level.read(y, min(y + window, height), x, min(x + window, width))
        digest.update(f"{y},{x}".encode())
        digest.update(np.ascontiguousarray(win).tobytes())
    return {
        "shape": [int(v) for v in source.shape],
        "channels": int(source.channels),
        "dtype": str(np.dtype(source.dtype)),
        "pixels_sha256": digest.hexdigest()[:32],
    }
