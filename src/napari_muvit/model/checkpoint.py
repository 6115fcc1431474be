"""Model folders: our format (config.yaml + model.safetensors) and official muvit folders.

Our format::

    folder/
      config.yaml        format: napari-muvit, format_version: 1, kind: encoder|segmenter|mae,
                         encoder: {...}, head: {...} | null, class_names, label_values,
                         class_colors, normalization, meta (small: crop size, recipe, ...)
      model.safetensors  float tensors, our key names (fused qkv)
      history.json       optional: the training record (loss curve, events, provenance), read
                         only when asked (:func:`load_history`), never when loading the model
      train_state.pt     only in a resumable training run (see engine/_checkpointing.py)

Folders written before history.json existed keep their history in ``meta`` and load as before
(:func:`split_history` moves it out). Provenance stores file names, not this machine's paths.

Official muvit 0.1.0 folders (spec §2): ``config.yaml`` written by ``yaml.dump`` (with
``!!python/tuple`` tags) + ``model.pth`` (a torch zip pickle of the state dict). We never
unpickle arbitrary objects: ``torch.load(weights_only=True)`` only, so a malicious ``model.pth``
is refused without running any of its code.

Reading is bounded: YAML goes through a safe loader (libyaml's C parser when available) after a
check of the parser's event stream (nesting depth, alias expansion, file size), and the sizes a
config asks for are checked against the weights file's header before anything is allocated.

Writing goes through the project's one atomic writer, :func:`_atomic.commit_files`, under the
folder's advisory lock: napari-muvit's own files are replaced as one set (a kill leaves the old
set or the new one), any other file in the folder is kept; an existing non-empty folder is only
written with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from napari_muvit.errors import CheckpointError, InputError
from napari_muvit.locks import advisory_lock
from napari_muvit.model._atomic import commit_files, committed_path

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "count_parameters",
    "is_official_folder",
    "load_folder",
    "load_history",
    "model_folder",
    "official_to_ours",
    "ours_to_official",
    "read_config",
    "save_model",
    "save_official",
    "split_history",
]

FORMAT = "napari-muvit"
FORMAT_VERSION = 1
CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
OFFICIAL_WEIGHTS = "model.pth"
HISTORY = "history.json"
TRAIN_STATE = "train_state.pt"
#: the files napari-muvit owns in a model/run folder; every other file there is the user's
OWNED_FILES = (CONFIG, WEIGHTS, OFFICIAL_WEIGHTS, HISTORY, TRAIN_STATE)
#: ``meta`` entries stored in history.json instead of config.yaml
HISTORY_META_KEYS = ("history", "provenance")
#: the kinds of model a folder of ours holds, and the class each loads as
KINDS = {
    "encoder": "MuViTEncoder",
    "segmenter": "MuViTSegmenter",
    "mae": "MuViTMAE",
    "points": "MuViTPointDetector",
}
_KIND_WORDS = {"encoder": "encoder", "segmenter": "segmenter", "mae": "mae",
               "points": "point detector"}


# =============================================================================== YAML
# A config is a few dozen lines; these bounds only stop hostile files (an alias "billion
# laughs", nesting deep enough to crash the C parser, a huge file) before they cost memory/time.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000

_SafeBase: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available


class TupleSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also accepts ``!!python/tuple`` (official configs)."""


class _FastTupleSafeLoader(_SafeBase):  # type: ignore[misc, valid-type]
    """The same on libyaml's C parser (a safe loader too: only plain data is constructed)."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


for _loader in (TupleSafeLoader, _FastTupleSafeLoader):
    _loader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def _check_yaml_bounds(text: str, path: Path) -> None:
    """Refuse nesting deeper than MAX_CONFIG_DEPTH, recursive aliases and alias expansion beyond
    MAX_CONFIG_NODES nodes, from the parser's event stream (iterative, nothing is built)."""
    sizes: dict[str, int] = {}  # anchor -> nodes of its expanded subtree
    stack: list[list[Any]] = [[0, None]]  # open collections: [expanded nodes, anchor]
    for event in yaml.parse(text, Loader=_SafeBase):
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([1, event.anchor])
            if len(stack) > MAX_CONFIG_DEPTH + 1:
                raise CheckpointError(
                    f"{path}: nested deeper than {MAX_CONFIG_DEPTH} levels; not a model config"
                )
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            size, anchor = stack.pop()
            if anchor is not None:
                sizes[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise CheckpointError(
                    f"{path}: recursive or undefined YAML alias; not a model config"
                )
            size = sizes[event.anchor]
        else:
            continue
        stack[-1][0] += size
        if stack[-1][0] > MAX_CONFIG_NODES:
            raise CheckpointError(
                f"{path}: YAML aliases expand to more than {MAX_CONFIG_NODES} values; "
                "not a model config"
            )


def parse_config_text(text: str, path: Path) -> Any:
    """Parse a config's YAML with bounds and a safe loader (C parser when available)."""
    _check_yaml_bounds(text, path)
    return yaml.load(text, Loader=_FastTupleSafeLoader)


def _plain(v: Any) -> Any:
    """Convert to YAML-safe plain Python (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    raise TypeError(f"value of type {type(v).__name__} cannot be stored in config.yaml: {v!r}")


def model_folder(path: str | Path) -> Path:
    """``path`` as a model folder (``~`` expanded; one of the folder's own files names the
    folder), or a one-line :class:`CheckpointError` for something that is not a path."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(
            f"model folder: expected a path (str or pathlib.Path), got {type(path).__name__} "
            f"{path!r}"
        )
    p = Path(path).expanduser()
    if p.is_file() and p.name in OWNED_FILES:
        p = p.parent
    return p


def _owned(folder: Path, name: str) -> Path:
    """The committed version of an owned file (see :func:`_atomic.committed_path`)."""
    return committed_path(folder, name) or folder / name


def read_config(folder: str | Path) -> dict[str, Any]:
    """Parse ``folder/config.yaml`` safely (python/tuple tags allowed) and return the mapping.

    Bounded: a file over 1 MiB, nesting deeper than 32 levels or aliases expanding to more than
    100,000 values are refused before anything is built.
    """
    folder = model_folder(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    path = _owned(folder, CONFIG)
    if not path.is_file():
        raise CheckpointError(
            f"{folder / CONFIG}: missing; a model folder holds {CONFIG} and {WEIGHTS} (ours) or "
            f"{OFFICIAL_WEIGHTS} (official muvit)"
        )
    shown = folder / CONFIG
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(
                f"{shown}: {path.stat().st_size} bytes, more than a model config can be "
                f"({MAX_CONFIG_BYTES} bytes)"
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{shown}: cannot read ({exc})") from None
    try:
        cfg = parse_config_text(text, shown)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{shown}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{shown}: expected a mapping of keys, got {type(cfg).__name__}")
    return cfg


def is_official_folder(folder: str | Path) -> bool:
    """True for an official muvit folder (config without our ``format`` key + ``model.pth``)."""
    folder = model_folder(folder)
    try:
        cfg = read_config(folder)
    except CheckpointError:
        return False
    return cfg.get("format") != FORMAT and (folder / OFFICIAL_WEIGHTS).is_file()


# =============================================================================== saving
def _check_target(folder: Path, overwrite: bool) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: exists and is not a folder")
        if any(folder.iterdir()) and not overwrite:
            raise CheckpointError(
                f"{folder}: already exists and is not empty; pass overwrite=True to replace it"
            )


def _save_files(folder: Path, writers: dict[str, Callable[[Path], None]], overwrite: bool) -> Path:
    """Commit ``writers`` into ``folder`` under its advisory lock; only owned files change."""
    folder = Path(folder).expanduser()
    _check_target(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with advisory_lock(folder, "model folder"):
        return commit_files(folder, writers, OWNED_FILES)


def _json_default(obj: Any) -> Any:
    """JSON for numpy scalars/arrays and paths found in histories."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def model_files(
    model: nn.Module, meta: dict | None = None, history: dict[str, Any] | None = None
) -> dict[str, Callable[[Path], None]]:
    """Writers of a model's files (our format), for :func:`_atomic.commit_files`.

    ``config.yaml`` gets what builds the model and its small metadata; the training history
    (``history``, else ``meta["history"]``) and ``meta["provenance"]`` go to ``history.json``,
    which loading never reads (see :func:`load_history`).
    """
    from safetensors.torch import save_file

    full_meta = {**getattr(model, "meta", {}), **(meta or {})}
    record = history if history is not None else full_meta.get("history")
    provenance = full_meta.get("provenance")
    # only mappings are training records; anything else someone put there stays in the meta
    record = record if isinstance(record, dict) else None
    provenance = provenance if isinstance(provenance, dict) else None
    moved = {"history": record, "provenance": provenance}
    small = {k: v for k, v in full_meta.items() if moved.get(k) is None}
    cfg = _model_config(model, small)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    writers: dict[str, Callable[[Path], None]] = {
        CONFIG: lambda p: p.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8"),
        WEIGHTS: lambda p: save_file(state, str(p), metadata={"format": FORMAT}),
    }
    if record is not None or provenance is not None:
        content = dict(record or {})
        if provenance is not None:
            content.setdefault("provenance", provenance)
        text = json.dumps(content, indent=1, default=_json_default)
        writers[HISTORY] = lambda p: p.write_text(text, encoding="utf-8")
    return writers


def load_history(folder: str | Path) -> dict[str, Any] | None:
    """The training history of a model folder (loss curve, events, provenance), or ``None``.

    Read from ``history.json``; folders written before it existed keep their history in
    ``config.yaml``'s ``meta`` and are read from there.
    """
    folder = model_folder(folder)
    path = committed_path(folder, HISTORY)
    if path is not None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{folder / HISTORY}: cannot read ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{folder / HISTORY}: expected a JSON object")
        return data
    try:
        meta = read_config(folder).get("meta")
    except CheckpointError:
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("history", {}), dict):
        return None
    if "history" not in meta and "provenance" not in meta:
        return None
    content = dict(meta.get("history") or {})
    if "provenance" in meta:
        content.setdefault("provenance", meta["provenance"])
    return content


def _model_config(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """``config.yaml`` of ``model``: format fields, what the model says builds it
    (its ``checkpoint_config()``), and ``meta``."""
    describe = getattr(model, "checkpoint_config", None)
    if describe is None:
        raise InputError(
            f"model: expected MuViTEncoder, MuViTSegmenter or MuViTMAE, got {type(model).__name__}"
        )
    if getattr(model, "task", None) == "points":
        # a point detector keeps its whole meta in config.yaml (its provenance is read back
        # from there), on top of history.json
        meta = {**model.meta, **(meta or {})}
    return _plain({"format": FORMAT, "format_version": FORMAT_VERSION, **describe(), "meta": meta})


def save_model(
    model: nn.Module, folder: str | Path, overwrite: bool = False, meta: dict | None = None
) -> Path:
    """Save an encoder, segmenter or MAE in our format (atomic; see module docstring).

    Only the files napari-muvit owns in ``folder`` are replaced; the user's other files stay.
    """
    return _save_files(Path(folder), model_files(model, meta), overwrite)


def _portable(value: Any) -> Any:
    """``value`` with absolute paths replaced by their last component (recursively)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and (value.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", value)):
        return re.split(r"[\\/]", value.rstrip("/\\"))[-1]
    return value


def split_history(folder: str | Path) -> bool:
    """Move an older folder's training history out of ``config.yaml`` into ``history.json``.

    Only those two files are rewritten (as one atomic step); the weights stay byte-identical.
    Absolute paths in the provenance become file names. Returns whether anything changed.
    """
    folder = model_folder(folder)
    cfg = read_config(folder)
    meta = cfg.get("meta")
    if cfg.get("format") != FORMAT or not isinstance(meta, dict):
        return False
    moved = {k: meta[k] for k in HISTORY_META_KEYS if isinstance(meta.get(k), dict)}
    if not moved:
        return False
    record = dict(moved.get("history", {}))
    if "provenance" in moved:
        record.setdefault("provenance", moved["provenance"])
    cfg["meta"] = {k: v for k, v in meta.items() if k not in moved}
    config_text = yaml.safe_dump(cfg, sort_keys=False)
    history_text = json.dumps(_portable(record), indent=1, default=_json_default)
    writers: dict[str, Callable[[Path], None]] = {
        CONFIG: lambda p: p.write_text(config_text, encoding="utf-8"),
        HISTORY: lambda p: p.write_text(history_text, encoding="utf-8"),
    }
    with advisory_lock(folder, "model folder"):
        commit_files(folder, writers, (CONFIG, HISTORY))
    return True


# =============================================================================== loading
def _check_shapes(
    own: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path
) -> None:
    """Same keys and shapes, or an error naming the file and the first offending key."""
    missing = [k for k in own if k not in found]
    unexpected = [k for k in found if k not in own]
    if missing:
        raise CheckpointError(
            f"{path}: missing key {missing[0]!r} ({len(missing)} missing in total)"
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in total)"
        )
    for k, shape in own.items():
        if tuple(found[k]) != tuple(shape):
            raise CheckpointError(
                f"{path}: key {k!r} has shape {tuple(found[k])}, the config expects {tuple(shape)}"
            )


def _shapes(sd: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _load_state(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    """Strict state-dict load with errors naming the file and the key."""
    own = model.state_dict()
    _check_shapes(_shapes(own), _shapes(sd), path)
    for k in own:
        if not torch.isfinite(sd[k].float()).all():
            raise CheckpointError(f"{path}: key {k!r} contains NaN or inf")
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)


def _build(kind_desc: str, path: Path, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (TypeError, InputError, ValueError, ArithmeticError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: bad {kind_desc} config ({exc})") from None


# Plausible ranges of the size-defining config values: far beyond any MuViT, but they keep a
# hostile config from making even the allocation-free (meta device) build take minutes.
_PLAUSIBLE = {
    "dim": 16384, "num_layers": 512, "heads": 1024, "patch_size": 1024, "in_channels": 4096,
    "decoder_dim": 16384, "decoder_layers": 512, "decoder_heads": 1024, "head_dim": 16384,
    "num_classes": 65536,
}
# Above this many weights the exact shape check runs on the meta device before the real build
# (it costs about one more construction: negligible next to reading such a file). Below it,
# the lower bounds of _check_plausible already cap what a build can allocate at a small
# multiple of a file this small, and the shapes are compared right after building.
_META_PROBE_ABOVE = 32_000_000
_MAX_LEVELS = 32


def _check_plausible(enc: dict, dec: dict, values_in_file: int, cpath: Path) -> None:
    """Refuse sizes out of range, or a model bigger than the weights file can hold.

    ``values_in_file`` is the number of tensor values the weights hold (from the file header);
    lower bounds of the model's size must fit in it: the q/k/v projections (3·dim² per layer)
    of the encoder and of the MAE decoders, a head's 3x3 convolutions (at least head_dim²).
    ``dec`` is the MAE decoder or segmentation head section of the config.
    """
    head_dim = dec.get("head_dim")
    if isinstance(head_dim, int) and head_dim * head_dim > values_in_file:
        raise CheckpointError(
            f"{cpath}: head_dim {head_dim} needs at least {head_dim * head_dim:,} weights, the "
            f"weights file holds {values_in_file:,}; config and weights do not belong together"
        )
    for section in (enc, dec):
        for key, top in _PLAUSIBLE.items():
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= top:
                raise CheckpointError(
                    f"{cpath}: key {key!r} is {value}, outside the plausible range 1..{top}"
                )
    levels = enc.get("levels")
    if isinstance(levels, (list, tuple)) and not 1 <= len(levels) <= _MAX_LEVELS:
        raise CheckpointError(
            f"{cpath}: key 'levels' lists {len(levels)} levels (1..{_MAX_LEVELS})"
        )
    stacks = [(enc, "dim", "num_layers", 1)]
    if isinstance(levels, (list, tuple)):
        stacks.append((dec, "decoder_dim", "decoder_layers", len(levels)))
    for section, dim_key, layers_key, copies in stacks:
        dim, layers = section.get(dim_key), section.get(layers_key)
        if isinstance(dim, int) and isinstance(layers, int):
            need = 3 * dim * dim * layers * copies
            if need > values_in_file:
                raise CheckpointError(
                    f"{cpath}: {layers_key} {layers} x {dim_key} {dim} needs at least {need:,} "
                    f"weights, the weights file holds {values_in_file:,}; config and weights "
                    "do not belong together"
                )


def _build_checked(
    kind_desc: str,
    cpath: Path,
    fn: Callable[[], nn.Module],
    found: dict[str, tuple[int, ...]],
    wpath: Path,
) -> nn.Module:
    """Build ``fn()`` and compare its parameter shapes with the weights file's; for a large
    file, first on the meta device (no memory), so a mismatch never allocates."""
    if _values(found) > _META_PROBE_ABOVE:
        with torch.device("meta"):
            probe = _build(kind_desc, cpath, fn)
        _check_shapes(_shapes(probe.state_dict()), found, wpath)
    model = _build(kind_desc, cpath, fn)
    _check_shapes(_shapes(model.state_dict()), found, wpath)
    return model


def _section(cfg: dict, key: str, path: Path, kind: type = dict) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{path}: missing key {key!r}")
    val = cfg[key]
    if not isinstance(val, kind):
        raise CheckpointError(
            f"{path}: key {key!r} should be a {kind.__name__}, got {type(val).__name__}"
        )
    return val


def _safetensors_header(path: Path, shown: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (nothing else is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = list(handle.keys())
            return {k: tuple(handle.get_slice(k).get_shape()) for k in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{shown}: not a readable safetensors file ({exc})") from None


def _values(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())


def _load_ours(folder: Path, cfg: dict, encoder_class: type, classes: Mapping[str, type],
               map_location: Any, encoder_only: bool, expected: str, hint: str) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cpath = folder / CONFIG
    version = cfg.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{cpath}: key 'format_version' should be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{cpath}: format_version {version} was written by a newer napari-muvit (this one "
            f"reads <= {FORMAT_VERSION}); update napari-muvit"
        )
    kind = _section(cfg, "kind", cpath, str)
    if kind not in KINDS:
        raise CheckpointError(
            f"{cpath}: key 'kind' should be encoder|segmenter|mae|points, got {kind!r}"
        )
    wanted = "encoder" if encoder_only else kind
    if not encoder_only and kind not in classes:
        raise CheckpointError(f"{cpath}: expected {expected} checkpoint, got {KINDS[kind]}{hint}")
    enc_cfg = _section(cfg, "encoder", cpath)
    wpath, shown = _owned(folder, WEIGHTS), folder / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"{shown}: missing (the weights of this model folder)")
    found = _safetensors_header(wpath, shown)
    dec_cfg = cfg.get("head") if isinstance(cfg.get("head"), dict) else {}
    _check_plausible(enc_cfg, dec_cfg, _values(found), cpath)
    meta = cfg.get("meta") or {}
    meta = dict(meta) if isinstance(meta, dict) else {}
    if wanted == "encoder":
        if kind != "encoder":
            found = {k[len("encoder.") :]: v for k, v in found.items() if k.startswith("encoder.")}

        def build() -> nn.Module:
            return encoder_class(**enc_cfg)

    else:
        head = _section(cfg, "head", cpath)
        if kind == "segmenter" and not isinstance(head.get("num_classes"), int):
            raise CheckpointError(
                f"{cpath}: key 'head.num_classes' should be an int, got {head.get('num_classes')!r}"
            )
        model_class = classes[kind]

        def build() -> nn.Module:
            return model_class.from_checkpoint_config(encoder_class(**enc_cfg), cfg, meta)

    model = _build_checked(_KIND_WORDS[wanted], cpath, build, found, shown)
    if wanted == "encoder":
        model.meta = meta
    try:
        sd = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{shown}: not a readable safetensors file ({exc})") from None
    if encoder_only and kind != "encoder":
        sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    _load_state(model, sd, shown)
    return model.to(map_location).eval()


# ------------------------------------------------------------------------------- official
_OFFICIAL_ENCODER_DEFAULTS: dict[str, Any] = {
    "num_layers": 6,
    "dim": 320,
    "heads": 4,
    "attention_mode": "all",
    "use_level_embed": True,
    "rotary_mode": "per_layer",
    "rotary_base": 10000,
    "input_space": "real",
    "dropout": 0.0,
}
_OFFICIAL_MAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 1,
    "levels": (1, 4),
    "patch_size": 16,
    "num_layers": 12,
    "dim": 512,
    "num_layers_decoder": 2,
    "dim_decoder": 256,
    "heads": 8,
    "decoder_mode": "multi",
    "loss": "mse",
    "masking_ratio": 0.75,
    "use_level_embed": True,
    "rotary_mode": "per_layer",
    "rotary_base": 10000,
    "attention_mode": "all",
    "masking_mode": "dirichlet",
    "input_space": "real",
    "dropout": 0.0,
}
_ENCODER_KEYS = (
    "in_channels",
    "levels",
    "patch_size",
    "dim",
    "num_layers",
    "heads",
    "rotary_base",
    "use_level_embed",
    "dropout",
    "rotary_mode",
    "attention_mode",
)


def _official_config(cfg: dict, path: Path) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    """-> (is_mae, encoder kwargs (ours), mae kwargs (ours))."""
    cfg = dict(cfg)
    is_mae = any(
        k in cfg for k in ("decoder_mode", "num_layers_decoder", "dim_decoder", "masking_ratio")
    )
    if "ndim" in cfg:
        if cfg["ndim"] != 2:
            raise CheckpointError(
                f"{path}: key 'ndim' is {cfg['ndim']}; napari-muvit supports 2-D models only"
            )
        del cfg["ndim"]
    if "use_rotary_embed" in cfg:
        if "rotary_mode" in cfg:
            raise CheckpointError(f"{path}: both legacy 'use_rotary_embed' and 'rotary_mode' given")
        cfg["rotary_mode"] = "per_layer" if cfg.pop("use_rotary_embed") else "none"
    defaults = _OFFICIAL_MAE_DEFAULTS if is_mae else _OFFICIAL_ENCODER_DEFAULTS
    full = {**defaults, **cfg}
    for req in ("in_channels", "levels", "patch_size"):
        if req not in full:
            raise CheckpointError(f"{path}: missing key {req!r}")
    if full.get("input_space", "real") != "real":
        raise CheckpointError(
            f"{path}: key 'input_space' must be 'real', got {full['input_space']!r}"
        )
    if full["attention_mode"] not in ("all", "causal", "same"):
        raise CheckpointError(
            f"{path}: key 'attention_mode' {full['attention_mode']!r} is not supported "
            "(all, causal, same)"
        )
    ps = full["patch_size"]
    if isinstance(ps, (list, tuple)):
        if len(ps) != 2 or ps[0] != ps[1]:
            raise CheckpointError(f"{path}: key 'patch_size' must be square 2-D, got {ps!r}")
        ps = ps[0]
    if not isinstance(full["levels"], (list, tuple)) or not full["levels"]:
        raise CheckpointError(
            f"{path}: key 'levels' should be a non-empty sequence, got {full['levels']!r}"
        )
    enc = {k: full[k] for k in _ENCODER_KEYS}
    enc["patch_size"] = int(ps)
    enc["levels"] = list(full["levels"])
    enc["coord_mode"] = "linspace"
    mae: dict[str, Any] = {}
    if is_mae:
        if full["decoder_mode"] not in ("multi", "multi_iso"):
            raise CheckpointError(
                f"{path}: key 'decoder_mode' {full['decoder_mode']!r} is not supported (multi, multi_iso)"
            )
        if full["loss"] not in ("mse", "norm_mse"):
            raise CheckpointError(
                f"{path}: key 'loss' {full['loss']!r} is not supported (mse, norm_mse)"
            )
        mm = full["masking_mode"]
        mae = {
            "decoder_dim": int(full["dim_decoder"] or full["dim"]),
            "decoder_layers": int(full["num_layers_decoder"]),
            "masking_ratio": float(full["masking_ratio"]),
            "masking_mode": list(mm) if isinstance(mm, (list, tuple)) else mm,
            "decoder_mode": full["decoder_mode"],
            "loss": full["loss"],
            "loss_mode": "token_mean",
            "decoder_heads": int(full["heads"]),
            "decoder_rotary_mode": full["rotary_mode"],
        }
    return is_mae, enc, mae


def _torch_load_safe(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the weights of this official muvit folder)")
    try:
        # weights_only=True: the restricted unpickler only rebuilds tensors and containers and
        # refuses any other global, so a malicious pickle is rejected before it can run.
        # mmap: the tensors stay on disk until used, so shapes are checked before any memory
        # is spent; pickles in torch's old non-zip format cannot be mapped and are read.
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zip errors ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load (not a plain tensor state dict; only weights-only "
            f"checkpoints are accepted): {msg[:300]}"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return dict(sd)


def _stack_official_to_ours(
    sd: dict[str, Tensor],
    src: str,
    dst: str,
    num_layers: int,
    rotary_mode: str,
    path: Path,
    out: dict[str, Tensor],
    dim: int,
) -> None:
    """Map one transformer stack (``layers.*`` + shared rope) from official to our keys."""

    def take(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"{path}: missing key {key!r}")
        return sd.pop(key)

    for i in range(num_layers):
        a, b = f"{src}layers.{i}.", f"{dst}layers.{i}."
        qkv = []
        for n in ("q", "k", "v"):
            t = take(a + f"attn.to_{n}.weight")
            if tuple(t.shape) != (dim, dim):
                raise CheckpointError(
                    f"{path}: key {a + f'attn.to_{n}.weight'!r} has shape {tuple(t.shape)}, the "
                    f"config expects {(dim, dim)}"
                )
            qkv.append(t)
        out[b + "attn.qkv.weight"] = torch.cat(qkv, dim=0)
        if a + "attn.to_out.weight" in sd:
            out[b + "attn.to_out.weight"] = take(a + "attn.to_out.weight")
        for n in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[b + f"{n}.{p}"] = take(a + f"{n}.{p}")
        for p in ("weight", "bias"):
            out[b + f"ff.fc1.{p}"] = take(a + f"ff.ff.0.0.{p}")
            out[b + f"ff.fc2.{p}"] = take(a + f"ff.ff.2.{p}")
        for ax, name in ((0, "y"), (1, "x")):
            k = a + f"rotary_pos_embs.{ax}.inv_freq"
            if rotary_mode == "per_layer":
                out[b + f"rope.inv_freq_{name}"] = take(k)
            else:
                sd.pop(k, None)  # shared/fixed: the same tensor is also listed per layer
    if rotary_mode in ("shared", "fixed"):
        for ax, name in ((0, "y"), (1, "x")):
            out[f"{dst}rope.inv_freq_{name}"] = take(f"{src}rotary_pos_embs.{ax}.inv_freq")


def official_to_ours(
    sd: dict[str, Tensor],
    enc_cfg: dict[str, Any],
    mae_cfg: dict[str, Any] | None = None,
    path: Path | str = "model.pth",
    encoder_only: bool = False,
) -> dict[str, Tensor]:
    """Translate an official state dict (encoder, or MAE with ``mae_cfg``) to our key names."""
    path = Path(path)
    sd = dict(sd)
    out: dict[str, Tensor] = {}
    pre = "encoder." if mae_cfg is not None else ""
    if mae_cfg is not None and encoder_only:
        sd = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    opre = "" if encoder_only else pre
    if f"{pre}level_embed" in sd:
        out[f"{opre}level_embed"] = sd.pop(f"{pre}level_embed")
    for k in [k for k in sd if k.startswith(f"{pre}proj.")]:
        out[opre + k[len(pre) :]] = sd.pop(k)
    _stack_official_to_ours(
        sd, pre, opre, enc_cfg["num_layers"], enc_cfg["rotary_mode"], path, out, int(enc_cfg["dim"])
    )
    if mae_cfg is not None and not encoder_only:
        for k in ("mask_token", "final.weight", "final.bias"):
            if k not in sd:
                raise CheckpointError(f"{path}: missing key {k!r}")
            out[k] = sd.pop(k)
        for lvl in range(len(enc_cfg["levels"])):
            p = f"decoder.{lvl}."
            for k in [k for k in sd if k.startswith(p + "proj.")]:
                out[k] = sd.pop(k)
            _stack_official_to_ours(
                sd,
                p,
                p,
                mae_cfg["decoder_layers"],
                mae_cfg["decoder_rotary_mode"],
                path,
                out,
                int(mae_cfg["decoder_dim"]),
            )
    if sd:
        raise CheckpointError(f"{path}: unexpected key {next(iter(sd))!r} ({len(sd)} in total)")
    return out


def _stack_ours_to_official(
    sd: dict[str, Tensor],
    src: str,
    dst: str,
    num_layers: int,
    rotary_mode: str,
    dim: int,
    out: dict[str, Tensor],
) -> None:
    shared = {}
    if rotary_mode in ("shared", "fixed"):
        shared = {ax: sd.pop(f"{src}rope.inv_freq_{n}") for ax, n in ((0, "y"), (1, "x"))}
    for i in range(num_layers):
        a, b = f"{src}layers.{i}.", f"{dst}layers.{i}."
        q, k, v = sd.pop(a + "attn.qkv.weight").split(dim, dim=0)
        out[b + "attn.to_q.weight"], out[b + "attn.to_k.weight"], out[b + "attn.to_v.weight"] = (
            q,
            k,
            v,
        )
        if a + "attn.to_out.weight" in sd:
            out[b + "attn.to_out.weight"] = sd.pop(a + "attn.to_out.weight")
        for n in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[b + f"{n}.{p}"] = sd.pop(a + f"{n}.{p}")
        for p in ("weight", "bias"):
            out[b + f"ff.ff.0.0.{p}"] = sd.pop(a + f"ff.fc1.{p}")
            out[b + f"ff.ff.2.{p}"] = sd.pop(a + f"ff.fc2.{p}")
        for ax, n in ((0, "y"), (1, "x")):
            if rotary_mode == "per_layer":
                out[b + f"rotary_pos_embs.{ax}.inv_freq"] = sd.pop(a + f"rope.inv_freq_{n}")
            elif shared:
                out[b + f"rotary_pos_embs.{ax}.inv_freq"] = shared[ax]
    for ax, t in shared.items():
        out[f"{dst}rotary_pos_embs.{ax}.inv_freq"] = t


def ours_to_official(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict and config (official key names) of an encoder or MAE."""
    describe = getattr(model, "checkpoint_config", None)
    kind = describe()["kind"] if describe is not None else None
    if kind not in ("encoder", "mae"):
        raise InputError(f"model: expected MuViTEncoder or MuViTMAE, got {type(model).__name__}")
    is_mae = kind == "mae"
    enc = model.encoder if is_mae else model
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    pre = "encoder." if is_mae else ""
    if is_mae:
        out["mask_token"] = sd.pop("mask_token")
    if f"{pre}level_embed" in sd:
        out[f"{pre}level_embed"] = sd.pop(f"{pre}level_embed")
    for k in [k for k in sd if k.startswith(f"{pre}proj.")]:
        out[k] = sd.pop(k)
    _stack_ours_to_official(sd, pre, pre, enc.num_layers, enc.rotary_mode, enc.dim, out)
    cfg: dict[str, Any] = {
        "attention_mode": enc.attention_mode,
        "dim": enc.dim,
        "dropout": enc.dropout,
        "heads": enc.heads,
        "in_channels": enc.in_channels,
        "input_space": "real",
        "levels": tuple(enc.levels),
        "ndim": 2,
        "num_layers": enc.num_layers,
        "patch_size": enc.patch_size,
        "rotary_base": int(enc.rotary_base)
        if float(enc.rotary_base).is_integer()
        else enc.rotary_base,
        "rotary_mode": enc.rotary_mode,
        "use_level_embed": enc.use_level_embed,
    }
    if is_mae:
        out["final.weight"] = sd.pop("final.weight")
        out["final.bias"] = sd.pop("final.bias")
        for lvl in range(enc.num_levels):
            p = f"decoder.{lvl}."
            for k in [k for k in sd if k.startswith(p + "proj.")]:
                out[k] = sd.pop(k)
            _stack_ours_to_official(
                sd, p, p, model.decoder_layers, model.decoder_rotary_mode, model.decoder_dim, out
            )
        cfg.update(
            decoder_mode=model.decoder_mode,
            dim_decoder=model.decoder_dim,
            loss=model.loss,
            masking_mode=tuple(model.masking_mode)
            if isinstance(model.masking_mode, list)
            else model.masking_mode,
            masking_ratio=model.masking_ratio,
            num_layers_decoder=model.decoder_layers,
        )
        if model.decoder_heads != enc.heads:
            raise CheckpointError(
                f"decoder_heads ({model.decoder_heads}) != encoder heads ({enc.heads}): the "
                "official format cannot represent this model"
            )
    if sd:
        raise CheckpointError(f"cannot export key {next(iter(sd))!r} to the official format")
    return out, cfg


def save_official(model: nn.Module, folder: str | Path, overwrite: bool = False) -> Path:
    """Export an encoder or MAE as an official muvit folder (config.yaml + model.pth).

    Official muvit places patches with ``linspace`` coordinates; exporting a ``coord_mode=
    "center"`` model works but the official package will then compute slightly different
    features (warned).
    """
    enc = getattr(model, "encoder", model)
    if getattr(enc, "coord_mode", "linspace") != "linspace":
        warnings.warn(
            "exporting a coord_mode='center' model: official muvit uses linspace patch "
            "coordinates, so its features will differ slightly",
            stacklevel=2,
        )
    sd, cfg = ours_to_official(model)

    # yaml.dump (not safe_dump) writes the tuples as !!python/tuple, like the official save.
    writers: dict[str, Callable[[Path], None]] = {
        CONFIG: lambda p: p.write_text(yaml.dump(cfg), encoding="utf-8"),
        OFFICIAL_WEIGHTS: lambda p: torch.save(sd, str(p)),
    }
    return _save_files(Path(folder), writers, overwrite)


def _load_official(folder: Path, cfg: dict, encoder_class: type, classes: Mapping[str, type],
                   map_location: Any, encoder_only: bool, expected: str, hint: str) -> nn.Module:
    cpath = folder / CONFIG
    is_mae, enc_cfg, mae_cfg = _official_config(cfg, cpath)
    kind = "mae" if is_mae else "encoder"
    if not encoder_only and kind not in classes:
        raise CheckpointError(f"{cpath}: expected {expected} checkpoint, got {KINDS[kind]}{hint}")
    wpath = folder / OFFICIAL_WEIGHTS
    raw = _torch_load_safe(_owned(folder, OFFICIAL_WEIGHTS))
    dec = {} if encoder_only else mae_cfg
    _check_plausible(enc_cfg, dec, _values(_shapes(raw)), cpath)
    meta = {"source": "official muvit", "folder": folder.name}
    if not is_mae or encoder_only:
        sd = official_to_ours(raw, enc_cfg, mae_cfg if is_mae else None, wpath, encoder_only=True)
        encoder = _build_checked(
            "encoder", cpath, lambda: encoder_class(**enc_cfg), _shapes(sd), wpath
        )
        encoder.meta = meta
        _load_state(encoder, sd, wpath)
        return encoder.to(map_location).eval()
    sd = official_to_ours(raw, enc_cfg, mae_cfg, wpath)
    mae_class = classes["mae"]
    model = _build_checked(
        "mae",
        cpath,
        lambda: mae_class(encoder_class(**enc_cfg), **mae_cfg, meta={"source": "official muvit"}),
        _shapes(sd),
        wpath,
    )
    model.encoder.meta = meta
    _load_state(model, sd, wpath)
    return model.to(map_location).eval()


def load_folder(
    folder: str | Path,
    encoder_class: type,
    classes: Mapping[str, type],
    map_location: str | torch.device = "cpu",
    *,
    encoder_only: bool = False,
    expected: str = "a napari-muvit model",
    hint: str = "",
) -> nn.Module:
    """Load a model folder (ours or official muvit) into the classes the caller names (eval mode).

    This module knows the files, not the model classes:
    :func:`napari_muvit.model.loading.load_model` passes all of them, a class's
    ``from_pretrained`` only itself. ``classes`` maps the kinds to accept
    (``encoder``, ``segmenter``, ``mae``, ``points``) to their class: ``encoder`` is built
    as ``cls(**config["encoder"])``, the others by ``cls.from_checkpoint_config(encoder,
    config, meta)`` (an official MAE by ``cls(encoder, **kwargs, meta=...)``). A folder of
    another kind is refused with ``expected {expected} checkpoint, got <class>{hint}``.
    ``encoder_class`` builds the encoder section; ``encoder_only`` loads just the encoder
    part of a folder of any kind.
    """
    if str(folder).lower().endswith(".zip"):
        raise CheckpointError(
            f"{folder}: a bioimage.io package, not a model folder; load it with "
            "napari_muvit.load_model"
        )
    folder = model_folder(folder)
    cfg = read_config(folder)
    if cfg.get("format") == FORMAT:
        return _load_ours(folder, cfg, encoder_class, classes, map_location, encoder_only,
                          expected, hint)
    if "format" in cfg:
        raise CheckpointError(f"{folder / CONFIG}: unknown format {cfg['format']!r}")
    return _load_official(folder, cfg, encoder_class, classes, map_location, encoder_only,
                          expected, hint)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
