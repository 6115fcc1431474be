"""Annotation-loop guardrails in a real napari viewer (issue 13; run under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from _predict_support import tiny_segmenter

pytestmark = pytest.mark.gui


def test_labels_choice_never_offers_predictions_or_ground_truth(make_napari_viewer):
    from napari_muvit.widgets import TrainWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.float32), name="img")
    viewer.add_labels(np.zeros((64, 64), np.uint8), name="img MuViT",
                      metadata={"napari_muvit": {"source_layer": "other image"}})
    viewer.add_labels(np.ones((64, 64), np.uint8), name="ground truth",
                      metadata={"napari_muvit": {"ground_truth": True}})
    panel = TrainWidget(viewer)
    combo = panel.labels_combo
    # before the fix the combo fell back to these layers when there were no annotations
    assert [combo.itemText(i) for i in range(combo.count())] == []
    viewer.add_labels(np.zeros((64, 64), np.uint8), name="strokes")
    assert [combo.itemText(i) for i in range(combo.count())] == ["strokes"]
    viewer.layers.remove("strokes")  # after a deletion: still nothing, not the ground truth
    assert [combo.itemText(i) for i in range(combo.count())] == []


def test_sample_ground_truth_is_marked():
    from napari_muvit.data.samples import synthetic_sample
    from napari_muvit.widgets.outputs import is_ground_truth

    _, (data, kwargs, kind) = synthetic_sample(size=512)
    assert kind == "labels"

    class Layer:
        metadata = kwargs["metadata"]

    assert is_ground_truth(Layer())


def test_prediction_colours_match_annotation_colours(make_napari_viewer):
    from napari_muvit.widgets._layers import labels_colormap

    viewer = make_napari_viewer()
    painted = viewer.add_labels(np.zeros((8, 8), np.uint8), name="strokes")
    cmap = labels_colormap([1, 2, 3, 4], None, ["a", "b", "c", "d"])
    values = np.array([1, 2, 3, 4])
    np.testing.assert_allclose(cmap.map(values), painted.colormap.map(values), atol=1e-6)


def test_every_training_snapshot_refreshes_a_view_never_predicted(make_napari_viewer, qtbot):
    # the panel follows a fine-tuning run: its snapshots predict the view even though the
    # user never pressed "Predict view" (before: only a view predicted earlier was refreshed)
    from napari_muvit.widgets import PredictWidget
    from napari_muvit.widgets._models import registry

    viewer = make_napari_viewer()
    rgb = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    viewer.add_image(rgb, name="slide", rgb=True)
    panel = PredictWidget(viewer)
    panel.follow_session("annot-run")
    seg = tiny_segmenter(in_channels=3)
    registry().publish("annot-run", seg, step=1)

    def predicted() -> bool:
        return any(layer.name.startswith("slide") and type(layer).__name__ == "Labels"
                   and np.asarray(layer.data).any() for layer in viewer.layers)

    qtbot.waitUntil(predicted, timeout=60_000)
