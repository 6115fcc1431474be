"""The uncertainty layer (active-learning hint) in a real napari viewer (issue 13; Xvfb).

A model whose classes 1 and 2 have identical output weights cannot decide between them: the
layer must be 100 % wherever it predicts class 1 (class 2 never wins the tie), lower where class
3 wins, equal to the engine's blended probabilities turned into 1 - margin everywhere, aligned
with the labels, and refreshed with every snapshot of a fine-tuning run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import torch
from _predict_support import tiny_segmenter

from napari_muvit.data import PyramidSource, synthetic_rings
from napari_muvit.engine.predictor import Predictor
from napari_muvit.engine.uncertainty import uncertainty_percent

pytestmark = pytest.mark.gui

SCALE = (0.5, 0.75)
TRANSLATE = (10.0, -20.0)


def tied_segmenter(seed: int = 5, shift: float = 1.3):
    """Classes 1 and 2 share their output weights (wherever one of them wins, it is a tie);
    class 3 has the opposite logit. ``shift`` (the median class-1 logit of seed 5 on the
    test image) splits the image about evenly between the tie and class 3."""
    seg = tiny_segmenter(seed=seed)
    with torch.no_grad():
        out = seg.head.out
        out.weight[1] = out.weight[0]
        out.weight[2] = -out.weight[0]
        out.weight.mul_(20.0)  # sharp: where class 3 wins by a margin, it is sure
        out.bias.copy_(torch.tensor([shift, shift, -shift]))
    return seg


def _reference(model, image: np.ndarray, overlap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    source = PyramidSource.from_layer_data(image, multiscale=False, rgb=False)
    sink = Predictor(model, device="cpu", overlap=overlap).predict(source, probabilities=True)
    return sink.labels, uncertainty_percent(sink.probs)


def test_uncertainty_layer_is_high_where_the_model_is_undecided(
    make_napari_viewer, qtbot, tmp_path
):
    from napari_muvit.widgets import PredictWidget
    from napari_muvit.widgets._models import registry

    image = synthetic_rings(256, seed=6).image
    model = tied_segmenter()
    folder = Path(model.save(tmp_path / "tied"))
    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(image, name="img", scale=SCALE, translate=TRANSLATE)
    panel = PredictWidget(viewer)
    viewer.window.add_dock_widget(panel)
    viewer.window._qt_window.resize(1100, 800)
    panel.device_combo.setCurrentText("cpu")
    panel.set_model(folder)
    panel.overlap_spin.setValue(8)  # blended probabilities across tile borders
    assert not panel.uncertainty_check.isChecked()  # off by default in the predict panel
    panel.uncertainty_check.setChecked(True)
    viewer.reset_view()
    worker = panel.predict_view()
    with qtbot.waitSignal(worker.finished, timeout=60_000, raising=False):
        pass
    qtbot.waitUntil(lambda: not panel.busy, timeout=60_000)
    qtbot.wait(100)

    labels_layer, unc_layer = panel.labels_layer(), panel.uncertainty_layer()
    assert unc_layer is not None and type(unc_layer).__name__ == "Image"
    assert unc_layer.colormap.name == "magma" and list(unc_layer.contrast_limits) == [0, 100]
    assert str(unc_layer.blending) == "additive"
    np.testing.assert_allclose(unc_layer.scale, layer.scale)
    np.testing.assert_allclose(unc_layer.translate, layer.translate)
    np.testing.assert_allclose(unc_layer.scale, labels_layer.scale)
    labels, unc = np.asarray(labels_layer.data), np.asarray(unc_layer.data)
    assert unc.shape == labels.shape == image.shape and unc.dtype == np.uint8

    ref_labels, ref_unc = _reference(load(folder), image, overlap=8)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(unc, ref_unc)
    tie, decided = labels == 1, labels == 3
    assert tie.sum() > 1000 and decided.sum() > 1000 and not (labels == 2).any()
    assert (unc[tie] == 100).all()  # undecided: as high as it gets
    assert unc[decided].mean() < 80  # where class 3 wins, the model is surer
    assert (unc[decided] < 20).sum() > 1000

    # the fine-tune loop: every snapshot refreshes the layer with its own probabilities
    panel.follow_session("unc-run")
    for step, snapshot in ((1, tied_segmenter(seed=7)), (2, tied_segmenter(seed=8))):
        registry().publish("unc-run", snapshot, step=step)
        _, expected = _reference(snapshot, image, overlap=8)

        def refreshed(expected=expected) -> bool:
            current, target = panel.uncertainty_layer(), panel.outputs.target(layer)
            if current is None or target is None or panel.busy:
                return False
            step = panel.predictor.step
            mask = np.zeros(image.shape, bool)  # the tiles of this snapshot's view
            for r, c in target.painted_cells():
                mask[r * step:(r + 1) * step, c * step:(c + 1) * step] = True
            return (mask.sum() > image.size // 2
                    and np.array_equal(np.asarray(current.data)[mask], expected[mask]))

        qtbot.waitUntil(refreshed, timeout=60_000)


def load(folder: Path):
    from napari_muvit.model import load_model

    return load_model(folder)
