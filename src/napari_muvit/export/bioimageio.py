"""Write a segmenter as a bioimage.io model package (model spec 0.5, a zip).

The package holds:

* ``rdf.yaml``: name, description, authors, citation of the MuViT paper, licence, tags,
  inputs (one ``(batch, channel, y, x)`` crop per level, finest first, plus
  ``bbox`` ``(batch, level, [y0, x0, y1, x1])``), the normalisation as ``scale_linear``
  preprocessing, the output ``(batch, class, y, x)`` softmax probabilities, and the weights;
* ``weights.pt``: the state dict of :class:`~napari_muvit.model.bioimageio.MuViTPackaged`
  (``pytorch_state_dict``, the architecture importable from ``napari_muvit``), and
  ``weights_torchscript.pt`` when tracing reproduces the eager model;
* test tensors (``.npy``) from a real tile of the image (raw intensities in, probabilities
  out), a cover image, ``README.md`` (training data, levels, classes, ``# Validation``) and
  ``environment.yaml``.

Only the standard library, numpy, PyTorch, PyYAML and imageio are used: ``bioimageio.spec`` /
``bioimageio.core`` validate and test the result (see ``tests/test_bioimageio.py``) but are
not needed to write it.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import yaml

from napari_muvit.errors import InputError
from napari_muvit.files import replace_file

__all__ = ["PAPER_CITATION", "export_bioimageio", "pick_tile"]

FORMAT_VERSION = "0.5.4"
PAPER_CITATION = {
    "text": "MuViT: Multi-Resolution Vision Transformers for Learning Across Scales in "
            "Microscopy. arXiv:2602.24222",
    "url": "https://arxiv.org/abs/2602.24222",
}
VALIDATION_FILE = "validation.md"
_TORCHSCRIPT_TOL = 1e-4


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _tif(array: np.ndarray) -> bytes:
    """A TIFF of ``array`` (bioimage.io sample tensors: viewable with any image tool)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(array), photometric="minisblack")
    return buf.getvalue()


def _level_id(level: float) -> str:
    return f"crop_l{level:g}".replace(".", "p")


def pick_tile(source: Any, size: int, levels: Any, candidates: int = 8) -> np.ndarray:
    """Origin ``(y, x)`` of the tile with the most structure (largest intensity std) among a
    ``candidates``² grid of tiles inside the image (a tile for the test tensors and cover)."""
    h, w = source.shape
    ys = np.linspace(0, max(h - size, 0), candidates).round().astype(int)
    xs = np.linspace(0, max(w - size, 0), candidates).round().astype(int)
    best, best_std = np.array([ys[len(ys) // 2], xs[len(xs) // 2]]), -1.0
    for y in np.unique(ys):
        for x in np.unique(xs):
            bbox = np.array([[y, x], [y + size, x + size]], dtype=np.float64)
            std = float(np.std(source.read(bbox, 1, size)))
            if std > best_std:
                best, best_std = np.array([y, x]), std
    return best


def _preprocessing(normalization: dict | None) -> list[dict[str, Any]]:
    """The model's normalisation ``(x - low) / (high - low)`` as bioimage.io ``scale_linear``."""
    steps: list[dict[str, Any]] = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    if not normalization or normalization.get("kind") == "none":
        return steps
    low = np.atleast_1d(np.asarray(normalization.get("low", 0.0), dtype=np.float64))
    high = np.atleast_1d(np.asarray(normalization.get("high", 1.0), dtype=np.float64))
    span = np.where(np.abs(high - low) < 1e-12, 1.0, high - low)
    gain, offset = 1.0 / span, -low / span
    if gain.size == 1:
        kwargs: dict[str, Any] = {"gain": float(gain[0]), "offset": float(offset[0])}
    else:
        kwargs = {"axis": "channel", "gain": [float(g) for g in gain],
                  "offset": [float(o) for o in offset]}
    return [*steps, {"id": "scale_linear", "kwargs": kwargs}]


def _cover(raw: np.ndarray, probs: np.ndarray, colors: list[tuple[int, int, int]]) -> bytes:
    """A 2:1 PNG: the level-1 crop (grey) and the predicted classes (colours)."""
    import imageio.v3 as iio

    img = raw[0].astype(np.float64)
    lo, hi = np.percentile(img, (1, 99.8))
    grey = np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1)
    grey = (np.repeat(grey[..., None], 3, axis=2) * 255).astype(np.uint8)
    classes = probs.argmax(0)
    palette = np.array(colors, dtype=np.uint8)
    labels = palette[classes % len(palette)]
    panel = np.concatenate([grey, labels], axis=1)
    scale = max(1, 256 // panel.shape[0])
    panel = np.kron(panel, np.ones((scale, scale, 1), dtype=np.uint8))
    return iio.imwrite("<bytes>", panel, extension=".png")


def _class_colors(model: Any) -> list[tuple[int, int, int]]:
    from napari_muvit.engine.ome_labels import label_colors

    return [tuple(c["rgba"][:3]) for c in label_colors(list(model.label_values), model.class_colors)]


def _documentation(model: Any, name: str, validation: str | None, tile: dict[str, Any],
                   history: dict | None = None) -> str:
    meta = model.meta or {}
    train = meta.get("train_config") or {}
    history = history or meta.get("history") or {}
    classes = "\n".join(
        f"| {k} | {n} | {v} |" for k, (n, v) in enumerate(zip(model.class_names, model.label_values))
    )
    levels = ", ".join(f"{lv:g}×" for lv in model.levels)
    lines = [
        f"# {name}",
        "",
        "A MuViT (multi-resolution vision transformer) semantic segmenter exported by "
        "[napari-muvit](https://pypi.org/project/napari-muvit/). It sees one crop per "
        f"resolution level ({levels} downsampling), all {tile['size']}×{tile['size']} pixels, "
        "centred on the same place, and where each crop lies (bounding boxes in level-1 pixel "
        "coordinates); it segments the finest crop.",
        "",
        "## Inputs",
        "",
        *[f"* `{_level_id(lv)}`: the crop at {lv:g}× downsampling (area average of the "
          f"full-resolution image), ({model.in_channels} channel(s), {tile['size']}² px), centred "
          "on the level-1 crop" for lv in model.levels],
        "* `bbox`: per level `[y0, x0, y1, x1]`, the crop's extent in full-resolution pixels "
        "(only relative positions matter). Coarse crops are snapped to their own pixel grid: "
        "napari-muvit's `geometry.centered_nested_bboxes` computes them.",
        "",
        "Preprocessing (in `rdf.yaml`): `(x - low) / (high - low)` with the intensity range the "
        f"model was trained with: {model.normalization}.",
        "",
        "## Output",
        "",
        "`probabilities`: softmax class probabilities of the level-1 crop. The classes and the "
        "label value napari-muvit writes for each:",
        "",
        "| class index | name | label value |",
        "|---|---|---|",
        classes,
        "",
        "## Training",
        "",
        f"* architecture: MuViT encoder {model.encoder.config}, head {model.head_config}",
        f"* training: {({k: train[k] for k in ('steps', 'batch_size', 'crop_size', 'lr', 'head') if k in train}) or 'not recorded'}",
        f"* started from: {meta.get('init', 'not recorded')}",
        f"* training data: {meta.get('training_data') or meta.get('provenance') or 'not recorded in the model'}",
        f"* steps trained: {history.get('step', 'not recorded')}",
        "",
        "The test tensors come from a real tile of "
        f"{tile['image']} at world origin {list(tile['origin'])}.",
        "",
        "# Validation",
        "",
        validation.strip() if validation else _recorded_validation(history),
        "",
        "## Who can run this package",
        "",
        "The model takes several inputs (one crop per level and the bounding boxes) that must be "
        "cut from the same image at different resolutions. `bioimageio.core` (Python) runs it "
        "and its test. Tools that feed a model one image tile (deepImageJ, ilastik's "
        "bioimage.io support, the bioimage.io web runner) do not build nested multi-resolution "
        "crops, so they cannot use it on their own. For whole slides, use napari-muvit "
        "(`napari_muvit.load_model('this.zip')`, or `napari-muvit predict IMAGE --model this.zip`), "
        "which tiles the image and builds the crops.",
        "",
        "## Citation",
        "",
        PAPER_CITATION["text"] + f" ({PAPER_CITATION['url']})",
        "",
    ]
    return "\n".join(lines)


def _recorded_validation(history: dict) -> str:
    val = history.get("val") or []
    if val:
        last = val[-1]
        return f"Last validation recorded during training: {last}."
    return ("No validation scores were recorded with this model. Measure them on held-out "
            "data before relying on it.")


def _trace(packaged: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
           expected: torch.Tensor) -> bytes | None:
    """TorchScript bytes if tracing reproduces the eager output, else None (with a warning)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(packaged, inputs, check_trace=False)
            shifted = (*inputs[:-1], inputs[-1] + 64.0)  # other world coordinates, same layout
            same = torch.allclose(traced(*inputs), expected, atol=_TORCHSCRIPT_TOL) and torch.allclose(
                traced(*shifted), packaged(*shifted), atol=_TORCHSCRIPT_TOL)
    except Exception as err:  # tracing fails in many ways; the state dict is enough
        warnings.warn(f"torchscript: tracing failed ({type(err).__name__}: {err}); "
                      "the package has pytorch_state_dict weights only", RuntimeWarning, stacklevel=3)
        return None
    if not same:
        warnings.warn("torchscript: the traced model differs from the eager one; the package "
                      "has pytorch_state_dict weights only", RuntimeWarning, stacklevel=3)
        return None
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def export_bioimageio(
    model: Any = None,
    out: str | Path = "muvit.zip",
    *,
    image: Any = None,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    license: str = "BSD-3-Clause",
    validation: str | Path | None = None,
    torchscript: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a bioimage.io model package (zip, model spec 0.5) at ``out``.

    Parameters
    ----------
    model
        A ``MuViTSegmenter``, a model folder, or ``None`` for the bundled model.
    image
        Where the test tile comes from (a path, array or ``PyramidSource``); default: the
        Synthetic rings sample (the bundled model's domain; a one-channel image).
    validation
        Markdown (or a ``.md`` file) for the ``# Validation`` section; default: the model
        folder's ``validation.md`` if it has one, else what training recorded.
    torchscript
        Also add TorchScript weights when tracing reproduces the eager model.
    overwrite
        Replace an existing file at ``out``.

    Returns the package path. Raises :class:`InputError` for a bad ``out`` or image.
    """
    from napari_muvit.data import Normalization, PyramidSource, centered_nested_bboxes, open_image
    from napari_muvit.engine.predictor import resolve_model
    from napari_muvit.model.bioimageio import ARCHITECTURE, MuViTPackaged, packaged_kwargs

    out = Path(out).expanduser()
    if out.suffix.lower() != ".zip":
        raise InputError(f"out: expected a .zip file name, got {str(out)!r}")
    if out.exists() and not overwrite:
        raise InputError(f"out {str(out)!r} already exists; pass overwrite=True (--overwrite)")
    folder = None if model is None or isinstance(model, torch.nn.Module) else Path(model)
    seg = resolve_model(model).to("cpu").eval()
    if validation is None:
        vfile = (folder if folder is not None else _default_folder()) if not isinstance(model, torch.nn.Module) else None
        if vfile is not None and (vfile / VALIDATION_FILE).is_file():
            validation = (vfile / VALIDATION_FILE).read_text(encoding="utf-8")
    elif isinstance(validation, Path) or (isinstance(validation, str) and validation.endswith(".md")
                                          and Path(validation).is_file()):
        validation = Path(validation).read_text(encoding="utf-8")

    size = int(seg.meta.get("crop_size", 64))
    raw_norm = Normalization(kind="none")
    if image is None:
        from napari_muvit.data.samples import synthetic_sample_image

        if seg.in_channels != 1:
            raise InputError(
                f"image: the model has {seg.in_channels} channels; pass an image of its kind for "
                "the test tile (--image)")
        syn = synthetic_sample_image(size=max(512, 4 * size * int(max(seg.levels))), seed=7)
        source = PyramidSource(syn.pyramid, downsample_factors=list(syn.factors), normalization=raw_norm)
        image_desc = "the Synthetic rings sample (napari_muvit.data.samples, seed 7)"
    elif isinstance(image, PyramidSource):  # shares the levels, reads raw intensities
        source = copy.copy(image)
        source.normalization = raw_norm
        image_desc = "the image open in napari"
    else:
        source = open_image(image, normalization=raw_norm)
        image_desc = str(image) if isinstance(image, (str, Path)) else "the given image"
    if source.channels != seg.in_channels:
        raise InputError(f"image: {source.channels} channels, the model expects {seg.in_channels}")
    levels = list(seg.levels)
    origin = pick_tile(source, size, levels)
    bboxes = centered_nested_bboxes(origin, size, levels)
    raw, _valid = source.read_nested(bboxes, levels, size)  # (L, C, S, S) raw intensities
    raw = raw.astype(np.float32)
    norm = Normalization.from_dict(seg.normalization)
    packaged = MuViTPackaged.wrap(seg)
    inputs = tuple(torch.from_numpy(norm.apply(raw[i])[None]) for i in range(len(levels)))
    bbox_tensor = torch.from_numpy(bboxes.reshape(1, len(levels), 4).astype(np.float32))
    with torch.no_grad():
        probs = packaged(*inputs, bbox_tensor)
    files: dict[str, bytes] = {}
    input_descrs = []
    pre = _preprocessing(seg.normalization)
    for i, level in enumerate(levels):
        tid = _level_id(level)
        files[f"test_input_{tid}.npy"] = _npy(raw[i][None])
        files[f"sample_input_{tid}.tif"] = _tif(raw[i][None])
        input_descrs.append({
            "id": tid,
            "description": f"crop at {level:g}x downsampling, centred on the level-1 crop",
            "axes": [
                {"type": "batch"},
                {"type": "channel", "channel_names": [f"c{c}" for c in range(seg.in_channels)]},
                {"type": "space", "id": "y", "size": size, "scale": float(level)},
                {"type": "space", "id": "x", "size": size, "scale": float(level)},
            ],
            "test_tensor": {"source": f"test_input_{tid}.npy"},
            "sample_tensor": {"source": f"sample_input_{tid}.tif"},
            "data": {"type": "float32"},
            "preprocessing": pre,
        })
    files["test_input_bbox.npy"] = _npy(bbox_tensor.numpy())
    files["sample_input_bbox.tif"] = _tif(bbox_tensor.numpy())
    input_descrs.append({
        "id": "bbox",
        "description": "per level [y0, x0, y1, x1]: the crop's extent in level-1 pixels",
        "axes": [
            {"type": "batch"},
            {"type": "index", "id": "level", "size": len(levels)},
            {"type": "channel", "channel_names": ["y0", "x0", "y1", "x1"]},
        ],
        "test_tensor": {"source": "test_input_bbox.npy"},
        "sample_tensor": {"source": "sample_input_bbox.tif"},
        "data": {"type": "float32"},
    })
    files["test_output_probabilities.npy"] = _npy(probs.numpy())
    files["sample_output_probabilities.tif"] = _tif(probs.numpy())
    output_descrs = [{
        "id": "probabilities",
        "description": "softmax class probabilities of the level-1 crop",
        "axes": [
            {"type": "batch"},
            {"type": "channel", "channel_names": [str(n) for n in seg.class_names]},
            {"type": "space", "id": "y", "size": size},
            {"type": "space", "id": "x", "size": size},
        ],
        "test_tensor": {"source": "test_output_probabilities.npy"},
        "sample_tensor": {"source": "sample_output_probabilities.tif"},
        "data": {"type": "float32", "range": [0.0, 1.0]},
    }]
    state = {k: v.detach().cpu().contiguous() for k, v in packaged.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    files["weights.pt"] = buf.getvalue()
    torch_version = torch.__version__.split("+")[0]
    weights: dict[str, Any] = {"pytorch_state_dict": {
        "source": "weights.pt",
        "architecture": {**ARCHITECTURE, "kwargs": packaged_kwargs(seg)},
        "pytorch_version": torch_version,
        "dependencies": {"source": "environment.yaml"},
    }}
    if torchscript:
        scripted = _trace(packaged, (*inputs, bbox_tensor), probs)
        if scripted is not None:
            files["weights_torchscript.pt"] = scripted
            weights["torchscript"] = {"source": "weights_torchscript.pt",
                                      "pytorch_version": torch_version,
                                      "parent": "pytorch_state_dict"}
    from napari_muvit import __version__

    files["environment.yaml"] = yaml.safe_dump({
        "name": "napari-muvit", "channels": ["conda-forge"],
        "dependencies": ["python>=3.11", "pip", {"pip": [f"napari-muvit>={__version__}"]}],
    }, sort_keys=False).encode()
    files["cover.png"] = _cover(raw[0], probs[0].numpy(), _class_colors(seg))
    name = name or ("MuViT synthetic rings" if folder is None and not isinstance(model, torch.nn.Module)
                    else f"MuViT segmenter {out.stem}")
    tile = {"size": size, "image": image_desc, "origin": [int(v) for v in origin]}
    history = None
    model_folder = folder if folder is not None else (
        None if isinstance(model, torch.nn.Module) else _default_folder())
    if model_folder is not None and model_folder.is_dir():
        from napari_muvit.model.checkpoint import load_history

        history = load_history(model_folder)  # history.json (or an older config.yaml's meta)
    files["README.md"] = _documentation(seg, name, validation, tile, history).encode()
    rdf = {
        "format_version": FORMAT_VERSION,
        "type": "model",
        "name": name,
        "description": description or (
            f"MuViT multi-resolution segmenter (levels {', '.join(f'{v:g}' for v in levels)}; "
            f"classes: {', '.join(map(str, seg.class_names))}) exported by napari-muvit"),
        "authors": [{"name": a} for a in (authors or ["napari-muvit developers"])],
        "cite": [PAPER_CITATION],
        "license": license,
        "tags": ["segmentation", "semantic-segmentation", "transformer", "multi-resolution",
                 "muvit", "napari-muvit", "2d"],
        "documentation": "README.md",
        "covers": ["cover.png"],
        "inputs": input_descrs,
        "outputs": output_descrs,
        "weights": weights,
        "config": {"napari-muvit": {"levels": [float(v) for v in levels], "tile_origin": tile["origin"],
                                    "label_values": [int(v) for v in seg.label_values]}},
    }
    _add_hashes(rdf, files)
    files = {"rdf.yaml": yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True).encode(), **files}
    return _write_zip(out, files)


def _default_folder() -> Path:
    from napari_muvit.weights import default_model_path

    return Path(default_model_path())


def _add_hashes(node: Any, files: dict[str, bytes]) -> None:
    """Add ``sha256`` next to every ``source`` naming a packaged file."""
    if isinstance(node, dict):
        src = node.get("source")
        if isinstance(src, str) and src in files:
            node["sha256"] = _sha256(files[src])
        for v in node.values():
            _add_hashes(v, files)
    elif isinstance(node, list):
        for v in node:
            _add_hashes(v, files)


def _write_zip(out: Path, files: dict[str, bytes]) -> Path:
    """Write the zip atomically (a temporary sibling renamed into place)."""

    def write(handle: BinaryIO) -> None:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for member, data in files.items():
                archive.writestr(member, data)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return replace_file(out, write)
    except OSError as err:
        if err.errno not in _NOT_WRITABLE:
            raise
        raise InputError(f"out {str(out)!r}: cannot write there ({err})") from None


# where the package cannot be written at all (as opposed to a disk that fills up on the way)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT,
                 errno.EEXIST, errno.EISDIR)
