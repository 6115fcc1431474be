"""The bundled model folders ship in the current layout: a small config.yaml that builds the
model, the training record in history.json, no paths of the machine they were trained on."""

from __future__ import annotations

import re

import pytest

from napari_muvit.model import load_history, read_config
from napari_muvit.weights import DEFAULT_ENCODER, DEFAULT_SEGMENTER, default_model_path


@pytest.mark.parametrize("kind", [DEFAULT_SEGMENTER, DEFAULT_ENCODER])
def test_bundled_folder_layout(kind: str) -> None:
    folder = default_model_path(kind)
    config = read_config(folder)
    assert "history" not in config["meta"] and "provenance" not in config["meta"]
    assert len((folder / "config.yaml").read_text().splitlines()) < 120  # was ~2,100 lines
    history = load_history(folder)
    assert history is not None and history["provenance"]["steps"] in (4000, 5000)
    for name in ("config.yaml", "history.json"):
        text = (folder / name).read_text()
        # no absolute POSIX or Windows paths (e.g. /work/..., /home/..., C:\...)
        assert not re.search(r"(^|[\s'\"\[])(/[A-Za-z]|[A-Za-z]:\\)", text), (folder / name)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("__")) == [
        "config.yaml", "history.json", "model.safetensors"
    ]
