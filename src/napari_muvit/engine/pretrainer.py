"""Multi-resolution MAE pre-training of a MuViT encoder on the user's unlabelled images.

Supplement B.2: random nested multi-resolution crops of the images (no labels), 75 % of the
tokens masked with Dirichlet(0.5)-distributed per-level proportions, per-level decoders, MSE on
the masked patches; AdamW (lr 6e-5 for the paper's D=512 encoder, scaled up for narrower ones),
gradient clipping 0.5, warm-up + cosine schedule.  Checkpoints are atomic and resumable exactly
like fine-tuning runs (see :mod:`~napari_muvit.engine.trainer`); the output folder is an MAE model
folder, so ``load_model(out)`` gives the MAE and ``MuViTEncoder.from_pretrained(out)`` (or
``napari-muvit train --init OUT``) its encoder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from napari_muvit.engine import _checkpointing as ckpt
from napari_muvit.engine._loop import RunConfig, StepProgress, TrainingLoop, thin_history
from napari_muvit.engine._models import (
    adapt_channels,
    load_start,
    mae_lr_for,
    parse_levels,
    preset_for,
    select_levels,
)
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.device import autocast
from napari_muvit.errors import InputError

__all__ = ["PretrainConfig", "Pretrainer", "pretrain"]


@dataclass
class PretrainConfig(RunConfig):
    """Hyper-parameters of an MAE pre-training run (defaults: MuViT supplement B.2).

    ``crop_size=None``: the encoder's ``meta["crop_size"]`` or 128.  ``lr=None``: 6e-5 for a
    D=512 encoder, ``6e-5·512/D`` (at most 5e-4) for narrower ones.  ``decoder_dim=None``: the
    preset's (256 for the paper encoder), else ``min(256, D)``.
    """

    steps: int = 1000
    batch_size: int = 8
    crop_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    clip: float = 0.5
    warmup_steps: int | None = None
    min_lr_factor: float = 0.01
    masking_ratio: float = 0.75
    dirichlet_alpha: float = 0.5
    decoder_dim: int | None = None
    decoder_layers: int = 2
    augment: bool = True
    checkpoint_every: float = 60.0
    checkpoint_unit: str = "seconds"
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "decoder_layers"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if self.lr is not None and not self.lr > 0:
            raise InputError(f"lr: expected a positive number, got {self.lr!r}")
        if self.crop_size is not None and (
            int(self.crop_size) != self.crop_size or self.crop_size < 8
        ):
            raise InputError(f"crop_size: expected an integer >= 8, got {self.crop_size!r}")
        if not 0.0 < self.masking_ratio < 1.0:
            raise InputError(f"masking_ratio: expected a value in (0, 1), got {self.masking_ratio}")
        if self.checkpoint_unit not in ("seconds", "steps"):
            raise InputError(
                f"checkpoint_unit: expected 'seconds' or 'steps', got {self.checkpoint_unit!r}"
            )


class Pretrainer(TrainingLoop):
    """MAE pre-training loop.

    Parameters
    ----------
    model
        A :class:`~napari_muvit.model.MuViTMAE` (continued) or a
        :class:`~napari_muvit.model.MuViTEncoder` (wrapped in a fresh MAE decoder).
    sources
        Images (:class:`~napari_muvit.data.PyramidSource`, arrays or paths); no labels.
    config, progress, cancel, out, resume, provenance, notes
        As for :class:`~napari_muvit.engine.trainer.Trainer`.
    """

    curve_keys = ("steps", "loss", "lr", "elapsed")

    def __init__(
        self,
        model: nn.Module,
        sources: Sequence[Any],
        config: PretrainConfig | None = None,
        progress: StepProgress | None = None,
        cancel: CancelToken | None = None,
        out: str | os.PathLike[str] | None = None,
        *,
        resume: bool = False,
        provenance: Mapping[str, Any] | None = None,
        notes: Iterable[str] = (),
    ) -> None:
        super().__init__(config or PretrainConfig(), progress, cancel, out, provenance)
        for note in notes:
            self._event("setup", note)
        self.sources = self._open_sources(sources)
        self.model = self._setup_model(model)
        self.crop_size = self._resolve_crop_size()
        self.dataset = self._build_dataset()
        lr = self.config.lr or mae_lr_for(self.model.encoder.dim)
        self.history["lr_base"] = lr
        self._init_optimizer([{"params": list(self.model.parameters()), "lr": lr}])
        if resume:
            self._restore()

    def _open_sources(self, sources: Sequence[Any]) -> list[Any]:
        from napari_muvit.data import open_image

        if not sources:
            raise InputError("images: expected at least one image to pre-train on, got none")
        opened = [open_image(s) for s in sources]
        channels = {s.channels for s in opened}
        if len(channels) > 1:
            raise InputError(
                f"images: expected the same channel count for all images, got {sorted(channels)}"
            )
        return opened

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from napari_muvit.model import MuViTEncoder, MuViTMAE

        if not isinstance(model, (MuViTEncoder, MuViTMAE)):
            raise InputError(
                f"model: expected a MuViTEncoder or MuViTMAE, got {type(model).__name__}"
            )
        model, notes = adapt_channels(model, self.sources[0].channels)
        for note in notes:
            self._event("channel_adaptation", note, warning=True)
        for src in self.sources:
            src.check_levels(model.levels)
        if isinstance(model, MuViTEncoder):
            model = self._wrap(model)
        model.normalization = self.sources[0].normalization.to_dict()
        return model.to(self.device)

    def _wrap(self, encoder: nn.Module) -> nn.Module:
        """A fresh MAE decoder around ``encoder`` (seeded, so runs are reproducible)."""
        from napari_muvit.model import MuViTMAE

        cfg = self.config
        preset = preset_for(encoder.dim)
        dim = cfg.decoder_dim or (preset.decoder_dim if preset else min(256, encoder.dim))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            mae = MuViTMAE(
                encoder,
                decoder_dim=dim,
                decoder_layers=cfg.decoder_layers,
                decoder_heads=_decoder_heads(dim, encoder.heads),
                masking_ratio=cfg.masking_ratio,
                dirichlet_alpha=cfg.dirichlet_alpha,
                meta=dict(getattr(encoder, "meta", {})),
            )
        self._event(
            "decoder", f"new MAE decoder (dim {dim}, {cfg.decoder_layers} layers per level)"
        )
        return mae

    def _resolve_crop_size(self) -> int:
        size = self.config.crop_size or self.model.meta.get("crop_size") or 128
        size, patch = int(size), int(self.model.encoder.patch_size)
        if size % patch:
            raise InputError(
                f"crop_size: expected a multiple of the patch size {patch}, got {size}"
            )
        return size

    def _build_dataset(self) -> Any:
        from napari_muvit.data.sampler import NestedCropDataset

        cfg = self.config
        return NestedCropDataset(
            self.sources,
            None,
            size=self.crop_size,
            levels=self.model.levels,
            length=cfg.steps * cfg.batch_size,
            weighted=False,
            augment=cfg.augment,
            seed=cfg.seed,
        )

    # ------------------------------------------------------------------ steps
    def _batch(self, step: int) -> dict[str, Tensor]:
        """Samples of ``step``: a pure function of seed and step (resumable, reproducible)."""
        b = self.config.batch_size
        samples = [self.dataset[i] for i in range(step * b, (step + 1) * b)]
        return {k: torch.stack([s[k] for s in samples]) for k in ("image", "bbox")}

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """One MAE step; the masks come from a generator seeded by (seed, step)."""
        self.model.train()
        x = batch["image"].to(self.device, non_blocking=True)
        bbox = batch["bbox"].to(self.device)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        with autocast(self.device, self.amp_dtype):
            out = self.model(x, bbox, generator=generator)
        norm = self._optimize(out["loss"].float())
        per_level = [round(float(v), 6) for v in out["loss_per_level"].detach().cpu()]
        return {"loss": float(out["loss"].detach()), "grad_norm": norm, "per_level": per_level}

    # ------------------------------------------------------------------ checkpoints
    def _update_meta(self) -> None:
        self.model.meta.update(
            crop_size=self.crop_size,
            pretrain_config=self.config.to_dict(),
            history=thin_history(self.history),
            provenance=self.history["provenance"],
        )


def _decoder_heads(dim: int, encoder_heads: int) -> int:
    """The encoder's head count (official default), reduced until each head has >= 24 dims:
    the decoders use RoPE, which needs head dims of at least 20."""
    if dim < 20:
        raise InputError(f"decoder_dim: expected at least 20 (RoPE head dimension), got {dim}")
    heads = max(1, int(encoder_heads))
    while heads > 1 and (dim % heads or dim // heads < 24):
        heads -= 1
    return heads


def pretrain(
    images: Any,
    levels: str | Sequence[float] | None = None,
    out: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    preset: str | None = None,
    init: str | os.PathLike[str] | nn.Module | None = None,
    config: PretrainConfig | None = None,
    progress: StepProgress | None = None,
    cancel: CancelToken | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> nn.Module:
    """Pre-train a MuViT encoder with the multi-resolution MAE; returns the ``MuViTMAE``.

    ``images``: one or a list of images (paths, arrays, PyramidSources).  ``levels``: e.g.
    ``"1,8,32"`` (default: ``init``'s levels, else 1,4).  ``preset``: size of a fresh encoder
    (default ``small``) when there is no ``init`` (an encoder or MAE folder to continue from).
    ``steps`` overrides ``config.steps``.  ``out``/``resume``/``overwrite``: as for
    :func:`~napari_muvit.engine.api.train`.
    """
    from napari_muvit.data import open_image
    from napari_muvit.model import load_model

    config = config or PretrainConfig()
    if steps is not None:
        config = replace(config, steps=int(steps))
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    sources = [open_image(i) for i in images]
    lock = ckpt.run_folder_lock(out) if out is not None else contextlib.nullcontext()
    with lock:  # one run per output folder, from the first look at it to the last checkpoint
        resuming = ckpt.check_out_folder(out, resume, overwrite) if out is not None else False
        if resuming:
            model, notes = load_model(out), [f"resuming the run in {Path(out).name}"]
        else:
            model, notes = _start_model(
                init, parse_levels(levels), preset, sources[0].channels, config
            )
        # names only: a model folder travels and must not carry this machine's paths
        provenance = {
            "init": _name(init) if not isinstance(init, nn.Module) else None,
            "images": [
                _name(i) if isinstance(i, (str, os.PathLike)) else type(i).__name__
                for i in images
            ],
            "steps": config.steps,
            "preset": preset,
        }
        trainer = Pretrainer(
            model,
            sources,
            config,
            progress,
            cancel,
            out,
            resume=resuming,
            provenance=provenance,
            notes=notes,
        )
        trainer.run()
    return trainer.model


def _name(path: Any) -> str | None:
    return None if path is None else Path(path).resolve().name


def _start_model(
    init: Any,
    levels: tuple[float, ...] | None,
    preset: str | None,
    channels: int,
    config: PretrainConfig,
) -> tuple[nn.Module, list[str]]:
    """Encoder or MAE to pre-train: ``init`` (restricted to ``levels``) or a fresh preset."""
    from napari_muvit.engine._models import fresh_encoder
    from napari_muvit.model import MuViTMAE, MuViTSegmenter

    if init is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            enc = fresh_encoder(preset or "small", channels, levels)
        return enc, [
            f"start: randomly initialised {preset or 'small'} encoder, levels {list(enc.levels)}"
        ]
    model = load_start(init)
    notes = [f"start: {init if isinstance(init, nn.Module) else _name(init)}"]
    if isinstance(model, MuViTSegmenter):
        model = model.encoder
        notes.append("start: the encoder of a segmenter (head dropped)")
    if isinstance(model, MuViTMAE):
        if levels is None or list(map(float, levels)) == list(map(float, model.levels)):
            return model, notes
        model = model.encoder
        notes.append("start: the MAE's encoder with a new decoder (levels changed)")
    model, level_notes = select_levels(model, levels)
    return model, notes + level_notes
