"""Model choices shared by the widgets: loading, describing, and fine-tuned models in the session.

* :func:`load_segmenter` turns a model choice (the bundled default, a folder of ours, an
  official ``muvit`` folder) into a segmenter, or raises a :class:`CheckpointError` whose
  message tells the user what to do (an encoder alone is not a segmenter: fine-tune it).
* :class:`ModelRegistry` is a per-process hub (``registry()``): the train panel publishes
  snapshots of the model it is fine-tuning, and every predict widget that shows that model
  swaps in the new weights and re-predicts its live view.  Snapshots are deep copies taken by
  the trainer between steps, so prediction never reads weights that an optimizer step is
  changing.

Loading runs in worker threads: this module never touches widgets and has no Qt (the
registry's signal is a psygnal signal, emitted in the thread that publishes: the main thread).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psygnal import Signal

from napari_muvit.errors import CheckpointError
from napari_muvit.model import load_model, load_predictor_model

BUNDLED = "bundled"
FOLDER = "folder"
SESSION = "session"


@dataclass(frozen=True)
class ModelChoice:
    """Where a model comes from: ``kind`` is ``bundled``, ``folder`` or ``session``."""

    kind: str
    value: str = ""

    @property
    def label(self) -> str:
        if self.kind == BUNDLED:
            return "Bundled default (synthetic rings, MuViT[1,4])"
        if self.kind == SESSION:
            return f"Fine-tuning: {self.value}"
        return str(self.value)

    def to_setting(self) -> str:
        return f"{self.kind}:{self.value}"

    @classmethod
    def from_setting(cls, text: str) -> ModelChoice:
        kind, _, value = str(text).partition(":")
        if kind not in (BUNDLED, FOLDER):  # session models do not outlive the session
            return cls(BUNDLED)
        return cls(kind, value)


def bundled_segmenter_path() -> Path:
    """Folder of the bundled segmenter (raises CheckpointError with advice if missing)."""
    from napari_muvit.weights import default_model_path

    return default_model_path()


def bundled_encoder_path() -> Path:
    """Folder of the bundled pre-trained encoder (raises CheckpointError if missing)."""
    from napari_muvit.weights import DEFAULT_ENCODER, default_model_path

    return default_model_path(DEFAULT_ENCODER)


def load_any(folder: str | Path) -> Any:
    """Whatever the folder (or bioimage.io package) holds (encoder, MAE or segmenter), on the
    CPU."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise CheckpointError(f"model folder {str(path)!r} does not exist")
    if not path.is_dir() and path.suffix.lower() != ".zip":  # a bioimage.io package is a file
        raise CheckpointError(
            f"{str(path)!r} is a file; choose the model *folder* that holds config.yaml, or a "
            "bioimage.io package (.zip)")
    return load_model(path, map_location="cpu")


def load_segmenter(choice: ModelChoice) -> Any:
    """The segmenter of a bundled/folder choice; raises CheckpointError with a clear cause."""
    if choice.kind == SESSION:
        model = registry().session_model(choice.value)
        if model is None:
            raise CheckpointError(f"the fine-tuned model {choice.value!r} is no longer available")
        return model
    return load_predictor_model(None if choice.kind == BUNDLED else choice.value)


def describe(model: Any, device: Any = None, tile_size: int | None = None) -> str:
    """One-line summary: levels, classes, patch and tile size, device."""
    levels = ", ".join(f"{float(v):g}" for v in model.levels)
    names = list(getattr(model, "class_names", []) or [])
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    head = getattr(model, "head_type", None) or "head"
    parts = [
        f"MuViT[{levels}] + {head}",
        f"{model.num_classes} classes ({shown})",
        f"{model.in_channels} input channel{'s' if model.in_channels != 1 else ''}",
        f"patch {model.patch_size}",
    ]
    if tile_size is not None:
        parts.append(f"tile {tile_size} px")
    if device is not None:
        parts.append(f"device {device}")
    return " · ".join(parts)


@dataclass
class _Session:
    model: Any
    version: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class ModelRegistry:
    """Fine-tuned models of this napari session, shared by train and predict widgets.

    Signals
    -------
    updated(name: str)
        A new snapshot of session model ``name`` was published (emitted synchronously in the
        thread that called :meth:`publish`; the train panel publishes from the main thread).
    """

    updated = Signal(str)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def publish(self, name: str, model: Any, **info: Any) -> int:
        """Store a snapshot of fine-tuned model ``name``; returns its version number."""
        with self._lock:
            entry = self._sessions.get(name)
            if entry is None:
                entry = self._sessions[name] = _Session(model)
            entry.model = model
            entry.version += 1
            entry.info = dict(info)
            version = entry.version
        self.updated.emit(name)
        return version

    def session_model(self, name: str) -> Any | None:
        with self._lock:
            entry = self._sessions.get(name)
            return None if entry is None else entry.model

    def session_version(self, name: str) -> int:
        with self._lock:
            entry = self._sessions.get(name)
            return 0 if entry is None else entry.version

    def names(self) -> list[str]:
        with self._lock:
            return list(self._sessions)


_REGISTRY: ModelRegistry | None = None


def registry() -> ModelRegistry:
    """The process-wide registry (created in the first caller's thread: the main thread)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = ModelRegistry()
    return _REGISTRY
