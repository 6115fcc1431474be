"""Starting models for training: presets, loading ``--init`` folders, channel adaptation, heads.

Everything that turns "what the user asked for" (a preset name, a model folder, a set of
levels, the image's channel count, the painted label values) into a model ready to train lives
here, so that :mod:`~napari_muvit.engine.trainer` and :mod:`~napari_muvit.engine.pretrainer` only
run optimisation loops.  Every change made to a model is returned as a human-readable note that
the caller records in the training history: nothing is adapted silently.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from napari_muvit.errors import CheckpointError, InputError


@dataclass(frozen=True)
class Preset:
    """Encoder size and matching training defaults of a named preset."""

    dim: int
    num_layers: int
    heads: int
    patch_size: int
    head_dim: int
    crop_size: int
    decoder_dim: int


# tiny: unit tests and CPU smoke runs; small: minutes on a laptop CPU (the bundled default
# encoder's size); paper: the MuViT paper's encoder (D=512, 12 layers, 8 heads, P=8, ~25M).
# The head width matters most on CPUs: the UNETR head's full-resolution convolutions cost ~20x
# the small encoder at 128² crops, so "small" uses a 64-wide head (3x faster than 128).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 2, 2, 8, 64, 64, 64),
    "small": Preset(192, 4, 4, 8, 64, 128, 128),
    "paper": Preset(512, 12, 8, 8, 256, 256, 256),
}
DEFAULT_LEVELS: tuple[int, ...] = (1, 4)
# Head layout of newly trained models (old folders keep the layout their config names): a
# tapered UNETR decoder trains 1.5x more steps per CPU-second and predicts ~30 % cheaper than
# the flat one, and was level with it on held-out quality after the same CPU time
# (benchmarks/bench_head_ttq.py, docs/benchmarks.md; docs/model-card.md records the choice).
# Replicate padding: zero padding made every prediction tile's edge look like a dark frame
# (tile seams on bright background, issue 13; benchmarks/bench_seams.py).
NEW_HEAD_OPTIONS: dict[str, object] = {"taper": True, "padding_mode": "replicate"}
# A new pixel head: a random forest on the filter bank of every level's crop, without the
# encoder's features (they made the forest worse with a few thousand painted pixels; the
# levels' filters carry the context: benchmarks/bench_scribbles.py, docs/benchmarks.md).
# Which levels the forest reads (its forest_levels/forest_sub_levels options) is chosen by
# the quick fit on held-out strokes (QuickConfig.select_levels), not fixed here.
# The coarse levels' crops are also filtered at 10 and 20 px (160 and 320 level-1 pixels on
# level 16): where a pixel lies in a tissue's layers (benchmarks/bench_scribbles.py, skin).
NEW_PIXEL_HEAD_OPTIONS: dict[str, object] = {
    "bank": "levels", "classifier": "forest", "encoder_features": False,
    "context_sigmas": [10.0, 20.0],
}


def get_preset(name: str) -> Preset:
    """The :class:`Preset` called ``name`` (``tiny``, ``small`` or ``paper``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}") from None


def parse_levels(levels: str | Sequence[float] | None) -> tuple[float | int, ...] | None:
    """``"1,8,32"`` or ``[1, 8, 32]`` -> ``(1, 8, 32)``; ``None`` stays ``None``."""
    if levels is None:
        return None
    items = levels.replace(" ", "").split(",") if isinstance(levels, str) else list(levels)
    try:
        values = [float(v) for v in items if v != ""]
    except (TypeError, ValueError):
        raise InputError(
            f"levels: expected comma-separated numbers like 1,8,32, got {levels!r}"
        ) from None
    if not values or values[0] < 1 or any(b <= a for a, b in itertools.pairwise(values)):
        raise InputError(f"levels: expected ascending factors >= 1 like 1,8,32, got {levels!r}")
    return tuple(int(v) if float(v).is_integer() else v for v in values)


def fresh_encoder(preset: str, in_channels: int, levels: Sequence[float] | None) -> nn.Module:
    """A randomly initialised encoder of ``preset`` size."""
    from napari_muvit.model import MuViTEncoder

    p = get_preset(preset)
    enc = MuViTEncoder(
        in_channels=in_channels,
        levels=tuple(levels or DEFAULT_LEVELS),
        patch_size=p.patch_size,
        dim=p.dim,
        num_layers=p.num_layers,
        heads=p.heads,
    )
    enc.meta = {"init": f"random ({preset} preset)", "crop_size": p.crop_size}
    return enc


def load_start(init: str | os.PathLike[str] | nn.Module) -> nn.Module:
    """Load an ``--init`` model (our folder, an official muvit folder, or a module as is)."""
    if isinstance(init, nn.Module):
        return init
    from napari_muvit.model import load_model

    path = Path(init)
    if not path.exists():
        raise InputError(f"init: model folder {path} does not exist")
    try:
        model = load_model(path)
    except CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(f"init: cannot load a model from {path}: {err}") from err
    # the folder's name, not its path: model folders travel and must not carry machine paths
    model.meta = {**getattr(model, "meta", {}), "init": path.resolve().name}
    return model


def select_levels(model: nn.Module, levels: Sequence[float] | None) -> tuple[nn.Module, list[str]]:
    """Restrict an encoder (or a segmenter's encoder) to ``levels``; returns notes."""
    from napari_muvit.model import MuViTSegmenter

    encoder = model.encoder if isinstance(model, MuViTSegmenter) else model
    if levels is None or _same_levels(encoder.levels, levels):
        return model, []
    if isinstance(model, MuViTSegmenter):
        raise InputError(
            f"levels: the segmenter was trained on levels {list(encoder.levels)}; its head cannot "
            f"be reused on levels {list(levels)} (start from its encoder instead)"
        )
    new = encoder.select_levels(levels)
    new.meta = dict(getattr(encoder, "meta", {}))
    return new, [f"encoder levels {list(encoder.levels)} -> {list(new.levels)} (select_levels)"]


def _same_levels(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), float(y)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- channels
def _adapt_tensor(old: Tensor, new_shape: torch.Size, c_old: int, c_new: int, key: str) -> Tensor:
    """Re-shape a channel-dependent weight from ``c_old`` to ``c_new`` input channels.

    Input side (patch embedding ``(D, P·P·C)`` with element order (p1, p2, c), conv
    ``(O, C, k, k)``): the new weight of every channel is the *sum* over the old channels divided
    by ``c_new``, so an image whose channels are all equal to ``x`` gives exactly the response
    the old model gave to ``x`` on all its channels (grey <-> RGB keeps working).  Output side
    (MAE pixel predictor ``(P·P·C, Dd)`` and its bias): the channel mean, replicated.
    """
    if old.ndim == 4 and old.shape[1] == c_old and new_shape[1] == c_new:
        return (old.sum(1, keepdim=True) / c_new).expand(-1, c_new, -1, -1).clone()
    if (
        old.ndim == 2
        and old.shape[1] % c_old == 0
        and new_shape[1] == old.shape[1] // c_old * c_new
    ):
        w = old.reshape(old.shape[0], -1, c_old).sum(-1, keepdim=True) / c_new
        return w.expand(-1, -1, c_new).reshape(new_shape).clone()
    if (
        old.ndim in (1, 2)
        and old.shape[0] % c_old == 0
        and new_shape[0] == old.shape[0] // c_old * c_new
    ):
        w = old.reshape(-1, c_old, *old.shape[1:]).mean(1, keepdim=True)
        return w.expand(-1, c_new, *old.shape[1:]).reshape(new_shape).clone()
    raise CheckpointError(
        f"cannot adapt weight {key!r} of shape {tuple(old.shape)} from {c_old} to {c_new} channels"
    )


def _rebuild(model: nn.Module, in_channels: int) -> nn.Module:
    """Same architecture as ``model`` with ``in_channels`` input channels (random weights)."""
    from napari_muvit.model import MuViTEncoder, MuViTMAE, MuViTSegmenter

    if isinstance(model, MuViTSegmenter):
        return MuViTSegmenter(
            _rebuild(model.encoder, in_channels),
            head=model.head_type,
            num_classes=model.num_classes,
            head_dim=model.head_dim,
            class_names=model.class_names,
            label_values=model.label_values,
            normalization=model.normalization,
            meta=model.meta,
            class_colors=model.class_colors,
            head_options=dict(model.head_options),
        )
    if isinstance(model, MuViTMAE):
        cfg = {k: v for k, v in model.decoder_config.items()}
        return MuViTMAE(
            _rebuild(model.encoder, in_channels),
            **cfg,
            normalization=model.normalization,
            meta=model.meta,
        )
    if isinstance(model, MuViTEncoder):
        enc = MuViTEncoder(**{**model.config, "in_channels": in_channels})
        enc.meta = dict(getattr(model, "meta", {}))
        return enc
    raise InputError(
        f"model: expected a MuViT encoder, segmenter or MAE, got {type(model).__name__}"
    )


def model_channels(model: nn.Module) -> int:
    """Input channels of an encoder, segmenter or MAE."""
    encoder = getattr(model, "encoder", model)
    return int(encoder.in_channels)


def adapt_channels(model: nn.Module, in_channels: int) -> tuple[nn.Module, list[str]]:
    """Return ``model`` with ``in_channels`` input channels and a note, or unchanged.

    The transformer, level embeddings and every channel-independent weight are copied; only the
    patch embeddings (and the UNETR/Mask2Former raw-image skip, the MAE pixel predictor) are
    re-derived by :func:`_adapt_tensor`.
    """
    c_old = model_channels(model)
    if c_old == in_channels:
        return model, []
    new = _rebuild(model, in_channels)
    old_sd = model.state_dict()
    new_sd = new.state_dict()
    adapted = []
    for key, ref in new_sd.items():
        old = old_sd[key]
        if old.shape == ref.shape:
            new_sd[key] = old.clone()
        else:
            new_sd[key] = _adapt_tensor(old, ref.shape, c_old, in_channels, key)
            adapted.append(key)
    new.load_state_dict(new_sd)
    # one short line: the training panel shows it next to the form
    note = f"channel adaptation: {c_old}-channel starting model adapted to {in_channels} channel(s)"
    return new.to(next(model.parameters()).device), [note]


# ---------------------------------------------------------------------------- heads
def default_class_names(label_values: Sequence[int], dense: bool) -> list[str]:
    """``background`` for value 0 in dense mode, ``class <value>`` otherwise."""
    return ["background" if (dense and v == 0) else f"class {v}" for v in label_values]


def new_segmenter(
    encoder: nn.Module,
    label_values: Sequence[int],
    head: str,
    preset: Preset | None,
    class_names: Sequence[str] | None,
    dense: bool,
    classifier: str = "forest",
) -> nn.Module:
    """A segmenter with a fresh ``head`` on ``encoder`` for ``label_values`` (a ``"pixel"``
    head with a ``classifier``: ``"forest"`` on every level's filters, or the ``"mlp"`` on
    level-1 filters and encoder features)."""
    from napari_muvit.model import MuViTSegmenter

    head_dim = preset.head_dim if preset is not None else _head_dim_for(encoder.dim)
    names = (
        list(class_names) if class_names is not None else default_class_names(label_values, dense)
    )
    return MuViTSegmenter(
        encoder,
        head=head,
        num_classes=len(label_values),
        head_dim=head_dim,
        class_names=names,
        label_values=list(label_values),
        meta={k: v for k, v in getattr(encoder, "meta", {}).items() if k in ("init", "crop_size")},
        head_options=copy.deepcopy({**NEW_HEAD_OPTIONS, **(
            NEW_PIXEL_HEAD_OPTIONS if head == "pixel" and classifier == "forest" else {})}),
    )


def preset_for(dim: int) -> Preset | None:
    """The preset whose encoder width is ``dim`` (for matching head/decoder sizes)."""
    return next((p for p in PRESETS.values() if p.dim == dim), None)


def mae_lr_for(dim: int) -> float:
    """MAE learning rate: the paper's 6e-5 at D=512, scaled by 512/D for narrower encoders
    (smaller models tolerate, and on CPU budgets need, larger steps), at most 5e-4."""
    return float(min(5e-4, 6e-5 * max(1.0, 512 / dim)))


def _head_dim_for(dim: int) -> int:
    """Head width for an encoder of width ``dim`` (the paper: 256 for D=512)."""
    return int(min(256, max(32, dim // 2)))
