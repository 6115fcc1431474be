"""bioimage.io model packages: the packaged architecture and the safe package loader.

A package written by :func:`napari_muvit.export.export_bioimageio` is a zip with ``rdf.yaml``
(bioimage.io model spec 0.5) whose ``pytorch_state_dict`` weights name
:class:`MuViTPackaged` as their architecture: one input tensor per level crop
``(batch, channel, y, x)`` plus the bounding boxes ``(batch, level, [y0, x0, y1, x1])``, one
output ``(batch, class, y, x)`` of class probabilities of the level-1 crop.

:func:`load_package` reads such a zip back into a :class:`MuViTSegmenter` without extracting
it: only ``rdf.yaml`` (``yaml.safe_load``) and the state dict (``torch.load(weights_only=True)``,
so no pickled code runs) are read, each member's size is bounded, and the package must name
our architecture. Pure PyTorch + PyYAML (no bioimage.io libraries needed).
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from napari_muvit.errors import CheckpointError, InputError
from napari_muvit.model._labelled import labelled_config
from napari_muvit.model.checkpoint import _plain
from napari_muvit.model.encoder import MuViTEncoder
from napari_muvit.model.segmenter import MuViTSegmenter

__all__ = ["ARCHITECTURE", "MuViTPackaged", "is_package", "load_package"]

ARCHITECTURE = {"callable": "MuViTPackaged", "import_from": "napari_muvit.model.bioimageio"}
RDF_NAME = "rdf.yaml"
MAX_RDF_BYTES = 4 * 2**20
MAX_WEIGHTS_BYTES = 4 * 2**30
MAX_MEMBERS = 10_000


class MuViTPackaged(nn.Module):
    """A :class:`MuViTSegmenter` called the bioimage.io way (one tensor per input).

    Args:
        encoder: the :class:`MuViTEncoder` keyword arguments (``MuViTEncoder.config``).
        head: the head section (``MuViTSegmenter.head_config``: ``type``, ``num_classes``,
            ``head_dim`` and head options such as ``skips``).
        class_names, label_values, class_colors, normalization, meta: as in
            :class:`MuViTSegmenter` (kept so that the package alone rebuilds the model).

    ``forward(crop_1, ..., crop_L, bbox)``: crops ``(B, C, S, S)`` finest level first, already
    normalised; ``bbox`` ``(B, L, 4)`` world ``[y0, x0, y1, x1]`` per level. Returns softmax
    class probabilities ``(B, K, S, S)`` of the level-1 crop.
    """

    def __init__(
        self,
        encoder: dict[str, Any],
        head: dict[str, Any],
        class_names: list[str] | None = None,
        label_values: list[int] | None = None,
        class_colors: list | None = None,
        normalization: dict | None = None,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        options = dict(head)
        head_type = options.pop("type", "unetr")
        num_classes = int(options.pop("num_classes"))
        head_dim = int(options.pop("head_dim", 256))
        self.segmenter = MuViTSegmenter(
            MuViTEncoder(**encoder), head=head_type, num_classes=num_classes, head_dim=head_dim,
            class_names=class_names, label_values=label_values, class_colors=class_colors,
            normalization=normalization, meta=meta, head_options=options,
        )
        self.num_levels = len(self.segmenter.levels)

    def forward(self, *tensors: Tensor) -> Tensor:
        if len(tensors) != self.num_levels + 1:
            raise InputError(
                f"MuViTPackaged: expected {self.num_levels} level crops and the bboxes, "
                f"got {len(tensors)} tensors"
            )
        crops = torch.stack(tensors[:-1], dim=1)
        bbox = tensors[-1].reshape(crops.shape[0], self.num_levels, 2, 2)
        return torch.softmax(self.segmenter(crops, bbox), dim=1)

    @classmethod
    def wrap(cls, model: MuViTSegmenter) -> MuViTPackaged:
        """A packaged copy of ``model`` (same weights) and the kwargs that rebuild it."""
        packaged = cls(**packaged_kwargs(model))
        packaged.segmenter.load_state_dict(model.state_dict())
        return packaged.eval()


def packaged_kwargs(model: MuViTSegmenter) -> dict[str, Any]:
    """The :class:`MuViTPackaged` keyword arguments of ``model`` (plain YAML values)."""
    fields = {k: v for k, v in labelled_config(model, "segmenter").items() if k != "kind"}
    return _plain({**fields, "meta": {k: v for k, v in model.meta.items() if k != "history"}})


def is_package(path: str | Path) -> bool:
    """Whether ``path`` looks like a bioimage.io package (a ``.zip`` file)."""
    p = Path(path)
    return p.suffix.lower() == ".zip" and (p.is_file() or not p.exists())


def _member(archive: zipfile.ZipFile, name: str, limit: int, package: Path) -> bytes:
    """One member's bytes: a relative path inside the archive, at most ``limit`` bytes."""
    clean = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or clean.startswith("..") or ":" in name or "\\" in name:
        raise CheckpointError(f"{package}: refusing member {name!r} (it points outside the package)")
    try:
        info = archive.getinfo(clean)
    except KeyError:
        raise CheckpointError(f"{package}: missing {name!r}") from None
    if info.file_size > limit:
        raise CheckpointError(
            f"{package}: {name!r} is {info.file_size} bytes, more than the {limit} allowed"
        )
    with archive.open(info) as fh:
        data = fh.read(limit + 1)  # the header's size could lie: never read past the limit
    if len(data) > limit:
        raise CheckpointError(f"{package}: {name!r} is larger than the {limit} bytes allowed")
    return data


def read_rdf(package: str | Path) -> dict[str, Any]:
    """The package's ``rdf.yaml`` (safe YAML), checked to be a bioimage.io model."""
    package = Path(package)
    try:
        with zipfile.ZipFile(package) as archive:
            if len(archive.infolist()) > MAX_MEMBERS:
                raise CheckpointError(f"{package}: more than {MAX_MEMBERS} files; not a model package")
            rdf = yaml.safe_load(_member(archive, RDF_NAME, MAX_RDF_BYTES, package))
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{package}: not a readable zip file ({err})") from None
    except yaml.YAMLError as err:
        raise CheckpointError(f"{package}: {RDF_NAME} is not valid YAML ({err})") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise CheckpointError(f"{package}: {RDF_NAME} does not describe a bioimage.io model")
    return rdf


def load_package(package: str | Path, map_location: str | torch.device = "cpu") -> MuViTSegmenter:
    """Load a napari-muvit bioimage.io package (zip) as a :class:`MuViTSegmenter` (eval mode).

    Refuses packages whose ``pytorch_state_dict`` architecture is not :class:`MuViTPackaged`
    (foreign code is never imported), oversized members, paths leaving the archive, and
    weights that are not a plain state dict (``torch.load(weights_only=True)``).
    """
    package = Path(package)
    if not package.is_file():
        raise CheckpointError(f"model package {str(package)!r} does not exist")
    rdf = read_rdf(package)
    weights = (rdf.get("weights") or {}).get("pytorch_state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{package}: no pytorch_state_dict weights (napari-muvit needs them)")
    arch = weights.get("architecture") or {}
    if {k: arch.get(k) for k in ARCHITECTURE} != ARCHITECTURE:
        raise CheckpointError(
            f"{package}: architecture {arch.get('import_from')}.{arch.get('callable')} is not "
            "napari-muvit's MuViTPackaged; napari-muvit only loads its own packages"
        )
    kwargs = arch.get("kwargs")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{package}: architecture kwargs missing")
    source = weights.get("source")
    if not isinstance(source, str):
        raise CheckpointError(f"{package}: pytorch_state_dict has no source file")
    with zipfile.ZipFile(package) as archive:
        data = _member(archive, source, MAX_WEIGHTS_BYTES, package)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types
        raise CheckpointError(
            f"{package}: {source!r} is not a plain PyTorch state dict ({type(err).__name__}: {err})"
        ) from None
    try:
        packaged = MuViTPackaged(**kwargs)
    except (TypeError, ValueError, KeyError, InputError) as err:
        raise CheckpointError(f"{package}: bad architecture kwargs ({err})") from None
    try:
        packaged.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{package}: weights do not fit the architecture ({err})") from None
    return packaged.segmenter.to(map_location).eval()
