"""Simulated paint strokes: what a user paints, drawn from a ground truth (tests, benchmarks).

A stroke is a short random walk with persistent direction inside one class region, painted
with a round brush and clipped to that region (a careful user stays inside the structure).
Deterministic per ``seed``; the same strokes can be given to any tool being compared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_muvit.errors import InputError

__all__ = ["simulate_strokes"]


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy * yy + xx * xx <= r * r + r  # a slightly fuller disk than the Euclidean one


def simulate_strokes(
    truth: np.ndarray,
    classes: Sequence[int] | None = None,
    strokes_per_class: int = 6,
    length: int = 40,
    brush_radius: int = 2,
    seed: int = 0,
    margin: int = 2,
) -> np.ndarray:
    """Sparse napari labels with ``strokes_per_class`` strokes in each class region.

    Parameters
    ----------
    truth
        ``(Y, X)`` integer ground truth.
    classes
        Truth values to paint (default: all values present). Class ``v`` is painted with label
        ``v + 1`` so that 0 stays "not annotated" (napari's convention).
    length
        Steps of each random walk (pixels); the walk stops early at the class border.
    brush_radius
        Radius of the round brush (2: a 5-pixel wide stroke).
    margin
        Stroke centres keep this distance to other classes (eroded region), like a user who
        does not paint on the boundary.
    """
    truth = np.asarray(truth)
    if truth.ndim != 2:
        raise InputError(f"truth: expected a 2-D label image, got shape {truth.shape}")
    rng = np.random.default_rng(seed)
    values = np.unique(truth) if classes is None else np.asarray(list(classes))
    out = np.zeros(truth.shape, np.int32)
    disk = _disk(brush_radius)
    r = int(brush_radius)
    for v in values:
        region = truth == v
        inner = _erode(region, margin) if margin > 0 else region
        ys, xs = np.nonzero(inner if inner.any() else region)
        if ys.size == 0:
            continue
        for _ in range(int(strokes_per_class)):
            i = int(rng.integers(ys.size))
            y, x = float(ys[i]), float(xs[i])
            angle = rng.uniform(0, 2 * np.pi)
            path = []
            for _ in range(int(length)):
                iy, ix = int(round(y)), int(round(x))
                if not (0 <= iy < truth.shape[0] and 0 <= ix < truth.shape[1]) or not inner[iy, ix]:
                    break
                path.append((iy, ix))
                angle += rng.normal(0.0, 0.25)
                y += np.sin(angle)
                x += np.cos(angle)
            for iy, ix in path:
                y0, y1 = max(iy - r, 0), min(iy + r + 1, truth.shape[0])
                x0, x1 = max(ix - r, 0), min(ix + r + 1, truth.shape[1])
                d = disk[y0 - iy + r : y1 - iy + r, x0 - ix + r : x1 - ix + r]
                sub = out[y0:y1, x0:x1]
                sub[d & region[y0:y1, x0:x1]] = int(v) + 1
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a square of side ``2·radius + 1`` (separable min filter)."""
    m = mask.copy()
    for axis in (0, 1):
        for _ in range(int(radius)):
            shifted_a = np.roll(m, 1, axis=axis)
            shifted_b = np.roll(m, -1, axis=axis)
            edge_a = [slice(None)] * 2
            edge_a[axis] = 0
            edge_b = [slice(None)] * 2
            edge_b[axis] = -1
            shifted_a[tuple(edge_a)] = False
            shifted_b[tuple(edge_b)] = False
            m = m & shifted_a & shifted_b
    return m
