"""Intensity normalisation shared by training and prediction.

The normalisation is stored inside model checkpoints (``to_dict``/``from_dict``) so that a model
sees the same intensities at prediction time as during training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_muvit.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from napari_muvit.data.pyramid import PyramidSource

__all__ = ["Normalization", "compute_normalization", "normalization_for_image"]

_KINDS = ("percentile", "divide", "none")


def _as_param(v: Any) -> float | np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 0:
        return float(a)
    return a.reshape(-1)


@dataclass
class Normalization:
    """Affine intensity normalisation ``(x - low) / (high - low)`` as float32.

    Attributes
    ----------
    kind
        ``"percentile"`` (``low``/``high`` are the 1 and 99.8 percentiles, CSBDeep style, no
        clipping), ``"divide"`` (``low = 0``, ``high`` = e.g. 255 for uint8 RGB) or ``"none"``
        (identity, only cast to float32).
    low, high
        Scalars, or one value per channel (length ``C``), applied along axis ``-3`` of
        ``(..., C, Y, X)`` arrays.
    pmin, pmax
        Percentiles used by ``kind="percentile"`` (kept for provenance).
    """

    kind: str = "percentile"
    low: float | np.ndarray = 0.0
    high: float | np.ndarray = 1.0
    pmin: float = 1.0
    pmax: float = 99.8
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InputError(f"normalization kind: expected one of {_KINDS}, got {self.kind!r}")
        self.low = _as_param(self.low)
        self.high = _as_param(self.high)
        if np.shape(self.low) != np.shape(self.high) and np.ndim(self.low) and np.ndim(self.high):
            raise InputError(
                f"normalization low/high: expected the same number of channels, got "
                f"{np.shape(self.low)} and {np.shape(self.high)}"
            )

    def _params(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        low = np.asarray(self.low, dtype=np.float32)
        high = np.asarray(self.high, dtype=np.float32)
        # guard against flat images: a zero range would divide by zero
        rng = np.where(np.abs(high - low) < 1e-12, np.float32(1.0), high - low).astype(np.float32)
        if low.ndim or rng.ndim:
            shape = (-1,) + (1,) * min(2, max(ndim - 1, 0))
            low = np.broadcast_to(low, rng.shape).reshape(shape)
            rng = rng.reshape(shape)
        return low, rng

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """Normalise ``arr`` (any dtype) to float32. Per-channel parameters need ``(..., C, Y, X)``."""
        x = np.asarray(arr, dtype=np.float32)
        if self.kind == "none":
            return x.copy() if x is arr else x
        low, rng = self._params(x.ndim)
        if low.ndim and x.ndim >= 3 and x.shape[-3] != low.shape[0] and low.shape[0] != 1:
            raise InputError(
                f"normalization: expected {low.shape[0]} channels on axis -3, got shape {x.shape}"
            )
        return ((x - low) / rng).astype(np.float32, copy=False)

    def invert(self, arr: np.ndarray) -> np.ndarray:
        """Map normalised values back to raw intensities (for display, MAE reconstructions)."""
        x = np.asarray(arr, dtype=np.float32)
        if self.kind == "none":
            return x
        low, rng = self._params(x.ndim)
        return (x * rng + low).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        """JSON/YAML-safe dict (plain floats and lists)."""

        def plain(v: Any) -> Any:
            a = np.asarray(v, dtype=np.float64)
            return float(a) if a.ndim == 0 else [float(t) for t in a.reshape(-1)]

        d = {
            "kind": self.kind,
            "low": plain(self.low),
            "high": plain(self.high),
            "pmin": float(self.pmin),
            "pmax": float(self.pmax),
        }
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> Normalization:
        """Inverse of :meth:`to_dict`; ``None`` gives ``kind="none"``."""
        if d is None:
            return cls(kind="none")
        if isinstance(d, Normalization):
            return d
        if not isinstance(d, dict) or "kind" not in d:
            raise InputError(f"normalization: expected a dict with a 'kind' key, got {d!r}")
        return cls(
            kind=d["kind"],
            low=d.get("low", 0.0),
            high=d.get("high", 1.0),
            pmin=float(d.get("pmin", 1.0)),
            pmax=float(d.get("pmax", 99.8)),
            extra=dict(d.get("extra", {})),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Normalization):
            return NotImplemented
        return self.to_dict() == other.to_dict()


def percentile_normalization(
    data: np.ndarray, pmin: float = 1.0, pmax: float = 99.8, channel_axis: int | None = 0
) -> Normalization:
    """Percentile normalisation of sample data: per channel along ``channel_axis`` (one
    channel gives scalars), or over everything with ``channel_axis=None``."""
    a = np.asarray(data)
    if channel_axis is None:
        flat = a.reshape(-1).astype(np.float64)
        lo, hi = np.percentile(flat, [pmin, pmax])
        return Normalization("percentile", float(lo), float(hi), pmin, pmax)
    a = np.moveaxis(a, channel_axis, 0).reshape(a.shape[channel_axis], -1).astype(np.float64)
    lo, hi = np.percentile(a, [pmin, pmax], axis=1)
    if a.shape[0] == 1:
        return Normalization("percentile", float(lo[0]), float(hi[0]), pmin, pmax)
    return Normalization("percentile", lo, hi, pmin, pmax)


def compute_normalization(
    source: PyramidSource, pmin: float = 1.0, pmax: float = 99.8, max_pixels: int = 4_000_000
) -> Normalization:
    """Normalisation for ``source``, computed once from a coarse view (≤ ``max_pixels`` read).

    * uint8 RGB(A) images: divide by 255 (the paper's KPIS setting).
    * otherwise: per-channel ``pmin``/``pmax`` percentiles (the paper's 1 / 99.8) of the
      coarsest-enough pyramid level, see :meth:`PyramidSource.sample_for_statistics`.
    """
    if source.rgb and np.dtype(source.dtype) == np.uint8:
        return Normalization("divide", 0.0, 255.0)
    sample = source.sample_for_statistics(max_pixels=max_pixels)  # (C, N) raw values
    return percentile_normalization(sample, pmin, pmax, channel_axis=0)


# ------------------------------------------------------------------ a model's normalisation

#: ``normalization.extra["mode"]`` of a model: how its stored percentile range is applied
FIXED = "fixed"  # the stored low/high (its training images' percentiles) for every image
PER_IMAGE = "per_image"  # each image's own pmin/pmax percentiles (robust to any bit depth)
#: an image whose percentile span is within this factor of the model's fits its fixed range
SPAN_TOLERANCE = 4.0


def normalization_for_image(
    model_normalization: dict | Normalization, source: PyramidSource
) -> tuple[Normalization, str | None]:
    """How to normalise ``source`` for a model; returns ``(normalization, note)``.

    A model's ``normalization`` (its config) is the percentile range of its training images.
    ``extra["mode"]`` says how to apply it (:data:`FIXED` when absent, as every model so far
    was trained that way):

    * :data:`PER_IMAGE`: the image's own ``pmin``/``pmax`` percentiles, for any input.
    * :data:`FIXED`: the stored ``low``/``high`` for every image, so that all images of one
      acquisition get the same mapping. When the image's own percentile span differs from
      the model's by more than :data:`SPAN_TOLERANCE`× the range cannot fit, then:
      an integer image wider than 8 bits for a model trained on 8-bit intensities (range
      within 0-255), or a float image in [0, 1] for such a model, gets the range scaled by
      the bit-depth ratio (×257 for uint16: exact for ``uint8 × 257`` data) if that fits;
      otherwise the stored range is kept and ``note`` warns that the labels may be wrong.

    ``note`` is a one-line message (``None`` when nothing needs saying).
    """
    norm = Normalization.from_dict(model_normalization)
    if norm.kind != "percentile":
        return norm, None
    mode = norm.extra.get("mode", FIXED)
    if mode == PER_IMAGE:
        own = compute_normalization(source, norm.pmin, norm.pmax)
        return Normalization("percentile", own.low, own.high, norm.pmin, norm.pmax,
                             dict(norm.extra)), None
    if mode != FIXED:
        raise InputError(
            f"model normalization mode: expected {FIXED!r} or {PER_IMAGE!r}, got {mode!r}"
        )
    own = source.normalization  # the image's own percentiles (computed once, cached)
    if own.kind != "percentile" or _span_fits(own, norm, 1.0):
        return norm, None
    name = source.describe() if hasattr(source, "describe") else "the image"
    dtype = np.dtype(source.dtype)
    shown = f"{_range_text(own.low, own.high)} at the {norm.pmin:g}-{norm.pmax:g} % percentiles"
    for scale in _bit_depth_scales(dtype, norm):
        if _span_fits(own, norm, scale):
            extra = {**norm.extra, "rescaled_by": scale}
            scaled = Normalization("percentile", np.asarray(norm.low) * scale,
                                   np.asarray(norm.high) * scale, norm.pmin, norm.pmax, extra)
            return scaled, (
                f"{name} is {dtype} ({shown}) but the model was trained on 8-bit intensities "
                f"(fixed range {_range_text(norm.low, norm.high)}); its range is scaled by "
                f"{scale:.6g} to {_range_text(scaled.low, scaled.high)}"
            )
    return norm, (
        f"{name} ({dtype}, {shown}) does not match the model's fixed intensity range "
        f"{_range_text(norm.low, norm.high)}; labels may be wrong - convert the image to the "
        "training data's bit depth/range or fine-tune a model on such images"
    )


def _span_fits(own: Normalization, model: Normalization, scale: float) -> bool:
    """The image's percentile span is within SPAN_TOLERANCE× of the (scaled) model span, and
    its low end is not beyond the model's high end (all channels)."""
    own_span = np.abs(np.asarray(own.high, np.float64) - np.asarray(own.low, np.float64))
    span = np.abs(np.asarray(model.high, np.float64) - np.asarray(model.low, np.float64)) * scale
    if np.all(own_span < 1e-12):  # a flat image: any range maps it to one value
        return True
    ratio = own_span / np.maximum(span, 1e-12)
    below_top = np.asarray(own.low, np.float64) < np.asarray(model.high, np.float64) * scale
    return bool(np.all((ratio <= SPAN_TOLERANCE) & (ratio >= 1 / SPAN_TOLERANCE) & below_top))


def _bit_depth_scales(dtype: np.dtype, model: Normalization) -> list[float]:
    """Bit-depth ratios worth trying for a model trained on 8-bit intensities."""
    low, high = np.asarray(model.low, np.float64), np.asarray(model.high, np.float64)
    if not (np.all(low >= 0) and np.all(high <= 255)):
        return []
    if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max > 255:
        return [np.iinfo(dtype).max / 255.0]  # uint16: 257 (the usual 8 → 16 bit scaling)
    if np.issubdtype(dtype, np.floating):
        return [1 / 255.0]  # images scaled to [0, 1]
    return []


def _range_text(low: Any, high: Any) -> str:
    lo, hi = np.atleast_1d(np.asarray(low, np.float64)), np.atleast_1d(np.asarray(high, np.float64))
    return ", ".join(f"{a:.4g}-{b:.4g}" for a, b in zip(lo, hi))
