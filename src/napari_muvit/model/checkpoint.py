"""Model folders: our format (config.yaml + model.safetensors) and official muvit folders.

Our format::

    folder/
      config.yaml        format: napari-muvit, format_version: 1, kind: encoder|segmenter|mae,
                         encoder: {...}, head: {...} | null, class_names, label_values,
                         class_colors, normalization, meta
      model.safetensors  float tensors, our key names (fused qkv)

Official muvit 0.1.0 folders (spec §2): ``config.yaml`` written by ``yaml.dump`` (with
``!!python/tuple`` tags) + ``model.pth`` (a torch zip pickle of the state dict). We never
unpickle arbitrary objects: ``torch.load(weights_only=True)`` only, so a malicious ``model.pth``
is refused without running any of its code. YAML is parsed with ``yaml.safe_load`` or a
``SafeLoader`` subclass that only adds the python/tuple tag.

Writing is atomic: everything goes to a temporary sibling folder which is renamed into place;
an existing non-empty folder is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from napari_muvit.errors import CheckpointError, InputError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "is_official_folder",
    "load_encoder",
    "load_model",
    "official_to_ours",
    "ours_to_official",
    "read_config",
    "save_model",
    "save_official",
]

FORMAT = "napari-muvit"
FORMAT_VERSION = 1
CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
OFFICIAL_WEIGHTS = "model.pth"


# =============================================================================== YAML
class TupleSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also accepts ``!!python/tuple`` (official configs)."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


TupleSafeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


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


def _folder(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file() and p.name in (CONFIG, WEIGHTS, OFFICIAL_WEIGHTS):
        p = p.parent
    return p


def read_config(folder: str | Path) -> dict[str, Any]:
    """Parse ``folder/config.yaml`` safely (python/tuple tags allowed) and return the mapping."""
    folder = _folder(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a model folder holds {CONFIG} and {WEIGHTS} (ours) or "
            f"{OFFICIAL_WEIGHTS} (official muvit)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    try:
        try:
            cfg = yaml.safe_load(text)
        except yaml.constructor.ConstructorError:
            cfg = yaml.load(text, Loader=TupleSafeLoader)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a mapping of keys, got {type(cfg).__name__}")
    return cfg


def is_official_folder(folder: str | Path) -> bool:
    """True for an official muvit folder (config without our ``format`` key + ``model.pth``)."""
    folder = _folder(folder)
    try:
        cfg = read_config(folder)
    except CheckpointError:
        return False
    return cfg.get("format") != FORMAT and (folder / OFFICIAL_WEIGHTS).is_file()


# =============================================================================== saving
def _atomic_folder(folder: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    folder = Path(folder).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: exists and is not a folder")
        if any(folder.iterdir()) and not overwrite:
            raise CheckpointError(
                f"{folder}: already exists and is not empty; pass overwrite=True to replace it"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a model folder should be shareable
        write(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            try:
                tmp.rename(folder)
            except BaseException:
                old.rename(folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _model_config(model: nn.Module, meta: dict | None) -> dict[str, Any]:
    from napari_muvit.model.encoder import MuViTEncoder
    from napari_muvit.model.mae import MuViTMAE
    from napari_muvit.model.segmenter import MuViTSegmenter

    cfg: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    # --- kind "points" (model/points.py): the detector describes itself
    if getattr(model, "task", None) == "points":
        cfg.update(model.checkpoint_config(), meta={**model.meta, **(meta or {})})
        return _plain(cfg)
    # ---
    if isinstance(model, MuViTSegmenter):
        cfg.update(
            kind="segmenter",
            encoder=model.encoder.config,
            head=model.head_config,
            class_names=model.class_names,
            label_values=model.label_values,
            class_colors=model.class_colors,
            normalization=model.normalization,
            meta={**model.meta, **(meta or {})},
        )
    elif isinstance(model, MuViTMAE):
        cfg.update(
            kind="mae",
            encoder=model.encoder.config,
            head=model.decoder_config,
            class_names=None,
            label_values=None,
            class_colors=None,
            normalization=model.normalization,
            meta={**model.meta, **(meta or {})},
        )
    elif isinstance(model, MuViTEncoder):
        cfg.update(
            kind="encoder",
            encoder=model.config,
            head=None,
            class_names=None,
            label_values=None,
            class_colors=None,
            normalization=None,
            meta={**getattr(model, "meta", {}), **(meta or {})},
        )
    else:
        raise InputError(
            f"model: expected MuViTEncoder, MuViTSegmenter or MuViTMAE, got {type(model).__name__}"
        )
    return _plain(cfg)


def save_model(
    model: nn.Module, folder: str | Path, overwrite: bool = False, meta: dict | None = None
) -> Path:
    """Save an encoder, segmenter or MAE in our format (atomic; see module docstring)."""
    from safetensors.torch import save_file

    cfg = _model_config(model, meta)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})

    return _atomic_folder(Path(folder), write, overwrite)


# =============================================================================== loading
def _load_state(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    """Strict state-dict load with errors naming the file and the key."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise CheckpointError(
            f"{path}: missing key {missing[0]!r} ({len(missing)} missing in total)"
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in total)"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, the config expects {tuple(v.shape)}"
            )
        if not torch.isfinite(sd[k].float()).all():
            raise CheckpointError(f"{path}: key {k!r} contains NaN or inf")
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)


def _build(kind_desc: str, path: Path, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except TypeError as exc:
        raise CheckpointError(f"{path}: bad {kind_desc} config ({exc})") from None
    except (InputError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad {kind_desc} config ({exc})") from None


def _section(cfg: dict, key: str, path: Path, kind: type = dict) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{path}: missing key {key!r}")
    val = cfg[key]
    if not isinstance(val, kind):
        raise CheckpointError(
            f"{path}: key {key!r} should be a {kind.__name__}, got {type(val).__name__}"
        )
    return val


def _load_ours(folder: Path, cfg: dict, map_location: Any, encoder_only: bool = False) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from napari_muvit.model.encoder import MuViTEncoder
    from napari_muvit.model.mae import MuViTMAE
    from napari_muvit.model.segmenter import MuViTSegmenter

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
    if kind not in ("encoder", "segmenter", "mae", "points"):
        raise CheckpointError(
            f"{cpath}: key 'kind' should be encoder|segmenter|mae|points, got {kind!r}"
        )
    enc_cfg = _section(cfg, "encoder", cpath)
    wpath = folder / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: missing (the weights of this model folder)")
    try:
        sd = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{wpath}: not a readable safetensors file ({exc})") from None
    encoder = _build("encoder", cpath, lambda: MuViTEncoder(**enc_cfg))
    meta = cfg.get("meta") or {}
    if kind == "encoder" or encoder_only:
        if kind != "encoder":
            sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
        encoder.meta = dict(meta) if isinstance(meta, dict) else {}
        _load_state(encoder, sd, wpath)
        model: nn.Module = encoder
    # --- kind "points" (model/points.py)
    elif kind == "points":
        from napari_muvit.model.points import MuViTPointDetector

        _section(cfg, "head", cpath)
        model = _build(
            "point head",
            cpath,
            lambda: MuViTPointDetector.from_checkpoint_config(
                encoder, cfg, meta if isinstance(meta, dict) else {}
            ),
        )
        _load_state(model, sd, wpath)
    # ---
    elif kind == "segmenter":
        head = dict(_section(cfg, "head", cpath))
        htype = head.pop("type", None)
        K = head.pop("num_classes", None)
        hd = head.pop("head_dim", 256)
        if not isinstance(K, int):
            raise CheckpointError(f"{cpath}: key 'head.num_classes' should be an int, got {K!r}")
        model = _build(
            "head",
            cpath,
            lambda: MuViTSegmenter(
                encoder,
                head=htype,
                num_classes=K,
                head_dim=hd,
                class_names=cfg.get("class_names"),
                label_values=cfg.get("label_values"),
                normalization=cfg.get("normalization"),
                meta=meta if isinstance(meta, dict) else {},
                class_colors=cfg.get("class_colors"),
                head_options=head,
            ),
        )
        _load_state(model, sd, wpath)
    else:
        dec = dict(_section(cfg, "head", cpath))
        model = _build(
            "mae decoder",
            cpath,
            lambda: MuViTMAE(
                encoder,
                **dec,
                normalization=cfg.get("normalization"),
                meta=meta if isinstance(meta, dict) else {},
            ),
        )
        _load_state(model, sd, wpath)
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
    from napari_muvit.model.encoder import MuViTEncoder
    from napari_muvit.model.mae import MuViTMAE

    is_mae = isinstance(model, MuViTMAE)
    enc: MuViTEncoder = model.encoder if is_mae else model
    if not isinstance(enc, MuViTEncoder):
        raise InputError(f"model: expected MuViTEncoder or MuViTMAE, got {type(model).__name__}")
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

    def write(tmp: Path) -> None:
        # yaml.dump (not safe_dump) writes the tuples as !!python/tuple, like the official save.
        (tmp / CONFIG).write_text(yaml.dump(cfg), encoding="utf-8")
        torch.save(sd, str(tmp / OFFICIAL_WEIGHTS))

    return _atomic_folder(Path(folder), write, overwrite)


def _load_official(folder: Path, cfg: dict, map_location: Any, encoder_only: bool) -> nn.Module:
    from napari_muvit.model.encoder import MuViTEncoder
    from napari_muvit.model.mae import MuViTMAE

    cpath = folder / CONFIG
    is_mae, enc_cfg, mae_cfg = _official_config(cfg, cpath)
    wpath = folder / OFFICIAL_WEIGHTS
    raw = _torch_load_safe(wpath)
    encoder = _build("encoder", cpath, lambda: MuViTEncoder(**enc_cfg))
    encoder.meta = {"source": "official muvit", "folder": str(folder)}
    if not is_mae or encoder_only:
        sd = official_to_ours(raw, enc_cfg, mae_cfg if is_mae else None, wpath, encoder_only=True)
        _load_state(encoder, sd, wpath)
        return encoder.to(map_location).eval()
    model = _build(
        "mae", cpath, lambda: MuViTMAE(encoder, **mae_cfg, meta={"source": "official muvit"})
    )
    sd = official_to_ours(raw, enc_cfg, mae_cfg, wpath)
    _load_state(model, sd, wpath)
    return model.to(map_location).eval()


def load_model_of_kind(
    folder: str | Path, cls: type, what: str, hint: str = "",
    map_location: str | torch.device = "cpu",
) -> Any:
    """:func:`load_model`, refusing a folder that holds something other than ``cls``.

    ``what`` names the expected kind in the message (``"an MAE"``); ``hint`` says what to do.
    """
    model = load_model(folder, map_location=map_location)
    if not isinstance(model, cls):
        raise CheckpointError(
            f"{Path(folder) / 'config.yaml'}: expected {what} checkpoint, "
            f"got {type(model).__name__}{hint}"
        )
    return model


def load_model(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load whatever the folder holds: MuViTEncoder, MuViTSegmenter or MuViTMAE (eval mode).

    Accepts our folders and official muvit folders (encoder → MuViTEncoder with
    ``coord_mode="linspace"``, MAE → MuViTMAE reproducing the official loss).
    """
    folder = _folder(folder)
    cfg = read_config(folder)
    if cfg.get("format") == FORMAT:
        return _load_ours(folder, cfg, map_location)
    if "format" in cfg:
        raise CheckpointError(f"{folder / CONFIG}: unknown format {cfg['format']!r}")
    return _load_official(folder, cfg, map_location, encoder_only=False)


def load_encoder(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load only the encoder of any model folder (ours of any kind, official encoder or MAE)."""
    folder = _folder(folder)
    cfg = read_config(folder)
    if cfg.get("format") == FORMAT:
        return _load_ours(folder, cfg, map_location, encoder_only=True)
    if "format" in cfg:
        raise CheckpointError(f"{folder / CONFIG}: unknown format {cfg['format']!r}")
    return _load_official(folder, cfg, map_location, encoder_only=True)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
