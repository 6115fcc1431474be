"""Point annotations: reading CSV files and presenting points as a (virtual) label image.

Two CSV layouts are read (:func:`read_points`):

* ``y,x[,class]`` — one point per row in level-0 pixel coordinates, ``class`` an integer >= 1
  (without a ``class`` column every point is class 1);
* the file napari writes for a Points layer (``File > Save Selected Layers``):
  ``index,axis-0,axis-1[,feature columns]``; a ``class`` feature may hold integers >= 1 or
  class names (mapped to 1..K in the order of ``class_names``, else alphabetically).

Coordinates follow napari: pixel ``i`` has its centre at ``i``, so a point at ``(y, x)`` lies
in the image when ``-0.5 <= y < Y - 0.5`` (same for ``x``).

:class:`PointRaster` shows points plus an annotated region as an integer label image
(0 = not annotated, 1 = annotated without a point, ``c + 1`` = a point of class ``c``) that is
only rasterised block by block when read, so the training engine's label index and crop sampler
work on point annotations of gigapixel images unchanged.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from napari_muvit.errors import InputError
from napari_muvit.files import replace_file

__all__ = [
    "PointRaster",
    "PointTable",
    "parse_region",
    "points_from_labels",
    "read_points",
    "write_points_csv",
]


@dataclass
class PointTable:
    """Points in level-0 pixel coordinates with integer classes (>= 1).

    ``class_names`` maps class ids to names when the file named them (napari ``class``
    feature holding text); empty otherwise.
    """

    yx: np.ndarray  # (N, 2) float64
    classes: np.ndarray  # (N,) int64, >= 1
    class_names: dict[int, str] = field(default_factory=dict)
    source: str = "points"

    def __len__(self) -> int:
        return len(self.yx)

    @property
    def class_ids(self) -> list[int]:
        """The distinct class ids, ascending."""
        return sorted({int(c) for c in self.classes})

    def check_inside(self, shape: Sequence[int]) -> None:
        """Raise a one-line :class:`InputError` if a point lies outside an image of ``shape``."""
        h, w = int(shape[0]), int(shape[1])
        bad = ~(
            (self.yx[:, 0] >= -0.5) & (self.yx[:, 0] < h - 0.5)
            & (self.yx[:, 1] >= -0.5) & (self.yx[:, 1] < w - 0.5)
        )
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            y, x = self.yx[i]
            raise InputError(
                f"{self.source}: point {i + 1} at (y={y:g}, x={x:g}) lies outside the image of "
                f"shape {(h, w)} ({int(bad.sum())} point(s) outside); wrong image or axis order?"
            )

    def in_region(self, region: Any) -> np.ndarray:
        """Boolean mask of the points whose pixel lies in ``region`` ``[[y0, x0], [y1, x1]]``."""
        (y0, x0), (y1, x1) = np.asarray(region, dtype=np.float64)
        py, px = np.rint(self.yx[:, 0]), np.rint(self.yx[:, 1])
        return (py >= y0) & (py < y1) & (px >= x0) & (px < x1)


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise InputError(f"points file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot read it as a CSV file ({err})") from None
    if not rows:
        raise InputError(f"{path}: the file is empty (expected a header y,x[,class] and points)")
    header = [c.strip().lower() for c in rows[0]]
    return header, rows[1:]


def read_points(
    path: str | os.PathLike[str],
    image_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> PointTable:
    """Read a points CSV (``y,x[,class]`` or napari's Points CSV); see the module docstring.

    ``image_shape`` (Y, X): refuse points outside the image. ``class_names``: names for text
    classes, in class-id order (``class_names[0]`` is class 1). Every problem is a one-line
    :class:`InputError` naming the file.
    """
    path = Path(path)
    header, rows = _read_rows(path)
    if "y" in header and "x" in header:
        iy, ix = header.index("y"), header.index("x")
    elif "axis-0" in header and "axis-1" in header:
        axes = [c for c in header if c.startswith("axis-")]
        if len(axes) != 2:
            raise InputError(
                f"{path}: expected 2-D points (axis-0, axis-1), got {len(axes)} axes {axes}"
            )
        iy, ix = header.index("axis-0"), header.index("axis-1")
    else:
        raise InputError(
            f"{path}: expected a header with columns y,x[,class] or napari's axis-0,axis-1, "
            f"got {','.join(header) or '(nothing)'}"
        )
    if not rows:
        raise InputError(f"{path}: no points (only a header)")
    ic = header.index("class") if "class" in header else None
    yx = np.empty((len(rows), 2), dtype=np.float64)
    raw_cls: list[str] = []
    for n, row in enumerate(rows):
        line = n + 2
        try:
            yx[n] = float(row[iy]), float(row[ix])
        except (ValueError, IndexError):
            raise InputError(
                f"{path}: line {line}: expected numbers for y and x, got {row}"
            ) from None
        if not np.isfinite(yx[n]).all():
            raise InputError(f"{path}: line {line}: coordinates must be finite, got {row}")
        if ic is not None:
            try:
                raw_cls.append(row[ic].strip())
            except IndexError:
                raise InputError(f"{path}: line {line}: missing the class column") from None
    classes, names = _parse_classes(path, raw_cls, len(rows), class_names)
    table = PointTable(yx, classes, names, str(path))
    if image_shape is not None:
        table.check_inside(image_shape)
    return table


def _parse_classes(
    path: Path, raw: list[str], n: int, class_names: Sequence[str] | None
) -> tuple[np.ndarray, dict[int, str]]:
    if not raw:
        return np.ones(n, dtype=np.int64), {}
    numeric = []
    for value in raw:
        try:
            f = float(value)
        except ValueError:
            break
        numeric.append(f)
    if len(numeric) == len(raw):
        cls = np.asarray(numeric)
        bad = (cls < 1) | (cls != np.round(cls))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"{path}: line {i + 2}: class {raw[i]!r}; classes are integers >= 1 "
                "(0 would mean 'no point')"
            )
        return cls.astype(np.int64), {}
    # text classes (a napari feature holding names)
    if any(v == "" for v in raw):
        i = raw.index("")
        raise InputError(f"{path}: line {i + 2}: empty class")
    known = list(class_names) if class_names is not None else sorted(set(raw))
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"{path}: unknown class name(s) {unknown}; known: {known}")
    ids = {name: k + 1 for k, name in enumerate(known)}
    return np.asarray([ids[v] for v in raw], dtype=np.int64), {k: n for n, k in ids.items()}


def parse_region(text: str | Sequence[float] | None, shape: Sequence[int]) -> np.ndarray:
    """``"y0,x0,y1,x1"`` (or a bbox) -> ``[[y0, x0], [y1, x1]]`` clipped to the image;
    ``None`` -> the whole image."""
    h, w = int(shape[0]), int(shape[1])
    if text is None:
        return np.array([[0, 0], [h, w]], dtype=np.int64)
    if isinstance(text, str):
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
    else:
        values = list(np.asarray(text, dtype=np.float64).reshape(-1))
    if len(values) != 4:
        raise InputError(f"--region: expected four numbers y0,x0,y1,x1, got {text!r}")
    y0, x0, y1, x1 = (int(round(v)) for v in values)
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if y1 <= y0 or x1 <= x0:
        raise InputError(f"--region: {text!r} does not overlap the image of shape {(h, w)}")
    return np.array([[y0, x0], [y1, x1]], dtype=np.int64)


class PointRaster:
    """A read-only integer label image made of points and an annotated region.

    Values: 0 = not annotated, 1 = annotated (no point), ``c + 1`` = a point of class ``c``
    (at the pixel nearest to it). Slicing rasterises only the requested block, so it behaves
    like a numpy/zarr label array of ``shape`` without ever holding one.
    """

    ndim = 2
    dtype = np.dtype(np.int32)

    def __init__(
        self, table: PointTable, shape: Sequence[int], region: Any = None, exclude: Any = None
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        table.check_inside(self.shape)
        self.region = parse_region(region, self.shape)
        # a held-out (validation) box: neither annotated nor holding points
        self.exclude = None if exclude is None else parse_region(
            np.asarray(exclude, dtype=np.float64).reshape(-1), self.shape
        )
        if self.exclude is not None:
            keep = ~table.in_region(self.exclude)
            table = PointTable(table.yx[keep], table.classes[keep], table.class_names, table.source)
        self.table = table
        pix = np.rint(table.yx).astype(np.int64)
        self._pix = np.clip(pix, 0, np.array(self.shape) - 1)
        self._values = table.classes.astype(np.int64) + 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key, slice(None))
        if len(key) != 2 or not all(isinstance(k, slice) for k in key):
            raise IndexError("PointRaster supports 2-D slicing only, e.g. raster[y0:y1, x0:x1]")
        (y0, y1, sy), (x0, x1, sx) = (k.indices(n) for k, n in zip(key, self.shape))
        if sy != 1 or sx != 1:
            raise IndexError("PointRaster supports unit steps only")
        y1, x1 = max(y1, y0), max(x1, x0)
        out = np.zeros((y1 - y0, x1 - x0), dtype=self.dtype)
        (ry0, rx0), (ry1, rx1) = self.region
        a0, a1 = max(ry0, y0), min(ry1, y1)
        b0, b1 = max(rx0, x0), min(rx1, x1)
        if a1 > a0 and b1 > b0:
            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = 1
        py, px = self._pix[:, 0], self._pix[:, 1]
        sel = (py >= y0) & (py < y1) & (px >= x0) & (px < x1)
        out[py[sel] - y0, px[sel] - x0] = self._values[sel]
        if self.exclude is not None:
            (ey0, ex0), (ey1, ex1) = self.exclude
            a0, a1 = max(ey0, y0), min(ey1, y1)
            b0, b1 = max(ex0, x0), min(ex1, x1)
            if a1 > a0 and b1 > b0:
                out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = 0
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:, :]
        return arr if dtype is None else arr.astype(dtype)


def points_from_labels(instances: Any, classes: Any = None) -> PointTable:
    """Centroids of the objects of an instance label image (0 = background) as points.

    ``classes``: an optional semantic label image of the same shape; each object's class is the
    most frequent non-zero value under it (default: class 1). Useful to turn a ground-truth
    mask (e.g. StarDist/Cellpose training data) into a points file.
    """
    from scipy import ndimage

    inst = np.asarray(instances)
    if inst.ndim != 2 or inst.dtype.kind not in "iub":
        raise InputError(
            f"instances: expected a 2-D integer label image, got {inst.dtype} {inst.shape}"
        )
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return PointTable(np.zeros((0, 2)), np.zeros(0, np.int64), {}, "labels")
    yx = np.asarray(ndimage.center_of_mass(np.ones_like(inst, dtype=np.float64), inst, ids))
    if classes is None:
        cls = np.ones(len(ids), np.int64)
    else:
        sem = np.asarray(classes).astype(np.int64)
        if sem.shape != inst.shape:
            raise InputError(f"classes: expected shape {inst.shape}, got {sem.shape}")
        cls = np.zeros(len(ids), np.int64)
        objects = ndimage.find_objects(inst)
        for k, i in enumerate(ids):
            sl = objects[i - 1]
            vals = sem[sl][(inst[sl] == i) & (sem[sl] > 0)]
            cls[k] = np.bincount(vals).argmax() if vals.size else 1
    return PointTable(yx.reshape(-1, 2), cls, {}, "labels")


def write_points_csv(path: str | os.PathLike[str], table: PointTable | dict) -> Path:
    """Write ``y,x,class`` (``+ score`` for prediction tables) atomically (temp file + rename)."""
    path = Path(path)
    if isinstance(table, PointTable):
        cols = {"y": table.yx[:, 0], "x": table.yx[:, 1], "class": table.classes}
    else:
        cols = {k: np.asarray(table[k]) for k in ("y", "x", "class", "score") if k in table}
    names = list(cols)
    def write(handle: BinaryIO) -> None:
        fh = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        fh.write(",".join(names) + "\n")
        for row in zip(*(cols[n] for n in names)):
            fh.write(",".join(_cell(n, v) for n, v in zip(names, row)) + "\n")
        fh.flush()
        fh.detach()  # replace_file fsyncs and closes the handle itself

    return replace_file(path, write)


def _cell(column: str, value: Any) -> str:
    """CSV text of one value: integer classes, 4-digit scores, 2-digit (1/100 px) coordinates."""
    if column == "class":
        return str(int(value))
    return f"{float(value):.4f}" if column == "score" else f"{float(value):.2f}"
