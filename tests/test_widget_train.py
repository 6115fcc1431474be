"""TrainWidget in a real napari viewer (run under Xvfb).

Fine-tunes a tiny encoder (dim 48, 1 layer) for a few steps on labels painted into an
annotation layer the widget created, with a validation rectangle, while a PredictWidget in the
same viewer refreshes its view with every published snapshot.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import QTimer

from napari_muvit.data import PyramidSource, synthetic_rings
from napari_muvit.engine.predictor import Predictor
from napari_muvit.model import MuViTEncoder, MuViTSegmenter, load_model

pytestmark = pytest.mark.gui

CROP = 32
STEPS = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("train_models")
    torch.manual_seed(0)
    enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2)
    enc.meta = {"crop_size": CROP}
    encoder = Path(enc.save(root / "encoder"))
    torch.manual_seed(1)
    seg = MuViTSegmenter(
        MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2),
        num_classes=2, head_dim=32, label_values=[1, 2], meta={"crop_size": CROP},
    )
    segmenter = Path(seg.save(root / "segmenter"))
    return {"encoder": encoder, "segmenter": segmenter}


@pytest.fixture(scope="module")
def rings():
    return synthetic_rings(256, seed=5)


class Heartbeat:
    def __init__(self) -> None:
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.last = None
        self.max_gap = 0.0
        self.ticks = 0

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.ticks += 1

    def start(self) -> None:
        self.timer.start()

    def stop(self) -> float:
        self.timer.stop()
        return max(0.0, self.max_gap - 0.010)


def _process(qtbot, ms=30) -> None:
    qtbot.wait(ms)


def test_train_panel_trains_on_painted_labels_and_refreshes_prediction(
    make_napari_viewer, qtbot, folders, rings
):
    from napari_muvit.widgets import PredictWidget, TrainWidget
    from napari_muvit.widgets._models import SESSION, registry

    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(rings.image, name="rings", scale=(2.0, 2.0))
    predict = PredictWidget(viewer)
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(predict, name="MuViT predict")
    viewer.window.add_dock_widget(train, name="MuViT fine-tune", tabify=True)
    viewer.window._qt_window.resize(1100, 800)
    _process(qtbot)

    # predict widget: a first view prediction with some other segmenter
    predict.set_model(folders["segmenter"])
    predict.device_combo.setCurrentText("cpu")
    predict.overlap_spin.setValue(0)  # tiles on the crop grid, compared one by one below
    predict.image_layer = image
    camera = viewer.scene.camera
    camera.zoom = 4.0
    camera.center = (128.0, 128.0)
    worker = predict.predict_view()
    qtbot.waitUntil(lambda: not predict.busy, timeout=60_000)
    _process(qtbot, 100)
    assert predict.labels_layer() is not None

    # train widget: annotation layer created by the widget, labels painted from ground truth
    train.image_layer = image
    labels = train.create_annotation_layer()
    assert labels.data.shape == rings.image.shape and labels.mode == "paint"
    np.testing.assert_allclose(labels.scale, image.scale)
    gt = rings.labels
    labels.data[8:90:3] = gt[8:90:3]  # sparse scribbles (every third row) of both classes
    labels.data[170:250:3] = gt[170:250:3]
    labels.data[96:160, 32:96] = gt[96:160, 32:96]  # fully annotated validation box
    assert {1, 2} <= set(np.unique(gt[96:160, 32:96]))
    labels.refresh()
    shapes = train.create_validation_layer()
    # a rectangle around data pixels 96..159 x 32..95 (shapes share the image's scale)
    shapes.add_rectangles(np.array([[95.5, 31.5], [159.5, 95.5]]))
    np.testing.assert_array_equal(train.validation_region(), [[96, 32], [160, 96]])

    train.set_start_model(folders["encoder"])
    train.classifier_combo.setCurrentText("mlp")  # a fine-tuned head (the forest: below)
    train.class_names_edit.setText("outer, inner")
    train.steps_spin.setValue(STEPS)
    train.batch_spin.setValue(2)
    train.crop_spin.setValue(CROP)
    train.publish_spin.setValue(3)
    train.device_combo.setCurrentText("cpu")

    # machine noise: the longest stall of the idle loop (budget is 100 ms on top of it)
    idle = Heartbeat()
    idle.start()
    qtbot.wait(1000)
    noise = idle.stop()
    whole = Heartbeat()
    whole.start()
    worker = train.train()
    assert worker is not None
    qtbot.waitUntil(lambda: train.job.trainer is not None, timeout=60_000)
    # paint during training: the stroke's bbox reaches the trainer
    labels.paint((60, 60), 2)
    assert train.job.regions_sent >= 1
    # Steady state: after the predict widget switched to the model being trained (a one-time
    # swap of its layer's colormap and data), training continues while every snapshot
    # re-predicts the view.
    qtbot.waitUntil(lambda: predict.model_choice.kind == SESSION, timeout=60_000)
    qtbot.waitUntil(lambda: not predict.busy, timeout=60_000)
    steady = Heartbeat()
    steady.start()
    qtbot.waitUntil(lambda: not train.busy, timeout=120_000)
    qtbot.waitUntil(lambda: not predict.busy, timeout=60_000)
    _process(qtbot, 200)
    qtbot.waitUntil(lambda: not predict.busy, timeout=60_000)
    stall = steady.stop()
    whole_stall = whole.stop()

    history = train.job.history
    assert history is not None and history["status"] == "finished"
    assert len(train.loss_plot.losses) == STEPS
    assert [s for s, _ in train.loss_plot.losses] == list(range(1, STEPS + 1))
    assert all(np.isfinite(v) for _, v in train.loss_plot.losses)
    assert train.loss_plot.dice, "validation Dice was reported"
    assert 0.0 <= train.loss_plot.dice[-1][1] <= 1.0
    assert any(e["kind"] == "labels_updated" for e in history["events"])
    model = train.job.trainer.model
    assert list(model.label_values) == [1, 2]
    assert list(model.class_names) == ["outer", "inner"]

    # the predict widget switched to the model being trained and shows its latest weights
    name = train.job.request.name
    assert predict.model_choice.kind == SESSION and predict.model_choice.value == name
    target = predict.outputs.target(image)
    assert target.identity[1] == registry().session_version(name) >= 2
    final = registry().session_model(name)
    out = np.asarray(predict.labels_layer().data)
    painted = {cell for _, cell in target.painted}
    assert painted
    source = PyramidSource.from_layer_data(image.data, multiscale=False, rgb=False)
    expected = Predictor(final, device="cpu").predict(source).labels
    for r, c in painted:
        sl = (slice(r * CROP, (r + 1) * CROP), slice(c * CROP, (c + 1) * CROP))
        np.testing.assert_array_equal(out[sl], expected[sl])
    # the uncertainty hint (on by default while training) shows the same weights' margins
    from napari_muvit.engine.uncertainty import uncertainty_percent

    assert train.uncertainty_check.isChecked() and predict.state.uncertainty
    unc_layer = predict.uncertainty_layer()
    np.testing.assert_allclose(unc_layer.scale, image.scale)
    unc = np.asarray(unc_layer.data)
    probs = Predictor(final, device="cpu").predict(source, probabilities=True).probs
    expected_unc = uncertainty_percent(probs)
    for r, c in painted:
        sl = (slice(r * CROP, (r + 1) * CROP), slice(c * CROP, (c + 1) * CROP))
        np.testing.assert_array_equal(unc[sl], expected_unc[sl])

    print(f"\nevent-loop stall (ms): training + prediction refresh {stall * 1000:.1f} over "
          f"{steady.ticks} ticks; whole run incl. the one-time model switch "
          f"{whole_stall * 1000:.1f}; idle loop noise {noise * 1000:.1f}")
    assert steady.ticks >= 3  # the loop ran while training (how often depends on the machine)
    # Stalls are printed, not asserted: a busy machine must not fail a test; the 100 ms goal is
    # measured by benchmarks/bench_ui.py.


def test_default_forest_head_answers_at_once_and_refits_on_new_strokes(
    make_napari_viewer, qtbot, folders, rings
):
    """The loop a user runs by default: paint, Train, the view shows the forest's answer (no
    fine-tuning steps); paint more, Train again: the forest is refitted on all strokes."""
    from napari_muvit.data.strokes import simulate_strokes
    from napari_muvit.widgets import PredictWidget, TrainWidget
    from napari_muvit.widgets._models import SESSION, registry

    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(rings.image, name="rings")
    predict = PredictWidget(viewer)
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(predict, name="MuViT predict")
    viewer.window.add_dock_widget(train, name="MuViT fine-tune", tabify=True)
    predict.device_combo.setCurrentText("cpu")
    predict.image_layer = image
    viewer.scene.camera.zoom = 1.5
    viewer.scene.camera.center = (128.0, 128.0)
    train.image_layer = image
    labels = train.create_annotation_layer()
    # rings.labels: 0 background, 1 outer, 2 inner; strokes paint value + 1
    labels.data[:] = simulate_strokes(rings.labels, strokes_per_class=2, length=15, seed=0)
    labels.refresh()
    train.set_start_model(folders["encoder"])
    assert train.classifier_combo.currentText() == "forest"
    train.device_combo.setCurrentText("cpu")

    assert train.train() is not None
    qtbot.waitUntil(lambda: train.job.history is not None, timeout=60_000)
    try:
        qtbot.waitUntil(lambda: predict.model_choice.kind == SESSION, timeout=90_000)
    except Exception:
        raise AssertionError(
            f"the predict panel did not switch: follows {predict.state.follow_session!r}, "
            f"shows {predict.model_choice}, train status {train.status!r}, predict status "
            f"{predict.status!r}, session models {registry().names()}, train panel alive "
            f"{train.alive}, predict panel alive {predict.alive}, run "
            f"{train.job.request.name!r} at version "
            f"{registry().session_version(train.job.request.name)}") from None
    qtbot.waitUntil(lambda: not predict.busy and predict.labels_layer() is not None,
                    timeout=60_000)
    history = train.job.history
    assert history["status"] == "finished" and history["step"] == 0
    assert any(e["kind"] == "quick_fit" for e in history["events"])
    # a forest has no loss to report: the status says what was fitted (never "loss nan")
    assert train.status.startswith("finished in ") and "painted pixels" in train.status
    assert "nan" not in train.status
    first = registry().session_model(train.job.request.name)
    assert first.head.forest.num_trees > 0
    shown = np.asarray(predict.labels_layer().data)
    source = PyramidSource.from_layer_data(image.data, multiscale=False, rgb=False)
    # the panel's default overlap (auto: blended, a quarter of the tile for a forest)
    expected = Predictor(first, device="cpu", overlap=None).predict(source).labels
    visible = shown > 0
    assert visible.mean() > 0.5, "the view shows the forest's answer"
    np.testing.assert_array_equal(shown[visible], expected[visible])

    # more strokes, Train again: a refit (not gradient steps on a forest)
    labels.data[:] = np.maximum(
        labels.data, simulate_strokes(rings.labels, strokes_per_class=4, length=15, seed=1))
    labels.refresh()
    train.set_start_model(folders["encoder"])
    second = train.train()
    assert second is not None and train.job.history is None
    qtbot.waitUntil(lambda: train.job.history is not None, timeout=60_000)
    assert train.job.history["status"] == "finished"
    painted = int((np.asarray(labels.data) > 0).sum())
    fitted = [e for e in train.job.history["events"] if e["kind"] == "quick_fit"]
    assert fitted and f"{painted} painted pixels" in fitted[-1]["message"]


def test_the_panel_is_busy_until_the_end_of_training_reached_it(
    make_napari_viewer, qtbot, folders, rings
):
    """The worker ends a moment before the panel handles its end: a script that waits for
    ``busy`` to fall reads the final status (never a stale step report)."""
    from napari_muvit.data.strokes import simulate_strokes
    from napari_muvit.widgets import TrainWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(rings.image, name="rings")
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="MuViT fine-tune")
    train.image_layer = image
    labels = train.create_annotation_layer()
    labels.data[:] = simulate_strokes(rings.labels, strokes_per_class=2, length=15, seed=0)
    labels.refresh()
    train.set_start_model(folders["encoder"])
    train.device_combo.setCurrentText("cpu")
    # the run's end (its result, then its finish) is held back on its way to the panel
    held: list = []
    handlers = {name: getattr(train, name) for name in ("_on_returned", "_on_finished")}
    train._on_returned = lambda *args: held.append(("_on_returned", args))
    train._on_finished = lambda *args: held.append(("_on_finished", args))
    assert train.train() is not None and train.busy
    qtbot.waitUntil(lambda: len(held) == 2, timeout=60_000)
    assert train.job.done.is_set()  # the worker is done...
    assert train.busy and not train.job.ended  # ...but its end has not reached the panel
    assert not train.status.startswith("finished")
    for name, args in held:
        handlers[name](*args)
    assert not train.busy
    assert train.job.ended and train.status.startswith("finished in ")
    assert train.train_button.isEnabled() and not train.stop_button.isEnabled()
    # a panel closed before its run's end arrived is not busy (that end never will arrive)
    train.job.ended = False
    assert train.busy
    train.close_widget()
    assert not train.busy


def test_train_save_and_errors(make_napari_viewer, qtbot, folders, rings, tmp_path):
    from napari_muvit.widgets import TrainWidget

    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(rings.image, name="rings")
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train)
    train.image_layer = image

    # no labels layer: a clear error, nothing started
    assert train.train() is None
    assert "Labels layer" in train.status
    # annotations of big images live in zarr on disk: painting writes through, survives
    stored = train.create_annotation_layer(store=tmp_path / "annotations.zarr")
    assert "zarr" in type(stored.data).__module__
    stored.paint((30, 40), 2)
    import zarr

    reopened = zarr.open_array(str(tmp_path / "annotations.zarr"), mode="r")
    assert reopened[30, 40] == 2 and reopened.shape == rings.image.shape
    viewer.layers.remove(stored)

    labels = train.create_annotation_layer()
    # nothing painted: the engine's message reaches the user
    train.set_start_model(folders["segmenter"])
    train.steps_spin.setValue(2)
    train.batch_spin.setValue(2)
    train.device_combo.setCurrentText("cpu")
    worker = train.train()
    qtbot.waitUntil(lambda: not train.busy, timeout=60_000)
    _process(qtbot, 50)
    assert "paint at least a few strokes" in train.status

    # continue training the segmenter on painted labels, stop early, save, reload
    labels.data[20:60, 20:60] = rings.labels[20:60, 20:60]
    labels.data[100:104, 0:256] = 1
    train.steps_spin.setValue(200)
    worker = train.train()
    qtbot.waitUntil(lambda: train.job.steps_seen >= 2, timeout=60_000)
    train.stop()
    qtbot.waitUntil(lambda: not train.busy, timeout=60_000)
    _process(qtbot, 50)
    assert train.job.history["status"] == "cancelled"
    assert 2 <= train.job.history["step"] < 200
    worker = train.save(tmp_path / "finetuned")
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        pass
    _process(qtbot, 50)
    saved = load_model(tmp_path / "finetuned")
    assert isinstance(saved, MuViTSegmenter)
    assert saved.meta["crop_size"] == CROP
    assert saved.meta["trained_steps"] == train.job.history["step"]
    assert "saved to" in train.status


def test_a_failing_panel_does_not_keep_others_from_following_a_run(
    make_napari_viewer, qtbot, folders, rings
):
    """The session registry's signal stops at the first callback that raises: one panel that
    fails (its window half gone) must not keep the others from switching to a run's model."""
    from napari_muvit.widgets import PredictWidget
    from napari_muvit.widgets._models import SESSION, registry

    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(rings.image, name="rings")
    from napari_muvit.widgets import TrainWidget

    # connected to the registry before the healthy panel: a fine-tune panel listens too
    stale_train = TrainWidget(viewer)
    broken, healthy = PredictWidget(viewer), PredictWidget(viewer)
    for panel in (broken, healthy):
        viewer.window.add_dock_widget(panel)
        panel.device_combo.setCurrentText("cpu")
        panel.image_layer = image

    class DeletedCombo:
        def count(self):
            raise RuntimeError("wrapped C/C++ object of type QComboBox has been deleted")

    real_combo, broken.model_combo = broken.model_combo, DeletedCombo()
    real_start, stale_train.start_combo = stale_train.start_combo, DeletedCombo()
    name = "robustness run"
    broken.follow_session(name)
    healthy.follow_session(name)
    registry().publish(name, load_model(folders["segmenter"]), step=1)
    qtbot.waitUntil(lambda: healthy.model_choice.kind == SESSION, timeout=30_000)
    assert healthy.model_choice.value == name
    qtbot.waitUntil(lambda: not healthy.busy, timeout=60_000)
    broken.model_combo = real_combo
    stale_train.start_combo = real_start
    stale_train.close_widget()
