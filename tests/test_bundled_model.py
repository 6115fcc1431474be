"""The bundled default segmenter: what the model card says it is, and that it still works.

The score check predicts the held-out Synthetic field of ``experiments/synthetic_table4.py``
(four ring systems never used in training) with the engine; a broken weight file, a wrong
normalisation or a regression in the model or engine code drops it far below the bound.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_muvit.data import PyramidSource, synthetic_field
from napari_muvit.engine.predict import Predictor
from napari_muvit.model import MuViTSegmenter, load_model
from napari_muvit.weights import default_model_path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "synthetic_table4.py"


@pytest.fixture(scope="module")
def bundled() -> MuViTSegmenter:
    return load_model(default_model_path())


def test_bundled_model_is_what_the_card_says(bundled) -> None:
    assert isinstance(bundled, MuViTSegmenter)
    assert list(bundled.levels) == [1, 4]
    assert bundled.class_names == ["background", "outer", "inner"]
    assert list(bundled.label_values) == [0, 1, 2]
    assert bundled.normalization["kind"] == "percentile"
    assert bundled.meta["crop_size"] == 64
    assert sum(p.numel() for p in bundled.parameters()) < 1_000_000  # ships in a few MB


def test_bundled_model_was_trained_with_the_scripts_recipe(bundled) -> None:
    spec = importlib.util.spec_from_file_location("table4_recipe", SCRIPT)
    table4 = importlib.util.module_from_spec(spec)
    sys.modules["table4_recipe"] = table4
    try:
        spec.loader.exec_module(table4)
    finally:
        sys.modules.pop("table4_recipe", None)
    cpu = table4.SCALES["cpu"]
    trained = bundled.meta["train_config"]
    assert [(trained["steps"], trained["lr"])] == [tuple(s) for s in cpu["schedule"]]
    assert trained["encoder_lr_factor"] == cpu["enc_factor"]
    assert trained["crop_size"] == cpu["crop"] and trained["batch_size"] == cpu["batch"]
    assert trained["dense"] and not trained["naive_bbox"]
    enc = bundled.encoder
    assert (enc.dim, enc.num_layers, bundled.head_dim) == (cpu["dim"], cpu["layers"],
                                                           cpu["head_dim"])


def test_bundled_model_segments_held_out_rings(bundled) -> None:
    field = synthetic_field(grid=2, system_size=512, seed=1000)  # the script's test field
    source = PyramidSource(field.pyramid, field.factors)
    pred = Predictor(bundled, device="cpu", amp="off", cache_tiles=0).predict(source).labels
    gt = np.asarray(field.labels)
    dice = []
    for value in (1, 2):
        a, b = pred == value, gt == value
        dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    # docs/model-card.md: outer 0.985, inner 0.980, mDSC 0.982 on this field
    assert min(dice) > 0.95, dice
