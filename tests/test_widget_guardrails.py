"""Guardrails of the annotation loop in a real napari viewer (issue 13; run under Xvfb).

* A request that is refused or cancelled never clears labels already shown: a view refused
  after a model switch, a view cancelled before the new model's first tile, a model (or a
  training snapshot) that cannot run on the image, a whole image refused by its store.
* A failed *Save as…* says so (folder and reason) and leaves the previous model folder intact.
* The model remembered from a session is kept per image kind (grayscale / RGB / n-channel);
  one that cannot run on the current image falls back to the bundled model with a short note.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from _predict_support import tiny_segmenter

from napari_muvit.data import PyramidSource, synthetic_rings
from napari_muvit.engine.predictor import Predictor
from napari_muvit.model import load_model

pytestmark = pytest.mark.gui

TILE = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guard_models")
    return {
        "a": Path(tiny_segmenter(seed=0).save(root / "a")),
        "b": Path(tiny_segmenter(seed=1).save(root / "b")),
        "rgb": Path(tiny_segmenter(in_channels=3, seed=2).save(root / "rgb")),
    }


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_rings(256, seed=4).image


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    from napari.utils import notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(msg))
    return shown


def _panel(make_napari_viewer, data, model, **kwargs):
    from napari_muvit.widgets import PredictWidget

    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(data, name="img", **kwargs)
    panel = PredictWidget(viewer)
    viewer.window.add_dock_widget(panel)
    viewer.window._qt_window.resize(1100, 800)
    panel.device_combo.setCurrentText("cpu")
    panel.overlap_spin.setValue(0)  # tiles on the crop grid: compared with the engine's
    panel.image_layer = layer
    if model is not None:
        panel.set_model(model)
    viewer.reset_view()
    return viewer, layer, panel


def _run(qtbot, panel, worker) -> None:
    if worker is not None:
        with qtbot.waitSignal(worker.finished, timeout=60_000, raising=False):
            pass
    qtbot.waitUntil(lambda: not panel.busy, timeout=60_000)
    qtbot.wait(50)


def _expected(model_dir: Path, data: np.ndarray, rgb: bool = False) -> np.ndarray:
    source = PyramidSource.from_layer_data(data, multiscale=False, rgb=rgb)
    return Predictor(load_model(model_dir), device="cpu").predict(source).labels


# ---------------------------------------------------------------------------------------------
# keep existing labels when a request is refused
# ---------------------------------------------------------------------------------------------


def test_model_switch_keeps_labels_until_the_new_models_first_tile(
    make_napari_viewer, qtbot, models, image
):
    viewer, layer, panel = _panel(make_napari_viewer, image, models["a"])
    _run(qtbot, panel, panel.predict_view())
    labels = panel.labels_layer()
    shown = np.asarray(labels.data).copy()
    np.testing.assert_array_equal(shown, _expected(models["a"], image))

    # another model, then a live view far beyond its budget: refused, nothing cleared
    panel.set_model(models["b"])
    panel.cap_spin.setValue(1)  # 64 new tiles > 10 x 1
    _run(qtbot, panel, panel.set_live(True))
    assert "zoomed out too far" in panel.status
    panel.set_live(False)
    np.testing.assert_array_equal(np.asarray(labels.data), shown)
    assert panel.labels_layer() is labels

    # the new model's view cancelled after the layer was prepared, before any tile: kept
    prepare = panel.outputs.prepare

    def prepare_then_cancel(*args, **kwargs):
        target = prepare(*args, **kwargs)
        panel.cancel()
        return target

    panel.outputs.prepare = prepare_then_cancel
    _run(qtbot, panel, panel.predict_view())
    panel.outputs.prepare = prepare
    assert panel.state.view_job.token.cancelled
    np.testing.assert_array_equal(np.asarray(labels.data), shown)

    # once the new model's tiles come, none of the old model's survives
    viewer.reset_view()  # (long status lines may have widened the dock)
    _run(qtbot, panel, panel.predict_view())
    np.testing.assert_array_equal(np.asarray(labels.data), _expected(models["b"], image))
    assert "view done: 64 tiles" in panel.status


def test_a_model_or_snapshot_that_cannot_run_keeps_labels(
    make_napari_viewer, qtbot, models, image, errors
):
    from napari_muvit.widgets._models import registry

    viewer, layer, panel = _panel(make_napari_viewer, image, models["a"])
    _run(qtbot, panel, panel.predict_view())
    labels = panel.labels_layer()
    shown = np.asarray(labels.data).copy()
    assert shown.all()

    # the user picks a 3-channel model for this grayscale image: an error, labels kept
    panel.set_model(models["rgb"])
    _run(qtbot, panel, panel.predict_view())
    assert errors and "expects 3" in errors[-1]
    np.testing.assert_array_equal(np.asarray(labels.data), shown)

    # a fine-tuning snapshot that cannot run on it: the refresh fails, the labels stay
    panel.set_model(models["a"])
    errors.clear()
    panel.follow_session("guard-run")
    registry().publish("guard-run", tiny_segmenter(in_channels=3), step=1)
    qtbot.waitUntil(lambda: bool(errors), timeout=60_000)
    _run(qtbot, panel, None)
    assert "expects 3" in errors[-1]
    assert panel.labels_layer() is labels
    np.testing.assert_array_equal(np.asarray(labels.data), shown)


def test_whole_image_refused_keeps_the_previous_store_layer(
    make_napari_viewer, qtbot, models, image, errors, tmp_path
):
    viewer, layer, panel = _panel(make_napari_viewer, image, models["a"])
    out = tmp_path / "img_muvit.zarr"
    _run(qtbot, panel, panel.predict_image(out))
    stored = panel.state.image_job.target
    before = np.asarray(stored.data).copy()
    assert before.all()

    layer.data = image[::-1].copy()  # the same store again: refused without Overwrite
    _run(qtbot, panel, panel.predict_image(out))
    assert errors and "img_muvit.zarr" in errors[-1] and "already exists" in errors[-1]
    assert stored in viewer.layers
    np.testing.assert_array_equal(np.asarray(stored.data), before)


# ---------------------------------------------------------------------------------------------
# a failed "Save as…" says so; the previous model folder stays intact
# ---------------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_failed_save_says_so_and_keeps_the_previous_model(
    make_napari_viewer, qtbot, errors, tmp_path, monkeypatch
):
    import errno

    import safetensors.torch
    from qtpy.QtWidgets import QFileDialog, QMessageBox

    from napari_muvit.widgets import TrainWidget

    viewer = make_napari_viewer()
    panel = TrainWidget(viewer)
    panel.state.model = tiny_segmenter(seed=3)  # as if a snapshot had been published

    def save(folder, overwrite=False):
        panel.save(folder, overwrite=overwrite)
        qtbot.waitUntil(lambda: not panel.status.startswith("saving"), timeout=30_000)

    good = tmp_path / "model"
    save(good)
    assert panel.status == f"saved to {good}"
    first = _files(good)

    # a target inside a regular file: one line naming the folder and the reason
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    save(blocker / "model")
    assert panel.status == f"not saved to {blocker / 'model'}: {blocker} is a file, not a folder"
    assert errors and "saved to" not in errors[-1].replace("not saved to", "")

    # the disk fills up while replacing the model: it says so, the old model is intact
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    panel.state.model = tiny_segmenter(seed=4)
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    save(good, overwrite=True)
    assert panel.status.startswith(f"not saved to {good}: ")
    assert "no space" in panel.status.lower() and "\n" not in panel.status
    assert _files(good) == first
    assert load_model(good).state_dict().keys() == tiny_segmenter(seed=3).state_dict().keys()
    monkeypatch.undo()
    monkeypatch.setenv("NAPARI_MUVIT_SETTINGS_DIR", str(tmp_path / "settings"))

    # Save as… into a folder holding a model asks first; No leaves it as it is
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(good))
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.No)
    panel._save_dialog()
    qtbot.wait(200)
    assert _files(good) == first
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    (good / "NOTES.txt").write_text("mine")
    panel._save_dialog()
    qtbot.waitUntil(lambda: panel.status.startswith("saved to"), timeout=30_000)
    replaced = _files(good)
    assert replaced["model.safetensors"] != first["model.safetensors"]
    assert replaced["NOTES.txt"] == b"mine"


# ---------------------------------------------------------------------------------------------
# settings remembered per image kind
# ---------------------------------------------------------------------------------------------


def test_image_kinds_and_per_kind_memory_without_qt():
    from napari_muvit.widgets._models import BUNDLED, FOLDER, SESSION, ModelChoice
    from napari_muvit.widgets.state import PredictState, image_kind

    assert image_kind((512, 512), rgb=False) == "grayscale"
    assert image_kind((512, 512, 3), rgb=True) == "rgb"
    assert image_kind((512, 512, 4), rgb=True) == "rgba"
    assert image_kind((2, 512, 512), rgb=False) == "2-channel"
    assert image_kind((40, 512, 512), rgb=False) == "grayscale"  # a stack of planes

    state = PredictState()
    state.model = ModelChoice(FOLDER, "/models/he")
    state.remember_kind("rgb")
    state.model = ModelChoice(SESSION, "run #1")  # lives only in this session: not stored
    state.remember_kind("grayscale")
    assert state.by_kind == {"rgb": {"model": "folder:/models/he"}}
    state.save()
    again = PredictState.restored()
    assert again.recall_kind("grayscale") == []
    assert again.recall_kind("rgb") == ["model"]
    assert again.model == ModelChoice(FOLDER, "/models/he")
    again.by_kind = {"rgb": {"model": 5}, "2-channel": {"model": "bundled"}}  # a stale file
    assert again.recall_kind("rgb") == []
    assert again.recall_kind("2-channel") == ["model"] and again.model == ModelChoice(BUNDLED)


def test_models_are_remembered_per_image_kind(make_napari_viewer, qtbot, models, image, errors):
    from napari_muvit.widgets import PredictWidget
    from napari_muvit.widgets._models import BUNDLED, ModelChoice
    from napari_muvit.widgets._settings import load_section, save_section

    rgb = np.stack([image, image[::-1], image[:, ::-1]], axis=-1)
    # session 1: the 3-channel model for an RGB slide, model a for a grayscale image
    viewer = make_napari_viewer()
    slide = viewer.add_image(rgb, name="slide", rgb=True)
    panel = PredictWidget(viewer)
    panel.device_combo.setCurrentText("cpu")
    assert panel.image_kind == "rgb"
    panel.set_model(models["rgb"])
    gray = viewer.add_image(image, name="gray")
    panel.image_layer = gray
    panel.set_model(models["a"])
    panel.image_layer = slide  # back to the slide: its model again
    assert panel.model_choice.value == str(models["rgb"])
    panel.close_widget()  # the session ends with the RGB model selected
    by_kind = load_section("predict", {"by_kind": {}})["by_kind"]
    assert by_kind == {"rgb": {"model": f"folder:{models['rgb']}"},
                       "grayscale": {"model": f"folder:{models['a']}"}}

    # session 2 opens a grayscale image: the grayscale model, and it predicts
    viewer2 = make_napari_viewer()
    viewer2.add_image(image, name="sample")
    second = PredictWidget(viewer2)
    assert second.model_choice.value == str(models["a"])
    _run(qtbot, second, second.predict_view())
    assert not errors and np.asarray(second.labels_layer().data).all()

    # settings of an older version (one model for all images, the 3-channel one): on a
    # grayscale image it falls back to the bundled model with a note, not an error
    save_section("predict", {"model": f"folder:{models['rgb']}", "device": "cpu"})
    viewer3 = make_napari_viewer()
    viewer3.add_image(image, name="sample")
    third = PredictWidget(viewer3)
    _run(qtbot, third, third.predict_view())  # may start before the model is loaded
    qtbot.waitUntil(lambda: third.model_choice == ModelChoice(BUNDLED), timeout=30_000)
    _run(qtbot, third, None)
    qtbot.waitUntil(lambda: third.labels_layer() is not None, timeout=60_000)
    _run(qtbot, third, None)
    assert not errors
    assert "not used" in third.status or "view done" in third.status
    assert third.labels_layer().metadata["napari_muvit"]["source_layer"] == "sample"


def test_train_start_model_is_remembered_per_image_kind(make_napari_viewer, models, image):
    from napari_muvit.widgets import TrainWidget
    from napari_muvit.widgets._models import BUNDLED, FOLDER, ModelChoice

    viewer = make_napari_viewer()
    slide = viewer.add_image(np.stack([image] * 3, axis=-1), name="slide", rgb=True)
    panel = TrainWidget(viewer)
    panel.set_start_model(models["rgb"])
    gray = viewer.add_image(image, name="gray")
    panel.image_layer = gray
    panel.set_start_model(BUNDLED)
    panel.image_layer = slide
    assert panel.start_choice == ModelChoice(FOLDER, str(models["rgb"]))
    assert panel.start_combo.currentData() == panel.start_choice  # the form shows it
    panel.image_layer = gray
    assert panel.start_choice == ModelChoice(BUNDLED)
    panel.image_layer = slide
    panel.close_widget()  # the session ends with the RGB start model

    # a next session on an image kind never seen: the last choice, as before
    viewer2 = make_napari_viewer()
    viewer2.add_image(np.stack([image, image]), name="two channels")
    second = TrainWidget(viewer2)
    assert second.image_kind == "2-channel"
    assert second.start_choice == ModelChoice(FOLDER, str(models["rgb"]))
    second.close_widget()
    # a next session on a grayscale image starts from what was used on grayscale images
    viewer3 = make_napari_viewer()
    viewer3.add_image(image, name="sample")
    third = TrainWidget(viewer3)
    assert third.start_choice == ModelChoice(BUNDLED)
