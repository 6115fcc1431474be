"""Resumable training checkpoints shared by fine-tuning and MAE pre-training.

A training output folder is an ordinary model folder (``config.yaml`` + ``model.safetensors`` +
``history.json``) plus ``train_state.pt``: optimizer, scheduler, step and random number generator
states, saved with :func:`torch.save` from tensors and plain containers only so that it loads
with ``weights_only=True`` (no arbitrary code runs when resuming a folder someone sent you).

Every checkpoint replaces these four files as one set with the model layer's single atomic
writer (:func:`napari_muvit.model._atomic.commit_files`): a kill at any moment leaves the previous
checkpoint or the new one, and every other file in the folder (the user's notes, predictions)
is never touched. A run holds the folder's advisory lock (:func:`run_folder_lock`) from the
first check of the folder to its last checkpoint, so a second run on the same folder gets a
one-line error instead of interleaving checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from napari_muvit.errors import CheckpointError, InputError
from napari_muvit.locks import _pid_alive, advisory_lock
from napari_muvit.model._atomic import commit_files, committed_path, recover_files
from napari_muvit.model.checkpoint import (
    CONFIG,
    FORMAT,
    OWNED_FILES,
    TRAIN_STATE,
    load_history,
    model_files,
    read_config,
)

__all__ = [
    "TRAIN_STATE",
    "check_out_folder",
    "folder_kind",
    "load_history",
    "load_train_state",
    "recover_folder",
    "run_folder_lock",
    "write_checkpoint",
]


@contextlib.contextmanager
def run_folder_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the advisory lock of a training folder (re-entrant in one thread)."""
    with advisory_lock(out, "training folder") as lock:
        yield lock


# Folders left by versions that swapped whole folders: ``.NAME.tmp-PID-HEX`` (the checkpoint
# being written), ``..NAME.tmp-PID-HEX.tmp-RAND`` (the model save inside it) and
# ``.NAME.old-PID-HEX`` (the previous checkpoint, between two renames).
_LEGACY = re.compile(r"^\.\.?(?P<name>.+?)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+(\.tmp-.+)?$")


def _legacy_siblings(out: Path) -> list[tuple[Path, str, int]]:
    if not out.parent.is_dir():
        return []
    found = []
    for entry in out.parent.iterdir():
        match = _LEGACY.match(entry.name)
        if match and match["name"] == out.name and entry.is_dir():
            found.append((entry, match["kind"], int(match["pid"])))
    return sorted(found, key=lambda item: item[0].stat().st_mtime)


def recover_folder(out: str | os.PathLike[str]) -> None:
    """Repair ``out`` after a crash: finish or undo an interrupted checkpoint.

    Inside the folder, :func:`~napari_muvit.model._atomic.recover_files` completes a committed
    checkpoint or deletes an uncommitted one's temporaries. Beside it, folders left by older
    versions are cleaned up when the process that made them is gone: if ``out`` is missing, the
    newest ``.NAME.old-*`` copy is put back; temporaries are deleted. The caller holds the lock.
    """
    out = Path(out)
    legacy = [(p, kind) for p, kind, pid in _legacy_siblings(out) if not _pid_alive(pid)]
    olds = [p for p, kind in legacy if kind == "old"]
    if not out.exists() and olds:
        os.rename(olds[-1], out)
        olds = olds[:-1]
    for stale in [*olds, *(p for p, kind in legacy if kind == "tmp")]:
        shutil.rmtree(stale, ignore_errors=True)
    recover_files(out)


def write_checkpoint(
    out: Path, model: Any, state: dict[str, Any], history: dict[str, Any]
) -> Path:
    """Commit model files, ``history.json`` and ``train_state.pt`` into ``out`` as one set."""
    writers: dict[str, Callable[[Path], None]] = model_files(model, history=history)
    writers[TRAIN_STATE] = lambda path: torch.save(state, path)
    return commit_files(out, writers, OWNED_FILES)


def load_train_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``train_state.pt`` with ``weights_only=True`` onto the CPU."""
    folder = Path(folder)
    path = committed_path(folder, TRAIN_STATE)
    if path is None or not path.is_file():
        raise CheckpointError(f"{folder} has no {TRAIN_STATE}: it is not a resumable run")
    shown = folder / TRAIN_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt file or a pickle with foreign objects
        # torch's own message spans lines and suggests weights_only=False, which would run
        # the file's code: never give that advice for a file that may come from anyone
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "weights_only" in first or "Weights only load failed" in first:
            first = "it holds objects other than tensors and plain containers"
        raise CheckpointError(
            f"cannot read training state {shown}: {first[:200]}; refused (only plain "
            "training states are loaded); start a new run with --overwrite"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"cannot read training state {shown}: not a napari-muvit run")
    return state


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
    try:
        meta = read_config(folder) if (folder / CONFIG).is_file() else None
    except CheckpointError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "foreign"
    return "resumable" if (folder / TRAIN_STATE).is_file() else "model"


def check_out_folder(out: str | os.PathLike[str], resume: bool, overwrite: bool) -> bool:
    """Validate an output folder before any work starts; returns whether to resume from it.

    * missing or empty: start fresh (also with ``resume``);
    * a resumable run: resume if ``resume``, replace if ``overwrite``, else an error;
    * a finished napari-muvit model folder: replace only with ``overwrite``;
    * anything else (user data): never touched, even with ``overwrite``.

    Replacing means replacing napari-muvit's own files: other files in the folder are kept.
    The caller holds :func:`run_folder_lock`.
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
        try:
            history = load_history(out) or {}
        except CheckpointError:
            history = {}
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
