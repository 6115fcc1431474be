"""Models shipped inside the wheel (nothing is downloaded at run time).

* ``default_segmenter/``: MuViT[1,4] + UNETR trained on the Synthetic rings task (see
  docs/model-card.md); the default model of the predict widget and the CLI.
* ``default_encoder/``: the small encoder pre-trained with the multi-resolution MAE; the default
  starting point of fine-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_muvit.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_SEGMENTER = "default_segmenter"
DEFAULT_ENCODER = "default_encoder"


def default_model_path(kind: str = DEFAULT_SEGMENTER) -> Path:
    """Folder of a bundled model (``"default_segmenter"`` or ``"default_encoder"``)."""
    folder = WEIGHTS_DIR / kind
    if not (folder / "config.yaml").is_file():
        raise CheckpointError(
            f"bundled model {kind!r} is missing from {folder} (a broken installation?); "
            "reinstall napari-muvit or pass a model folder explicitly"
        )
    return folder


def load_default_model(kind: str = DEFAULT_SEGMENTER) -> Any:
    """Load a bundled model (see :func:`default_model_path`)."""
    from napari_muvit.model import load_model

    return load_model(default_model_path(kind))
