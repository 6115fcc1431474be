"""Write a prediction into the source OME-Zarr as ``SRC.ome.zarr/labels/NAME``.

The labels follow the OME-NGFF labels spec of the image's own version: NGFF 0.4 on zarr v2,
NGFF 0.5 on zarr v3. The writer is the engine's :class:`~napari_muvit.engine.sinks.ZarrSink`
(resumable, chunk by chunk), rooted at ``labels/NAME`` with a
:class:`~napari_muvit.engine.sinks.LevelLayout` taken from the image:

* **one dataset per image level**, with the image level's ``(y, x)`` shape and its
  ``coordinateTransformations`` (so the labels overlay the image in any NGFF viewer), and the
  image's axes; the channel axis (and every other non-spatial axis) has size 1. Level ``k`` is
  nearest-neighbour: its pixel ``(i, j)`` is level-0 pixel ``(i·fy, j·fx)``. The image's
  pyramid must have integer per-level factors, each a multiple of the previous (powers of two,
  as ome-zarr-py, bioformats2raw and our own stores write); other pyramids are refused.
* ``image-label`` with one colour and one ``{"label-value", "class"}`` property per class, and
  ``source: {"image": "../../"}``;
* ``NAME`` is appended to the ``labels`` group's list (the group is created if missing).

Nothing of the image changes: its arrays and metadata stay byte-identical (only files under
``labels/`` are created). The label group's ``napari_muvit`` attributes mark it as ours: a
name already used by other labels is refused, and ``overwrite`` only replaces labels we wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_muvit.engine.sinks import LevelLayout, read_store_info
from napari_muvit.errors import InputError
from napari_muvit.locks import advisory_lock

__all__ = [
    "DEFAULT_LABELS_NAME",
    "ome_image_of",
    "SourceLabels",
    "labels_layout",
    "prepare_source_labels",
    "register_source_labels",
]

DEFAULT_LABELS_NAME = "muvit"
LABELS_GROUP = "labels"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# distinct colours for classes without stored colours (label value 0 stays transparent)
_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


@dataclass(frozen=True)
class SourceLabels:
    """Where a prediction goes when it is written into its source OME-Zarr.

    Pass it as ``out=`` to :func:`napari_muvit.predict` (or use ``into_source=``).
    """

    image: Path
    name: str = DEFAULT_LABELS_NAME

    @property
    def path(self) -> Path:
        """The label image group: ``image/labels/name``."""
        return Path(self.image) / LABELS_GROUP / self.name


@dataclass(frozen=True)
class _ImageInfo:
    version: str
    zarr_format: int
    multiscale: dict[str, Any]
    axes: str
    shapes: list[tuple[int, ...]]


def _read_attrs(group_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """(zarr format, attributes) of the group stored in ``group_dir``; None if not a group."""
    try:
        if (group_dir / "zarr.json").is_file():
            meta = json.loads((group_dir / "zarr.json").read_text())
            if meta.get("node_type") != "group":
                return None
            return 3, dict(meta.get("attributes", {}))
        if (group_dir / ".zgroup").is_file():
            attrs_file = group_dir / ".zattrs"
            return 2, json.loads(attrs_file.read_text()) if attrs_file.is_file() else {}
    except (OSError, ValueError) as err:
        raise InputError(f"{str(group_dir)!r}: unreadable zarr metadata ({err})") from None
    return None


def _axis_letters(axes: list[Any]) -> str:
    """One letter per axis: ``y``, ``x``, ``c`` (channel), the name if it is one letter
    (``t``, ``z``), else ``q``."""
    letters = []
    for a in axes:
        name = str(a.get("name", "") if isinstance(a, dict) else a).lower()
        kind = a.get("type") if isinstance(a, dict) else None
        if kind == "channel":
            name = "c"
        letters.append(name if len(name) == 1 and name.isalpha() else "q")
    return "".join(letters)


def _describe_image(image: Path) -> _ImageInfo:
    """The image's NGFF version, zarr format, first multiscale, axis letters and level shapes."""
    import zarr

    found = _read_attrs(image)
    if found is None:
        raise InputError(
            f"into-source: {str(image)!r} is not a zarr group; --into-source needs an OME-Zarr image"
        )
    zarr_format, attrs = found
    if zarr_format == 3:
        ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else {}
        version = str(ome.get("version", ""))
        multiscales = ome.get("multiscales")
    else:
        multiscales = attrs.get("multiscales")
        version = str(multiscales[0].get("version", "")) if isinstance(multiscales, list) and multiscales else ""
    if not isinstance(multiscales, list) or not multiscales:
        raise InputError(
            f"into-source: {str(image)!r} has no OME-NGFF multiscales; pass the image group itself "
            "(e.g. SRC.ome.zarr/0 for a bioformats2raw store)"
        )
    if (zarr_format, version) not in ((2, "0.4"), (3, "0.5")):
        raise InputError(
            f"into-source: {str(image)!r} is OME-NGFF {version or '?'} on zarr v{zarr_format}; "
            "labels can be written into NGFF 0.4 (zarr v2) and 0.5 (zarr v3) images - use --out"
        )
    ms = multiscales[0]
    axes = _axis_letters(ms.get("axes", []))
    if "y" not in axes or "x" not in axes:
        raise InputError(f"into-source: {str(image)!r}: expected y and x axes, got {ms.get('axes')}")
    group = zarr.open_group(str(image), mode="r", zarr_format=zarr_format)
    shapes = [tuple(int(v) for v in group[d["path"]].shape) for d in ms["datasets"]]
    return _ImageInfo(version, zarr_format, ms, axes, shapes)


def _level_factors(info: _ImageInfo, image: Path) -> list[tuple[int, int]]:
    """Integer (fy, fx) of each image level relative to level 0 (nested), or InputError."""
    iy, ix = info.axes.index("y"), info.axes.index("x")
    y0, x0 = info.shapes[0][iy], info.shapes[0][ix]
    factors = [(1, 1)]
    for k in range(1, len(info.shapes)):
        pair = []
        for axis, full in ((iy, y0), (ix, x0)):
            prev_size, size = info.shapes[k - 1][axis], info.shapes[k][axis]
            # the factor to the previous level, rounded: 25 -> 12 is 2 (floor), 25 -> 13 too
            f = factors[-1][len(pair)] * max(1, round(prev_size / max(size, 1)))
            if size not in (full // f, -(-full // f)):
                raise InputError(
                    f"into-source: {str(image)!r} level {k} has shape {info.shapes[k]}, not an "
                    f"integer downsampling of level {k - 1} {info.shapes[k - 1]}; write the "
                    "labels to a separate store with --out"
                )
            pair.append(f)
        factors.append((pair[0], pair[1]))
    return factors


def label_colors(label_values: list[int], class_colors: list | None) -> list[dict[str, Any]]:
    """NGFF `colors` entries: the model's class colours, else a fixed palette (0 transparent)."""
    colors = []
    for i, value in enumerate(label_values):
        if class_colors is not None and i < len(class_colors):
            rgba = [float(c) for c in class_colors[i]]
            rgba = rgba + [1.0] if len(rgba) == 3 else rgba
            rgba_255 = [round(255 * c) if max(rgba) <= 1.0 else round(c) for c in rgba]
        elif value == 0:
            rgba_255 = [0, 0, 0, 0]
        else:
            rgba_255 = [*_PALETTE[(value - 1) % len(_PALETTE)], 255]
        colors.append({"label-value": int(value), "rgba": rgba_255})
    return colors


def labels_layout(
    image: Path,
    name: str,
    label_values: list[int],
    class_names: list[str] | None,
    class_colors: list | None = None,
) -> LevelLayout:
    """The :class:`LevelLayout` of ``image/labels/name``: the image's levels, axes, zarr format
    and the NGFF ``multiscales`` + ``image-label`` attributes of the image's version."""
    info = _describe_image(image)
    extra = [(a, n) for a, n in zip(info.axes, info.shapes[0]) if a not in "yxc" and n != 1]
    if extra:
        raise InputError(
            f"into-source: {str(image)!r} has axes {info.axes!r} of shape {info.shapes[0]}; "
            "labels are written for 2-D images (other axes of size 1) - use --out"
        )
    factors = _level_factors(info, image)
    iy, ix = info.axes.index("y"), info.axes.index("x")
    src = info.multiscale
    datasets = []
    for k, d in enumerate(src["datasets"]):
        entry: dict[str, Any] = {"path": str(k)}
        if "coordinateTransformations" in d:
            entry["coordinateTransformations"] = d["coordinateTransformations"]
        datasets.append(entry)
    multiscale: dict[str, Any] = {"name": name, "axes": src.get("axes"), "datasets": datasets}
    if "coordinateTransformations" in src:
        multiscale["coordinateTransformations"] = src["coordinateTransformations"]
    multiscale["type"] = "nearest"
    multiscale["metadata"] = {"method": "nearest neighbour (level-0 pixel i*f)"}
    properties = [
        {"label-value": int(v), **({"class": str(class_names[i])} if class_names and i < len(class_names) else {})}
        for i, v in enumerate(label_values)
    ]
    image_label: dict[str, Any] = {
        "colors": label_colors(label_values, class_colors),
        "properties": properties,
        "source": {"image": "../../"},
    }
    if info.zarr_format == 2:
        attrs = {
            "multiscales": [{"version": "0.4", **multiscale}],
            "image-label": {"version": "0.4", **image_label},
        }
    else:
        attrs = {"ome": {"version": "0.5", "multiscales": [multiscale], "image-label": image_label}}
    return LevelLayout(
        shapes=tuple((s[iy], s[ix]) for s in info.shapes),
        factors=tuple(factors),
        axes=info.axes,
        zarr_format=info.zarr_format,
        attrs=attrs,
    )


def ome_image_of(path: str | Path | None) -> Path | None:
    """``path`` if it is an OME-NGFF 0.4 (zarr v2) or 0.5 (zarr v3) image group labels can be
    written into (e.g. a napari layer's ``source.path``), else ``None``. Never raises."""
    if not path:
        return None
    image = Path(path).expanduser()
    try:
        if not image.is_dir():
            return None
        _describe_image(image)
    except (InputError, OSError, KeyError, ValueError, TypeError, AttributeError, IndexError):
        return None
    return image.absolute()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(
            f"labels name: expected letters, digits, '.', '_' or '-' (not starting with a "
            f"symbol), got {name!r}"
        )


def _check_writable(image: Path) -> None:
    probe = image / f".napari-muvit-write-test-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(
            f"into-source: {str(image)!r} is read-only ({err.strerror or err}); write the labels "
            "to a separate store with --out"
        ) from None


def prepare_source_labels(
    target: SourceLabels,
    image_shape: tuple[int, int],
    label_values: list[int],
    class_names: list[str] | None,
    class_colors: list | None = None,
) -> tuple[Path, LevelLayout]:
    """Check that ``target`` can be written and return its group path and layout.

    Raises :class:`InputError` (one line) for: not an NGFF 0.4/0.5 image, a pyramid without
    integer factors, a level-0 shape other than ``image_shape``, a read-only store, a bad name,
    or labels of that name not written by napari-muvit.
    """
    image = Path(target.image).expanduser().absolute()
    _check_name(target.name)
    layout = labels_layout(image, target.name, label_values, class_names, class_colors)
    if tuple(layout.shapes[0]) != tuple(int(v) for v in image_shape):
        raise InputError(
            f"into-source: {str(image)!r} level 0 is {layout.shapes[0]} (y, x) but the image read "
            f"for prediction is {tuple(image_shape)}"
        )
    _check_writable(image)
    labels_dir = image / LABELS_GROUP
    if labels_dir.exists():
        found = _read_attrs(labels_dir)
        if found is None:
            raise InputError(
                f"into-source: {str(labels_dir)!r} exists but is not a zarr group; "
                "refusing to write labels there"
            )
        if found[0] != layout.zarr_format:
            raise InputError(
                f"into-source: {str(labels_dir)!r} is zarr v{found[0]} inside a zarr "
                f"v{layout.zarr_format} image; refusing to mix formats"
            )
    path = image / LABELS_GROUP / target.name
    if (path.exists() or path.is_symlink()) and read_store_info(path) is None:
        if not (path.is_dir() and not path.is_symlink() and not any(path.iterdir())):
            raise InputError(
                f"into-source: labels {target.name!r} in {str(image)!r} already exist and were not "
                "written by napari-muvit; choose another --labels-name"
            )
    if not labels_dir.exists():
        with advisory_lock(labels_dir, "OME-Zarr labels group"):
            if _read_attrs(labels_dir) is None:
                _create_labels_group(labels_dir, layout.zarr_format)
    return path, layout


def _create_labels_group(labels_dir: Path, zarr_format: int) -> None:
    """An empty ``labels`` group of the image's format (no label listed yet)."""
    import zarr

    attrs = {"labels": []} if zarr_format == 2 else {"ome": {"version": "0.5", "labels": []}}
    zarr.open_group(str(labels_dir), mode="w-", zarr_format=zarr_format, attributes=attrs)


def register_source_labels(target: SourceLabels) -> None:
    """Create the ``labels`` group if needed and append ``target.name`` to its list."""
    image = Path(target.image).expanduser().absolute()
    labels_dir = image / LABELS_GROUP
    # two runs writing different label images of one slide must not lose each other's name
    with advisory_lock(labels_dir, "OME-Zarr labels group"):
        _append_name(image, labels_dir, target.name)


def _append_name(image: Path, labels_dir: Path, name: str) -> None:
    import zarr

    image_format = _describe_image(image).zarr_format
    if _read_attrs(labels_dir) is None:
        _create_labels_group(labels_dir, image_format)
    group = zarr.open_group(str(labels_dir), mode="r+", zarr_format=image_format)
    attrs: dict[str, Any] = dict(group.attrs)
    if image_format == 3:
        ome = dict(attrs.get("ome") or {})
        names = list(ome.get("labels") or [])
        if name not in names:
            group.attrs.update({"ome": {**ome, "version": ome.get("version", "0.5"),
                                        "labels": [*names, name]}})
    else:
        names = list(attrs.get("labels") or [])
        if name not in names:
            group.attrs.update({"labels": [*names, name]})
