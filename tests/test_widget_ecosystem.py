"""The panels' ecosystem features in a real napari viewer: whole-image labels written into the
OME-Zarr the image came from, *Export…* to a bioimage.io package, a package chosen with
*Folder…*, and napari's activity dock (``napari.utils.progress``) for export and training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from _predict_support import reference_labels, rings, tiny_segmenter  # noqa: E402

from napari_muvit.data import open_image  # noqa: E402
from napari_muvit.model.loading import load_model  # noqa: E402

pytestmark = pytest.mark.gui
SIZE = 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return Path(tiny_segmenter().save(tmp_path_factory.mktemp("models") / "tiny"))


def _write_ome(path: Path, version: str = "0.5") -> Path:
    ome_zarr = pytest.importorskip("ome_zarr", reason="needs ome-zarr (the testing extra)")
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    del ome_zarr
    fmt = FormatV05() if version == "0.5" else FormatV04()
    root = zarr.group(store=parse_url(str(path), mode="w", fmt=fmt).store, zarr_format=fmt.zarr_format)
    write_image(rings(SIZE)[0], root, axes="yx", fmt=fmt)
    return path


def _image_hashes(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.relative_to(path).parts[0] != "labels"}


def _panel(make_napari_viewer, model_dir, widget_cls=None):
    from napari_muvit.widgets import PredictWidget

    viewer = make_napari_viewer()
    widget = (widget_cls or PredictWidget)(viewer)
    viewer.window.add_dock_widget(widget)
    if hasattr(widget, "set_model"):
        widget.set_model(model_dir)
        widget.device_combo.setCurrentText("cpu")
        widget.overlap_spin.setValue(0)  # compared with the engine's unblended prediction
    return viewer, widget


def _wait(qtbot, worker, timeout=120_000) -> None:
    if worker is not None and (worker.is_running or worker in type(worker)._worker_set):
        with qtbot.waitSignal(worker.finished, timeout=timeout, raising=False):
            pass
    qtbot.wait(50)


class _Activity:
    """Records the napari.utils.progress bars the panels open (the activity dock's entries)."""

    def __init__(self, monkeypatch) -> None:
        import napari.utils

        self.opened: list[str] = []
        self.closed: list[str] = []
        real = napari.utils.progress
        activity = self

        class Recording(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                activity.opened.append(kwargs.get("desc", ""))

            def close(self):
                activity.closed.append(self.desc)
                super().close()

        monkeypatch.setattr(napari.utils, "progress", Recording)


def test_whole_image_into_the_source_ome_zarr(make_napari_viewer, qtbot, model_dir, tmp_path, monkeypatch) -> None:
    pytest.importorskip("napari_ome_zarr", reason="needs napari-ome-zarr")
    src = _write_ome(tmp_path / "slide.ome.zarr")
    before = _image_hashes(src)
    viewer, widget = _panel(make_napari_viewer, model_dir)
    # an image that did not come from an OME-Zarr: the choice is off
    viewer.add_image(rings(SIZE)[0], name="plain")
    widget.image_layer = viewer.layers["plain"]
    assert widget.state.source_ome == "" and not widget.into_source_check.isEnabled()
    (layer,) = viewer.open(str(src), plugin="napari-ome-zarr")
    widget.image_layer = layer
    assert widget.state.source_ome == str(src.absolute())
    assert widget.into_source_check.isEnabled() and widget.labels_name_edit.isEnabled()
    widget.into_source_check.setChecked(True)
    widget.labels_name_edit.setText("panel")
    widget.labels_name_edit.editingFinished.emit()
    assert widget.state.into_source and widget.state.labels_name == "panel"
    activity = _Activity(monkeypatch)
    worker = widget.predict_image()
    _wait(qtbot, worker)
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    out = src / "labels" / "panel"
    assert widget.state.image_job.out_path == out.absolute()
    assert json.loads((src / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"] == ["panel"]
    assert _image_hashes(src) == before
    model = load_model(model_dir)
    expected = reference_labels(model, open_image(str(src)), np.array([[0, 0], [SIZE, SIZE]]))
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], expected)
    shown = widget.state.image_job.target
    np.testing.assert_array_equal(np.asarray(shown.data[0] if shown.multiscale else shown.data), expected)
    assert any("MuViT" in d for d in activity.opened) and activity.closed
    assert "done" in widget.status
    # the separate-store default stayed untouched
    assert widget.state.output == ""


def test_export_button_and_package_as_model(make_napari_viewer, qtbot, model_dir, tmp_path, monkeypatch) -> None:
    import yaml
    from qtpy.QtWidgets import QFileDialog

    viewer, widget = _panel(make_napari_viewer, model_dir)
    viewer.add_image(rings(256, seed=5)[0], name="mine")
    widget.image_layer = viewer.layers["mine"]
    activity = _Activity(monkeypatch)
    out = tmp_path / "exported.zip"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(tmp_path / "exported"), "")))
    widget.export_button.click()
    _wait(qtbot, widget.export_worker)
    assert out.is_file(), widget.status
    assert "exported" in widget.status
    assert activity.opened == ["MuViT export exported.zip"] and set(activity.closed) == set(activity.opened)
    import zipfile

    with zipfile.ZipFile(out) as archive:
        readme = archive.read("README.md").decode()
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    assert "the image open in napari" in readme
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["class_names"] == ["class 0", "class 1", "class 2"]

    # Folder… takes a package: the predict panel then runs it like the folder it came from
    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(out), "")))
    widget.browse_button.click()
    assert widget.model_choice.value == str(out.absolute())
    qtbot.waitUntil(lambda: "error" not in widget.status.lower() and widget.state.model_info != "", timeout=30_000)
    worker = widget.predict_image(tmp_path / "via_package.zarr")
    _wait(qtbot, worker)
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    direct = tmp_path / "direct.zarr"
    from napari_muvit.engine.api import predict

    predict(np.asarray(viewer.layers["mine"].data), model=model_dir, out=direct, device="cpu")
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "via_package.zarr"), mode="r")["0"][:],
                                  zarr.open_group(str(direct), mode="r")["0"][:])
    # picking config.yaml inside a folder chooses the folder
    monkeypatch.setattr(QFileDialog, "getOpenFileName",
                        staticmethod(lambda *a, **k: (str(model_dir / "config.yaml"), "")))
    widget.browse_button.click()
    assert widget.model_choice.value == str(model_dir.absolute())


def test_fine_tune_panel_reports_to_the_activity_dock_and_exports(make_napari_viewer, qtbot, model_dir, tmp_path, monkeypatch) -> None:
    from napari_muvit.widgets import TrainWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(rings(128, seed=2)[0], name="img")
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert not widget.export_button.isEnabled()
    widget.image_layer = image
    labels = widget.create_annotation_layer()
    labels.data[10:30, 10:30] = 1
    labels.data[80:100, 80:100] = 2
    widget.set_start_model(model_dir)
    widget.steps_spin.setValue(3)
    widget.batch_spin.setValue(2)
    widget.device_combo.setCurrentText("cpu")
    activity = _Activity(monkeypatch)
    worker = widget.train()
    assert worker is not None, widget.status
    _wait(qtbot, worker)
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert activity.opened and activity.opened[0].startswith("MuViT fine-tune")
    assert set(activity.closed) == set(activity.opened[:1])
    assert widget.export_button.isEnabled()
    worker = widget.export(tmp_path / "tuned.zip")
    _wait(qtbot, worker)
    assert (tmp_path / "tuned.zip").is_file(), widget.status
    loaded = load_model(tmp_path / "tuned.zip")
    assert loaded.num_classes == widget.model.num_classes
