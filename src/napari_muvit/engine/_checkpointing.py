"""Atomic, resumable training checkpoints shared by fine-tuning and MAE pre-training.

A training output folder is an ordinary model folder (``config.yaml`` + ``model.safetensors``,
written by the model's ``save``) plus ``train_state.pt``: optimizer, scheduler, step and random
number generator states, saved with :func:`torch.save` from tensors and plain containers only so
that it loads with ``weights_only=True`` (no arbitrary code runs when resuming a folder someone
sent you).

Every checkpoint is written into a hidden sibling folder first and then swapped in with two
renames, so the output folder always holds one complete checkpoint: a run that crashes while
writing leaves the previous checkpoint (or, in the tiny window between the two renames, a
``.NAME.old-*`` folder that :func:`recover_folder` puts back).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from napari_muvit.errors import CheckpointError, InputError

TRAIN_STATE = "train_state.pt"
CONFIG = "config.yaml"
HISTORY = "history.json"


def _siblings(out: Path, kind: str) -> list[Path]:
    """Hidden temporary/old folders that belong to ``out`` (``.NAME.tmp-*``/``.NAME.old-*``)."""
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)


def recover_folder(out: str | os.PathLike[str]) -> None:
    """Repair ``out`` after a crash in the middle of :func:`atomic_replace_folder`.

    If ``out`` is missing but a ``.NAME.old-*`` copy exists (crash between the two renames), the
    newest old copy is renamed back; stale temporary folders are removed either way.
    """
    out = Path(out)
    olds = _siblings(out, "old")
    if not out.exists() and olds:
        os.rename(olds[-1], out)
        olds = olds[:-1]
    for stale in [*olds, *_siblings(out, "tmp")]:
        shutil.rmtree(stale, ignore_errors=True)


def atomic_replace_folder(out: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a folder with ``write(tmp)`` and swap it into ``out`` without a torn state.

    ``write`` receives a fresh, existing, empty temporary folder next to ``out`` (same file
    system, so renames are atomic).  If ``write`` raises, ``out`` is untouched.
    """
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{tag}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _fsync_tree(folder: Path) -> None:
    """Flush the files of ``folder`` to disk so a power loss cannot leave empty files behind."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def save_train_state(folder: Path, state: dict[str, Any]) -> None:
    """Save optimizer/scheduler/step/RNG state (tensors and plain containers only)."""
    torch.save(state, folder / TRAIN_STATE)


def load_train_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``train_state.pt`` with ``weights_only=True`` onto the CPU."""
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{Path(folder)} has no {TRAIN_STATE}: it is not a resumable run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or foreign pickle: say which file
        raise CheckpointError(f"cannot read training state {path}: {err}") from err


def save_history(folder: Path, history: dict[str, Any]) -> None:
    """Write the full training history as JSON beside the model (easy to plot)."""
    (folder / HISTORY).write_text(json.dumps(history, indent=1, default=_json_default))


def load_history(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``history.json`` of a training folder, or ``None`` if it has none."""
    path = Path(folder) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else None


def _json_default(obj: Any) -> Any:
    """JSON encoding for numpy scalars/arrays and paths found in histories."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def folder_kind(folder: Path) -> str:
    """Classify an existing output folder.

    Returns ``"missing"``, ``"empty"``, ``"resumable"`` (a napari-muvit model folder with
    ``train_state.pt``), ``"model"`` (a napari-muvit model folder without it) or ``"foreign"``
    (anything else: never written to).
    """
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "foreign"
    if not any(folder.iterdir()):
        return "empty"
    config = folder / CONFIG
    try:
        meta = yaml.safe_load(config.read_text()) if config.is_file() else None
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != "napari-muvit":
        return "foreign"
    return "resumable" if (folder / TRAIN_STATE).is_file() else "model"


def check_out_folder(out: str | os.PathLike[str], resume: bool, overwrite: bool) -> bool:
    """Validate an output folder before any work starts; returns whether to resume from it.

    * missing or empty: start fresh (also with ``resume``);
    * a resumable run: resume if ``resume``, replace if ``overwrite``, else an error;
    * a finished napari-muvit model folder: replace only with ``overwrite``;
    * anything else (user data): never touched, even with ``overwrite``.
    """
    out = Path(out)
    recover_folder(out)
    kind = folder_kind(out)
    if kind in ("missing", "empty"):
        # --resume on a fresh folder starts the run, so "rerun the same command after a crash"
        # works from the first attempt on.
        return False
    if kind == "foreign":
        raise InputError(
            f"output folder {out} exists and is not a napari-muvit model folder; "
            "refusing to write into it (choose a new or empty folder)"
        )
    if kind == "resumable" and resume:
        return True
    if overwrite:
        return False
    if kind == "resumable":
        history = load_history(out) or {}
        status = {"finished": "finished", "cancelled": "stopped"}.get(
            history.get("status"), "unfinished"
        )
        state = f"training run ({status}, step {history.get('step', '?')})"
        raise InputError(
            f"output folder {out} holds a {state}; "
            "pass --resume to continue it or --overwrite to start over"
        )
    raise InputError(
        f"output folder {out} already holds a model; pass --overwrite to replace it "
        "or choose another folder"
    )
