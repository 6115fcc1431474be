"""The fine-tune panel's *Quick fit* row (forest levels, colour space) in a real napari viewer
(run under Xvfb): passed to the engine as chosen, remembered, refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_widget_train import folders, rings  # noqa: E402,F401  (the fixtures)

from napari_muvit.widgets.state import TrainState  # noqa: E402

pytestmark = pytest.mark.gui


def _panel(make_napari_viewer, rings):
    from napari_muvit.widgets import TrainWidget

    viewer = make_napari_viewer(show=True)
    grey = viewer.add_image(rings.image, name="rings")
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="MuViT fine-tune")
    train.image_layer = grey
    return viewer, train, grey


def _train_and_wait(train, qtbot):
    job = train.train()
    assert job is not None, train.status
    # the worker's end is signalled to the main thread: wait for its result or its error
    qtbot.waitUntil(lambda: train.job.history is not None or train.status.startswith("error:"),
                    timeout=90_000)
    qtbot.waitUntil(lambda: not train.running, timeout=30_000)
    return train.job


def test_quick_fit_row_passes_the_choices_and_remembers_them(make_napari_viewer, qtbot,
                                                              folders, rings):
    from napari_muvit.data.strokes import simulate_strokes

    viewer, train, grey = _panel(make_napari_viewer, rings)
    levels, colours = train.forest_levels_combo, train.color_space_combo
    assert [levels.itemText(i) for i in range(levels.count())] == ["auto", "level1", "all", "mix"]
    assert [colours.itemText(i) for i in range(colours.count())] == ["auto", "rgb", "lab", "hed"]
    assert (levels.currentText(), colours.currentText()) == ("auto", "auto")
    # behind the New head row's button until asked for
    assert train.quick_fit_row.isHidden()
    train.quick_fit_button.click()
    assert not train.quick_fit_row.isHidden()

    labels = train.create_annotation_layer()
    labels.data[:] = simulate_strokes(rings.labels, strokes_per_class=2, length=15, seed=0)
    labels.refresh()
    train.set_start_model(folders["encoder"])
    train.device_combo.setCurrentText("cpu")
    levels.setCurrentText("level1")
    assert train.state.forest_levels == "level1"
    job = _train_and_wait(train, qtbot)
    assert job.history is not None and job.history["status"] == "finished", train.status
    assert job.request.config.forest_levels == "level1"
    model = job.trainer.model
    assert model.head_options["forest_sub_levels"] == [1] and model.head.forest_levels == 1
    fitted = [e["message"] for e in job.history["events"] if e["kind"] == "quick_fit"]
    assert "the forest reads level 1 (forest levels: level1)" in fitted[-1]
    # remembered with the panel's settings: the next panel opens with it, shown
    assert TrainState.restored().forest_levels == "level1"
    from napari_muvit.widgets import TrainWidget

    again = TrainWidget(viewer)
    viewer.window.add_dock_widget(again, name="MuViT fine-tune 2")
    assert again.forest_levels_combo.currentText() == "level1"
    assert not again.quick_fit_row.isHidden() and again.quick_fit_button.isChecked()

    # a choice that cannot apply: one line in the status, no model published
    colours.setCurrentText("lab")
    job = _train_and_wait(train, qtbot)
    assert job.history is None
    assert train.status.startswith("error: color space 'lab' needs RGB images")
    assert "\n" not in train.status


def test_colour_space_is_remembered_per_image_kind(make_napari_viewer, qtbot, rings):
    viewer, train, grey = _panel(make_napari_viewer, rings)
    rgb = viewer.add_image(np.stack([rings.image] * 3, -1).astype(np.uint8), name="slide",
                           rgb=True)
    train.image_layer = rgb
    train.color_space_combo.setCurrentText("lab")
    train.image_layer = grey
    qtbot.wait(10)
    train.color_space_combo.setCurrentText("auto")  # lab cannot filter a grey image
    train.image_layer = rgb
    qtbot.waitUntil(lambda: train.color_space_combo.currentText() == "lab", timeout=5_000)
    train.image_layer = grey
    qtbot.waitUntil(lambda: train.color_space_combo.currentText() == "auto", timeout=5_000)
    assert TrainState.restored().by_kind["rgb"]["color_space"] == "lab"


def test_an_rgb_slide_gets_its_colours_chosen_and_said_in_one_line(make_napari_viewer, qtbot,
                                                                   folders, rings):
    """On an RGB layer the panel's automatic colours compare CIELAB with the stain densities
    on held-out strokes; the status says the outcome on one line."""
    from napari_muvit.data.strokes import simulate_strokes

    viewer, train, _ = _panel(make_napari_viewer, rings)
    tint = np.array([0.9, 0.6, 1.0])  # a purple, stain-like rendering of the rings
    slide = viewer.add_image((rings.image[..., None] * tint).astype(np.uint8), name="slide",
                             rgb=True)
    train.image_layer = slide
    labels = train.create_annotation_layer()
    labels.data[:] = simulate_strokes(rings.labels, strokes_per_class=3, length=15, seed=0)
    labels.refresh()
    train.set_start_model(folders["encoder"])
    train.device_combo.setCurrentText("cpu")
    assert train.color_space_combo.currentText() == "auto"
    job = _train_and_wait(train, qtbot)
    assert job.history is not None and job.history["status"] == "finished", train.status
    chosen = [e["message"] for e in job.history["events"] if e["kind"] == "color_space"]
    assert len(chosen) == 1 and "held-out strokes: CIELAB 0." in chosen[0], chosen
    space = job.trainer.model.head.color_space
    assert space in ("lab", "hed")
    said = "CIELAB" if space == "lab" else "stain densities"
    assert f"filters on {said}" in train.status and "\n" not in train.status
